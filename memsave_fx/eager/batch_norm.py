"""Eval-mode batch norm that keeps its input only for the affine weight's gradient.

With the running statistics, batch norm is a per-channel affine map, so grad_input and
grad_bias never read the input; autograd's `NativeBatchNormBackward0` keeps it all the same.
Training mode normalises with the batch's own statistics, whose gradient does read the input:
that path is left to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._saving import TensorLayout, records_gradient

aten = torch.ops.aten


class _EvalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, eps):
        output = F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        weight_needs_grad = ctx.needs_input_grad[3]
        ctx.save_for_backward(input if weight_needs_grad else None, running_mean, running_var, weight)
        ctx.input_layout, ctx.eps, ctx.has_bias = TensorLayout.of(input), eps, bias is not None
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, running_mean, running_var, weight = ctx.saved_tensors
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.has_bias and ctx.needs_input_grad[4]]
        grad_input, grad_weight, grad_bias = aten.native_batch_norm_backward(
            grad_output,
            # Its reductions read the input even when only grad_input and grad_bias are requested.
            input if input is not None else ctx.input_layout.stand_in(like=grad_output),
            weight, running_mean, running_var, None, None, False, ctx.eps, output_mask,
        )  # fmt: skip
        return grad_input, None, None, grad_weight, grad_bias, None


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """`F.batch_norm`; in eval mode it saves less."""
    if training or running_mean is None or running_var is None or not _keeps_less(input, weight, bias):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _EvalBatchNorm.apply(input, running_mean, running_var, weight, bias, eps)


def _keeps_less(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `_EvalBatchNorm` keeps less than autograd: when the weight is frozen or absent."""
    return records_gradient(input, weight, bias) and (weight is None or not weight.requires_grad)


def call_batch_norm_module(module: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """`nn.BatchNorm1d/2d/3d.forward`; in eval mode with running statistics it saves less."""
    if module.training or module.running_mean is None or module.running_var is None:
        return module.forward(input)  # batch statistics: PyTorch's own path
    if not _keeps_less(input, module.weight, module.bias):
        return module.forward(input)
    module._check_input_dim(input)
    return _EvalBatchNorm.apply(input, module.running_mean, module.running_var, module.weight, module.bias, module.eps)
