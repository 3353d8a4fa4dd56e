"""Stop eval-mode `native_batch_norm_backward` from keeping its input when the affine weight is frozen.

In eval mode BatchNorm is the per-channel affine map `y = (x - mean) * rstd * weight + bias`
with the running statistics, so grad_input is `grad_out * weight * rstd` and grad_bias is
`grad_out` summed over all but the channels. Only grad_weight reads the input. Inductor's
decompositions already drop the input; aten's fused kernel on the `compiler="eager"` path
does not, so this pass spells the two gradients out.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..analysis import ARG_PURPOSES, LIVE_OUTPUTS, ReadPurpose, display_name
from .. import _compat
from ..config import MemsaveConfig
from .base import Rewrite, insert_call, output_users, replace_outputs

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger(__name__)

_GRAD_INPUT, _GRAD_WEIGHT, _GRAD_BIAS = 0, 1, 2


def replace_eval_batch_norm_backward(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    rewrites = []
    for node in graph.find_nodes(op="call_function", target=aten.native_batch_norm_backward.default):
        if node.meta[ARG_PURPOSES].get("input") is not ReadPurpose.UNREQUESTED:
            continue  # train mode, or the weight gradient is requested
        rewrite = _rewrite(graph, node)
        log.debug("%s: %s", node.name, rewrite.reason)
        rewrites.append(rewrite)
    return rewrites


def _rewrite(graph: fx.Graph, node: fx.Node) -> Rewrite:
    (grad_out, bn_input, weight, _running_mean, running_var,
     _save_mean, _save_invstd, _train, eps, _output_mask) = node.args  # fmt: skip
    live = node.meta[LIVE_OUTPUTS]
    users = output_users(node, live)
    if users is None:
        return Rewrite(
            replace_eval_batch_norm_backward.__name__, node.name, (), False,
            "an unrequested output of native_batch_norm_backward is still used",
        )  # fmt: skip

    # Compute in the kernel's accumulation dtype, as aten does, then round once.
    grad_dtype = grad_out.meta["val"].dtype
    compute_dtype = _compat.get_computation_dtype(grad_dtype)
    ndim = grad_out.meta["val"].dim()

    def call(target, *args, **kwargs):
        return insert_call(graph, target, args, kwargs, like=node)

    def to_compute_dtype(value: fx.Node) -> fx.Node:
        if value.meta["val"].dtype == compute_dtype:
            return value
        return call(prims.convert_element_type.default, value, compute_dtype)

    replacements: dict[int, fx.Node] = {}
    if _GRAD_INPUT in live:
        scale = call(aten.rsqrt.default, call(aten.add.Tensor, to_compute_dtype(running_var), eps))
        if weight is not None:
            scale = call(aten.mul.Tensor, scale, to_compute_dtype(weight))
        per_channel = call(aten.view.default, scale, [1, -1] + [1] * (ndim - 2))
        grad_input = call(aten.mul.Tensor, to_compute_dtype(grad_out), per_channel)
        if compute_dtype != grad_dtype:
            grad_input = call(prims.convert_element_type.default, grad_input, grad_dtype)
        replacements[_GRAD_INPUT] = grad_input
    if _GRAD_BIAS in live:
        bias_dtype = weight.meta["val"].dtype if weight is not None else grad_dtype
        grad_bias = call(
            aten.sum.dim_IntList, grad_out, [0, *range(2, ndim)], dtype=compute_dtype
        )
        if compute_dtype != bias_dtype:
            grad_bias = call(prims.convert_element_type.default, grad_bias, bias_dtype)
        replacements[_GRAD_BIAS] = grad_bias

    replace_outputs(graph, node, users, replacements)
    reader = f"the gradient of frozen {display_name(weight)}" if weight is not None else "no gradient"
    return Rewrite(
        replace_eval_batch_norm_backward.__name__,
        node.name,
        (bn_input.name,),
        True,
        f"eval-mode batch norm input {bn_input.name} was read only for {reader}",
    )
