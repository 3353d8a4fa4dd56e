"""`memsave-fx selftest [--device cpu|cuda]`: check memsave on this torch and device.

Small models, one per case, together cover every exact rewrite memsave makes under Inductor:
frozen convolutions (1d, 2d, 3d, transposed), pooling backwards that read their input only for
its shape, flat saved conv inputs, eval-mode BatchNorm with a frozen affine weight, 1-bit ReLU
and dropout masks, packed max-pool offsets, a transformer block with LoRA, and an LM head's
cross-entropy. (The eval-mode
BatchNorm rewrite of `compiler="eager"` is left out: under Inductor its decompositions already
drop the input.) Each case runs one training step in eager PyTorch, stock Inductor and memsave,
each on its own copy of the model, and passes when

- every gradient (trainable parameters and inputs) matches eager PyTorch's, judged against the
  largest entry of the reference gradients;
- memsave keeps no more for backward than Inductor (less, where the case is built to save),
  and the rewrites the case is built for applied;
- the memory plan, computed on fake tensors, predicts exactly the saved bytes measured.

Cases are the module-level list `CASES`; `run_selftest` runs them and returns a `Selftest`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import memsave_fx

from . import _compat
from .backend import MemsaveBackend
from .config import MemsaveConfig, environment_options

# Errors are judged against the largest entry of the reference gradients (as in the tests).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}
SEED = 0
# The exact defaults, whatever MEMSAVE_<OPTION> variables say: the cases check what they do.
DEFAULTS = {name: getattr(MemsaveConfig(), name) for name in MemsaveConfig.option_names()}

Inputs = list[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to check. `build(device)` returns the model and its inputs, with the frozen
    parameters and the inputs' `requires_grad` set."""

    name: str
    build: Callable[[torch.device], tuple[nn.Module, Inputs]]
    covers: str
    # The model draws random numbers. Both compilers then run with Inductor's
    # `fallback_random`, which on CPU draws them as eager PyTorch does; on CUDA eager's fused
    # dropout kernel draws its own way, so memsave's gradients are compared with Inductor's.
    random: bool = False
    # The passes that must rewrite something, and whether saved masks must be packed.
    rewrites: frozenset[str] = frozenset()
    packs_masks: bool = False
    # Whether memsave must keep strictly less than Inductor: true where a rewrite applies.
    saves: bool = True

    def reference(self, device: torch.device) -> str:
        """Whose gradients memsave's must match."""
        return "inductor" if self.random and device.type == "cuda" else "eager"

    @property
    def options(self) -> dict[str, Any] | None:
        """Inductor options for both compilers."""
        return {"fallback_random": True} if self.random else None


@dataclasses.dataclass
class CaseResult:
    name: str
    reference: str = "eager"
    grad_error: float | None = None  # the largest error, relative to the largest reference entry
    inductor_saved: int | None = None
    memsave_saved: int | None = None
    plan_saved: int | None = None
    plan_baseline_saved: int | None = None
    peaks: dict[str, int] = dataclasses.field(default_factory=dict)  # CUDA only: per backend
    rewrites: list[str] = dataclasses.field(default_factory=list)  # the passes that applied
    packed_masks: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        return "ok" if self.passed else "FAIL: " + "; ".join(self.failures)

    @property
    def ratio(self) -> float | None:
        if self.inductor_saved is None or self.memsave_saved is None or not self.inductor_saved:
            return None
        return self.memsave_saved / self.inductor_saved


@dataclasses.dataclass
class Selftest:
    cases: list[CaseResult]
    missing_internals: dict[str, str]  # torch internals memsave needs that this torch lacks, by name

    @property
    def passed(self) -> bool:
        return not self.missing_internals and all(case.passed for case in self.cases)

    @property
    def failed(self) -> list[str]:
        return [case.name for case in self.cases if not case.passed] + (["torch internals"] if self.missing_internals else [])


# --- the models ---------------------------------------------------------------------------


