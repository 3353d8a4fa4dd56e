import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .layers import DTYPES, Call, Scale, check_exact, converted, random_input

MODULES = {
    "relu": lambda: nn.ReLU(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "leaky_relu_inplace": lambda: nn.LeakyReLU(0.2, inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5),
    "hardtanh_inplace": lambda: nn.Hardtanh(-0.5, 0.5, inplace=True),
    "threshold": lambda: nn.Threshold(0.1, 20.0),
}

FUNCTIONS = {
    "F.relu": (F.relu,),
    "torch.relu": (torch.relu,),
    "torch.relu_": (torch.relu_,),
    "F.relu6": (F.relu6,),
    "F.leaky_relu": (F.leaky_relu, 0.3),
    "F.hardtanh_inplace": (F.hardtanh, -0.5, 0.5, True),
    "F.threshold": (F.threshold, 0.0, -1.0),
    "torch.threshold": (torch.threshold, 0.1, 0.1),
}

# (input requires grad, the parameter before the activation requires grad)
REQUIRES_GRAD = [(True, False), (False, True), (True, True)]


def boundary_input(dtype, requires_grad):
    x = random_input(2, 3, 6, 6, dtype=dtype, requires_grad=False)
    x.view(-1)[1::13] = 0.1  # where Threshold(0.1, ...) decides
    x.view(-1)[2::17] = 0.5  # where Hardtanh(-0.5, 0.5) decides
    x.view(-1)[3::19] = 6.0  # where ReLU6 decides
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_grad,scale_grad", REQUIRES_GRAD)
@pytest.mark.parametrize("name", MODULES)
def test_activation_modules_keep_one_bit(name, input_grad, scale_grad, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(Scale(3, 2), MODULES[name]()).to(dtype)
    model[0].scale.requires_grad_(scale_grad)
    saved, eager_saved = check_exact(model, [boundary_input(dtype, input_grad)], saves_less=True)
    if not scale_grad:  # only the activation saves: 216 elements, one bit each
        assert saved == 27


@pytest.mark.parametrize("input_grad,scale_grad", REQUIRES_GRAD)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_activation_functions(name, input_grad, scale_grad):
    model = Call(3, 2, *FUNCTIONS[name])
    model.scale.scale.requires_grad_(scale_grad)
    check_exact(model, [boundary_input(torch.float32, input_grad)], saves_less=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_method_calls(inplace):
    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale(3, 2)

        def forward(self, x):
            y = self.scale(x)
            return y.relu_() if inplace else y.relu()

    check_exact(Method(), [boundary_input(torch.float32, True)], saves_less=True)


def test_channels_last_and_nan():
    # NaN passes ReLU's gradient (NaN <= 0 is false) and takes LeakyReLU's slope (NaN > 0 is
    # false), as in aten. The upstream gradient is given directly: a loss would be NaN.
    model = nn.Sequential(Scale(3, 2), nn.ReLU(), Scale(3, 2), nn.LeakyReLU(0.1)).requires_grad_(False)
    x = boundary_input(torch.float32, False)
    x.view(-1)[5::23] = float("nan")
    x = x.to(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for candidate in (model, converted(model)):
        leaf = x.detach().requires_grad_()
        candidate(leaf).backward(upstream)
        grads.append(leaf.grad)
    assert not grads[0].isnan().any()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
