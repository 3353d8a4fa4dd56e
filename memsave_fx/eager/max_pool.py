"""Max-pooling that keeps only the argmax indices, in the narrowest integer type that holds them.

Autograd's `MaxPool2DWithIndicesBackward0` keeps the input and the int64 indices, though its
kernel reads the input only for its shape. These keep the indices alone (int16 when a pooled
plane has fewer than 2**15 elements) and hand the same kernel an uninitialised stand-in.
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

_STOCK = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_POOL = {2: aten.max_pool2d_with_indices, 3: aten.max_pool3d_with_indices}
_POOL_BACKWARD = {2: aten.max_pool2d_with_indices_backward, 3: aten.max_pool3d_with_indices_backward}


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        dims = len(kernel_size)
        output, indices = _POOL[dims](input, kernel_size, stride, padding, dilation, ceil_mode)
        if ctx.needs_input_grad[0]:
            # Indices returned to the caller are alive anyway; otherwise keep a narrow copy.
            ctx.save_for_backward(indices if return_indices else indices.to(_index_dtype(input, dims)))
        ctx.input_layout = TensorLayout.of(input)
        ctx.arguments = (kernel_size, stride, padding, dilation, ceil_mode)
        if return_indices:
            ctx.mark_non_differentiable(indices)
            return output, indices
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_indices=None):
        (indices,) = ctx.saved_tensors
        dims = len(ctx.arguments[0])
        grad_input = _POOL_BACKWARD[dims](
            grad_output, ctx.input_layout.stand_in(), *ctx.arguments, indices.to(torch.int64)
        )
        return grad_input, None, None, None, None, None, None


def _index_dtype(input: torch.Tensor, dims: int) -> torch.dtype:
    plane = input.shape[-dims:].numel()
    if plane <= torch.iinfo(torch.int16).max:
        return torch.int16
    if plane <= torch.iinfo(torch.int32).max:
        return torch.int32
    return torch.int64


def _max_pool(input, dims, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    def expand(value: IntOrInts) -> list[int]:
        return [value] * dims if isinstance(value, int) else list(value)

    kernel_size = expand(kernel_size)
    stride = expand(stride) if stride not in (None, [], ()) else kernel_size
    padding, dilation = expand(padding), expand(dilation)
    if not records_gradient(input):
        return _STOCK[dims](input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if dims == 1:
        # As aten does: a 1d pool is a 2d pool over a height of one.
        result = _MaxPool.apply(input.unsqueeze(-2), [1, *kernel_size], [1, *stride], [0, *padding], [1, *dilation], ceil_mode, return_indices)
        return tuple(r.squeeze(-2) for r in result) if return_indices else result.squeeze(-2)
    return _MaxPool.apply(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """`F.max_pool1d`, keeping only the indices."""
    return _max_pool(input, 1, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """`F.max_pool2d`, keeping only the indices."""
    return _max_pool(input, 2, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """`F.max_pool3d`, keeping only the indices."""
    return _max_pool(input, 3, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


_MODULE_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


def call_max_pool_module(module: nn.modules.pooling._MaxPoolNd, input: torch.Tensor):
    """`nn.MaxPool1d/2d/3d.forward`, keeping only the indices."""
    dims = next(d for cls, d in _MODULE_DIMS.items() if isinstance(module, cls))
    return _max_pool(
        input, dims, module.kernel_size, module.stride, module.padding, module.dilation,
        module.ceil_mode, module.return_indices,
    )  # fmt: skip