def _seeded(device: torch.device, model: nn.Module, *inputs: tuple[tuple[int, ...], bool]) -> tuple[nn.Module, Inputs]:
    """`model` on `device`, with random inputs of the given shapes and `requires_grad`."""
    generator = torch.Generator().manual_seed(SEED + 1)
    tensors = [torch.randn(shape, generator=generator).to(device).requires_grad_(grad) for shape, grad in inputs]
    return model.to(device), tensors


def _frozen(layer: nn.Module, *, bias: bool = False) -> nn.Module:
    """`layer` with its weight frozen, and its bias too unless `bias`."""
    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(bias and name == "bias")
    return layer


# Each model is as small as shows its rewrites: every distinct kernel costs a C++ compile
# (seconds on CPU), so layers carry no bias and no activation they do not need.


def conv1d_avg_pool(device: torch.device) -> tuple[nn.Module, Inputs]:
    # BitFit: the weight frozen, the bias trains; the input's gradient is requested. The
    # average pool's backward reads the convolution's output only for its shape.
    torch.manual_seed(SEED)
    model = nn.Sequential(_frozen(nn.Conv1d(4, 4, 3), bias=True), nn.AvgPool1d(2))
    return _seeded(device, model, ((2, 4, 32), True))


def conv2d_relu_max_pool(device: torch.device) -> tuple[nn.Module, Inputs]:
    # A frozen convolution after a trained one: the pooled output is read only for the frozen
    # weight's gradient; the ReLU mask (1 bit) and the 3x3 max-pool offsets (4 bits) remain.
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1), _frozen(nn.Conv2d(4, 4, 3, bias=False)))
    return _seeded(device, model, ((2, 3, 18, 18), False))


def conv3d_transposed(device: torch.device) -> tuple[nn.Module, Inputs]:
    # Everything frozen, the input's gradient requested (saliency, adversarial inputs).
    torch.manual_seed(SEED)
    model = nn.Sequential(_frozen(nn.Conv3d(2, 4, 3, bias=False)), _frozen(nn.ConvTranspose3d(4, 2, 3, stride=2, bias=False)))
    return _seeded(device, model, ((2, 2, 6, 6, 6), True))


def batch_norm_eval(device: torch.device) -> tuple[nn.Module, Inputs]:
    # Eval-mode BatchNorm with a frozen affine weight: its backward needs the running
    # statistics alone, not its input.
    torch.manual_seed(SEED)
    norm = _frozen(nn.BatchNorm2d(4))
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm.eval(), _frozen(nn.Conv2d(4, 4, 3, bias=False)))
    return _seeded(device, model, ((2, 3, 12, 12), False))


def dropout_relu(device: torch.device) -> tuple[nn.Module, Inputs]:
    # A frozen linear layer after dropout and ReLU: only their masks cross, at 1 bit each.
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Dropout(0.25), nn.ReLU(), _frozen(nn.Linear(32, 8, bias=False)))
    return _seeded(device, model, ((16, 16), False))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trained low-rank update: `base(x) + scale * B(A(x))`."""

    def __init__(self, features_in: int, features_out: int, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = _frozen(nn.Linear(features_in, features_out))
        self.lora_a = nn.Parameter(torch.randn(rank, features_in) / math.sqrt(features_in))
        # Not zero, as a fresh adapter's B is: a zero B would make A's gradient zero.
        self.lora_b = nn.Parameter(0.1 * torch.randn(features_out, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As peft does: adapters kept in fp32 on a low-precision model read x cast to fp32.
        update = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return self.base(x) + (self.scale * update).to(x.dtype)


class TransformerBlock(nn.Module):
    """A parallel pre-norm block (attention and MLP read one LayerNorm), every weight frozen
    but LoRA adapters on the query, value and MLP input projections."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _frozen(nn.LayerNorm(dim))
        self.query, self.key, self.value = LoRALinear(dim, dim), _frozen(nn.Linear(dim, dim)), LoRALinear(dim, dim)
        self.out = _frozen(nn.Linear(dim, dim))
        self.up, self.down = LoRALinear(dim, 2 * dim), _frozen(nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, dim)
        return x + self.out(attention) + self.down(F.gelu(self.up(h)))


