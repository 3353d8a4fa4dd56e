import torch
from torch import nn

from memsave_fx.analysis import (
    BACKWARD_READS,
    DIFFERENTIABLE,
    GRADIENT_OF,
    IS_BACKWARD,
    LIVE_OUTPUTS,
    ReadPurpose,
    analyze_joint_graph,
    needed_by_backward,
)

from .utils import joint_graph

aten = torch.ops.aten


class FrozenConvNet(nn.Module):
    """A trainable conv, a frozen conv, an average pool: one read of each purpose."""

    def __init__(self):
        super().__init__()
        self.trainable = nn.Conv2d(3, 4, 3)
        self.frozen = nn.Conv2d(4, 4, 3)
        self.frozen.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.pool(self.frozen(torch.relu(self.trainable(x))))


def analyzed():
    torch.manual_seed(0)
    gm = joint_graph(FrozenConvNet(), torch.randn(2, 3, 10, 10))
    info = analyze_joint_graph(gm.graph)
    return gm.graph, info


def reads_of(node):
    return {(r.reader.target, r.argument): r.purpose for r in node.meta.get(BACKWARD_READS, [])}


def test_gradients_map_to_primals():
    graph, info = analyzed()
    # primals: trainable.weight, trainable.bias, x, frozen.weight, frozen.bias
    requested = [p for p in info.primals if p in info.gradients]
    assert len(info.primals) == 5 and len(requested) == 2
    assert len(info.frozen_primals) == 3
    for primal in info.primals:
        assert (primal.meta[GRADIENT_OF] is not None) == (primal in info.gradients)


def test_differentiable_follows_requested_primals():
    graph, info = analyzed()
    convs = graph.find_nodes(op="call_function", target=aten.convolution.default)
    trainable_conv, frozen_conv = convs
    assert trainable_conv.meta[DIFFERENTIABLE] and frozen_conv.meta[DIFFERENTIABLE]
    assert not any(p.meta[DIFFERENTIABLE] for p in info.frozen_primals)
    assert all(t.meta[IS_BACKWARD] and not t.meta[DIFFERENTIABLE] for t in info.tangents)
    assert not trainable_conv.meta[IS_BACKWARD]


def test_read_purposes():
    graph, info = analyzed()
    relu = graph.find_nodes(op="call_function", target=aten.relu.default)[0]
    frozen_conv = graph.find_nodes(op="call_function", target=aten.convolution.default)[1]
    x = info.primals[2]
    # The frozen conv's input would feed only the frozen weight's gradient, which the output
    # mask leaves out: the kernel reads no more than its shape.
    assert reads_of(relu)[(aten.convolution_backward.default, "input")] is ReadPurpose.METADATA
    # The pool's input is read only for its shape.
    assert set(reads_of(frozen_conv).values()) == {ReadPurpose.METADATA}
    # The trainable conv's input feeds its weight gradient.
    assert reads_of(x)[(aten.convolution_backward.default, "input")] is ReadPurpose.GRADIENT
    assert needed_by_backward(x) and not needed_by_backward(relu) and not needed_by_backward(frozen_conv)


def test_live_outputs_of_fused_backward():
    graph, _ = analyzed()
    trainable_bw, frozen_bw = sorted(
        graph.find_nodes(op="call_function", target=aten.convolution_backward.default),
        key=lambda n: n.args[2].name,
    )
    # The trainable conv's input (x) needs no gradient; the frozen conv's input gradient does.
    assert trainable_bw.meta[LIVE_OUTPUTS] == {1, 2}
    assert frozen_bw.meta[LIVE_OUTPUTS] == {0}


def test_positional_fallback_without_descriptors():
    graph, info = analyzed()
    expected = {p.name: g.name for p, g in info.gradients.items()}
    del graph.output_node().meta["desc"]
    fallback = analyze_joint_graph(graph)
    assert {p.name: g.name for p, g in fallback.gradients.items()} == expected


def test_graph_without_backward_is_not_annotated():
    graph = torch.fx.symbolic_trace(nn.Linear(3, 2)).graph
    assert analyze_joint_graph(graph) is None
    assert not any(IS_BACKWARD in n.meta for n in graph.nodes)
