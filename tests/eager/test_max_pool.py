import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .layers import DTYPES, Call, FirstOutput, Scale, check_exact, random_input

POOLS = {
    "max_pool1d": (lambda: nn.MaxPool1d(3, 2, 1), (2, 3, 13)),
    "max_pool1d_dilated_ceil": (lambda: nn.MaxPool1d(2, 2, dilation=2, ceil_mode=True), (2, 3, 12)),
    "max_pool2d_overlapping": (lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 9, 9)),
    "max_pool2d_ceil": (lambda: nn.MaxPool2d((2, 3), (2, 1), ceil_mode=True), (2, 3, 7, 8)),
    "max_pool2d_unbatched": (lambda: nn.MaxPool2d(2), (3, 6, 6)),
    "max_pool3d": (lambda: nn.MaxPool3d(2, padding=1), (2, 3, 4, 5, 5)),
}

REQUIRES_GRAD = [(True, False), (False, True), (True, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_grad,scale_grad", REQUIRES_GRAD)
@pytest.mark.parametrize("name", POOLS)
def test_max_pool_modules_keep_only_indices(name, input_grad, scale_grad, dtype):
    pool, shape = POOLS[name]
    torch.manual_seed(0)
    spatial_dims = len(shape) - 2 if name != "max_pool2d_unbatched" else 2
    model = nn.Sequential(Scale(3, spatial_dims), pool()).to(dtype)
    model[0].scale.requires_grad_(scale_grad)
    check_exact(model, [random_input(*shape, dtype=dtype, requires_grad=input_grad)], saves_less=True)


def test_max_pool2d_channels_last():
    model = nn.Sequential(Scale(3, 2), nn.MaxPool2d(3, 2, 1))
    x = random_input(2, 3, 9, 9, dtype=torch.float32, requires_grad=False).to(memory_format=torch.channels_last)
    check_exact(model, [x.requires_grad_()], saves_less=True)


def test_returned_indices_match():
    model = nn.Sequential(Scale(3, 2), nn.MaxPool2d(2, return_indices=True), FirstOutput())
    check_exact(model, [random_input(2, 3, 8, 8, dtype=torch.float32, requires_grad=True)], saves_less=True)


@pytest.mark.parametrize(
    "function,args,shape",
    [
        (F.max_pool2d, (3, 2, 1), (2, 3, 8, 9)),
        (torch.max_pool2d, (2,), (2, 3, 8, 9)),
        (F.max_pool1d, (3,), (2, 3, 9)),
        (F.max_pool2d, (2, None, 0, 1, False, True), (2, 3, 8, 9)),
    ],
    ids=["F.max_pool2d", "torch.max_pool2d", "F.max_pool1d", "F.max_pool2d_indices"],
)
def test_max_pool_functions(function, args, shape):
    model = Call(3, len(shape) - 2, function, *args, first_output=len(args) == 6)
    check_exact(model, [random_input(*shape, dtype=torch.float32, requires_grad=True)], saves_less=True)