def lora_transformer(device: torch.device) -> tuple[nn.Module, Inputs]:
    # bf16 weights with fp32 adapters, peft's default: the fp32 copies of the normalised input
    # that the adapters' weight gradients read are rebuilt in the backward from the bf16 one.
    torch.manual_seed(SEED)
    block = TransformerBlock().to(torch.bfloat16)
    for module in block.modules():
        if isinstance(module, LoRALinear):
            module.lora_a.data, module.lora_b.data = module.lora_a.data.float(), module.lora_b.data.float()
    model, (x,) = _seeded(device, block, ((2, 8, 16), False))
    return model, [x.to(torch.bfloat16)]


class LanguageModelHead(nn.Module):
    """A final norm, a frozen vocabulary projection and transformers' causal-LM loss: the
    logits upcast to fp32, prompt tokens ignored (-100), the mean over the others."""

    def __init__(self, dim: int = 32, vocabulary: int = 512) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = _frozen(nn.Linear(dim, vocabulary, bias=False))

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(hidden)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def lm_head_loss(device: torch.device) -> tuple[nn.Module, Inputs]:
    # bf16, as LLMs are fine-tuned: Inductor keeps the fp32 log-softmax, memsave no logits.
    torch.manual_seed(SEED)
    model, (hidden,) = _seeded(device, LanguageModelHead().to(torch.bfloat16), ((2, 64, 32), False))
    labels = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(SEED + 2)).to(device)
    labels[:, :5] = -100
    return model, [hidden.to(torch.bfloat16), labels]


FROZEN_CONV = "replace_frozen_convolution_backward"
CASES: list[Case] = [
    Case(
        "conv1d_avgpool", conv1d_avg_pool, "frozen Conv1d weight, trained bias (BitFit), input gradient, average pool",
        rewrites=frozenset({FROZEN_CONV, "replace_shape_only_reads"}),
    ),
    Case(
        "conv2d_relu_maxpool", conv2d_relu_max_pool, "frozen Conv2d after a trained one, ReLU mask, max-pool offsets",
        rewrites=frozenset({FROZEN_CONV, "flatten_saved_conv_inputs"}), packs_masks=True,
    ),
    Case(
        "conv3d_transposed", conv3d_transposed, "frozen Conv3d and ConvTranspose3d, input gradient only",
        rewrites=frozenset({FROZEN_CONV}),
    ),
    Case(
        "batchnorm_eval", batch_norm_eval, "eval-mode BatchNorm2d with a frozen affine weight",
        rewrites=frozenset({FROZEN_CONV}),
    ),
    Case("dropout_relu", dropout_relu, "dropout and ReLU masks at 1 bit", random=True, packs_masks=True),
    Case(
        "lora_transformer", lora_transformer, "bf16 attention and MLP block, fp32 LoRA adapters train (peft's default)",
        rewrites=frozenset({"rebuild_pointwise_reads"}),
    ),
    Case(
        "lm_head_loss", lm_head_loss, "bf16 LM head and cross-entropy (ignore_index), the final norm trains",
        rewrites=frozenset({"chunk_linear_cross_entropy"}),
    ),
]  # fmt: skip


# --- running a case -----------------------------------------------------------------------


