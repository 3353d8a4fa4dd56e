"""chunk_linear_cross_entropy: the LM head's loss without logits kept for backward."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memsave_fx
from memsave_fx import MemsaveConfig
from memsave_fx.analysis import Decision
from memsave_fx.linear_cross_entropy import _all_zero_bits, linear_backward_unless_zero, linear_cross_entropy
from memsave_fx.passes.chunk_linear_cross_entropy import chunk_linear_cross_entropy

from ..utils import TOLERANCE, assert_grads_close, assert_pass_leaves_graph_unchanged, clone_inputs

pass_module = importlib.import_module("memsave_fx.passes.chunk_linear_cross_entropy")  # the name is also the pass's

VOCABULARY = 384
ROWS = 2 * 150  # in three blocks of 100 rows, with the fixture below


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(pass_module, "ELEMENTS_PER_CHUNK", 128 * VOCABULARY)


# --- the kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_autograd(mean, bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    target = torch.randint(0, 50, (37,), generator=generator)
    target[::5] = -100
    loss = F.cross_entropy(F.linear(hidden, weight, b), target, reduction="mean" if mean else "sum")
    expected = torch.autograd.grad(loss, [hidden, weight, *([b] if bias else [])])
    result = linear_cross_entropy(hidden.detach(), weight.detach(), None if b is None else b.detach(), target, -100, mean, torch.float64, 5, [True, True, bias, False, False], True)
    torch.testing.assert_close(result[0], loss.detach())
    for got, want in zip(result[1:4], expected):
        torch.testing.assert_close(got, want)
    assert result[4] is None and result[5] is None
    torch.testing.assert_close(result[6], F.linear(hidden, weight, b).detach())


def lora_head_tensors(dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(50, 16, generator=generator).to(dtype).requires_grad_()
    low_rank = torch.randn(37, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    low_rank_weight = torch.randn(50, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    return hidden, weight, low_rank, low_rank_weight


def test_kernel_with_a_lora_term_matches_autograd():
    hidden, weight, low_rank, low_rank_weight = lora_head_tensors()
    target = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(1))
    target[::4] = -100
    logits = F.linear(hidden, weight) + F.linear(low_rank, low_rank_weight) * 0.5
    loss = F.cross_entropy(logits, target)
    expected = torch.autograd.grad(loss, [hidden, weight, low_rank, low_rank_weight])
    detached = [t.detach() for t in (hidden, weight, low_rank, low_rank_weight)]
    result = linear_cross_entropy(detached[0], detached[1], None, target, -100, True, torch.float64, 5, [True, True, False, True, True], True, detached[2], detached[3], 0.5, None)
    torch.testing.assert_close(result[0], loss.detach())
    for got, want in zip((result[1], result[2], result[4], result[5]), expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(result[6], logits.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_zero_check_reads_bits(dtype):
    tangent = torch.zeros(5, 7, dtype=dtype)
    assert _all_zero_bits(tangent) and _all_zero_bits(tangent.t()) and _all_zero_bits(tangent[:0])
    for value in (-0.0, 1e-3, -1e-3, float("nan")):  # a -0 is only a matmul not skipped
        tangent[2, 3] = value
        assert not _all_zero_bits(tangent), value


def test_zero_tangent_skips_the_matmuls_and_others_do_not():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 4, generator=generator), torch.randn(9, 4, generator=generator)
    zero = linear_backward_unless_zero(torch.zeros(6, 9), hidden, weight, [True, True, True, False, False])
    assert all(not g.any() for g in zero[:3]) and [g.shape for g in zero[:3]] == [hidden.shape, weight.shape, (9,)]
    tangent = torch.randn(6, 9, generator=generator)
    grads = linear_backward_unless_zero(tangent, hidden, weight, [True, True, False, False, False])
    torch.testing.assert_close(grads[0], tangent @ weight)
    torch.testing.assert_close(grads[1], tangent.t() @ hidden)
    assert grads[2].numel() == 0


def test_zero_tangent_with_a_lora_term():
    hidden, weight, low_rank, low_rank_weight = (t.detach() for t in lora_head_tensors())
    tangent = torch.randn(37, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = linear_backward_unless_zero(tangent, hidden, weight, [True, False, True, True, True], low_rank, low_rank_weight, 0.5)
    expected = [tangent @ weight, tangent.sum(0), (tangent * 0.5) @ low_rank_weight, (tangent * 0.5).t() @ low_rank]
    for got, want in zip((grads[0], *grads[2:]), expected):
        torch.testing.assert_close(got, want)
    zero = linear_backward_unless_zero(torch.zeros_like(tangent), hidden, weight, [True, False, True, True, True], low_rank, low_rank_weight, 0.5)
    assert all(not g.any() for g in zero) and zero[3].shape == low_rank.shape


# --- models --------------------------------------------------------------------------------------


def causal_lm(family: str, dtype: torch.dtype, train: str) -> nn.Module:
    """A one-layer transformers causal LM in `dtype`. `train`: "lora" (peft's defaults on every
    linear layer, the head frozen), "lora_head" (the same and on lm_head too), "head" (the
    final norm and an untied lm_head train) or "tied" (the final norm and the embedding, which
    is the head, train)."""
    import transformers

    torch.manual_seed(0)
    if family == "Llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, use_cache=False, tie_word_embeddings=train == "tied",
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCABULARY, n_embd=32, n_layer=1, n_head=2, n_positions=256, use_cache=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # else transformers logs a warning each call: a graph break
    model = model.to(dtype)
    if train in ("lora", "lora_head"):
        from peft import LoraConfig, get_peft_model

        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        targets = "all-linear" if train == "lora" else linears  # "all-linear" leaves out the head
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
        return model
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(
            "norm.weight" in name or "ln_f" in name or (train == "head" and "lm_head" in name) or (train == "tied" and ("embed_tokens" in name or "wte" in name))
        )
    return model


def batch(ignore: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCABULARY, (2, ROWS // 2), generator=generator)
    labels = ids.clone()
    if ignore:
        labels[:, :11] = -100  # a prompt, as SFT masks it
    return {"input_ids": ids, "labels": labels}


def loss_step(model: nn.Module, backend, inputs: dict, *, through_logits: bool = False):
    """One step on a random multiple of the loss (plus, with `through_logits`, a random
    projection of the logits); returns the trainable parameters' gradients and the largest
    tensor kept for backward, in elements."""
    fn = torch.compile(model, backend=backend) if backend is not None else model
    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter):
            sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn(**inputs)
    generator = torch.Generator().manual_seed(2)
    total = output.loss * (1 + torch.rand((), generator=generator))
    if through_logits:
        weights = torch.randn(output.logits.shape, generator=generator)
        total = total + (output.logits.float() * weights).mean()
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads, max(sizes)


def rewrites(backend: memsave_fx.MemsaveBackend, *, applied: bool = True) -> list:
    return [r for c in backend.compiled for r in c.rewrites if r.pass_name == chunk_linear_cross_entropy.__name__ and r.applied == applied]


CASES = [
    ("Llama", torch.bfloat16, "lora", {}),
    ("Llama", torch.float32, "head", {"num_items_in_batch": torch.tensor(200)}),
    ("Llama", torch.bfloat16, "tied", {}),
    ("GPT2", torch.float32, "tied", {}),
    ("GPT2", torch.bfloat16, "head", {"num_items_in_batch": torch.tensor(200)}),
    ("Llama", torch.bfloat16, "lora_head", {}),
    ("Llama", torch.float32, "lora_head", {"num_items_in_batch": torch.tensor(200)}),
]


@pytest.mark.slow
@pytest.mark.parametrize("family, dtype, train, extra", CASES, ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, dict) else ("items" if v else "mean"))
def test_causal_lm_loss_matches_and_keeps_no_logits(family, dtype, train, extra):
    model = causal_lm(family, dtype, train)
    inputs = batch() | extra
    # fp32 against eager; bf16 against stock Inductor, whose low-precision rounding it shares.
    expected, stock_largest = loss_step(copy.deepcopy(model), "inductor", inputs)
    if dtype == torch.float32:
        expected, _ = loss_step(copy.deepcopy(model), None, inputs)
    backend = memsave_fx.backend()
    actual, largest = loss_step(copy.deepcopy(model), backend, inputs)
    assert_grads_close(actual, expected, tolerance=TOLERANCE[dtype])
    assert len(rewrites(backend)) == 1, [r.reason for r in rewrites(backend, applied=False)]
    # Stock keeps the logits or their log-softmax; memsave nothing vocabulary-wide.
    assert stock_largest >= ROWS * VOCABULARY > 2 * largest, (stock_largest, largest)
    # The logits are computed once: the forward's vocabulary-wide matmuls cover as many rows as
    # stock's, none of them a second time for the returned logits.
    assert sum(vocabulary_matmul_rows(backend, rewrite=True)) == sum(vocabulary_matmul_rows(backend, rewrite=False)) > 0


def vocabulary_matmul_rows(backend: memsave_fx.MemsaveBackend, *, rewrite: bool) -> list[int]:
    """The row counts of the forward's matmuls whose output is as wide as the vocabulary,
    traced again with or without memsave's rewrites."""
    forwards = [graph.retrace(rewrite).forward.graph for graph in backend.compiled if graph.has_backward]
    return [
        node.meta["val"].shape[0] for forward in forwards for node in forward.nodes
        if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and node.meta["val"].shape[-1] == VOCABULARY
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("train", ["head", "lora_head"])
def test_backpropagating_through_the_returned_logits_stays_right(train):
    model = causal_lm("Llama", torch.float32, train)
    expected, _ = loss_step(copy.deepcopy(model), None, batch(), through_logits=True)
    backend = memsave_fx.backend()
    actual, _ = loss_step(copy.deepcopy(model), backend, batch(), through_logits=True)
    assert_grads_close(actual, expected)
    assert len(rewrites(backend)) == 1


@pytest.mark.slow
def test_option_off_keeps_stock_behaviour():
    model = causal_lm("Llama", torch.float32, "head")
    _, stock = loss_step(copy.deepcopy(model), "inductor", batch())
    backend = memsave_fx.backend(chunked_loss=False, exact_compression=False)
    _, saved = loss_step(copy.deepcopy(model), backend, batch())
    assert rewrites(backend) == [] and saved == stock


@pytest.mark.slow
def test_plan_shows_the_logits_dropped():
    model = causal_lm("Llama", torch.bfloat16, "lora")
    plan = memsave_fx.plan(model, **batch())
    dropped = [t for t in plan.tensors if t.decision is Decision.DROPPED and "cross-entropy" in t.reason]
    assert sum(t.baseline_nbytes for t in dropped) >= ROWS * VOCABULARY * 2, plan.table()
    assert plan.saved_bytes < plan.baseline_saved_bytes


# --- tiny heads: every form and every decline ----------------------------------------------------


class Head(nn.Module):
    """hidden -> linear (-> an op on the logits) -> cross-entropy, as a user writes it."""

    def __init__(self, bias: bool = False, logits_op=None, shift: bool = False, upcast: bool = True, **loss_options) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCABULARY, bias=bias)
        self.logits_op, self.shift, self.upcast, self.loss_options = logits_op, shift, upcast, loss_options

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(hidden))
        if self.logits_op is not None:
            logits = self.logits_op(logits)
        if self.shift:  # the causal shift as older transformers wrote it
            logits, labels = logits[:, :-1, :].contiguous(), labels[:, 1:].contiguous()
        if self.upcast:
            logits = logits.float()
        return F.cross_entropy(logits.view(-1, VOCABULARY), labels.reshape(-1), **self.loss_options)


