"""The memory plan against what the compiled models really keep, and its decisions and reasons."""

import copy
import json
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import min_cut_rematerialization_partition

import memsave_fx
from memsave_fx.analysis import Decision

from .utils import saved_bytes_of


class KnownAnswer(nn.Module):
    """A trained stem and head around a frozen convolution."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.frozen = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.act2(self.frozen(self.act1(self.stem(x)))))


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = KnownAnswer(), KnownAnswer()
        self.middle = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        x = self.middle(self.first(x))
        torch._dynamo.graph_break()
        return self.second(x)


ACTIVATION_BYTES = 2 * 8 * 12 * 12 * 4  # one float32 activation of KnownAnswer at batch 2


def known_answer():
    torch.manual_seed(0)
    return KnownAnswer(), torch.randn(2, 3, 12, 12)


@pytest.fixture(scope="module")
def known_plan():
    model, x = known_answer()
    return memsave_fx.plan(model, x)


def rows(plan, decision, module):
    return [t for t in plan.tensors if t.decision is decision and t.module == module]


def test_drops_what_only_a_frozen_weight_gradient_reads(known_plan):
    (dropped,) = rows(known_plan, Decision.DROPPED, "act1")
    assert dropped.op == "relu" and dropped.shape == (2, 8, 12, 12) and dropped.dtype == torch.float32
    assert (dropped.nbytes, dropped.baseline_nbytes) == (0, ACTIVATION_BYTES)
    assert "frozen frozen.weight" in dropped.reason


def test_compresses_the_mask_its_activation_still_needs(known_plan):
    (mask,) = rows(known_plan, Decision.COMPRESSED, "act1")
    assert mask.dtype == torch.bool and mask.shape == (2, 8, 12, 12)
    assert mask.nbytes == 2 * 8 * 12 * 12 // 8
    assert "1 bit" in mask.reason


def test_max_pool_offsets_show_as_compressed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3))
    model[2].weight.requires_grad_(False)
    plan = memsave_fx.plan(model, torch.randn(2, 3, 17, 17))
    (offsets,) = [t for t in plan.tensors if t.dtype == torch.int8]
    assert offsets.decision is Decision.COMPRESSED and offsets.module == "1"
    assert (offsets.nbytes, offsets.baseline_nbytes) == (2 * 4 * 8 * 8 // 2, 2 * 4 * 8 * 8)
    assert offsets.reason == "max-pool offsets in a window of 9 packed at 4 bits per element"


def test_keeps_what_a_trained_weight_gradient_reads(known_plan):
    (kept,) = rows(known_plan, Decision.KEPT, "act2")
    assert kept.op == "relu" and kept.nbytes == kept.baseline_nbytes == ACTIVATION_BYTES
    assert "head.weight" in kept.reason
    (model_input,) = [t for t in known_plan.tensors if t.name == "args[0]"]
    assert model_input.decision is Decision.KEPT and "stem.weight" in model_input.reason


def test_rows_add_up_and_leave_parameters_out(known_plan):
    assert known_plan.saved_bytes == sum(t.nbytes for t in known_plan.tensors)
    assert known_plan.baseline_saved_bytes == sum(t.baseline_nbytes for t in known_plan.tensors)
    assert all(t.reason for t in known_plan.tensors)
    # Parameters are not activations; only Inductor's channels-last copies of them are.
    assert all(t.op != "parameter" or "channels-last copy" in t.name for t in known_plan.tensors)
    assert 0 < known_plan.saved_bytes < known_plan.baseline_saved_bytes
    assert known_plan.peak_bytes >= known_plan.parameter_bytes + known_plan.input_bytes + known_plan.saved_bytes


def test_memsave_matches_what_the_hooks_see(known_plan):
    model, x = known_answer()
    assert_close(known_plan.saved_bytes, saved_bytes_of(copy.deepcopy(model), [x], "memsave"))
    torch._dynamo.reset()
    assert_close(known_plan.baseline_saved_bytes, saved_bytes_of(copy.deepcopy(model), [x], "inductor"))


def assert_close(predicted, measured):
    assert abs(predicted - measured) <= 0.03 * measured, f"predicted {predicted}, measured {measured}"


@pytest.mark.parametrize(
    "options",
    [{"exact_compression": False}, {"compiler": "eager"}],
    ids=["no_compression", "eager_compiler"],
)
def test_options_reach_the_plan(options):
    model, x = known_answer()
    plan = memsave_fx.plan(model, x, options=options)
    assert not [t for t in plan.tensors if t.decision is Decision.COMPRESSED]
    assert_close(plan.saved_bytes, saved_bytes_of(copy.deepcopy(model), [x], memsave_fx.backend(**options)))
    torch._dynamo.reset()
    stock = "inductor" if "compiler" not in options else aot_autograd(
        fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=min_cut_rematerialization_partition
    )
    assert_close(plan.baseline_saved_bytes, saved_bytes_of(copy.deepcopy(model), [x], stock))


def test_backend_plans_each_graph_it_compiled():
    torch.manual_seed(0)
    model, x = WithGraphBreak(), torch.randn(2, 3, 12, 12)
    backend = memsave_fx.backend()
    measured = saved_bytes_of(copy.deepcopy(model), [x], backend)
    plans = backend.plans()
    assert len(plans) == 2 and all(p.saved_bytes > 0 for p in plans)
    assert_close(sum(p.saved_bytes for p in plans), measured)
    combined = memsave_fx.plan(model, x)
    assert combined.graphs == 2 and combined.saved_bytes == sum(p.saved_bytes for p in plans)
    assert {t.graph for t in combined.tensors} == {0, 1}


def test_plan_computes_nothing_real_and_leaves_no_compiled_code():
    model, x = known_answer()
    before = {name: p.clone() for name, p in model.named_parameters()}
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(3):
            memsave_fx.plan(model, x)
        backend = memsave_fx.backend()
        torch.compile(model, backend=backend)(x)
    assert len(backend.compiled) == 1, "planning used up the recompile limit of the user's compile"
    assert all(p.grad is None and torch.equal(p, before[name]) for name, p in model.named_parameters())


class ScaledRMSNorm(nn.Module):
    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_plans_in_a_row_keep_float_attributes_constant():
    # The second plan sees another value of `eps` at the same code location; Dynamo's
    # automatic dynamism would make it a tensor input that fake tensors cannot read.
    for eps in (1e-5, 1e-6):
        model = nn.Sequential(nn.Linear(8, 8), ScaledRMSNorm(eps), nn.Linear(8, 2))
        assert memsave_fx.plan(model, torch.randn(4, 8)).saved_bytes > 0


def test_a_model_without_backward_keeps_nothing():
    model, x = known_answer()
    model.requires_grad_(False)
    plan = memsave_fx.plan(model, x)
    assert plan.tensors == () and plan.saved_bytes == plan.baseline_saved_bytes == 0
    assert plan.gradient_bytes == 0 and plan.peak_bytes >= plan.parameter_bytes + plan.input_bytes


def test_rejects_what_it_cannot_plan():
    with pytest.raises(TypeError, match="nn.Module"):
        memsave_fx.plan(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="compiler"):
        memsave_fx.plan(nn.Linear(2, 2), torch.randn(2, 2), options={"compiler": "fast"})


def test_renders_as_text_and_json(known_plan):
    text = str(known_plan)
    for expected in ("saved for backward", "peak (estimated)", "act1", "dropped: ", "compressed: "):
        assert expected in text
    data = json.loads(known_plan.to_json())
    assert data["saved_bytes"] == known_plan.saved_bytes
    assert len(data["tensors"]) == len(known_plan.tensors)
    assert {t["decision"] for t in data["tensors"]} == {"kept", "dropped", "compressed"}
    assert max(data["timeline"]["forward"] + data["timeline"]["backward"]) == known_plan.peak_bytes


def test_plots_a_png(known_plan, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plan.png"
    known_plan.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_bitfit", "vit_lora"])
def test_transformers_models_match_what_the_hooks_see(name):
    from benchmarks.workloads import WORKLOADS

    model, inputs, _ = WORKLOADS[name](batch=4, size=64)
    plan = memsave_fx.plan(model, *inputs)
    assert_close(plan.saved_bytes, saved_bytes_of(copy.deepcopy(model), inputs, "memsave"))
    torch._dynamo.reset()
    assert_close(plan.baseline_saved_bytes, saved_bytes_of(copy.deepcopy(model), inputs, "inductor"))


@pytest.mark.slow
def test_meta_device_llama_with_7b_wide_layers():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=2, vocab_size=32000, use_cache=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    start = time.perf_counter()
    plan = memsave_fx.plan(model, torch.randint(0, 32000, (1, 512), device="meta"))
    assert time.perf_counter() - start < 60
    assert 0 < plan.saved_bytes <= plan.baseline_saved_bytes
    assert plan.parameter_bytes > 2 * 202_000_000 * 4  # two 7B-wide layers and the embeddings, fp32
    assert plan.peak_bytes > plan.parameter_bytes + plan.saved_bytes


def test_tables_show_module_names_without_peft_wrappers_and_keep_their_ends():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    long = "a_module_name_long_enough_to_be_cut_in_a_table_of_sixty_characters"

    def block():
        return nn.Sequential(OrderedDict(query_projection=nn.Linear(8, 8), relu=nn.ReLU(), **{long: nn.Linear(8, 8)}))

    model = nn.Sequential(OrderedDict(layer_0=block(), layer_1=block()))
    model = get_peft_model(model, LoraConfig(target_modules=["query_projection"], init_lora_weights=False))
    plan = memsave_fx.plan(model, torch.randn(4, 8))
    assert any(t.module.startswith("base_model.model.layer_0.") for t in plan.tensors)  # the data keep full names
    table = str(plan).split("saved for backward, by module:")[1].split("largest saved tensors")[0]
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.strip()]
    assert "layer_0.query_projection.lora_A.default" in rows and "layer_1.query_projection.lora_A.default" in rows
    assert not any(row.startswith("base_model.model.") for row in rows)
    cut = [row for row in rows if row.startswith("…")]
    assert cut and all(long.endswith(row.removeprefix("…")) and len(row) == 60 for row in cut), cut
