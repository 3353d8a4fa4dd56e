import itertools

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.analysis import analyze_joint_graph
from memsave_fx.passes import replace_frozen_convolution_backward

from ..utils import assert_grads_match, assert_pass_leaves_graph_unchanged, joint_graph, saved_bytes_of

COMPILERS = ["inductor", "eager"]
BASELINES = {"inductor": "inductor", "eager": "aot_eager"}

# (module factory, input shape): every geometry the rewrite has to get right. Odd sizes make
# the adjoint transposed convolution need a non-zero output padding.
CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (2, 4, 11)),
    "conv2d_strided_padded": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 10)),
    "conv2d_stride3_odd": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(3, 2)), (2, 4, 11, 9)),
    "conv2d_dilated": (lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2), (2, 4, 9, 9)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), (2, 4, 8, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 8, 8)),
    "conv2d_no_bias": (lambda: nn.Conv2d(4, 6, 3, bias=False), (2, 4, 8, 8)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 8, 8)),
    "conv2d_replicate": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), (2, 4, 8, 8)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1), (2, 4, 5, 7, 6)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 7)),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        (2, 4, 5, 6),
    ),
    "conv_transpose3d_grouped": (lambda: nn.ConvTranspose3d(4, 6, 3, groups=2), (2, 4, 3, 4, 3)),
}


def make_case(name, *, weight=False, bias=True, input=True, dtype=torch.float32, channels_last=False):
    factory, shape = CONVS[name]
    torch.manual_seed(0)
    # A trainable layer in front keeps the frozen conv on the gradient path of something.
    conv = factory().to(dtype)
    conv.weight.requires_grad_(weight)
    if conv.bias is not None:
        conv.bias.requires_grad_(bias)
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return conv, [x.requires_grad_(input)]


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("name", CONVS)
def test_frozen_weight_gradients_match_eager(name, compiler):
    model, inputs = make_case(name)
    backend = memsave_fx.backend(compiler=compiler)
    assert_grads_match(model, inputs, backend)
    (graph,) = backend.compiled
    assert graph.released, f"no rewrite applied: {graph.rewrites}"


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize(
    "input,weight,bias",
    [c for c in itertools.product([True, False], repeat=3) if any(c)],
)
def test_requires_grad_combinations(input, weight, bias, compiler):
    model, inputs = make_case("conv2d_strided_padded", input=input, weight=weight, bias=bias)
    backend = memsave_fx.backend(compiler=compiler)
    assert_grads_match(model, inputs, backend)
    (graph,) = backend.compiled
    conv_rewrites = [r for r in graph.rewrites if r.pass_name == "replace_frozen_convolution_backward"]
    assert bool(conv_rewrites) == (not weight), conv_rewrites


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_dtypes_and_layouts(dtype, channels_last, compiler):
    model, inputs = make_case("conv2d_strided_padded", dtype=dtype, channels_last=channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    assert_grads_match(model, inputs, memsave_fx.backend(compiler=compiler))


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("name", ["conv2d_strided_padded", "conv2d_reflect", "conv3d", "conv_transpose2d"])
def test_frozen_conv_saves_less_than_stock(name, compiler):
    model, inputs = make_case(name)
    memsave = saved_bytes_of(model, inputs, memsave_fx.backend(compiler=compiler))
    stock = saved_bytes_of(model, inputs, BASELINES[compiler])
    assert memsave < stock


@pytest.mark.parametrize("compiler", COMPILERS)
def test_nothing_frozen_saves_as_much_as_stock(compiler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    inputs = [torch.randn(2, 3, 16, 16, requires_grad=True)]
    memsave = saved_bytes_of(model, inputs, memsave_fx.backend(compiler=compiler))
    stock = saved_bytes_of(model, inputs, BASELINES[compiler])
    # Stock Inductor also keeps a channels-last copy of every conv weight; memsave does not.
    weight_copies = sum(m.weight.nbytes for m in model if isinstance(m, nn.Conv2d)) if compiler == "inductor" else 0
    assert memsave == stock - weight_copies


def test_bias_only_gradient_keeps_no_activation():
    # Neither the input nor the weight needs a gradient: grad_bias is a sum of grad_output.
    model, inputs = make_case("conv2d_strided_padded", input=False)
    backend = memsave_fx.backend()
    saved, _ = assert_grads_match(model, inputs, backend)
    assert saved == 0


def test_trainable_weight_leaves_graph_unchanged():
    model, inputs = make_case("conv2d_strided_padded", weight=True)
    assert_pass_leaves_graph_unchanged(replace_frozen_convolution_backward, model, inputs)


def test_frozen_weight_rewrites_joint_graph():
    model, inputs = make_case("conv2d_strided_padded")
    gm = joint_graph(model, *inputs)
    analyze_joint_graph(gm.graph)
    (rewrite,) = replace_frozen_convolution_backward(gm.graph, memsave_fx.MemsaveConfig())
    assert rewrite.applied and rewrite.released
    gm.graph.eliminate_dead_code()
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution_backward.default)
    transposed = [n for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default) if n.args[6]]
    assert len(transposed) == 1 and transposed[0].args[7] == [0, 1]  # output padding for 9x10 at stride 2
