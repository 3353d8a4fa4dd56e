import copy

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.analysis import Decision
from memsave_fx.passes.share_normalized_output import share_normalized_output

from ..utils import assert_grads_match, assert_pass_leaves_graph_unchanged, saved_bytes_of


class LlamaStyleRMSNorm(nn.Module):
    """transformers' Llama RMSNorm: statistics in fp32, x̂ cast back before the weight."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


NORMS = {
    "layer_norm": lambda: nn.LayerNorm(16),
    "layer_norm_no_bias": lambda: nn.LayerNorm(16, bias=False),
    "layer_norm_2d": lambda: nn.LayerNorm([6, 16]),
    "rms_norm": lambda: nn.RMSNorm(16, eps=1e-6),
    "llama_rms_norm": lambda: LlamaStyleRMSNorm(16),
}


class NormBlock(nn.Module):
    """A norm between a linear layer and a frozen linear with a LoRA adapter, which reads the
    norm's output for its weight gradient."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.norm = norm
        self.frozen = nn.Linear(16, 16)
        self.lora_a = nn.Linear(16, 4, bias=False)
        self.lora_b = nn.Linear(4, 16, bias=False)

    def forward(self, x):
        y = self.norm(self.pre(x))
        return self.frozen(y) + self.lora_b(self.lora_a(y))


# Which parameters train, and whether the input wants a gradient.
TRAINABLE = {
    "lora": ({"pre", "lora_a", "lora_b"}, False),
    "lora_and_norm": ({"pre", "norm", "lora_a", "lora_b"}, False),
    "input_and_lora": ({"lora_a", "lora_b"}, True),
    # Nothing reads the output for a weight gradient; stock compilation keeps only the input
    # (or x̂) and recomputes the rest.
    "norm_only": ({"pre", "norm"}, False),
    "lora_only": ({"lora_a", "lora_b"}, False),  # the norm's input gradient is not needed
}
SHARES = {"lora", "lora_and_norm", "input_and_lora"}



def block(norm: str, trainable: str, dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = NormBlock(NORMS[norm]()).to(dtype)
    with torch.no_grad():  # weights away from 1 and biases away from 0, so that errors show
        for name, parameter in model.norm.named_parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.5 if name == "weight" else torch.randn_like(parameter))
    modules, input_grad = TRAINABLE[trainable]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] in modules)
    x = (torch.randn(4, 6, 16) * 3 + 1).to(dtype).requires_grad_(input_grad)
    return model, [x]


def share_rewrites(backend: memsave_fx.MemsaveBackend) -> list:
    return [r for c in backend.compiled for r in c.rewrites if r.pass_name == share_normalized_output.__name__]


@pytest.mark.parametrize("trainable", TRAINABLE)
@pytest.mark.parametrize("norm", NORMS)
def test_gradients_match_eager_and_the_output_is_kept_once(norm, trainable):
    model, inputs = block(norm, trainable, torch.float32)
    backend = memsave_fx.backend(share_norms=True)
    saved, _ = assert_grads_match(model, inputs, backend)
    applied = [r.applied for r in share_rewrites(backend)]
    # Where the output is an fp32 product of values the norm's backward keeps anyway
    # (nn.RMSNorm in fp32), the exact rebuild pass has rebuilt it first: nothing is left to share.
    rebuilt = [r for c in backend.compiled for r in c.rewrites if r.pass_name == "rebuild_pointwise_reads" and r.applied]
    expected = [False] if rebuilt else [trainable in SHARES]
    assert applied == expected, [r.reason for r in share_rewrites(backend)]
    stock = saved_bytes_of(copy.deepcopy(model), inputs, "inductor")
    if trainable in SHARES:
        output_bytes = inputs[0].numel() * 4
        assert saved <= stock - output_bytes
    else:
        assert saved == stock


@pytest.mark.parametrize("trainable", sorted(SHARES))
@pytest.mark.parametrize("norm", NORMS)
def test_bf16_gradients_match_eager_within_rounding(norm, trainable):
    model, inputs = block(norm, trainable, torch.bfloat16)
    backend = memsave_fx.backend(share_norms=True)
    saved, _ = assert_grads_match(model, inputs, backend)
    assert [r.applied for r in share_rewrites(backend)] == [True]
    # The partitioner may keep the bf16 input with the fp32 mean and rstd, and recompute x̂
    # from them: it weighs a value a matmul wrote lower than one a fused kernel would write.
    row_statistics = inputs[0].numel() // 16 * 4 * 2
    stock = saved_bytes_of(copy.deepcopy(model), inputs, "inductor")
    assert saved <= stock - inputs[0].numel() * 2 + row_statistics


@pytest.mark.parametrize("norm", ["layer_norm", "llama_rms_norm"])
def test_forward_is_bitwise_inductors(norm):
    model, (x,) = block(norm, "lora", torch.float32)
    stock = torch.compile(copy.deepcopy(model), backend="inductor")(x)
    ours = torch.compile(model, backend=memsave_fx.backend(share_norms=True, approx_activations=True))(x)
    assert torch.equal(ours, stock)


def test_a_norm_without_affine_already_shares_and_is_left_alone():
    model = NormBlock(nn.LayerNorm(16, elementwise_affine=False))
    model.pre.requires_grad_(True)
    model.frozen.requires_grad_(False)
    backend = memsave_fx.backend(share_norms=True)
    assert_grads_match(model, [torch.randn(4, 6, 16)], backend)
    (rewrite,) = share_rewrites(backend)
    assert not rewrite.applied and "nothing to share" in rewrite.reason


@pytest.mark.parametrize("trainable", ["norm_only", "lora_only"])
def test_a_norm_with_nothing_to_share_leaves_the_graph_unchanged(trainable):
    model, inputs = block("layer_norm", trainable, torch.float32)
    config = memsave_fx.MemsaveConfig(share_norms=True)
    assert_pass_leaves_graph_unchanged(share_normalized_output, model, inputs, config, decomposed=True)


def test_off_by_default_leaves_the_graph_unchanged():
    model, inputs = block("llama_rms_norm", "lora", torch.float32)
    assert_pass_leaves_graph_unchanged(share_normalized_output, model, inputs, decomposed=True)


class ResidualNormBlock(NormBlock):
    """The norm reads a residual sum, as in a transformer."""

    def forward(self, x):
        y = self.norm(x + self.pre(x))
        return self.frozen(y) + self.lora_b(self.lora_a(y))


@pytest.mark.parametrize("norm", ["layer_norm", "llama_rms_norm"])
def test_plan_shows_the_output_dropped_and_why(norm):
    model = ResidualNormBlock(NORMS[norm]())
    model.frozen.requires_grad_(False)
    plan = memsave_fx.plan(model, torch.randn(4, 6, 16), options={"share_norms": True})
    (dropped,) = [t for t in plan.tensors if t.decision is Decision.DROPPED]
    assert dropped.baseline_nbytes == 4 * 6 * 16 * 4
    # An fp32 RMSNorm's output is an fp32 product of values its backward keeps: the exact
    # rebuild pass rebuilds it before the norms are shared.
    assert "rebuilt from them in the backward" in dropped.reason or "rebuilt in the backward from" in dropped.reason
    # Here the partitioner keeps the residual's summands (one of them a matmul's output,
    # which it prefers) and recomputes x̂; transformers' residual streams keep x̂ itself,
    # marked shared (tests/test_lora.py).
    assert plan.saved_bytes == plan.baseline_saved_bytes - dropped.baseline_nbytes
