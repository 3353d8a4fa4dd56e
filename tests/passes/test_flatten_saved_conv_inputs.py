import copy

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import memsave_fx
from memsave_fx.passes import flatten_saved_conv_inputs

from ..utils import assert_grads_match, assert_pass_leaves_graph_unchanged, saved_bytes_of


def make_case(frozen=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    for conv in (model[2], model[4]):
        conv.weight.requires_grad_(not frozen)
    return model, [torch.randn(2, 3, 14, 14, requires_grad=True)]


def saved_storages(model, inputs, backend):
    storages = []

    def pack(tensor):
        storages.append(tensor.untyped_storage().data_ptr())
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.compile(model, backend=backend)(*inputs)
    return set(storages)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_weights_and_input_are_saved_as_themselves(frozen):
    model, inputs = make_case(frozen)
    saved = saved_storages(model, inputs, memsave_fx.backend())
    weights = {m.weight.untyped_storage().data_ptr() for m in model if isinstance(m, nn.Conv2d)}
    assert weights <= saved
    assert inputs[0].untyped_storage().data_ptr() in saved
    # Stock Inductor saves channels-last copies instead.
    assert not weights & saved_storages(model, inputs, "inductor")


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_gradients_match_eager(frozen):
    model, inputs = make_case(frozen)
    assert_grads_match(model, inputs, memsave_fx.backend())


def test_exact_compression_off_keeps_stock_copies():
    model, inputs = make_case(frozen=False)
    backend = memsave_fx.backend(exact_compression=False)
    assert saved_bytes_of(model, inputs, backend) == saved_bytes_of(model, inputs, "inductor")
    assert not [r for r in backend.compiled[0].rewrites if r.pass_name == "flatten_saved_conv_inputs"]


@pytest.mark.parametrize(
    "config", [memsave_fx.MemsaveConfig(compiler="eager"), memsave_fx.MemsaveConfig(exact_compression=False)]
)
def test_leaves_graph_unchanged_when_off(config):
    model, inputs = make_case()
    assert_pass_leaves_graph_unchanged(flatten_saved_conv_inputs, model, inputs, config)


def test_leaves_graph_unchanged_without_convolutions():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    assert_pass_leaves_graph_unchanged(flatten_saved_conv_inputs, model, [torch.randn(3, 2, 2, 4, requires_grad=True)])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_leaves_channels_last_and_depthwise_weights_alone(memory_format):
    """Inductor copies neither; flattening a depthwise weight of a channels-last model and
    viewing it back would give it contiguous strides, and the forward conv a different layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 1)).to(memory_format=memory_format)
    model[2].weight.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    assert_pass_leaves_graph_unchanged(flatten_saved_conv_inputs, model, [x], decomposed=True)


class FoldedConv(nn.Module):
    """A frozen convolution of a per-channel scaled weight, as Inductor's conv-BN folding
    computes one: the backward rebuilds the product from the weight for the input gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3), requires_grad=False)
        self.scale = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5, requires_grad=False)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.scale, padding=1)


def test_a_weight_scaled_before_its_convolution_is_saved_as_itself():
    model, inputs = FoldedConv(), [torch.randn(2, 3, 10, 10, requires_grad=True)]
    assert_grads_match(model, inputs, memsave_fx.backend())
    assert model.weight.untyped_storage().data_ptr() in saved_storages(model, inputs, memsave_fx.backend())
    assert model.weight.untyped_storage().data_ptr() not in saved_storages(model, inputs, "inductor")


@pytest.mark.parametrize("layout_optimization", [True, False], ids=["channels_last", "contiguous"])
def test_a_weight_gradient_leaves_the_backward_in_stock_inductors_layout(layout_optimization):
    """The first convolution reads the saved input, flat, in the backward too. Its weight
    gradient comes out channels-last where Inductor runs convolutions so, as under stock
    Inductor; a contiguous input would make Inductor copy it to contiguous, one kernel more."""
    model, _ = make_case(frozen=True)  # only the first convolution trains
    inputs = [torch.randn(2, 3, 14, 14)]
    upstream = torch.randn(2, 4, 8, 8)
    strides = {}
    with torch._inductor.config.patch(layout_optimization=layout_optimization):
        for name, backend in (("memsave", memsave_fx.backend()), ("inductor", "inductor")):
            copied = copy.deepcopy(model)
            copied[0].weight.register_hook(lambda grad, name=name: strides.update({name: grad.stride()}))
            torch.compile(copied, backend=backend)(*inputs).backward(upstream)
    assert strides["memsave"] == strides["inductor"]
    assert (strides["memsave"] == (27, 1, 9, 3)) is layout_optimization
    assert_grads_match(model, inputs, memsave_fx.backend())
