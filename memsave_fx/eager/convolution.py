"""Convolution that keeps its input only for a weight gradient, and its weight only for an input gradient.

Autograd's `ConvolutionBackward0` keeps both whatever is requested (pytorch issue 133566), so a
frozen conv keeps its input alive until the backward. grad_input reads only the input's shape,
and grad_weight only the weight's, so the backward hands `convolution_backward` an
uninitialised stand-in for whichever was not kept: the same kernel runs, with the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._saving import TensorLayout, records_gradient

aten = torch.ops.aten

IntOrInts = int | Sequence[int]


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        output = aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        input_needs_grad, weight_needs_grad = ctx.needs_input_grad[:2]
        ctx.save_for_backward(input if weight_needs_grad else None, weight if input_needs_grad else None)
        ctx.input_layout, ctx.weight_layout = TensorLayout.of(input), TensorLayout.of(weight)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.arguments = (stride, padding, dilation, transposed, output_padding, groups)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = aten.convolution_backward(
            grad_output,
            input if input is not None else ctx.input_layout.stand_in(),
            weight if weight is not None else ctx.weight_layout.stand_in(),
            ctx.bias_sizes,
            *ctx.arguments,
            output_mask,
        )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _convolution(input, weight, bias, *arguments) -> torch.Tensor:
    if _keeps_less(input, weight, bias):
        return _Convolution.apply(input, weight, bias, *arguments)
    return aten.convolution(input, weight, bias, *arguments)


def _keeps_less(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `_Convolution` keeps less than autograd's `ConvolutionBackward0`, which keeps
    the input and the weight: it does when the weight is frozen (no input), or when only a
    computed weight needs a gradient (no weight; a parameter costs nothing to keep)."""
    if not records_gradient(input, weight, bias):
        return False
    if not weight.requires_grad:
        return True
    return not input.requires_grad and weight.grad_fn is not None


def conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrInts = 1,
    padding: IntOrInts | str = 0,
    dilation: IntOrInts = 1,
    groups: int = 1,
) -> torch.Tensor:
    """`F.conv1d`, `F.conv2d` and `F.conv3d` (the dimension comes from the weight), saving less."""
    dims = weight.dim() - 2
    stride, dilation = _expand(stride, dims), _expand(dilation, dims)
    if isinstance(padding, str):
        input, padding = _pad_for_mode(input, weight, padding, stride, dilation)
    return _batched(
        input, dims,
        lambda batch: _convolution(batch, weight, bias, stride, _expand(padding, dims), dilation, False, [0] * dims, groups),
    )  # fmt: skip


def conv_transpose(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrInts = 1,
    padding: IntOrInts = 0,
    output_padding: IntOrInts = 0,
    groups: int = 1,
    dilation: IntOrInts = 1,
) -> torch.Tensor:
    """`F.conv_transpose1d`, `2d` and `3d` (the dimension comes from the weight), saving less."""
    dims = weight.dim() - 2
    arguments = (_expand(stride, dims), _expand(padding, dims), _expand(dilation, dims), True, _expand(output_padding, dims), groups)
    return _batched(input, dims, lambda batch: _convolution(batch, weight, bias, *arguments))


def call_conv_module(module: nn.modules.conv._ConvNd, input: torch.Tensor) -> torch.Tensor:
    """`nn.Conv1d/2d/3d.forward`, saving less."""
    if module.padding_mode != "zeros":
        padded = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return conv(padded, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    return conv(input, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


def call_conv_transpose_module(
    module: nn.modules.conv._ConvTransposeNd, input: torch.Tensor, output_size: Sequence[int] | None = None
) -> torch.Tensor:
    """`nn.ConvTranspose1d/2d/3d.forward`, saving less."""
    if module.padding_mode != "zeros":
        raise ValueError(f"Only 'zeros' padding mode is supported for {type(module).__name__}")
    dims = module.weight.dim() - 2
    output_padding = module._output_padding(
        input, output_size, module.stride, module.padding, module.kernel_size, dims, module.dilation
    )
    return conv_transpose(
        input, module.weight, module.bias, module.stride, module.padding, output_padding, module.groups, module.dilation
    )


def _expand(value: IntOrInts, dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)


def _batched(input: torch.Tensor, dims: int, run) -> torch.Tensor:
    # Like aten's convolutions, accept one unbatched sample.
    if input.dim() == dims + 1:
        return run(input.unsqueeze(0)).squeeze(0)
    return run(input)


def _pad_for_mode(
    input: torch.Tensor, weight: torch.Tensor, mode: str, stride: list[int], dilation: list[int]
) -> tuple[torch.Tensor, list[int]]:
    """The explicit padding of `padding="valid"` or `"same"`, as aten computes it: an uneven
    "same" pads the input's far side by the extra element, the rest symmetrically."""
    dims = weight.dim() - 2
    if mode == "valid":
        return input, [0] * dims
    if mode != "same":
        raise ValueError(f"Invalid padding string {mode!r}, should be one of ['valid', 'same']")
    if any(s != 1 for s in stride):
        raise ValueError("padding='same' is not supported for strided convolutions")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    extra = [total - 2 * (total // 2) for total in totals]
    if any(extra):
        # F.pad lists the last dimension first.
        input = F.pad(input, [amount for e in reversed(extra) for amount in (0, e)])
    return input, [total // 2 for total in totals]