def head_inputs(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, ROWS // 2, 16, generator=generator, dtype=dtype).requires_grad_()
    labels = torch.randint(0, VOCABULARY, (2, ROWS // 2), generator=generator)
    labels[0, :7] = -100
    return [hidden, labels]


def head_step(model: nn.Module, backend, inputs: list[torch.Tensor]):
    fn = torch.compile(model, backend=backend) if backend is not None else model
    loss = fn(*inputs)
    (loss * 1.37).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad} | {"hidden": inputs[0].grad}
    return grads


HEADS = {
    "bias": dict(bias=True),
    "shift": dict(shift=True),
    "sum": dict(reduction="sum"),
    "bf16": dict(),
}


@pytest.mark.parametrize("form", HEADS)
@pytest.mark.parametrize("compiler", ["inductor", "eager"])
def test_head_forms_match_eager(form, compiler):
    dtype = torch.bfloat16 if "bf16" in form else torch.float32
    model = Head(**HEADS[form]).to(dtype)
    inputs = head_inputs(dtype)
    expected = head_step(copy.deepcopy(model), None if dtype == torch.float32 else "inductor", clone_inputs(inputs))
    backend = memsave_fx.backend(compiler=compiler)
    actual = head_step(copy.deepcopy(model), backend, clone_inputs(inputs))
    assert_grads_close(actual, expected)
    assert len(rewrites(backend)) == 1, [r.reason for r in rewrites(backend, applied=False)]


DECLINES = {
    "label smoothing": (dict(label_smoothing=0.1), "label smoothing"),
    "class weights": (dict(weight=torch.rand(VOCABULARY)), "class weights"),
    "soft-capping": (dict(logits_op=lambda x: 30 * torch.tanh(x / 30)), "soft-capping"),
    "no reduction": (dict(reduction="none"), "not reduced to a scalar"),
    "no upcast": (dict(upcast=False), "computed in bfloat16"),
}


@pytest.mark.parametrize("case", DECLINES)
def test_declines_are_recorded_and_leave_the_graph_unchanged(case):
    options, reason = DECLINES[case]
    dtype = torch.bfloat16 if case == "no upcast" else torch.float32
    model = Head(**options).to(dtype)
    inputs = head_inputs(dtype)
    if case == "no reduction":
        model = _Mean(model)
    assert_pass_leaves_graph_unchanged(chunk_linear_cross_entropy, model, inputs, decomposed=True)
    backend = memsave_fx.backend()
    expected = head_step(copy.deepcopy(model), None if dtype == torch.float32 else "inductor", clone_inputs(inputs))
    actual = head_step(copy.deepcopy(model), backend, clone_inputs(inputs))
    assert_grads_close(actual, expected)
    declined = rewrites(backend, applied=False)
    assert not rewrites(backend) and declined and reason in declined[0].reason, declined


class _Mean(nn.Module):
    """Per-row losses averaged by the user: the loss the pass sees is not a scalar."""

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.inner = head

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.inner(hidden, labels) * torch.linspace(0, 1, labels.numel())).mean()


class _ZLoss(Head):
    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(hidden)).float().view(-1, VOCABULARY)
        return F.cross_entropy(logits, labels.view(-1)) + 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()