def run_selftest(device: str = "cpu", out: Callable[[str], None] = print) -> Selftest:
    """Run every case of `CASES` on `device`, print a table through `out`, return the results."""
    torch_device = torch.device(device)
    measure_peak = torch_device.type == "cuda"
    out(f"memsave_fx {memsave_fx.__version__}, torch {torch.__version__}, device: {_device_name(torch_device)}")
    missing = _compat.check_internals()
    for name, message in missing.items():
        out(f"missing torch internal {name}: {message}")
    if set_in_environment := sorted(environment_options(os.environ)):
        out(f"checking memsave's defaults; ignored here: the options {', '.join(set_in_environment)} set by MEMSAVE_ variables")
    columns = _columns(measure_peak)
    out(_row(columns, {c: c for c, _ in columns}))
    results = []
    with _exact_float32(), _compat.autograd_cache_disabled():
        for case in CASES:
            torch.compiler.reset()  # each case is a new model: a fresh recompile budget
            result = CaseResult(case.name, case.reference(torch_device))
            try:
                _run_case(case, torch_device, measure_peak, result)
            except Exception as error:  # report it and go on with the other cases
                result.failures.append(_describe(error))
            results.append(result)
            out(_row(columns, _cells(result)))
        torch.compiler.reset()
    out("ratio = memsave / Inductor saved bytes; plan = memsave's saved bytes predicted on fake tensors")
    out("memsave's rewrites:")
    for result in results:
        packed = [f"{result.packed_masks} saved masks packed"] if result.packed_masks else []
        out(f"  {result.name}: {', '.join(result.rewrites + packed) or 'none'}")
    for result in results:
        if result.reference != "eager":
            out(f"{result.name}: gradients compared with {result.reference}'s (on CUDA eager dropout draws other random numbers)")
    selftest = Selftest(results, missing)
    out(f"FAILED: {', '.join(selftest.failed)}" if selftest.failed else f"all {len(results)} cases passed")
    return selftest


def _run_case(case: Case, device: torch.device, measure_peak: bool, result: CaseResult) -> None:
    model, inputs = case.build(device)
    eager = _step(copy.deepcopy(model), inputs, None, None, measure_peak)
    torch.compiler.reset()
    inductor = _step(copy.deepcopy(model), inputs, "inductor", case.options, measure_peak)
    torch.compiler.reset()
    backend = MemsaveBackend(DEFAULTS)
    memsave = _step(copy.deepcopy(model), inputs, backend, case.options, measure_peak)
    torch.compiler.reset()
    graphs = backend.compiled
    result.rewrites = sorted({r.pass_name for graph in graphs for r in graph.rewrites or () if r.applied})
    result.packed_masks = sum(graph.packed_masks for graph in graphs)
    plan = memsave_fx.plan(model, *inputs, options=DEFAULTS | (case.options or {}))

    reference = {"eager": eager, "inductor": inductor}[result.reference]
    result.grad_error, worst = _grad_error(memsave.grads, reference.grads)
    result.inductor_saved, result.memsave_saved = inductor.saved, memsave.saved
    result.plan_saved, result.plan_baseline_saved = plan.saved_bytes, plan.baseline_saved_bytes
    if measure_peak:
        result.peaks = {"eager": eager.peak, "inductor": inductor.peak, "memsave": memsave.peak}

    # Judged at the model's least precise dtype: fp32 adapters on a bf16 model see bf16 rounding.
    dtypes = {p.dtype for p in model.parameters()} | {g.dtype for g in reference.grads.values()}
    tolerance = max(TOLERANCE.get(dtype, TOLERANCE[torch.float32]) for dtype in dtypes)
    if worst is not None:
        result.failures.append(worst)
    elif result.grad_error > tolerance:
        name = max(memsave.grads, key=lambda n: _error(memsave.grads[n], reference.grads[n]))
        result.failures.append(f"{name} gradient off by {result.grad_error:.2g} > {tolerance:g}")
    if memsave.saved > inductor.saved:
        result.failures.append(f"memsave keeps {memsave.saved} B > Inductor's {inductor.saved} B")
    elif case.saves and memsave.saved == inductor.saved:
        result.failures.append(f"memsave keeps as much as Inductor ({inductor.saved} B): no rewrite applied")
    if missing := sorted(case.rewrites - set(result.rewrites)):
        result.failures.append(f"{', '.join(missing)} did not apply")
    if case.packs_masks and not result.packed_masks:
        result.failures.append("no saved mask was packed")
    if plan.saved_bytes != memsave.saved:
        result.failures.append(f"plan says memsave keeps {plan.saved_bytes} B, measured {memsave.saved} B")
    if plan.baseline_saved_bytes != inductor.saved:
        result.failures.append(f"plan says Inductor keeps {plan.baseline_saved_bytes} B, measured {inductor.saved} B")


@dataclasses.dataclass
class _Step:
    grads: dict[str, torch.Tensor]
    saved: int
    peak: int | None = None


