"""Dropout that keeps its mask at one bit per element.

Autograd keeps a byte per element on CUDA (`native_dropout`'s bool mask) and a whole scaled
noise tensor of the input's dtype on CPU. This keeps the mask packed at one bit, and follows
`at::dropout`'s own choice of kernel so that the random stream, the output and the gradient
are PyTorch's to the bit, on any device and for any p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._saving import in_layout_of, records_gradient
from .bits import pack_mask, unpack_mask

aten = torch.ops.aten

# `at::dropout` uses the fused `native_dropout` kernel on these devices, and on CPU draws
# Bernoulli noise and multiplies (`_dropout_impl`); the two consume the generator differently.
_FUSED_KERNEL_DEVICES = frozenset({"cuda", "xpu", "lazy", "privateuseone"})


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, p, inplace):
        ctx.fused = not inplace and input.device.type in _FUSED_KERNEL_DEVICES
        if ctx.fused:
            output, kept = aten.native_dropout(input, p, True)
        else:
            noise = torch.empty_like(input).bernoulli_(1 - p)
            kept = noise.bool()
            noise.div_(1 - p)
            if inplace:
                input.mul_(noise)
                ctx.mark_dirty(input)
                output = input  # the input object itself, as Dynamo requires of a dirty input
            else:
                output = input * noise
        if ctx.needs_input_grad[0]:
            packed, ctx.layout = pack_mask(kept)
            ctx.save_for_backward(packed)
        ctx.p = p
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        kept = unpack_mask(packed, ctx.layout)
        if ctx.fused:
            return aten.native_dropout_backward(grad_output, kept.view(torch.bool), 1.0 / (1.0 - ctx.p)), None, None
        # The noise the forward multiplied by, rebuilt by the same ops: 0 or 1 / (1 - p).
        noise = in_layout_of(kept, grad_output).div_(1 - ctx.p)
        return noise.mul_(grad_output), None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`F.dropout`, keeping a 1-bit mask. With nothing to keep (eval mode, p of 0 or 1, an
    empty input, no gradient) it is `F.dropout` itself, which draws the same mask."""
    if not training or not 0.0 < p < 1.0 or input.numel() == 0 or not records_gradient(input):
        return F.dropout(input, p, training, inplace)  # also raises for p outside [0, 1]
    return _Dropout.apply(input, p, inplace)


def call_dropout_module(module: nn.Dropout, input: torch.Tensor) -> torch.Tensor:
    return dropout(input, module.p, module.training, module.inplace)
