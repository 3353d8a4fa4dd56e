"""ReLU, LeakyReLU, Hardtanh/ReLU6 and Threshold that keep a 1-bit mask instead of a tensor.

The gradient of each is the upstream gradient, passed or scaled where a condition on the input
holds. Autograd keeps the whole input or output to test that condition again in the backward;
these keep the condition itself, packed at one bit per element. The backward then runs aten's
own backward kernel with the unpacked 0/1 mask in place of the tensor: the mask is positive
exactly where the kernel would have passed the gradient, so the result is the same.

The cost is one comparison in the forward and one conversion in the backward, each a pass over
a byte per element, plus packing and unpacking at an eighth of that.
"""

from __future__ import annotations

import enum

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._saving import in_layout_of, records_gradient
from .bits import pack_mask, unpack_mask

aten = torch.ops.aten


class _Activation(enum.Enum):
    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    HARDTANH = "hardtanh"
    THRESHOLD = "threshold"


class _MaskedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, activation, first, second, inplace):
        needs_grad = ctx.needs_input_grad[0]
        # Other conditions are tested on the input, before the op may overwrite it.
        passes = _passes_gradient(input, activation, first, second) if needs_grad and activation is not _Activation.RELU else None
        output = _apply(input, activation, first, second, inplace)
        if needs_grad:
            if activation is _Activation.RELU:
                # ReLU's backward passes the gradient where its result is not <= 0; the result
                # is >= 0 or NaN, so that is where it is not 0: one comparison.
                passes = output != 0
            packed, ctx.layout = pack_mask(passes)
            ctx.save_for_backward(packed)
        ctx.activation, ctx.slope = activation, first
        if inplace:
            ctx.mark_dirty(input)
            return input  # the input object itself, as Dynamo requires of a dirty input
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        # In the gradient's dtype: aten's backward kernels take mixed dtypes 10x slower. The
        # gradient is then written over the mask, so the backward allocates no more than eager's.
        passes = in_layout_of(unpack_mask(packed, ctx.layout), grad_output)
        if ctx.activation is _Activation.LEAKY_RELU:
            grad_input = aten.leaky_relu_backward.grad_input(grad_output, passes, ctx.slope, False, grad_input=passes)
        else:
            grad_input = aten.threshold_backward.grad_input(grad_output, passes, 0, grad_input=passes)
        return grad_input, None, None, None, None


def _passes_gradient(input: torch.Tensor, activation: _Activation, first: float, second: float) -> torch.Tensor:
    """Where the backward passes (or for LeakyReLU, does not scale) the gradient, with the
    conditions of aten's backward kernels."""
    if activation is _Activation.LEAKY_RELU:
        return torch.gt(input, 0)
    if activation is _Activation.HARDTANH:
        value = _comparable(input, first, second)
        return torch.le(value, first).logical_or_(value >= second).logical_not_()
    return torch.le(_comparable(input, first), first).logical_not_()


def _comparable(input: torch.Tensor, *bounds: float) -> torch.Tensor:
    """`input`, or a float32 copy where a bound is not exact in its reduced-precision dtype:
    aten's kernels compare such values with the bounds in float32 (0.1 is not 0.1 in bfloat16)."""
    if input.dtype in (torch.bfloat16, torch.float16) and any(
        torch.tensor(bound, dtype=input.dtype).item() != bound for bound in bounds
    ):
        return input.float()
    return input


def _apply(input: torch.Tensor, activation: _Activation, first: float, second: float, inplace: bool) -> torch.Tensor:
    if activation is _Activation.RELU:
        return torch.relu_(input) if inplace else torch.relu(input)
    if activation is _Activation.LEAKY_RELU:
        return aten.leaky_relu_(input, first) if inplace else aten.leaky_relu(input, first)
    if activation is _Activation.HARDTANH:
        return aten.hardtanh_(input, first, second) if inplace else aten.hardtanh(input, first, second)
    return torch.threshold_(input, first, second) if inplace else torch.threshold(input, first, second)


def _masked(input: torch.Tensor, activation: _Activation, first: float, second: float, inplace: bool) -> torch.Tensor:
    if records_gradient(input):
        return _MaskedActivation.apply(input, activation, first, second, inplace)
    return _apply(input, activation, first, second, inplace)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """`F.relu`, keeping a 1-bit mask."""
    return _masked(input, _Activation.RELU, 0.0, 0.0, inplace)


def relu_(input: torch.Tensor) -> torch.Tensor:
    """`torch.relu_`, keeping a 1-bit mask."""
    return relu(input, inplace=True)


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """`F.leaky_relu`, keeping a 1-bit mask."""
    return _masked(input, _Activation.LEAKY_RELU, negative_slope, 0.0, inplace)


def hardtanh(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """`F.hardtanh`, keeping a 1-bit mask."""
    if min_val > max_val:
        raise ValueError("min_val cannot be greater than max_val")
    return _masked(input, _Activation.HARDTANH, min_val, max_val, inplace)


def relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """`F.relu6`, keeping a 1-bit mask."""
    return hardtanh(input, 0.0, 6.0, inplace)


def threshold(input: torch.Tensor, threshold: float, value: float, inplace: bool = False) -> torch.Tensor:
    """`F.threshold`, keeping a 1-bit mask."""
    return _masked(input, _Activation.THRESHOLD, threshold, value, inplace)


def call_relu_module(module: nn.ReLU, input: torch.Tensor) -> torch.Tensor:
    return relu(input, module.inplace)


def call_leaky_relu_module(module: nn.LeakyReLU, input: torch.Tensor) -> torch.Tensor:
    return leaky_relu(input, module.negative_slope, module.inplace)


def call_hardtanh_module(module: nn.Hardtanh, input: torch.Tensor) -> torch.Tensor:
    """`nn.Hardtanh` and its subclass `nn.ReLU6`."""
    return hardtanh(input, module.min_val, module.max_val, module.inplace)


def call_threshold_module(module: nn.Threshold, input: torch.Tensor) -> torch.Tensor:
    return threshold(input, module.threshold, module.value, module.inplace)
