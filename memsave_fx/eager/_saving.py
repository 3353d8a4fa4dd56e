"""What the memory-saving autograd Functions share."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """Enough of a tensor to stand in for it where a kernel reads only its metadata."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorLayout:
        return cls(tensor.shape, tensor.stride(), tensor.dtype, tensor.device)

    def stand_in(self) -> torch.Tensor:
        """An uninitialised tensor of this layout, for a backward kernel that reads only the
        shape, strides, dtype and device of that argument: the same kernel as eager then runs
        and gives the same gradient. It lives only for that kernel call."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
