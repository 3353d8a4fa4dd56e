"""What the memory-saving autograd Functions share."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TensorLayout(NamedTuple):
    """Enough of a tensor to stand in for it where a kernel reads only its metadata.

    A NamedTuple: built on every forward, where a dataclass's construction showed up."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorLayout:
        return cls(tensor.shape, tensor.stride(), tensor.dtype, tensor.device)

    def stand_in(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """A tensor of this layout whose values do not matter, for a backward kernel whose
        requested outputs read only the shape, strides, dtype and device of that argument: the
        same kernel as eager then runs and gives the same gradient.

        `like` is returned when it has this layout. Pass a tensor already in memory for a
        kernel that reads the argument for an output nobody requested: on CPU, reading fresh
        uninitialised memory costs a page fault per page (eval batch norm's backward ran 3.6x
        slower on one)."""
        if like is not None and TensorLayout.of(like) == self:
            return like
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


def in_layout_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` converted to `like`'s dtype and memory layout: a buffer that an elementwise
    backward can overwrite with its result, laid out as eager's result would be."""
    return torch.empty_like(like).copy_(values)


def records_gradient(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors. Where it would not, or where a
    Function would keep no less than autograd, the plain op runs: it is the same kernel, and
    skips the Function's Python overhead (tens of microseconds a call)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
