"""The benchmark suite: memsave against eager PyTorch and stock torch.compile, side by side.

The selective-differentiation cases of the memsave paper (Bhatia & Dangel, 2024) and the
LoRA setting of Approx-BP, on small transformers models (nothing is downloaded) and a plain
CNN. One row per model, case and backend:

- saved_bytes: what the step keeps for backward (saved_tensors_hooks; parameters and buffers
  excluded);
- peak_bytes: torch.cuda.max_memory_allocated over forward and backward on CUDA; on CPU the
  memory plan's estimate for the compiled backends, marked `peak_is_estimate` (not with
  --quick, which leaves it null), else null;
- rss_peak_bytes (CPU, run under MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave the
  resident set; else null): the resident-set high-water mark over one forward and backward,
  reset through /proc/self/clear_refs, less the resident set before the step;
- step_ms: the median of interleaved steps; compile_s: the first step minus a median step,
  Inductor's caches off (each backend compiles a small model first, so that none pays for
  the process's first compile), the fastest of --compiles interleaved cold compiles (one
  compile varies by up to a quarter from the next), and compile_vs_inductor: compile_s over
  stock Inductor's for the same model and case, summarised below the table as a geometric mean
  and maximum;
- grad_error: the largest gradient difference, relative to the largest gradient, and
  grad_cosine: the cosine similarity of all gradients together; against stock Inductor for the
  compiled backends and against eager PyTorch for eager ones (each side draws dropout masks
  from its own generator).

    python benchmarks/run.py --quick --json results.json     # a subset, minutes on a laptop CPU
    python benchmarks/run.py --quick --backends inductor memsave --compiles 3   # compile times
    python benchmarks/run.py                                 # the full matrix
    python benchmarks/run.py --models cnn resnet --cases all bitfit --backends inductor memsave
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/run.py --cases lora_bf16 --backends eager inductor memsave

It writes `results.md` and `results.png` to --results-dir (default: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memsave_fx  # noqa: E402
from benchmarks.bench_backends import interleaved_steps, loss_of, synchronize  # noqa: E402
from benchmarks.workloads import CausalLMLoss, LastHiddenState, PooledOutput  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOSSY = {"approx_activations": True, "share_norms": True, "pool_activations": 2}


# Models: (model, inputs, whether the input is a float tensor that can want a gradient).
def plain_cnn(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.1),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.1),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    return model, [torch.randn(batch, 3, 64, 64)]


def resnet(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic")
    torch.manual_seed(0)
    return PooledOutput(ResNetModel(config)), [torch.randn(batch, 3, 64, 64)]


def vit(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=64, patch_size=8)
    torch.manual_seed(0)
    return PooledOutput(ViTModel(config)), [torch.randn(batch, 3, 64, 64)]


def bert(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=512)
    torch.manual_seed(0)
    return LastHiddenState(BertModel(config, add_pooling_layer=False)), [_tokens(batch, config.vocab_size)]


def llama(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    from transformers import LlamaModel

    config = _llama_config()
    torch.manual_seed(0)
    return LastHiddenState(LlamaModel(config)), [_tokens(batch, config.vocab_size)]


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=64,
    )  # fmt: skip


def mistral(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(
        hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, sliding_window=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return LastHiddenState(MistralModel(config)), [_tokens(batch, config.vocab_size)]


def llama_lm(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """The Llama above with its language-modelling head and loss: the logits included."""
    from transformers import LlamaForCausalLM

    config = _llama_config()
    torch.manual_seed(0)
    tokens = _tokens(batch, config.vocab_size)
    return CausalLMLoss(LlamaForCausalLM(config)), [tokens, tokens.clone()]


def lm_vocabulary(family: str, vocabulary: int) -> Callable[[int], tuple[nn.Module, list[torch.Tensor]]]:
    """A small causal LM of `family` with a realistic vocabulary (32k: Llama 2 and Mistral;
    128k: Llama 3; 152k: Qwen2, its head tied to the embedding as in Qwen2-0.5B), called as
    HF Trainer calls it: the graph returns the logits with the loss."""

    def build(batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
        import transformers

        config = getattr(transformers, f"{family}Config")(
            hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=vocabulary, max_position_embeddings=64,
            tie_word_embeddings=family == "Qwen2",
        )  # fmt: skip
        torch.manual_seed(0)
        tokens = _tokens(batch, vocabulary)
        model = getattr(transformers, f"{family}ForCausalLM")(config)
        return CausalLMLoss(model, logits_returned=True), [tokens, tokens.clone()]

    return build


def _tokens(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, 64), generator=torch.Generator().manual_seed(0))


MODELS: dict[str, Callable[[int], tuple[nn.Module, list[torch.Tensor]]]] = {
    "cnn": plain_cnn, "resnet": resnet, "vit": vit, "bert": bert, "llama": llama, "mistral": mistral, "llama_lm": llama_lm,
    "llama_lm_32k": lm_vocabulary("Llama", 32000), "llama_lm_128k": lm_vocabulary("Llama", 128256),
    "qwen2_lm_152k": lm_vocabulary("Qwen2", 151936),
}  # fmt: skip
LM_VOCABULARIES = ("llama_lm_32k", "llama_lm_128k", "qwen2_lm_152k")
LORA_TARGETS = {
    "vit": ["q_proj", "v_proj"], "bert": ["query", "value"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "llama_lm": ["q_proj", "v_proj"],
    **{name: ["q_proj", "v_proj"] for name in LM_VOCABULARIES},
}  # fmt: skip
LORA_ONLY = {"mistral", "llama_lm", *LM_VOCABULARIES}  # models benchmarked only under LoRA
HAS_BATCH_NORM = {"resnet"}
HAS_NO_NORMS = {"cnn"}


@dataclasses.dataclass(frozen=True)
class Case:
    """Which parameters train, whether the input wants a gradient, BatchNorm's mode."""

    name: str
    description: str
    trainable: Callable[[str, int, int], bool]  # (parameter name, its layer's index, how many layers) -> trains?
    input_grad: bool = False
    lora: bool = False
    bn_eval: bool = False
    # LoRA as most fine-tuning runs it: the model's weights in bf16 and peft's defaults (fp32
    # adapters), with dropout 0.05 on every linear layer.
    low_precision_lora: bool = False


