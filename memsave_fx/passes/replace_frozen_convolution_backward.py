"""Stop `convolution_backward` from keeping a conv input that only a frozen weight's gradient reads.

`convolution_backward(grad_output, input, weight, ..., output_mask)` reads `input` even when
`output_mask` leaves out the weight gradient, so the partitioner keeps the input alive from
forward to backward (pytorch issue 133566). The other two gradients do not need it:

- grad_input is the adjoint convolution of grad_output with the weight: a transposed
  convolution for an ordinary conv, an ordinary convolution for a transposed one. Building it
  directly avoids an input-sized placeholder, which CPU kernels would materialise.
- grad_bias is grad_output summed over every dimension but the channels.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..analysis import ARG_PURPOSES, LIVE_OUTPUTS, ReadPurpose, display_name
from ..config import MemsaveConfig
from .base import Rewrite, insert_call, output_users, replace_outputs

aten = torch.ops.aten
log = logging.getLogger(__name__)

_GRAD_INPUT, _GRAD_WEIGHT, _GRAD_BIAS = 0, 1, 2


def replace_frozen_convolution_backward(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    rewrites = []
    for node in graph.find_nodes(op="call_function", target=aten.convolution_backward.default):
        if node.meta[ARG_PURPOSES].get("input") is ReadPurpose.GRADIENT:
            continue
        rewrite = _rewrite(graph, node)
        log.debug("%s: %s", node.name, rewrite.reason)
        rewrites.append(rewrite)
    return rewrites


def _rewrite(graph: fx.Graph, node: fx.Node) -> Rewrite:
    (grad_output, conv_input, weight, _bias_sizes, stride, padding, dilation,
     transposed, output_padding, groups, _output_mask) = node.args  # fmt: skip
    live = node.meta[LIVE_OUTPUTS]

    def declined(reason: str) -> Rewrite:
        return Rewrite(replace_frozen_convolution_backward.__name__, node.name, (), False, reason)

    users = output_users(node, live)
    if users is None:
        return declined("an unrequested output of convolution_backward is still used")

    replacements: dict[int, fx.Node] = {}
    if _GRAD_INPUT in live:
        grad_input_args = _adjoint_convolution_args(
            conv_input.meta["val"], grad_output.meta["val"], weight.meta["val"],
            stride, padding, dilation, transposed, output_padding, groups,
        )  # fmt: skip
        if isinstance(grad_input_args, str):
            return declined(grad_input_args)
        grad_input = insert_call(graph, aten.convolution.default, (grad_output, weight, None, *grad_input_args), like=node)
        if grad_input.meta["val"].shape != conv_input.meta["val"].shape:
            graph.erase_node(grad_input)
            return declined("the adjoint convolution does not reproduce the input shape")
        replacements[_GRAD_INPUT] = grad_input
    if _GRAD_BIAS in live:
        channel_free_dims = [0, *range(2, grad_output.meta["val"].dim())]
        replacements[_GRAD_BIAS] = insert_call(
            graph, aten.sum.dim_IntList, (grad_output, channel_free_dims), like=node
        )

    replace_outputs(graph, node, users, replacements)
    kind = "transposed conv" if transposed else "conv"
    return Rewrite(
        replace_frozen_convolution_backward.__name__,
        node.name,
        (conv_input.name,),
        True,
        f"{kind} input {conv_input.name} was read only for the gradient of frozen {display_name(weight)}",
    )


def _adjoint_convolution_args(
    conv_input, grad_output, weight, stride, padding, dilation, transposed, output_padding, groups
) -> tuple | str:
    """`convolution` arguments after (grad_output, weight, bias) whose result is grad_input,
    or why there are none."""
    if transposed:
        # The adjoint of a transposed convolution is the ordinary convolution.
        return stride, padding, dilation, False, [0] * len(stride), groups
    # The transposed convolution's output_padding restores the rows the forward stride dropped.
    kernel = weight.shape[2:]
    adjoint_padding = []
    for size, out, k, s, p, d in zip(conv_input.shape[2:], grad_output.shape[2:], kernel, stride, padding, dilation):
        extra = size + 2 * p - d * (k - 1) - 1 - (out - 1) * s
        if not is_concrete_int(extra):
            return "the output padding of the adjoint convolution depends on a symbolic size"
        extra = int(extra)
        if not 0 <= extra < max(s, d):
            return f"no transposed convolution has output padding {extra} for stride {s}, dilation {d}"
        adjoint_padding.append(extra)
    return stride, padding, dilation, True, adjoint_padding, groups
