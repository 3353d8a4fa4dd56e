import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.analysis import Decision
from memsave_fx.passes.approximate_activation_backward import SURROGATES, approximate_activation_backward

from ..utils import assert_pass_leaves_graph_unchanged


class Activation(nn.Module):
    """A trainable scale before the activation, so that the backward reaches through it."""

    def __init__(self, activation: nn.Module, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.activation = activation

    def forward(self, x):
        return self.activation(x * self.scale)


ACTIVATIONS = {
    "gelu": (lambda: nn.GELU(), "aten.gelu_backward.default"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "aten.gelu_backward.default"),
    "silu": (lambda: nn.SiLU(), "aten.silu_backward.default"),
}


def probe_points(surrogate) -> torch.Tensor:
    """Every threshold, and the float32 values two steps either side of it, plus random ones."""
    points = []
    for threshold in surrogate.thresholds:
        t = torch.tensor(threshold, dtype=torch.float32)
        below = torch.nextafter(torch.nextafter(t, t - 1), t - 1)
        above = torch.nextafter(torch.nextafter(t, t + 1), t + 1)
        points += [below, torch.nextafter(t, t - 1), t, torch.nextafter(t, t + 1), above]
    points = torch.stack(points)
    return torch.cat([points, torch.randn(243 - len(points), generator=torch.Generator().manual_seed(0)) * 4])


def surrogate_gradient(x: torch.Tensor, upstream: torch.Tensor, surrogate) -> torch.Tensor:
    thresholds = torch.tensor(surrogate.thresholds, dtype=torch.float32)
    codes = (x.float().unsqueeze(-1) > thresholds).sum(-1)
    return upstream.float() * torch.tensor(surrogate.slopes, dtype=torch.float32)[codes]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gradient_is_the_piecewise_constant_surrogate_at_and_around_every_threshold(name):
    make, op = ACTIVATIONS[name]
    surrogate = SURROGATES[op]
    x = probe_points(surrogate)  # 243 elements: the codes do not fill whole bytes
    model = Activation(make(), x.numel())
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    backend = memsave_fx.backend(approx_activations=True)
    leaf = x.clone().requires_grad_()
    out = torch.compile(model, backend=backend)(leaf)
    out.backward(upstream)
    assert [r.applied for r in backend.compiled[0].rewrites if r.pass_name == "approximate_activation_backward"] == [True]
    # d/dx of activation(x * scale) with scale = 1: the surrogate derivative.
    torch.testing.assert_close(leaf.grad, surrogate_gradient(x, upstream, surrogate), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_is_bitwise_inductors_and_only_codes_are_saved(name, dtype):
    make, _ = ACTIVATIONS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 30), make(), nn.Linear(30, 4)).to(dtype)
    model[2].weight.requires_grad_(False)
    x = torch.randn(7, 16, dtype=dtype)
    stock = torch.compile(model, backend="inductor")(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = torch.compile(model, backend=memsave_fx.backend(approx_activations=True))(x)
    assert torch.equal(ours, stock)
    activations = [t for t in saved if t.dtype == torch.uint8]
    assert [t.numel() for t in activations] == [-(-7 * 30 // 4)]  # 2 bits each, 4 to a byte
    assert not [t for t in saved if t.shape == (7, 30)]


def test_swiglu_keeps_its_gate_and_says_why():
    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.down.requires_grad_(False)

        def forward(self, x):
            return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    backend = memsave_fx.backend(approx_activations=True)
    torch.compile(SwiGLU(), backend=backend)(torch.randn(4, 8)).sum().backward()
    (rewrite,) = [r for r in backend.compiled[0].rewrites if r.pass_name == "approximate_activation_backward"]
    assert not rewrite.applied and "is read by the backward" in rewrite.reason


def test_off_by_default_leaves_the_graph_unchanged():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    assert_pass_leaves_graph_unchanged(approximate_activation_backward, model, [torch.randn(2, 8)])


def test_plan_marks_the_codes_as_approximated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    model[2].weight.requires_grad_(False)
    plan = memsave_fx.plan(model, torch.randn(8, 16), options={"approx_activations": True})
    (row,) = [t for t in plan.tensors if t.decision is Decision.APPROXIMATED]
    assert row.nbytes == 8 * 32 // 4 and row.baseline_nbytes == 8 * 32 * 4
    assert "2-bit ReGELU2 code" in row.reason and "packed at 2 bits per element" in row.reason