def _is_norm(name: str) -> bool:
    return any(part in name.lower() for part in ("norm", "normalization"))


CASES = {
    "all": Case("all", "all parameters trainable", lambda n, i, count: True),
    "input_only": Case("input_only", "every weight frozen, the input requires grad", lambda n, i, count: False, input_grad=True),
    "norms": Case("norms", "only normalisation parameters", lambda n, i, count: _is_norm(n)),
    "bitfit": Case("bitfit", "biases and norms (BitFit)", lambda n, i, count: n.endswith("bias") or _is_norm(n)),
    "surgical_first": Case("surgical_first", "the first quarter of the layers", lambda n, i, count: i < count / 4),
    "surgical_last": Case("surgical_last", "the last quarter of the layers", lambda n, i, count: i >= 3 * count / 4),
    "lora": Case("lora", "peft LoRA (rank 8) on the attention queries and values", lambda n, i, count: False, lora=True),
    "lora_bf16": Case(
        "lora_bf16", "bf16 weights, peft LoRA (rank 8, fp32 adapters, dropout 0.05) on every linear layer",
        lambda n, i, count: False, lora=True, low_precision_lora=True,
    ),
    "all_bn_eval": Case("all_bn_eval", "all parameters trainable, BatchNorm in eval mode", lambda n, i, count: True, bn_eval=True),
}
QUICK = {
    "cnn": ["all", "surgical_first"],
    "resnet": ["all_bn_eval", "bitfit"],
    "vit": ["lora"],
    "bert": ["lora"],
    "llama": ["lora"],
}

BACKENDS = ("eager", "inductor", "memsave", "memsave_lossy", "convert")


def applies(model: str, case: Case) -> bool:
    if case.lora:
        return model in LORA_TARGETS
    if model in LORA_ONLY:
        return False
    if case.bn_eval:
        return model in HAS_BATCH_NORM
    if case.input_grad:
        return model in ("cnn", "resnet", "vit")  # token ids cannot want a gradient
    return not (case.name == "norms" and model in HAS_NO_NORMS)


def prepare(name: str, case: Case, batch: int) -> tuple[nn.Module, list[torch.Tensor]]:
    model, inputs = MODELS[name](batch)
    if case.lora:
        from peft import LoraConfig, get_peft_model

        if case.low_precision_lora:
            model = model.to(torch.bfloat16)
            inputs = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
            lora = LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05)
        else:
            lora = LoraConfig(r=8, target_modules=LORA_TARGETS[name])
        if isinstance(model, CausalLMLoss):  # as a user applies it: to the transformers model, so "all-linear" leaves out the head
            model.model = get_peft_model(model.model, lora)
        else:
            model = get_peft_model(model, lora)
    else:
        # A layer is a module with parameters of its own, in the order the model registers them.
        layers = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters()))
        for parameter_name, parameter in model.named_parameters():
            index = layers.index(parameter_name.rpartition(".")[0])
            parameter.requires_grad_(case.trainable(parameter_name, index, len(layers)))
    model.train(not case.bn_eval)
    inputs = [x.requires_grad_(case.input_grad) if x.is_floating_point() else x for x in inputs]
    if not any(p.requires_grad for p in model.parameters()) and not case.input_grad:
        raise ValueError(f"case {case.name} leaves nothing of {name} trainable")
    return model, inputs