def _step(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    backend: Any | None,
    options: dict[str, Any] | None,
    measure_peak: bool,
) -> _Step:
    """One training step of `model` compiled with `backend` and `options` (eager PyTorch when
    `backend` is None), on copies of `inputs`: its gradients, saved bytes and, with
    `measure_peak`, the CUDA memory it allocated at its peak above what was allocated before it."""
    fn = torch.compile(model, backend=backend, options=options) if backend is not None else model
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    if measure_peak:
        _forward_backward(fn, inputs)  # warm-up: compiling and autotuning allocate too
        for tensor in (*model.parameters(), *inputs):
            tensor.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    saved = _forward_backward(fn, inputs)
    peak = None
    if measure_peak:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - allocated
    grads = {f"param {n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads |= {f"input {i}": x.grad for i, x in enumerate(inputs) if x.requires_grad}
    return _Step(grads, saved, peak)


def _forward_backward(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> int:
    """Forward and backward with an MSE loss against a random target; the saved bytes.

    The global generator is seeded first, so that every run draws the same dropout masks.
    """
    torch.manual_seed(SEED)
    output, saved = memsave_fx.saved_activation_bytes(fn, *inputs)
    generator = torch.Generator().manual_seed(SEED)
    target = torch.randn(output.shape, generator=generator).to(device=output.device, dtype=output.dtype)
    F.mse_loss(output.float(), target.float()).backward()
    return saved


def _grad_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str | None]:
    """The largest difference over all gradients, relative to the largest expected entry; and
    what is wrong where the gradients cannot be compared at all."""
    if not expected:
        return 0.0, "nothing requires grad: the case checks no gradient"
    if actual.keys() != expected.keys():
        return math.inf, f"gradients of {sorted(actual)} instead of {sorted(expected)}"
    for name, want in expected.items():
        got = actual[name]
        if got is None or want is None:
            return math.inf, f"{name} gradient is None ({'memsave' if got is None else 'reference'})"
        if got.shape != want.shape or got.dtype != want.dtype:
            return math.inf, f"{name} gradient is {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
    scale = max(g.abs().max().item() for g in expected.values()) or 1.0
    return max(_error(actual[n], expected[n]) for n in expected) / scale, None


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """TF32 off, restored afterwards: on Ampere and newer GPUs it rounds float32 matmuls and
    convolutions to 10 mantissa bits, differently in eager and compiled code."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# --- the table ----------------------------------------------------------------------------


def _columns(measure_peak: bool) -> list[tuple[str, int]]:
    columns = [("case", max(len(case.name) for case in CASES)), ("grad err", 8), ("inductor", 9), ("memsave", 9)]
    columns += [("ratio", 5), ("plan", 9)]
    if measure_peak:
        columns += [("peak eager", 10), ("peak ind.", 10), ("peak mems.", 10)]
    return columns + [("status", 0)]


def _cells(result: CaseResult) -> dict[str, str]:
    ratio = result.ratio
    cells = {
        "case": result.name,
        "grad err": "-" if result.grad_error is None else f"{result.grad_error:.1e}",
        "inductor": _bytes(result.inductor_saved),
        "memsave": _bytes(result.memsave_saved),
        "ratio": "-" if ratio is None else f"{ratio:.2f}",
        "plan": _bytes(result.plan_saved),
        "status": result.status,
    }
    for column, backend in (("peak eager", "eager"), ("peak ind.", "inductor"), ("peak mems.", "memsave")):
        cells[column] = _bytes(result.peaks.get(backend))
    return cells


def _row(columns: list[tuple[str, int]], cells: dict[str, str]) -> str:
    left = {"case", "status"}
    return "  ".join(cells[c].ljust(w) if c in left else cells[c].rjust(w) for c, w in columns).rstrip()


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine() or 'unknown'}, {torch.get_num_threads()} threads)"


def _describe(error: BaseException) -> str:
    """The error's type and the first line of its message; for an error a compiler raised,
    the one Dynamo wraps, whose message says what went wrong."""
    while isinstance(getattr(error, "inner_exception", None), BaseException):
        error = error.inner_exception  # type: ignore[attr-defined]
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