def assert_declined_as_eager(model: nn.Module, inputs: list[torch.Tensor], reason: str) -> None:
    """The pass leaves the graph unchanged, the gradients are eager's, and the record says why."""
    assert_pass_leaves_graph_unchanged(chunk_linear_cross_entropy, model, inputs, decomposed=True)
    backend = memsave_fx.backend()
    assert_grads_close(head_step(copy.deepcopy(model), backend, clone_inputs(inputs)), head_step(copy.deepcopy(model), None, clone_inputs(inputs)))
    declined = rewrites(backend, applied=False)
    assert not rewrites(backend) and any(reason in r.reason for r in declined), declined


def test_z_loss_is_declined():
    assert_declined_as_eager(_ZLoss(), head_inputs(), "z-loss")


class _Classifier(nn.Module):
    """Pooled features through a linear layer over 4 classes: logits no larger than h."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.classes = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classes(self.body(images).mean((2, 3))), labels)


def classifier_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randn(4, 3, 10, 10, generator=generator).requires_grad_(), torch.randint(0, 4, (4,), generator=generator)]


def test_a_head_whose_gradients_outweigh_its_logits_is_declined():
    assert_declined_as_eager(_Classifier(), classifier_inputs(), "no fewer bytes than the logits")


def test_gradients_formed_in_the_forward_are_never_recomputed(monkeypatch):
    # Applied where the partitioner would rather keep the tiny logits' gradient and recompute the
    # hidden state's from it, in the backward, from forward-only values: the gradients are kept.
    monkeypatch.setattr(pass_module, "_check_worth_keeping", lambda head, plan: None)
    model, inputs = _Classifier(), classifier_inputs()
    backend = memsave_fx.backend()
    assert_grads_close(head_step(copy.deepcopy(model), backend, clone_inputs(inputs)), head_step(copy.deepcopy(model), None, clone_inputs(inputs)))
    assert len(rewrites(backend)) == 1


def test_option_takes_booleans_only():
    with pytest.raises(ValueError, match="chunked_loss"):
        MemsaveConfig(chunked_loss="yes")


def test_dynamic_sequence_lengths():
    # Variable-length batches: one graph with a symbolic row count serves both.
    model = Head()
    reference, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    backend = memsave_fx.backend()
    compiled = torch.compile(compiled_model, backend=backend, dynamic=True)
    for length in (150, 97):
        hidden, labels = head_inputs()
        hidden, labels = hidden[:, :length].contiguous().detach().requires_grad_(), labels[:, :length].contiguous()
        inputs = [hidden, labels]
        for m in (reference, compiled_model):
            m.zero_grad()
        expected = head_step(reference, None, clone_inputs(inputs))
        actual_inputs = clone_inputs(inputs)
        (compiled(*actual_inputs) * 1.37).backward()
        actual = {n: p.grad for n, p in compiled_model.named_parameters()} | {"hidden": actual_inputs[0].grad}
        assert_grads_close(actual, expected)
    assert len(backend.compiled) == 1 and rewrites(backend), [r.reason for r in rewrites(backend, applied=False)]