def compiled(backend: str, model: nn.Module) -> Callable[..., torch.Tensor]:
    if backend == "eager":
        return model
    if backend == "convert":
        return memsave_fx.convert(model)
    if backend == "inductor":
        return torch.compile(model, backend="inductor")
    options = LOSSY if backend == "memsave_lossy" else {}
    return torch.compile(model, backend=memsave_fx.backend(**options))


def warm_up(backends: list[str], device: str) -> None:
    """Compile a small model with each compiling backend once: the first compile in a process
    also loads Inductor and its C++ toolchain, which would count against whichever backend the
    first case measures first."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    for backend in backends:
        if backend not in ("eager", "convert"):
            torch._dynamo.reset()
            with torch._inductor.config.patch(force_disable_caches=True):
                compiled(backend, copy.deepcopy(model))(x).sum().backward()
    torch._dynamo.reset()


def cold_compiles(model: nn.Module, inputs: list[torch.Tensor], backends: list[str], rounds: int, device: str) -> dict[str, list[float]]:
    """First-step seconds of `rounds` cold compiles by each compiling backend, interleaved, each
    on a fresh copy of `model`, with Dynamo's and Inductor's caches cleared."""
    firsts: dict[str, list[float]] = {backend: [] for backend in backends if backend not in ("eager", "convert")}
    for _ in range(rounds):
        for backend, seconds in firsts.items():
            torch._dynamo.reset()
            replica = copy.deepcopy(model)
            seconds.append(first_step(backend, replica, inputs, device)[0])
    for x in inputs:
        x.grad = None
    return firsts


def first_step(backend: str, replica: nn.Module, inputs: list[torch.Tensor], device: str) -> tuple[float, Callable, int, torch.Tensor]:
    """Compile `replica` with `backend`, Inductor's caches off, and take one step against a
    random target: (seconds, the compiled function, saved bytes, the target)."""
    with torch._inductor.config.patch(force_disable_caches=True):
        fn = compiled(backend, replica)
        synchronize(device)
        start = time.perf_counter()
        torch.manual_seed(0)
        output, saved = memsave_fx.saved_activation_bytes(fn, *inputs, exclude=[*replica.parameters(), *replica.buffers()])
        target = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(device)
        loss_of(output, target).backward()
        synchronize(device)
        return time.perf_counter() - start, fn, saved, target


def measure(
    name: str, case: Case, backends: list[str], steps: int, device: str, batch: int, estimate_peaks: bool, compile_rounds: int = 1
) -> list[dict]:
    model, inputs = prepare(name, case, batch)
    model, inputs = model.to(device), [x.detach().to(device).requires_grad_(x.requires_grad) for x in inputs]
    # Cold compiles vary by a quarter from one to the next: each backend's fastest is compared.
    earlier_firsts = cold_compiles(model, inputs, backends, compile_rounds - 1, device)
    torch._dynamo.reset()  # each case starts with an empty recompile budget
    runs: dict[str, dict] = {}
    for backend in backends:
        replica = copy.deepcopy(model)
        first, fn, saved, target = first_step(backend, replica, inputs, device)
        grads = [p.grad.detach().clone() for p in replica.parameters() if p.requires_grad]
        grads += [x.grad.detach().clone() for x in inputs if x.requires_grad]
        for x in inputs:
            x.grad = None
        runs[backend] = {"fn": fn, "model": replica, "target": target, "saved": saved, "first": first, "grads": grads}
    times, peaks = interleaved_steps(runs, inputs, steps, device)
    rss_peaks = {backend: _rss_peak(run, inputs) for backend, run in runs.items()} if _measures_rss(device) else {}
    for x in inputs:
        x.grad = None

    measured = any(peaks.values())
    estimated = _estimated_peaks(backends, model, inputs) if estimate_peaks and not measured else {}
    rows = []
    step_s = {backend: statistics.median(times[backend]) for backend in runs}
    first_s = {backend: min([run["first"], *earlier_firsts.get(backend, [])]) for backend, run in runs.items()}
    compile_s = {backend: max(first_s[backend] - step_s[backend], 0.0) for backend in runs}
    for backend, run in runs.items():
        reference = runs.get("eager" if backend in ("eager", "convert") else "inductor")
        step = step_s[backend]
        compiles = backend not in ("eager", "convert")
        peak = max(peaks[backend]) if peaks[backend] else estimated.get(backend)
        estimate = backend in estimated
        rows.append({
            "model": name, "case": case.name, "backend": backend, "device": device, "batch": batch,
            "saved_bytes": run["saved"],
            "peak_bytes": peak, "peak_is_estimate": estimate, "rss_peak_bytes": rss_peaks.get(backend),
            "step_ms": step * 1e3,
            "compile_s": compile_s[backend] if compiles else 0.0,
            "compile_vs_inductor": compile_s[backend] / compile_s["inductor"] if compiles and compile_s.get("inductor") else None,
            "grad_error": _relative_error(run["grads"], reference["grads"]) if reference is not None else None,
            "grad_cosine": _cosine(run["grads"], reference["grads"]) if reference is not None else None,
        })  # fmt: skip
    return rows


def _measures_rss(device: str) -> bool:
    """Whether the resident set's peak measures a CPU step: only with small allocations' memory
    returned to the system on free (glibc keeps freed heap memory otherwise)."""
    return device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") == "65536" and Path("/proc/self/clear_refs").exists()


def _rss_peak(run: dict, inputs: list[torch.Tensor]) -> int:
    """The resident-set high-water mark over one forward and backward, less the resident set
    before it."""
    run["model"].zero_grad(set_to_none=True)
    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident set now
    loss_of(run["fn"](*inputs), run["target"]).backward()
    return _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # in kB
    raise KeyError(field)


def _estimated_peaks(backends: list[str], model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, int]:
    """The memory plan's peak estimates for the backends it models: one plan gives stock
    Inductor's (its baseline) and memsave's, another the lossy options'."""
    estimates = {}
    if {"inductor", "memsave"} & set(backends):
        plan = memsave_fx.plan(model, *inputs)
        estimates |= {"inductor": plan.baseline_peak_bytes, "memsave": plan.peak_bytes}
    if "memsave_lossy" in backends:
        estimates["memsave_lossy"] = memsave_fx.plan(model, *inputs, options=LOSSY).peak_bytes
    return {backend: peak for backend, peak in estimates.items() if backend in backends}


