"""Stop Inductor from saving channels-last copies of graph inputs that convolutions read.

With layout optimisation, Inductor gives every dense 4-D input of a convolution channels-last
strides. A graph input (a parameter, or the model's input) that is also kept for backward is
then copied, and the forward returns the copy as the saved tensor: every conv weight the
backward reads, frozen or not, is held twice from forward to backward.

The lowering re-strides only 4-D values, so this pass saves a flat 1-D `_unsafe_view` of the
input instead, tagged MUST_SAVE, and un-flattens it on each side. The saved tensor then shares
the input's storage. The forward convolution still runs channels-last; the backward makes its
own short-lived converted copy. Where the input is a convolution's data input, that copy is
explicit in the graph: the weight gradient's memory format follows its input's, and stock
Inductor's comes out channels-last, as the convolution computes it. From a contiguous input
Inductor would copy it to contiguous, a kernel more to compile and run.

Where the backward reads the un-flattened value as a weight (a convolution backward's, or a
transposed convolution's computing a frozen weight's input gradient), Inductor's lowering copies
it to channels-last; `partition.hoist_converting_convolutions` keeps that copy from being a C++
kernel of its own.

Two details keep the partitioner from undoing this: `_unsafe_view` is not treated as a view
(views are always recomputed, never saved), and the two un-flattens are different ops
(`view` and `_unsafe_view`), which its CSE would otherwise merge across the boundary.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils.checkpoint import CheckpointPolicy

from ..analysis import CONVERTED_FOR_CONVOLUTION, IS_BACKWARD, display_name, is_primal
from .. import _compat
from ..config import MemsaveConfig
from .base import Rewrite, insert_call

aten = torch.ops.aten
log = logging.getLogger(__name__)

_RECOMPUTED = (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)


def flatten_saved_conv_inputs(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    if not config.exact_compression or config.compiler != "inductor":
        return []  # the copy comes from Inductor's lowering alone
    rewrites = []
    channels_last = graph.owning_module is not None and _compat.runs_channels_last(graph.owning_module)
    for primal in filter(is_primal, graph.find_nodes(op="placeholder")):
        value = primal.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() != 4:
            continue
        if not value.is_contiguous() or value.is_contiguous(memory_format=torch.channels_last):
            # Channels-last already, as is a depthwise weight (one input channel): no copy is
            # made, and re-viewing it flat could change the layout the forward conv runs in.
            # Or not flat-viewable.
            continue
        backward_users = [u for u in primal.users if u.meta[IS_BACKWARD]]
        forward_users = [u for u in primal.users if not u.meta[IS_BACKWARD]]
        if not backward_users or not forward_users:
            continue
        if not all(map(_feeds_convolution, forward_users)):
            continue  # only a convolution input gets re-strided; others keep their layout
        if any(u.meta.get("recompute") in _RECOMPUTED for u in forward_users):
            # Activation checkpointing: the partitioner reruns the convolution in the backward,
            # copy included, so nothing is saved twice; the forward-only view would break it.
            rewrites.append(
                Rewrite(flatten_saved_conv_inputs.__name__, primal.name, (), False,
                        f"{display_name(primal)} is read inside an activation-checkpointed region")  # fmt: skip
            )
            continue
        if not all(is_concrete_int(s) for s in value.shape):
            rewrites.append(
                Rewrite(flatten_saved_conv_inputs.__name__, primal.name, (), False,
                        f"{display_name(primal)} has a symbolic shape")  # fmt: skip
            )
            continue
        rewrites.append(_flatten(graph, primal, forward_users, backward_users, channels_last))
        log.debug("%s: %s", primal.name, rewrites[-1].reason)
    return rewrites


def _feeds_convolution(user: fx.Node) -> bool:
    """A convolution, or a product whose every user is one: the layout a convolution asks of
    its input reaches through a fold (Inductor's conv-BN folding scales the weight)."""
    if user.target is aten.convolution.default:
        return True
    return user.target is aten.mul.Tensor and bool(user.users) and all(u.target is aten.convolution.default for u in user.users)


def _reads_as_data(user: fx.Node, value: fx.Node) -> bool:
    """`user` is a convolution's backward reading `value` as the convolution's data input."""
    return user.target is aten.convolution_backward.default and user.args[1] is value


def _flatten(
    graph: fx.Graph,
    primal: fx.Node,
    forward_users: list[fx.Node],
    backward_users: list[fx.Node],
    channels_last: bool,
) -> Rewrite:
    shape = [int(s) for s in primal.meta["val"].shape]
    first_user = next(n for n in graph.nodes if n in primal.users)
    flat = insert_call(graph, aten._unsafe_view.default, (primal, [primal.meta["val"].numel()]), like=first_user)
    _compat.tag_for_forward(flat)
    flat.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    # Untagged: a recomputation of the convolution in the backward (activation checkpointing,
    # a memory budget) reads it there from the saved `flat`.
    for_forward = insert_call(graph, aten.view.default, (flat, shape), like=first_user)
    for user in forward_users:
        user.replace_input_with(primal, for_forward)
    first_backward_user = next(n for n in graph.nodes if n in backward_users)
    for_backward = insert_call(graph, aten._unsafe_view.default, (flat, shape), like=first_backward_user)
    _compat.tag_for_backward(for_backward)
    for user in backward_users:
        user.replace_input_with(primal, for_backward)
    if channels_last:
        # A convolution (backward) reading it as its weight copies it to channels-last first.
        for_backward.meta[CONVERTED_FOR_CONVOLUTION] = True
    weight_gradients = [n for n in graph.nodes if n in backward_users and _reads_as_data(n, for_backward)]
    if channels_last and weight_gradients:
        as_channels_last = insert_call(
            graph, aten.clone.default, (for_backward,), {"memory_format": torch.channels_last}, like=weight_gradients[0]
        )
        _compat.tag_for_backward(as_channels_last)
        for user in weight_gradients:
            user.update_arg(1, as_channels_last)
    return Rewrite(
        flatten_saved_conv_inputs.__name__,
        primal.name,
        (),
        True,
        f"{display_name(primal)} is saved as itself, not as a channels-last copy",
    )
