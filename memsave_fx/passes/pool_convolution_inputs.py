"""Keep a k-pooled copy of a convolution's input for its weight gradient (`pool_activations=k`).

Barley & Fröning (arXiv 2409.11902). The forward and the input gradient stay exact. The weight
gradient, the only gradient that reads the input's data, reads instead the input average-pooled
over k-wide windows in every spatial dimension (k×k in 2d) and upsampled back, nearest, to the
input's size; the backward then keeps 1/k^d of the input. Sizes that k does not divide get a
last, partial window, averaged over the elements it covers.

Convolutions reading one input share one pooled copy. The pass applies only where the input
is read by the backward for nothing but convolution weight gradients.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils.checkpoint import CheckpointPolicy

from ..analysis import ARG_PURPOSES, BACKWARD_READS, IS_BACKWARD, SAVED_AS, Decision, ReadPurpose, SavedAs, display_name
from .. import _compat
from ..config import MemsaveConfig
from .base import Rewrite, insert_call

aten = torch.ops.aten
log = logging.getLogger(__name__)

_CONVOLUTION_BACKWARD = aten.convolution_backward.default


def pool_convolution_inputs(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    k = config.pool_activations
    if k == 1:
        return []
    pooled_copies: dict[fx.Node, fx.Node] = {}  # one per input, shared by the convolutions reading it
    rewrites = []
    for node in list(graph.find_nodes(op="call_function", target=_CONVOLUTION_BACKWARD)):
        if node.meta[ARG_PURPOSES].get("input") is not ReadPurpose.GRADIENT:
            continue
        rewrite = _rewrite(graph, node, k, pooled_copies)
        log.debug("%s: %s", node.name, rewrite.reason)
        rewrites.append(rewrite)
    return rewrites


def _rewrite(graph: fx.Graph, node: fx.Node, k: int, pooled_copies: dict[fx.Node, fx.Node]) -> Rewrite:
    conv_input, transposed = node.args[1], node.args[7]
    value = conv_input.meta["val"]
    window = "×".join([str(k)] * (value.dim() - 2))

    def declined(reason: str) -> Rewrite:
        return Rewrite(pool_convolution_inputs.__name__, node.name, (), False, reason)

    if conv_input.meta[IS_BACKWARD]:
        return declined(f"{conv_input.name} is computed in the backward")
    if not 1 <= value.dim() - 2 <= 3:
        return declined(f"{conv_input.name} has {value.dim() - 2} spatial dimensions; pooling covers 1 to 3")
    if not all(is_concrete_int(d) for d in value.shape):
        return declined(f"{conv_input.name} has a symbolic size")
    others = [
        r.reader.name for r in conv_input.meta.get(BACKWARD_READS, ())
        if r.purpose is ReadPurpose.GRADIENT and not (r.reader.target is _CONVOLUTION_BACKWARD and r.argument == "input")
    ]  # fmt: skip
    if others:
        return declined(f"{conv_input.name} is also read by {others[0]}: a pooled copy would only add to it")

    pooled = pooled_copies.get(conv_input)
    if pooled is None:
        pooled = pooled_copies[conv_input] = _pooled(graph, conv_input, k)
        # Kept, never recomputed in the backward from the input, which would then be kept.
        pooled.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    node.replace_input_with(conv_input, _upsampled(graph, pooled, conv_input, k, before=node))
    kind = "transposed conv" if transposed else "conv"
    readers = [r.reader for r in conv_input.meta.get(BACKWARD_READS, ())]
    weights = sorted({display_name(r.args[2]) for r in readers if r.target is _CONVOLUTION_BACKWARD})
    gradients = "gradients" if len(weights) > 1 else "gradient"
    reason = f"{kind} input {conv_input.name} kept average-pooled over windows of {window} for the {gradients} of {', '.join(weights)}"
    pooled.meta[SAVED_AS] = SavedAs(Decision.COMPRESSED, conv_input.name, reason)
    return Rewrite(pool_convolution_inputs.__name__, node.name, (conv_input.name,), True, reason)


def _pooled(graph: fx.Graph, conv_input: fx.Node, k: int) -> fx.Node:
    """In the forward, right after the input: its average over k-wide windows, a partial last
    window averaged over what it covers (ceil mode, no padding)."""
    spatial = conv_input.meta["val"].dim() - 2
    after = conv_input.next

    def call(target, *args):
        return insert_call(graph, target, args, like=conv_input, before=after)

    if spatial == 3:
        return call(aten.avg_pool3d.default, conv_input, [k] * 3, [k] * 3, [0] * 3, True)
    if spatial == 2:
        return call(aten.avg_pool2d.default, conv_input, [k, k], [k, k], [0, 0], True)
    planes = call(aten.unsqueeze.default, conv_input, 2)  # 1d as 2d with a window of 1 x k
    return call(aten.squeeze.dim, call(aten.avg_pool2d.default, planes, [1, k], [1, k], [0, 0], True), 2)


def _upsampled(graph: fx.Graph, pooled: fx.Node, conv_input: fx.Node, k: int, *, before: fx.Node) -> fx.Node:
    """In the backward: `pooled` repeated k times along each spatial dimension, cut to the
    input's size."""

    def call(target, *args, **kwargs):
        node = insert_call(graph, target, args, kwargs, like=before)
        _compat.tag_for_backward(node)  # else it would be kept instead
        return node

    shape = [int(d) for d in conv_input.meta["val"].shape]
    pooled_shape = [int(d) for d in pooled.meta["val"].shape]
    spatial = len(shape) - 2
    # (N, C, P1, P2) -> (N, C, P1, 1, P2, 1) -> (N, C, P1, k, P2, k) -> (N, C, P1 k, P2 k)
    interleaved = pooled_shape[:2] + [size for p in pooled_shape[2:] for size in (p, 1)]
    repeated = pooled_shape[:2] + [size for p in pooled_shape[2:] for size in (p, k)]
    widened = pooled_shape[:2] + [p * k for p in pooled_shape[2:]]
    expanded = call(aten.expand.default, call(aten.view.default, pooled, interleaved), repeated)
    dense = call(aten.clone.default, expanded, memory_format=torch.contiguous_format)
    upsampled = call(aten.view.default, dense, widened)
    for dim in range(2, 2 + spatial):
        if widened[dim] != shape[dim]:
            upsampled = call(aten.slice.Tensor, upsampled, dim, 0, shape[dim])
    return upsampled