def _relative_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    scale = max((g.abs().max().item() for g in reference), default=0.0) or 1.0
    return max(((a.double() - b.double()).abs().max().item() for a, b in zip(grads, reference)), default=0.0) / scale


def _cosine(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    ours, theirs = (torch.cat([g.double().flatten() for g in gs]) for gs in (grads, reference))
    return torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item()


def markdown(rows: list[dict]) -> str:
    """One table row per model, case and backend, with saved bytes relative to eager."""
    eager = {(r["model"], r["case"]): r["saved_bytes"] for r in rows if r["backend"] == "eager"}
    lines = [
        "| model | case | backend | saved MiB | vs eager | peak MiB | RSS peak MiB | step ms | compile s | compile vs Inductor | grad error | grad cosine |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = eager.get((r["model"], r["case"]))
        ratio = f"{r['saved_bytes'] / base:.2f}x" if base else "-"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}{' (est.)' if r['peak_is_estimate'] else ''}"
        error = "-" if r["grad_error"] is None else f"{r['grad_error']:.1e}"
        cosine = "-" if r["grad_cosine"] is None else f"{r['grad_cosine']:.4f}"
        rss = "-" if r.get("rss_peak_bytes") is None else f"{r['rss_peak_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['model']} | {r['case']} | {r['backend']} | {r['saved_bytes'] / 2**20:.2f} | {ratio} | {peak} | {rss} "
            f"| {r['step_ms']:.1f} | {r['compile_s']:.1f} | {_ratio(r.get('compile_vs_inductor'))} | {error} | {cosine} |"
        )
    return "\n".join(lines) + "\n" + compile_summary(rows)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def compile_summary(rows: list[dict]) -> str:
    """Each compiling backend's cold compile over stock Inductor's: geometric mean and maximum
    over the models and cases measured."""
    lines = []
    for backend in BACKENDS:
        ratios = [(r["compile_vs_inductor"], f"{r['model']} / {r['case']}") for r in rows if r["backend"] == backend and r.get("compile_vs_inductor")]
        if backend == "inductor" or not ratios:
            continue
        mean = math.exp(statistics.fmean(math.log(ratio) for ratio, _ in ratios))
        worst, where = max(ratios)
        lines.append(f"- {backend}: cold compile {mean:.2f}x Inductor's (geometric mean of {len(ratios)}), at most {worst:.2f}x ({where})\n")
    return "\n" + "".join(lines) if lines else ""


