import itertools

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.passes import replace_eval_batch_norm_backward

from ..utils import assert_grads_match, assert_pass_leaves_graph_unchanged, saved_bytes_of

BATCH_NORMS = {
    "1d": (nn.BatchNorm1d, (4, 6, 9)),
    "2d": (nn.BatchNorm2d, (4, 6, 5, 7)),
    "3d": (nn.BatchNorm3d, (2, 6, 3, 4, 5)),
}


def make_case(dim, *, weight=False, bias=True, affine=True, dtype=torch.float32, channels_last=False):
    factory, shape = BATCH_NORMS[dim]
    torch.manual_seed(0)
    bn = factory(6, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    bn = bn.eval().to(dtype)
    if affine:
        bn.weight.requires_grad_(weight)
        bn.bias.requires_grad_(bias)
    # The frozen affine BN sits between two ops whose gradients are requested.
    model = nn.Sequential(nn.Identity(), bn, nn.Tanh())
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return model, [x.requires_grad_(True)]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dim", BATCH_NORMS)
def test_eval_frozen_affine_gradients_match_eager(dim, compiler):
    model, inputs = make_case(dim)
    backend = memsave_fx.backend(compiler=compiler)
    assert_grads_match(model, inputs, backend)


@pytest.mark.parametrize("weight,bias", list(itertools.product([True, False], repeat=2)))
def test_requires_grad_combinations_on_eager_compiler(weight, bias):
    model, inputs = make_case("2d", weight=weight, bias=bias)
    backend = memsave_fx.backend(compiler="eager")
    assert_grads_match(model, inputs, backend)
    rewrites = [r for r in backend.compiled[0].rewrites if r.pass_name == "replace_eval_batch_norm_backward"]
    assert bool(rewrites) == (not weight)


def test_without_affine_parameters():
    model, inputs = make_case("2d", affine=False)
    assert_grads_match(model, inputs, memsave_fx.backend(compiler="eager"))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_dtypes_and_layouts(dtype, channels_last):
    model, inputs = make_case("2d", dtype=dtype, channels_last=channels_last)
    assert_grads_match(model, inputs, memsave_fx.backend(compiler="eager"))


@pytest.mark.parametrize("dim", BATCH_NORMS)
def test_eager_compiler_drops_the_input(dim):
    model, inputs = make_case(dim)
    memsave = saved_bytes_of(model, inputs, memsave_fx.backend(compiler="eager"))
    assert memsave < saved_bytes_of(model, inputs, "aot_eager")


def test_train_mode_leaves_graph_unchanged():
    model, inputs = make_case("2d")
    model.train()
    assert_pass_leaves_graph_unchanged(replace_eval_batch_norm_backward, model, inputs)


def test_trainable_weight_leaves_graph_unchanged():
    model, inputs = make_case("2d", weight=True)
    assert_pass_leaves_graph_unchanged(replace_eval_batch_norm_backward, model, inputs)
