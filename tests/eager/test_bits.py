import pytest
import torch

from memsave_fx.eager.bits import pack_mask, unpack_mask


def test_every_byte_pattern_round_trips_in_order():
    patterns = torch.tensor([[(value >> (7 - k)) & 1 for k in range(8)] for value in range(256)], dtype=torch.bool)
    packed, layout = pack_mask(patterns)
    # First element in the high bit, as numpy.packbits does.
    assert torch.equal(packed, torch.arange(256).to(torch.uint8))
    assert torch.equal(unpack_mask(packed, layout).bool(), patterns)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (9,), (3, 5, 7), (2, 3, 4, 5, 6)])
def test_sizes_not_a_multiple_of_eight(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed, layout = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    unpacked = unpack_mask(packed, layout)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked.bool(), mask)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_layout_survives(memory_format):
    mask = (torch.randn(2, 6, 5, 3) > 0).to(memory_format=memory_format)
    unpacked = unpack_mask(*pack_mask(mask))
    assert unpacked.stride() == mask.stride() and torch.equal(unpacked.bool(), mask)


def test_a_non_dense_mask_round_trips():
    mask = (torch.randn(6, 10) > 0)[::2, 1::3]
    assert torch.equal(unpack_mask(*pack_mask(mask)).bool(), mask)


def test_rejects_non_bool():
    with pytest.raises(TypeError, match="bool tensor, got torch.uint8"):
        pack_mask(torch.zeros(8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    mask = torch.rand(3, 1000, 7, device="cuda") > 0.3
    packed, layout = pack_mask(mask)
    assert packed.device == mask.device
    assert torch.equal(unpack_mask(packed, layout).bool(), mask)