def chart(rows: list[dict], path: Path, ceiling: float = 2.0) -> None:
    """Saved bytes relative to eager: one panel per model, one group of bars per case. Bars
    above `ceiling` are cut there and labelled with their value, so one outlier does not
    flatten the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    eager = {(r["model"], r["case"]): r["saved_bytes"] for r in rows if r["backend"] == "eager"}
    most_cases = max(len({r["case"] for r in rows if r["model"] == m}) for m in models)
    width = 0.8 / len(backends)
    figure, panels = plt.subplots(len(models), 1, figsize=(max(7, 1.5 * most_cases), 2.4 * len(models)), squeeze=False)
    for axes, model in zip(panels[:, 0], models):
        cases = list(dict.fromkeys(r["case"] for r in rows if r["model"] == model))
        for offset, backend in enumerate(backends):
            for i, case in enumerate(cases):
                row = next((r for r in rows if (r["model"], r["case"], r["backend"]) == (model, case, backend)), None)
                if row is None or not eager.get((model, case)):
                    continue
                ratio = row["saved_bytes"] / eager[(model, case)]
                x = i + offset * width
                axes.bar(x, min(ratio, ceiling), width, color=f"C{offset}", label=backend if i == 0 else None)
                if ratio > ceiling:
                    axes.text(x, ceiling, f"{ratio:.1f}x", ha="center", va="bottom", fontsize=7)
        axes.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(cases))])
        axes.set_xticklabels(cases, fontsize=8)
        axes.set_ylim(0, ceiling * 1.12)
        axes.axhline(1.0, color="grey", linewidth=0.8)
        axes.set_ylabel(f"{model}\nvs eager", fontsize=9)
    panels[0, 0].set_title("memory kept for backward, relative to eager PyTorch (lower is better)")
    panels[0, 0].legend(fontsize=7, ncol=len(backends), loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset of the cases; under 10 minutes on 2 CPU cores")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="default: every case that applies")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--steps", type=int, help="timed steps per backend (default 5 quick, 20 full)")
    parser.add_argument("--compiles", type=int, default=1, help="cold compiles per compiling backend, interleaved; the fastest counts (default 1)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 20)

    rows: list[dict] = []
    failures: list[str] = []
    warm_up(args.backends, args.device)
    for name in args.models:
        cases = args.cases or (QUICK.get(name, []) if args.quick else list(CASES))
        for case in (CASES[c] for c in cases):
            if not applies(name, case):
                continue
            print(f"{name} / {case.name}: {case.description}", flush=True)
            try:
                rows += measure(name, case, args.backends, steps, args.device, args.batch, estimate_peaks=not args.quick, compile_rounds=args.compiles)
            except Exception as error:  # one failing case must not lose the others' rows; the exit status reports it
                traceback.print_exc()
                failures.append(f"{name} / {case.name}: {type(error).__name__}: {error}")

    table = markdown(rows)
    print(table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# memsave benchmark results\n\n`{recorded_command('benchmarks/run.py', sys.argv[1:])}` on {args.device}, "
        f"torch {torch.__version__}, batch {args.batch}, {steps} interleaved steps.\n"
        f"memsave_lossy: {', '.join(f'{k}={v}' for k, v in LOSSY.items())}.\n\n"
    )
    charted = any(r["backend"] == "eager" for r in rows)  # the chart's bars are relative to eager PyTorch
    if charted:
        header += "![saved bytes](results.png)\n\n"
    if failures:
        header += "**Failed cases** (no rows):\n\n" + "".join(f"- {failure}\n" for failure in failures) + "\n"
    (args.results_dir / "results.md").write_text(header + table)
    if charted:
        chart(rows, args.results_dir / "results.png")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if failures:
        sys.exit(f"{len(failures)} case(s) failed:\n" + "\n".join(failures))


def recorded_command(script: str, arguments: list[str]) -> str:
    """The command line as a results page shows it: without where the JSON and the page
    went, local paths."""
    recorded = [f"python {script}"]
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in ("--json", "--results-dir"):
            skip = True
        elif not argument.startswith(("--json=", "--results-dir=")):
            recorded.append(argument)
    return " ".join(recorded)


if __name__ == "__main__":
    main()
