"""Saved storages and liveness over hand-built forward graphs with known answers."""

import operator

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.descriptors import PlainAOTOutput, SavedForBackwardsAOTOutput
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from memsave_fx.analysis import SOURCE, GraphInput, InputKind
from memsave_fx.memory import memory_timeline, saved_storages, storage_base

aten = torch.ops.aten
FLOATS = 4 * 4 * 4  # bytes of one 4x4 float32 value


def forward_graph(build, saved_count):
    """A forward graph whose outputs are one model output, then `saved_count` saved values."""
    graph = fx.Graph()
    x, weight = graph.placeholder("primals_1"), graph.placeholder("primals_2")
    outputs = build(graph, x, weight)
    output = graph.output(tuple(outputs))
    output.meta["desc"] = [PlainAOTOutput(0)] + [SavedForBackwardsAOTOutput(i) for i in range(saved_count)]
    gm = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm, FakeTensorMode()).propagate(torch.randn(4, 4), torch.randn(4, 4))
    x.meta[SOURCE] = GraphInput("args[0]", InputKind.INPUT)
    weight.meta[SOURCE] = GraphInput("linear.weight", InputKind.PARAMETER)
    return gm


def test_views_resolve_to_the_storage_they_share():
    def build(graph, x, weight):
        product = graph.call_function(aten.mm.default, (x, weight))
        flat = graph.call_function(aten.view.default, (product, [16]))
        unsafe = graph.call_function(aten._unsafe_view.default, (product, [2, 8]))
        chunks = graph.call_function(aten.split.Tensor, (product, 2))
        chunk = graph.call_function(operator.getitem, (chunks, 1))
        transposed = graph.call_function(aten.t.default, (weight,))
        return product, flat, unsafe, chunk, transposed

    gm = forward_graph(build, 4)
    product, flat, unsafe, chunks, chunk, transposed = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert {storage_base(n) for n in (flat, unsafe, chunk)} == {product}
    # Saved three times over, the product is one storage; a view of a parameter is none.
    (storage,) = saved_storages(gm)
    assert storage.base is product and set(storage.saved) == {flat, unsafe, chunk}
    assert storage.nbytes == FLOATS and not storage.layout_copy


def test_saved_model_inputs_count_and_parameters_do_not():
    gm = forward_graph(lambda graph, x, weight: (graph.call_function(aten.mm.default, (x, weight)), x, weight), 2)
    (storage,) = saved_storages(gm)
    assert storage.base.name == "primals_1" and storage.nbytes == FLOATS


def test_timeline_frees_each_value_after_its_last_use():
    def build(graph, x, weight):
        scaled = graph.call_function(aten.mul.Tensor, (x, 2.0))  # read by mm: allocated
        product = graph.call_function(aten.mm.default, (scaled, weight))  # returned
        activated = graph.call_function(aten.relu.default, (product,))  # saved
        return product, activated

    gm = forward_graph(build, 1)
    # placeholders, mul, mm (then mul is freed), relu, output
    assert memory_timeline(gm, None, fuses_pointwise=True).forward == (0, 0, FLOATS, 2 * FLOATS, 2 * FLOATS, 2 * FLOATS)


def test_inductor_fuses_pointwise_chains_into_their_consumers():
    def build(graph, x, weight):
        scaled = graph.call_function(aten.mul.Tensor, (x, 3.0))
        shifted = graph.call_function(aten.add.Tensor, (scaled, 1.0))
        total = graph.call_function(aten.sum.default, (shifted,))
        return (total,)

    gm = forward_graph(build, 0)
    scalar = 4
    assert memory_timeline(gm, None, fuses_pointwise=True).forward == (0, 0, 0, 0, scalar, scalar)
    unfused = memory_timeline(gm, None, fuses_pointwise=False).forward
    assert unfused == (0, 0, FLOATS, 2 * FLOATS, FLOATS + scalar, scalar)
