import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memsave_fx
from memsave_fx.analysis import Decision
from memsave_fx.passes.pool_convolution_inputs import pool_convolution_inputs

from ..utils import assert_pass_leaves_graph_unchanged, saved_bytes_of

POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

# (convolution, input shape, k): sizes k does not divide, transposed and grouped convolutions.
CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 11), 2),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 7, 9), 2),
    "conv2d_strided_k3": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (2, 4, 10, 8), 3),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), (2, 3, 5, 6, 7), 2),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 7, 9), 2),
}


def pooled_then_upsampled(x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: average over k-wide windows (a partial last window averages what it
    covers), repeated back to x's size."""
    spatial = x.dim() - 2
    out = POOLS[spatial](x, k, k, ceil_mode=True)
    for dim in range(2, 2 + spatial):
        out = out.repeat_interleave(k, dim).narrow(dim, 0, x.shape[dim])
    return out


@pytest.mark.parametrize("case", CASES)
def test_weight_gradient_reads_the_pooled_input_and_the_rest_stays_exact(case):
    make, shape, k = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), make())
    x = torch.randn(shape)
    upstream = torch.randn_like(model(x))

    backend = memsave_fx.backend(pool_activations=k)
    ours, leaf = copy.deepcopy(model), x.clone().requires_grad_()
    out = torch.compile(ours, backend=backend)(leaf)
    out.backward(upstream)
    assert [r.applied for c in backend.compiled for r in c.rewrites if r.pass_name == "pool_convolution_inputs"] == [True]

    assert torch.equal(out, torch.compile(copy.deepcopy(model), backend="inductor")(x))  # Inductor's forward
    exact, reference_leaf = copy.deepcopy(model), x.clone().requires_grad_()
    exact(reference_leaf).backward(upstream)
    pooled_model = copy.deepcopy(model)
    pooled_model[1](pooled_then_upsampled(torch.relu(x), k)).backward(upstream)

    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1].bias.grad, exact[1].bias.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1].weight.grad, pooled_model[1].weight.grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[1].weight.grad, exact[1].weight.grad)  # it is approximate


def test_only_the_pooled_copies_and_the_mask_are_kept(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(dtype)
    x = torch.randn(2, 3, 15, 16, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.compile(model, backend=memsave_fx.backend(pool_activations=2))(x)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved flat, as views
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in parameters]
    shapes = sorted(tuple(t.shape) for t in activations if t.dtype == dtype)
    # The input and the ReLU output, 15 x 16, pooled 2 x 2, a partial row included.
    assert shapes == [(2, 3, 8, 8), (2, 8, 8, 8)]
    masks = [t for t in activations if t.dtype == torch.uint8]
    assert sum(t.numel() for t in masks) == 2 * 8 * 15 * 16 // 8  # the ReLU mask, 1 bit each


def test_bf16_keeps_less_than_exact_memsave():
    # In bf16 the partitioner may keep the ReLU output itself rather than its boolean mask (it
    # weighs both alike, not knowing the mask is packed to 1 bit); the input copy still shrinks.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(torch.bfloat16)
    x = torch.randn(2, 3, 15, 16, dtype=torch.bfloat16)
    exact = saved_bytes_of(copy.deepcopy(model), [x], memsave_fx.backend())
    assert saved_bytes_of(copy.deepcopy(model), [x], memsave_fx.backend(pool_activations=2)) < exact


def test_an_input_read_by_other_gradients_is_left_alone():
    class Scaled(nn.Module):
        """The conv's input also feeds a trainable scale, whose gradient reads it in full."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.scale = nn.Parameter(torch.ones(3, 1, 1))

        def forward(self, x):
            h = torch.relu(x)
            return self.conv(h) + h * self.scale

    config = memsave_fx.MemsaveConfig(pool_activations=2)
    assert_pass_leaves_graph_unchanged(pool_convolution_inputs, Scaled(), [torch.randn(2, 3, 8, 8)], config, decomposed=True)
    backend = memsave_fx.backend(pool_activations=2)
    torch.compile(Scaled(), backend=backend)(torch.randn(2, 3, 8, 8)).sum().backward()
    (rewrite,) = [r for r in backend.compiled[0].rewrites if r.pass_name == "pool_convolution_inputs"]
    assert not rewrite.applied and "a pooled copy would only add to it" in rewrite.reason


def test_off_by_default_leaves_the_graph_unchanged():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3))
    assert_pass_leaves_graph_unchanged(pool_convolution_inputs, model, [torch.randn(2, 3, 8, 8)])


def test_convolutions_reading_one_input_share_one_pooled_copy():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            h = torch.relu(x)
            return self.a(h).sum() + self.b(h).sum()

    plan = memsave_fx.plan(TwoHeads(), torch.randn(2, 3, 8, 8), options={"pool_activations": 2})
    (row,) = [t for t in plan.tensors if t.decision is Decision.COMPRESSED and t.op == "relu"]
    assert row.nbytes == 2 * 3 * 4 * 4 * 4 and row.baseline_nbytes == 2 * 3 * 8 * 8 * 4
    assert "average-pooled over windows of 2×2 for the gradients of a.weight, b.weight" in row.reason
