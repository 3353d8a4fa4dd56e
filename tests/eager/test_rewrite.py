import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import memsave_fx
from memsave_fx.analysis import BACKWARD_READS, analyze_joint_graph
from memsave_fx.eager import REWRITES

from ..utils import graph_code, joint_graph
from .layers import Scale, random_input


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.max_pool2d(torch.relu(self.norm(self.conv(x))), 2))


def test_forward_module_gets_memory_saving_calls_and_keeps_its_parameters():
    model = ConvNet().eval()
    traced = fx.symbolic_trace(model)
    before = graph_code(traced)
    rewritten = memsave_fx.rewrite(traced)
    assert graph_code(traced) == before  # the input module is left as it was
    targets = {n.target.__module__ for n in rewritten.graph.nodes if n.op == "call_function"}
    assert {"memsave_fx.eager.convolution", "memsave_fx.eager.batch_norm", "memsave_fx.eager.activations",
            "memsave_fx.eager.max_pool"} <= targets  # fmt: skip
    assert {n.name for n in rewritten.graph.nodes} >= {"conv", "norm", "relu", "max_pool2d", "head"}
    assert dict(rewritten.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(a is b for a, b in zip(rewritten.parameters(), model.parameters()))
    records = rewritten.meta[REWRITES]
    assert [r.node for r in records] == ["conv", "norm", "relu", "max_pool2d", "head"]
    assert all(r.applied for r in records)


def test_module_without_saving_calls_is_unchanged():
    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.GELU()))
    rewritten = memsave_fx.rewrite(traced)
    assert graph_code(rewritten) == graph_code(traced)
    assert rewritten.meta[REWRITES] == []


class HookedConv(nn.Conv2d):
    pass


class LeafConvTracer(fx.Tracer):
    """Keeps every conv a call_module, as symbolic_trace does only for torch's own classes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


class CustomConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("kind", ["forward hook", "overridden forward"])
def test_modules_that_may_compute_something_else_are_left_with_a_reason(kind):
    conv = HookedConv(3, 3, 1) if kind == "forward hook" else CustomConv(3, 3, 1)
    root = nn.Sequential(conv)
    traced = fx.GraphModule(root, LeafConvTracer().trace(root))
    if kind == "forward hook":
        # Registered after tracing: symbolic_trace itself inlines a module that has hooks.
        conv.register_forward_hook(lambda module, args, output: output + 1)
    rewritten = memsave_fx.rewrite(traced)
    assert graph_code(rewritten) == graph_code(traced)
    (record,) = rewritten.meta[REWRITES]
    assert not record.applied
    assert ("forward hooks" if kind == "forward hook" else "overrides forward of Conv2d") in record.reason
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(rewritten(x), traced(x))


def test_rejects_what_is_not_a_graph_module():
    with pytest.raises(TypeError, match="takes a torch.fx.GraphModule .* got Conv2d; for an nn.Module use memsave_fx.convert"):
        memsave_fx.rewrite(nn.Conv2d(1, 1, 1))


def test_joint_graph_without_fake_values_is_rejected():
    gm = joint_graph(nn.Sequential(nn.Conv2d(3, 3, 1)).requires_grad_(False), torch.randn(1, 3, 4, 4, requires_grad=True))
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    with pytest.raises(ValueError, match=r"needs fake values in node.meta\['val'\]"):
        memsave_fx.rewrite(gm)


# --- joint forward/backward graphs -------------------------------------------------------


def frozen_conv_step_graph(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list, list]:
    """make_fx of a training step that calls torch.autograd.grad: AOTAutograd's joint layout,
    the forward output followed by one gradient slot per primal."""
    names = [n for n, _ in model.named_parameters()]

    def train_step(primals, tangents):
        x, *params = primals
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        wanted = [p for p in primals if p.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, tangents))
        return out, *[next(grads) if p.requires_grad else None for p in primals]

    primals = [x, *model.parameters()]
    tangents = [torch.randn(model(x).shape, generator=torch.Generator().manual_seed(5))]
    return make_fx(train_step)(primals, tangents), primals, tangents


def forward_values_read_by_backward(gm: fx.GraphModule) -> set[str]:
    graph = copy.deepcopy(gm.graph)
    analyze_joint_graph(graph)
    return {n.name for n in graph.nodes if n.meta.get(BACKWARD_READS) and not n.name.startswith("tangents")}


def test_make_fx_joint_graph_gets_the_backend_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), Scale(4, 2))
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    x = random_input(2, 3, 10, 10, dtype=torch.float32, requires_grad=False)
    gm, primals, tangents = frozen_conv_step_graph(model, x)
    rewritten = memsave_fx.rewrite(gm)

    assert any(r.applied and r.pass_name == "replace_frozen_convolution_backward" for r in rewritten.meta[REWRITES])
    kept, kept_before = forward_values_read_by_backward(rewritten), forward_values_read_by_backward(gm)
    assert kept < kept_before and "relu" in kept_before - kept  # the frozen conv's input

    # The passes' bias gradient is a plain sum, equal up to the order of summation.
    expected = gm(primals, tangents)
    actual = rewritten(primals, tangents)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want)


def test_aot_autograd_joint_graph_saves_fewer_bytes_after_partitioning():
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from memsave_fx.memory import saved_storages

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    model[0].weight.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    x = torch.randn(2, 3, 12, 12)
    joint = joint_graph(model, x)

    def saved_bytes(gm: fx.GraphModule) -> int:
        inputs = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]
        forward, _ = min_cut_rematerialization_partition(copy.deepcopy(gm), inputs, num_fwd_outputs=1)
        return sum(s.nbytes for s in saved_storages(forward))

    assert saved_bytes(memsave_fx.rewrite(joint)) < saved_bytes(joint)
