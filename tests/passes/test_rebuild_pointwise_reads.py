"""rebuild_pointwise_reads: LLM LoRA as peft runs it (low-precision base, fp32 adapters, dropout)."""

import copy

import pytest
import torch
import torch.nn as nn

import memsave_fx
from benchmarks.workloads import LastHiddenState
from memsave_fx import MemsaveConfig
from memsave_fx.analysis import Decision, analyze_joint_graph
from memsave_fx.passes.rebuild_pointwise_reads import rebuild_pointwise_reads

from ..utils import (
    assert_grads_close,
    assert_pass_leaves_graph_unchanged,
    clone_inputs,
    decomposed_joint_graph,
    graph_code,
    run_step,
)

pytestmark = pytest.mark.slow


def lora_model(family: str, dtype: torch.dtype, dropout: float, targets: str) -> tuple[nn.Module, list[torch.Tensor], int]:
    """A one-layer transformers model in `dtype` with peft LoRA at peft's defaults (fp32
    adapters); returns it, its input and how many linear layers carry an adapter."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = getattr(transformers, f"{family}Config")(
        hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = getattr(transformers, f"{family}Model")(config).to(dtype)
    target_modules = "all-linear" if targets == "all-linear" else ["q_proj", "v_proj"]
    model = get_peft_model(LastHiddenState(base), LoraConfig(r=8, target_modules=target_modules, lora_dropout=dropout))
    with torch.no_grad():  # a fresh adapter's B is zero, which would make A's gradient zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    adapters = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    return model, [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))], adapters


def rebuilds(backend: memsave_fx.MemsaveBackend, *, applied: bool = True) -> list:
    return [
        r for c in backend.compiled for r in c.rewrites
        if r.pass_name == rebuild_pointwise_reads.__name__ and r.applied == applied
    ]  # fmt: skip


# Dropout draws from Inductor's generator in both runs, so the reference is stock Inductor.
CONFIGS = [
    ("Llama", torch.bfloat16, 0.05, "all-linear"),
    ("Llama", torch.float16, 0.0, "q_proj,v_proj"),
    ("Mistral", torch.bfloat16, 0.0, "all-linear"),
    ("Qwen2", torch.float16, 0.05, "q_proj,v_proj"),
]


@pytest.mark.parametrize("family, dtype, dropout, targets", CONFIGS, ids=lambda v: str(v).removeprefix("torch."))
def test_low_precision_lora_matches_inductor_and_keeps_less(family, dtype, dropout, targets):
    model, inputs, adapters = lora_model(family, dtype, dropout, targets)
    expected, stock = run_step(copy.deepcopy(model), clone_inputs(inputs), "inductor")
    backend = memsave_fx.backend()
    actual, saved = run_step(copy.deepcopy(model), clone_inputs(inputs), backend)
    # Within low-precision rounding: the partitioner recomputes other bf16/fp16 values
    # differently once the fp32 copies are gone, as it does under stock compilation.
    assert_grads_close(actual, expected, tolerance=3e-2)
    # One fp32 copy per adapter, each rebuilt from the narrow input (and its 1-bit mask).
    assert len(rebuilds(backend)) == adapters, [r.reason for r in rebuilds(backend, applied=False)]
    assert saved < stock


def test_fp32_lora_with_dropout_is_bitwise_stock_inductor():
    # In fp32 the rebuilt dropout outputs are the forward's own ops on the same inputs: the
    # gradients are bitwise the same as stock Inductor's.
    model, inputs, adapters = lora_model("Llama", torch.float32, 0.05, "all-linear")
    expected, stock = run_step(copy.deepcopy(model), clone_inputs(inputs), "inductor")
    backend = memsave_fx.backend()
    actual, saved = run_step(copy.deepcopy(model), clone_inputs(inputs), backend)
    assert rebuilds(backend)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert saved < stock


def test_the_plan_says_what_each_copy_is_rebuilt_from():
    model, inputs, adapters = lora_model("Llama", torch.bfloat16, 0.05, "all-linear")
    plan = memsave_fx.plan(model, *inputs)
    dropped = [t for t in plan.tensors if t.decision is Decision.DROPPED and "rebuilt in the backward" in t.reason]
    assert len(dropped) == adapters
    for row in dropped:
        assert row.dtype == torch.float32 and row.nbytes == 0 and row.baseline_nbytes > 0
        assert "dropout output of a widened value" in row.reason and "(bfloat16)" in row.reason
        assert "the 1-bit mask" in row.reason
    assert plan.saved_bytes < plan.baseline_saved_bytes


class DropoutAdapter(nn.Module):
    """An fp32 frozen linear with one adapter reading dropout of its input: the input is as
    wide as the dropout copy, and no other adapter shares it."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.dropout = nn.Dropout(0.1)
        self.lora_a = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return self.frozen(h) + self.lora_a(self.dropout(h)).sum(-1, keepdim=True)


def test_declines_where_the_sources_are_as_wide_and_leaves_the_graph_unchanged():
    gm = decomposed_joint_graph(DropoutAdapter(), torch.randn(8, 16))
    before = graph_code(gm)
    analyze_joint_graph(gm.graph)
    (declined,) = rebuild_pointwise_reads(gm.graph, MemsaveConfig())
    assert not declined.applied and "nothing to save" in declined.reason and "the 1-bit mask" in declined.reason
    assert graph_code(gm) == before


def test_a_graph_with_nothing_to_rebuild_is_unchanged():
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    assert_pass_leaves_graph_unchanged(rebuild_pointwise_reads, model, [torch.randn(8, 16)])


def test_off_without_exact_compression():
    model, inputs, _ = lora_model("Llama", torch.bfloat16, 0.0, "q_proj,v_proj")
    gm = decomposed_joint_graph(model, *inputs)
    before = graph_code(gm)
    analyze_joint_graph(gm.graph)
    assert rebuild_pointwise_reads(gm.graph, MemsaveConfig(exact_compression=False)) == []
    assert graph_code(gm) == before
