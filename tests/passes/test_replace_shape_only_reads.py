import copy

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.passes import replace_shape_only_reads

from ..utils import assert_grads_match, assert_pass_leaves_graph_unchanged, saved_bytes_of

# Layers whose backward reads the forward input only for its shape.
LAYERS = {
    "avg_pool2d": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 3, 9, 8)),
    "avg_pool3d": (lambda: nn.AvgPool3d(2), (2, 3, 4, 6, 5)),
    "adaptive_avg_pool2d": (lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 3, 7, 8)),
    "adaptive_avg_pool3d": (lambda: nn.AdaptiveAvgPool3d(2), (2, 3, 5, 4, 6)),
    "max_pool2d": (lambda: nn.MaxPool2d(2), (2, 3, 9, 8)),
    "max_pool3d": (lambda: nn.MaxPool3d(2), (2, 3, 4, 6, 5)),
    "reflection_pad1d": (lambda: nn.ReflectionPad1d(2), (2, 3, 7)),
    "reflection_pad2d": (lambda: nn.ReflectionPad2d((1, 2, 0, 1)), (2, 3, 5, 6)),
    "reflection_pad3d": (lambda: nn.ReflectionPad3d(1), (2, 3, 3, 4, 5)),
    "replication_pad1d": (lambda: nn.ReplicationPad1d(2), (2, 3, 7)),
    "replication_pad2d": (lambda: nn.ReplicationPad2d((1, 2, 0, 1)), (2, 3, 5, 6)),
    "replication_pad3d": (lambda: nn.ReplicationPad3d(1), (2, 3, 3, 4, 5)),
}


class ScaleThen(nn.Module):
    """`layer(2 * x)`: the layer's input is an activation that nothing else needs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x * 2)


def make_case(name, dtype=torch.float32):
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    return ScaleThen(factory()), [torch.randn(shape, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("name", LAYERS)
def test_gradients_match_eager(name, compiler):
    model, inputs = make_case(name)
    assert_grads_match(model, inputs, memsave_fx.backend(compiler=compiler))


@pytest.mark.parametrize("name", LAYERS)
def test_eager_compiler_keeps_no_input(name):
    model, inputs = make_case(name)
    backend = memsave_fx.backend(compiler="eager")
    memsave = saved_bytes_of(model, inputs, backend)
    stock = saved_bytes_of(model, inputs, "aot_eager")
    assert memsave < stock
    assert [r.applied for r in backend.compiled[0].rewrites] == [True]


@pytest.mark.parametrize("name", ["avg_pool2d", "avg_pool3d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "replication_pad2d"])
def test_inductor_keeps_no_input(name):
    model, inputs = make_case(name)
    assert saved_bytes_of(model, inputs, memsave_fx.backend()) < saved_bytes_of(model, inputs, "inductor")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_dtypes(dtype):
    model, inputs = make_case("avg_pool2d", dtype=dtype)
    assert_grads_match(model, inputs, memsave_fx.backend(compiler="eager"))


def test_data_reads_leave_graph_unchanged():
    # Softplus reads its input's data for the gradient: nothing here is shape-only.
    model = nn.Sequential(nn.Softplus(), nn.Linear(4, 3))
    assert_pass_leaves_graph_unchanged(replace_shape_only_reads, model, [torch.randn(2, 4, requires_grad=True)])


class ScaledWeightConv(nn.Module):
    """A convolution of a weight computed in the forward (as Inductor's conv-BN folding or a
    weight-norm reparametrisation computes one) on an input that needs no gradient."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3, dtype=dtype))
        self.scale = nn.Parameter(torch.rand(6, 1, 1, 1, dtype=dtype) + 0.5)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.scale, padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trained", ["both", "weight", "scale"])
def test_computed_conv_weight_read_only_for_its_shape(trained, dtype):
    model = ScaledWeightConv(dtype)
    model.weight.requires_grad_(trained != "scale")
    model.scale.requires_grad_(trained != "weight")
    inputs = [torch.randn(2, 3, 8, 8, dtype=dtype)]
    backend = memsave_fx.backend(compiler="eager")
    assert_grads_match(model, inputs, backend, reference="aot_eager")
    (rewrite,) = [r for r in backend.compiled[0].rewrites if r.pass_name == "replace_shape_only_reads"]
    assert rewrite.applied and "only for its shape" in rewrite.reason, rewrite
    # What stays is the input (the weight's gradient reads it) and the scale, never the product.
    weight_nbytes = model.weight.numel() * model.weight.element_size()
    stock = saved_bytes_of(copy.deepcopy(model), inputs, "aot_eager")
    assert saved_bytes_of(copy.deepcopy(model), inputs, memsave_fx.backend(compiler="eager")) <= stock - weight_nbytes


def test_parameter_conv_weight_is_left_alone():
    # A parameter weight is a graph input, kept anyway: a stand-in would only add an allocation.
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert_pass_leaves_graph_unchanged(replace_shape_only_reads, model, [torch.randn(2, 3, 6, 6)])


def test_conv_weight_read_for_the_input_gradient_is_kept():
    model = ScaledWeightConv()
    assert_pass_leaves_graph_unchanged(replace_shape_only_reads, model, [torch.randn(2, 3, 8, 8, requires_grad=True)])
