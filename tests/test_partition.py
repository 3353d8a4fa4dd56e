import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import memsave_fx

from .utils import assert_grads_match, saved_bytes_of


def frozen_relu_net():
    # The frozen convs stop the backward from reading the ReLU outputs: masks are saved.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model[2].requires_grad_(False)
    model[4].weight.requires_grad_(False)
    return model, [torch.randn(2, 3, 16, 16)]


def saved_dtypes(model, inputs, backend):
    dtypes = []

    def pack(tensor):
        dtypes.append(tensor.dtype)
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.compile(model, backend=backend)(*inputs)
    return dtypes


def test_saved_masks_cross_as_bits():
    model, inputs = frozen_relu_net()
    backend = memsave_fx.backend()
    dtypes = saved_dtypes(model, inputs, backend)
    assert torch.uint8 in dtypes and torch.bool not in dtypes
    assert backend.compiled[0].packed_masks == 2


def test_exact_compression_off_keeps_bool_masks():
    model, inputs = frozen_relu_net()
    backend = memsave_fx.backend(exact_compression=False)
    assert torch.bool in saved_dtypes(model, inputs, backend)
    assert backend.compiled[0].packed_masks == 0


def test_gradients_match_eager():
    model, inputs = frozen_relu_net()
    assert_grads_match(model, inputs, memsave_fx.backend())


def test_bytes_take_no_more_memory_than_bools():
    model, inputs = frozen_relu_net()
    assert saved_bytes_of(model, inputs, memsave_fx.backend()) < saved_bytes_of(model, inputs, "inductor")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_odd_sizes_layouts_and_dtypes(dtype, channels_last):
    # 2 x 8 x 5 x 7 = 560 mask bits after the first conv: 70 bytes; 3 x 5 = 15 per channel later.
    model, _ = frozen_relu_net()
    model = model.to(dtype)
    x = torch.randn(2, 3, 9, 11, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    assert_grads_match(model, [x.requires_grad_()], memsave_fx.backend())
