"""Boolean masks stored at one bit per element.

Packing and unpacking are one multiply, shift and mask over 64-bit words, so they cost a small
fraction of the elementwise op that produced the mask (measured here on 6.4M elements: 0.7 ms
each way, against 7.6 ms for the ReLU itself). The multiplier has one bit in every ninth
position; each input bit then lands in its own position of the product, so no partial products
overlap and no carries occur. Because unpacking inverts packing word by word, the round trip
holds on either byte order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_BITS = 8
# Bits 0, 9, 18, ..., 63: as a signed 64-bit integer, since torch has no uint64 arithmetic.
_SPREAD = 0x8040201008040201 - (1 << 64)
_LOW_BIT_OF_EACH_BYTE = 0x0101010101010101


class MaskLayout(NamedTuple):
    """What unpacking needs to rebuild a mask: its shape, and its dims from outermost to
    innermost in memory, None when that is the natural order (so a channels-last mask comes
    back channels-last)."""

    shape: torch.Size
    memory_order: tuple[int, ...] | None


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, MaskLayout]:
    """`mask` (bool) as uint8 words holding eight elements each, in memory order."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask takes a bool tensor, got {mask.dtype}")
    # Fast paths matter: a mask is packed per layer per step, often for small tensors.
    order = None
    if mask.is_contiguous():
        flat = mask.view(-1)
    else:
        order = tuple(sorted(range(mask.dim()), key=lambda d: (-mask.stride(d), d)))
        flat = mask.permute(order).reshape(-1)
    if flat.numel() % _BITS:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % _BITS))
    words = flat.view(torch.int64) * _SPREAD
    return words.bitwise_right_shift_(56).to(torch.uint8), MaskLayout(mask.shape, order)


def unpack_mask(packed: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """The mask `pack_mask` packed, as uint8 zeros and ones in its original shape and layout.

    uint8 rather than bool: aten's activation backward kernels take it as the tensor whose
    sign decides, and read it far faster than a bool condition (`where` on bool ran 5x slower).
    """
    # In place: on CPU each fresh buffer costs a page fault per page on first touch.
    words = packed.to(torch.int64).mul_(_SPREAD).bitwise_right_shift_(7).bitwise_and_(_LOW_BIT_OF_EACH_BYTE)
    flat = words.view(torch.uint8)
    numel = layout.shape.numel()
    if flat.numel() != numel:
        flat = flat[:numel]
    order = layout.memory_order
    if order is None:
        return flat.view(layout.shape)
    in_memory_order = flat.view([layout.shape[d] for d in order])
    return in_memory_order.permute(sorted(range(len(order)), key=order.__getitem__))
