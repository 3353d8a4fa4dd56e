import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .layers import DTYPES, check_exact, random_input, requires_grad_combinations

CONVOLUTIONS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9, 9)),
    "conv2d_reflect_dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 4, 9, 9)),
    "conv2d_same_even_kernel": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 5, 5, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 11)),
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 7, 7)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 6, 3, stride=2), (2, 4, 4, 4, 4)),
}


def conv_model(name: str, dtype: torch.dtype, weight_grad: bool, bias_grad: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = CONVOLUTIONS[name][0]().to(dtype)
    conv.weight.requires_grad_(weight_grad)
    conv.bias.requires_grad_(bias_grad)
    return nn.Sequential(conv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_grad,weight_grad,bias_grad", requires_grad_combinations(3))
@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_conv_modules(name, input_grad, weight_grad, bias_grad, dtype):
    model = conv_model(name, dtype, weight_grad, bias_grad)
    x = random_input(*CONVOLUTIONS[name][1], dtype=dtype, requires_grad=input_grad)
    check_exact(model, [x], saves_less=not weight_grad)


@pytest.mark.parametrize("input_grad,weight_grad,bias_grad", requires_grad_combinations(3))
def test_conv2d_channels_last(input_grad, weight_grad, bias_grad):
    model = conv_model("conv2d_grouped", torch.float32, weight_grad, bias_grad).to(memory_format=torch.channels_last)
    x = random_input(2, 4, 9, 9, dtype=torch.float32, requires_grad=input_grad).to(memory_format=torch.channels_last)
    check_exact(model, [x.detach().requires_grad_(input_grad)], saves_less=not weight_grad)


class FunctionalConv(nn.Module):
    def __init__(self, function, weight_shape, *args, **kwargs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(weight_shape, generator=torch.Generator().manual_seed(1)))
        self.function, self.args, self.kwargs = function, args, kwargs

    def forward(self, x):
        return self.function(x, self.weight, None, *self.args, **self.kwargs)


@pytest.mark.parametrize(
    "function,weight_shape,input_shape,args",
    [
        (F.conv2d, (6, 4, 3, 3), (2, 4, 9, 9), (2, 1)),
        (torch.conv1d, (6, 2, 3), (2, 4, 9), (1, "valid", 1, 2)),
        (F.conv2d, (6, 4, 3, 3), (4, 9, 9), (1, "same")),  # unbatched
        (F.conv_transpose2d, (4, 6, 3, 3), (2, 4, 5, 5), (2, 1, 1)),
    ],
)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_conv_functions(function, weight_shape, input_shape, args, weight_grad):
    model = FunctionalConv(function, weight_shape, *args)
    model.weight.requires_grad_(weight_grad)
    x = random_input(*input_shape, dtype=torch.float32, requires_grad=True)
    check_exact(model, [x], saves_less=not weight_grad)


def test_conv_after_a_computed_input_frees_it():
    # A frozen conv after a trainable one: the trainable conv's output is not kept at all.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    model[1].requires_grad_(False)
    x = random_input(2, 3, 10, 10, dtype=torch.float32, requires_grad=False)
    saved, eager_saved = check_exact(model, [x], saves_less=True)
    assert eager_saved - saved == 2 * 4 * 8 * 8 * 4  # exactly the intermediate activation

