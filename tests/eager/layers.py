"""Small models around one layer each, for the eager rewrite's tests."""

from __future__ import annotations

import itertools

import torch
from torch import nn

import memsave_fx
from memsave_fx.eager import REWRITES

from ..utils import assert_grads_match

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


class Scale(nn.Module):
    """Multiplies by a parameter that starts at one: the layer after it sees the input itself,
    boundary values included, and a gradient reaches the parameter through that layer."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, *[1] * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Call(nn.Module):
    """Calls a function (not a module) on the output of `Scale`, so the trace has a call_function."""

    def __init__(self, channels: int, spatial_dims: int, function, *args, first_output: bool = False, **kwargs) -> None:
        super().__init__()
        self.scale = Scale(channels, spatial_dims)
        self.function, self.args, self.kwargs, self.first_output = function, args, kwargs, first_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.function(self.scale(x), *self.args, **self.kwargs)
        return out[0] if self.first_output else out


class FirstOutput(nn.Module):
    """The first of a pair, such as a max-pool's output and indices."""

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return pair[0]


def requires_grad_combinations(count: int) -> list[tuple[bool, ...]]:
    """Every requires_grad combination of `count` tensors in which something needs a gradient."""
    return [c for c in itertools.product([True, False], repeat=count) if any(c)]


def converted(model: nn.Module) -> nn.Module:
    """`memsave_fx.convert(model)`, checked to have replaced something (or the test would
    compare eager with eager)."""
    result = memsave_fx.convert(model)
    assert result is not model
    assert any(r.applied for m in result.modules() for r in getattr(m, "meta", {}).get(REWRITES, ()))
    return result


def check_exact(model: nn.Module, inputs: list[torch.Tensor], *, saves_less: bool) -> tuple[int, int]:
    """Gradients identical to eager PyTorch's, and saved bytes below eager's (or at most equal)."""
    saved, eager_saved = assert_grads_match(model, inputs, None, prepare=converted, tolerance=0.0)
    if saves_less:
        assert saved < eager_saved, (saved, eager_saved)
    else:
        assert saved <= eager_saved, (saved, eager_saved)
    return saved, eager_saved


def random_input(*shape: int, dtype: torch.dtype, requires_grad: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x.view(-1)[::11] = 0.0  # exact zeros, where masks decide
    return x.requires_grad_(requires_grad)
