"""Inductor's partitioner, followed by what only the partitioned graphs can decide.

The joint-graph passes decide what the backward may read; `min_cut_rematerialization_partition`
then decides what crosses from forward to backward. `store_saved_masks_as_bytes` acts on that
saved set itself: a boolean mask the forward saves goes across as uint8.

Why: Inductor's C++ backend stores and loads bool tensors through a slow masked-vector path
(measured here on 512k elements: a compare-and-store kernel took 3 ms writing bool and 0.06 ms
writing uint8 through float; a `where` took 1.06 ms reading a bool mask and 0.06 ms reading
uint8 through float). Once memsave stops the backward from reading a ReLU's output, the
partitioner saves the ReLU's mask instead, and CPU forward steps got ~50% slower for it.
Bytes and bools are the same size, so the saved bytes do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from .config import MemsaveConfig

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger(__name__)


class MemsavePartitioner(CustomPartitionerFn):
    """Inductor's `custom_partitioner_fn`: the min-cut partitioner, then `store_saved_masks_as_bytes`."""

    def __init__(self, config: MemsaveConfig, uuid: str) -> None:
        self.config = config
        self._uuid = uuid

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        forward, backward = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        if store_saved_masks_as_bytes(forward, backward):
            forward.recompile()
            backward.recompile()
        return forward, backward

    def uuid(self) -> str:
        return self._uuid


def store_saved_masks_as_bytes(forward: fx.GraphModule, backward: fx.GraphModule) -> int:
    """Save every bool tensor the forward hands to the backward as uint8; return how many."""
    output = forward.graph.output_node()
    outputs = list(output.args[0])
    descs = output.meta.get("desc") or [None] * len(outputs)
    backward_inputs = {node.name: node for node in backward.graph.find_nodes(op="placeholder")}
    converted = 0
    for position, (saved, desc) in enumerate(zip(outputs, descs)):
        if not isinstance(desc, SavedForBackwardsAOTOutput) or not _is_bool_tensor(saved):
            continue
        received = backward_inputs.get(saved.name)
        if received is None or not _is_bool_tensor(received):
            continue
        with forward.graph.inserting_before(output):
            # Through float: Inductor vectorises float -> uint8, not bool -> uint8.
            as_float = forward.graph.call_function(prims.convert_element_type.default, (saved, torch.float32))
            as_bytes = forward.graph.call_function(prims.convert_element_type.default, (as_float, torch.uint8))
        _set_value(as_float, saved.meta["val"], torch.float32)
        _set_value(as_bytes, saved.meta["val"], torch.uint8)
        outputs[position] = as_bytes

        _set_value(received, received.meta["val"], torch.uint8)
        # Through float again: a uint8 -> bool load is as slow as the bool store.
        with backward.graph.inserting_after(_last_placeholder(backward.graph)):
            received_float = backward.graph.call_function(prims.convert_element_type.default, (received, torch.float32))
        with backward.graph.inserting_after(received_float):
            as_bool = backward.graph.call_function(aten.ne.Scalar, (received_float, 0))
        _set_value(received_float, received.meta["val"], torch.float32)
        _set_value(as_bool, received.meta["val"], torch.bool)
        received.replace_all_uses_with(as_bool, delete_user_cb=lambda user: user is not received_float)
        converted += 1
    if converted:
        output.args = (tuple(outputs), *output.args[1:])
        log.debug("saved %d boolean masks as uint8", converted)
    return converted


def _is_bool_tensor(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _set_value(node: fx.Node, like: torch.Tensor, dtype: torch.dtype) -> None:
    with detect_fake_mode([like]):
        node.meta["val"] = torch.empty_strided(like.shape, like.stride(), dtype=dtype, device=like.device)
    node.meta.pop("tensor_meta", None)  # would describe the old dtype


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return list(graph.find_nodes(op="placeholder"))[-1]
