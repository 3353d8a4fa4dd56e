import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memsave_fx.eager.dropout import dropout

from .layers import DTYPES, Call, Scale, check_exact, converted, random_input

KEEPS_MASK = [0.1, 0.5, 0.999]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("p", [0.0, *KEEPS_MASK, 1.0])
def test_dropout_module_same_mask_and_gradient(p, inplace, dtype):
    model = nn.Sequential(Scale(3, 2), nn.Dropout(p, inplace=inplace)).to(dtype).train()
    check_exact(model, [random_input(2, 3, 9, 9, dtype=dtype, requires_grad=True)], saves_less=p in KEEPS_MASK)


def test_eval_mode_is_the_identity():
    model = nn.Sequential(Scale(3, 2), nn.Dropout(0.5)).eval()
    x = random_input(2, 3, 5, 5, dtype=torch.float32, requires_grad=True)
    assert torch.equal(converted(model)(x), model(x))
    check_exact(model, [x], saves_less=False)


def test_mode_switches_after_conversion():
    model = nn.Sequential(Scale(3, 2), nn.Dropout(0.5))
    ours = converted(model).eval()
    x = random_input(2, 3, 5, 5, dtype=torch.float32, requires_grad=False)
    assert torch.equal(ours(x), x)
    ours.train()
    assert (ours(x) == 0).any()


def test_channels_last():
    model = nn.Sequential(Scale(3, 2), nn.Dropout(0.3))
    x = random_input(2, 3, 9, 9, dtype=torch.float32, requires_grad=False).to(memory_format=torch.channels_last)
    check_exact(model, [x.requires_grad_()], saves_less=True)


@pytest.mark.parametrize("p", KEEPS_MASK)
def test_dropout_function(p):
    check_exact(Call(3, 2, F.dropout, p, True), [random_input(2, 3, 7, 7, dtype=torch.float32, requires_grad=True)], saves_less=True)


def test_bad_probability_raises_like_pytorch():
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
        dropout(torch.ones(3), 1.5)
