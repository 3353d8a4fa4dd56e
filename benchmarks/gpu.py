"""Eager PyTorch, stock Inductor and memsave on full-size fine-tuning cases, in one command.

Cases, run in this order (the headline case first, so that a run cut short keeps what matters most):

- resnet101_input: the memsave paper's headline case. ResNet-101 from a transformers
  ResNetConfig, batch 64 at 224x224, no parameter trains, only the input requires grad,
  BatchNorm in eval mode.
- llama_lora: a Llama causal LM (4 layers, hidden 1024, vocab 32000) with bf16 weights and peft
  LoRA on every linear layer, batch 4 x 512 tokens, loss = model(input_ids, labels=...).loss.
- resnet50_stem: ResNet-50, batch 64 at 224x224, only the stem (conv + BN) trains, BN eval.

For each case and backend: torch.cuda.max_memory_allocated over one step's forward and
backward after warm-up (absolute, and above what was allocated when the step began), the
activation bytes kept for backward (memsave_fx.saved_activation_bytes), the median of
interleaved timed steps, the first step's wall time (compilation included), and the gradients'
largest error relative to the largest eager gradient. TF32 is off, so fp32 gradients can be
compared with eager's.

    python benchmarks/gpu.py                               # sized for one H100 within 8 minutes
    python benchmarks/gpu.py --device cpu --quick          # tiny sizes: a smoke run
    python benchmarks/gpu.py --cases resnet101_input --out /tmp/gpu.md

The table goes to benchmarks/results/gpu.md (--out), rewritten after each case, so a run that
is cut short keeps the finished cases. A failing case is listed there and makes the exit status
non-zero; the other cases still run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import shlex
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
from benchmarks.bench_backends import loss_of, synchronize  # noqa: E402
from benchmarks.run import _relative_error  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    Workload,
    bottleneck_resnet_input_grad,
    bottleneck_resnet_stem,
    llama_lora_causal_lm,
)

OUT = Path(__file__).resolve().parent / "results" / "gpu.md"
BACKENDS = ("eager", "inductor", "memsave")
# Compiled in this order: memsave before inductor, so that kernels already in Inductor's
# on-disk cache can only shorten stock Inductor's compile time, never memsave's.
COMPILE_ORDER = ("eager", "memsave", "inductor")
SEED = 0
# --quick sizes: a ResNet of one bottleneck block, a one-layer Llama. Each compile costs tens of
# seconds on a CPU with cold caches, most of it compiling C++ kernels: fewer layers, fewer kernels.
TINY_RESNET = {"batch": 2, "size": 32, "depths": (1,), "hidden_sizes": (32,), "embedding_size": 16}
TINY_LLAMA = {
    "batch": 2, "size": 32, "hidden_size": 64, "intermediate_size": 172, "layers": 1, "heads": 4, "kv_heads": 2,
    "vocab_size": 256,
}  # fmt: skip

@dataclasses.dataclass(frozen=True)
class Case:
    """A workload builder, at its own full size and at the --quick sizes `tiny`."""

    name: str
    build: Workload
    tiny: dict
    # The model draws random numbers (dropout). Compiled code draws them from Inductor's own
    # generator, so the same seed does not give eager PyTorch's masks (nor, on CUDA, does
    # Inductor's `fallback_random` in every torch version): the gradient check runs separate
    # copies in eval mode, dropout off, and so is deterministic.
    random: bool = False


CASES = {
    "resnet101_input": Case("resnet101_input", bottleneck_resnet_input_grad, TINY_RESNET),
    "llama_lora": Case("llama_lora", llama_lora_causal_lm, TINY_LLAMA, random=True),
    "resnet50_stem": Case("resnet50_stem", bottleneck_resnet_stem, TINY_RESNET),
}


@dataclasses.dataclass
class Run:
    """One backend's copy of a case's model, and what was measured on it."""

    backend: str
    model: nn.Module
    fn: Callable[..., torch.Tensor]
    first_step_s: float = 0.0
    saved_bytes: int = 0
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)
    peak: int | None = None
    step_peak: int | None = None
    compiler: memsave_fx.MemsaveBackend | None = None  # memsave's backend object: what it compiled


def compile_run(backend: str, model: nn.Module) -> Run:
    if backend == "eager":
        return Run(backend, model, model)
    if backend == "inductor":
        return Run(backend, model, torch.compile(model, backend="inductor"))
    compiler = memsave_fx.backend()
    return Run(backend, model, torch.compile(model, backend=compiler), compiler=compiler)


def clear_grads(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None


def step_loss(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The model's own loss (a scalar output), else a loss against a random target: a random
    upstream gradient, where `.sum()` would give a constant one."""
    return output if target is None else loss_of(output, target)


def requested_grads(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    grads += [x.grad for x in inputs if x.requires_grad]
    return [g.detach().clone() for g in grads]


def first_step(run: Run, inputs: list[torch.Tensor], target: torch.Tensor | None, device: str) -> torch.Tensor | None:
    """Compile (if compiled) and run one step, counting the saved bytes and keeping the gradients.
    Returns the target, made from the output's shape when none is given yet."""
    clear_grads(run.model, inputs)
    synchronize(device)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    excluded = [*run.model.parameters(), *run.model.buffers()]
    output, run.saved_bytes = memsave_fx.saved_activation_bytes(run.fn, *inputs, exclude=excluded)
    if target is None and output.dim() > 0:
        target = torch.randn(output.shape, generator=torch.Generator().manual_seed(SEED)).to(device)
    step_loss(output, target).backward()
    synchronize(device)
    run.first_step_s = time.perf_counter() - start
    run.grads = requested_grads(run.model, inputs)
    clear_grads(run.model, inputs)
    return target


def timed_step(run: Run, inputs: list[torch.Tensor], target: torch.Tensor | None, device: str, seed: int) -> float:
    clear_grads(run.model, inputs)
    torch.manual_seed(seed)  # every backend draws from the same seed at the same step
    synchronize(device)
    start = time.perf_counter()
    step_loss(run.fn(*inputs), target).backward()
    synchronize(device)
    return time.perf_counter() - start


def measure_peak(run: Run, runs: list[Run], inputs: list[torch.Tensor], target: torch.Tensor | None) -> None:
    """torch.cuda.max_memory_allocated over one step, with every backend's gradients freed first."""
    for other in runs:
        clear_grads(other.model, inputs)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(SEED)
    step_loss(run.fn(*inputs), target).backward()
    torch.cuda.synchronize()
    run.peak = torch.cuda.max_memory_allocated()
    run.step_peak = run.peak - before
    clear_grads(run.model, inputs)


def measure_case(case: Case, quick: bool, device: str, warmup: int, steps: int, log: Callable[[str], None]) -> dict:
    """Every backend on one case: returns the case's description and one row per backend."""
    model, inputs, description = case.build(**(case.tiny if quick else {}))
    inputs = [x.detach().to(device).requires_grad_(x.requires_grad) for x in inputs]
    torch.compiler.reset()  # each case starts with an empty recompile budget
    runs: dict[str, Run] = {}
    failures: list[str] = []
    target = None
    for backend in COMPILE_ORDER:
        run = compile_run(backend, copy.deepcopy(model).to(device))  # parameters are not shared between backends
        try:
            target = first_step(run, inputs, target, device)
        except Exception as error:  # one failing backend must not lose the others' rows
            if backend == "eager":
                raise  # the reference
            traceback.print_exc()
            failures.append(f"{case.name} / {backend}: {_one_line(error)}")
            continue
        runs[backend] = run
        log(f"  {backend}: first step {run.first_step_s:.1f} s, saved {run.saved_bytes / 2**20:.2f} MiB")

    errors = {backend: _relative_error(run.grads, runs["eager"].grads) for backend, run in runs.items()}
    if case.random:
        compiled = [b for b in runs if b != "eager"]
        errors |= _dropout_off_errors(model, inputs, target, device, compiled, failures, case.name)
    vs_inductor = (
        _relative_error(runs["memsave"].grads, runs["inductor"].grads) if {"memsave", "inductor"} <= set(runs) else None
    )
    for run in runs.values():
        run.grads.clear()  # off the device before the memory is measured

    order = list(runs.values())
    for i in range(warmup):
        for run in order if i % 2 else order[::-1]:
            timed_step(run, inputs, target, device, SEED + 1 + i)
    if device == "cuda":
        for run in order:
            measure_peak(run, order, inputs, target)
    for i in range(steps):
        # Alternate the order each step, so that position effects cancel out.
        for run in order if i % 2 else order[::-1]:
            run.times.append(timed_step(run, inputs, target, device, SEED + 1 + warmup + i))
    for run in order:
        clear_grads(run.model, inputs)

    rows = []
    for backend in BACKENDS:
        if backend not in runs:
            continue
        run = runs[backend]
        rows.append({
            "case": case.name, "backend": backend, "peak": run.peak, "step_peak": run.step_peak,
            "saved": run.saved_bytes, "step_s": statistics.median(run.times), "first_step_s": run.first_step_s,
            "grad_error": errors[backend] if backend != "eager" else None,
            "grad_error_vs_inductor": vs_inductor if backend == "memsave" else None,
        })  # fmt: skip
    notes = []
    if "memsave" in runs and runs["memsave"].compiler is not None:
        graphs = len(runs["memsave"].compiler.compiled)
        notes.append(f"memsave compiled {graphs} graph{'s' if graphs != 1 else ''}")
    if case.random:
        notes.append(
            "grad err vs eager: separate copies in eval mode (dropout off), compiled again; vs inductor: "
            "the measured copies, dropout on, same seed (both draw from Inductor's generator)"
        )
    return {"name": case.name, "description": description, "notes": notes, "rows": rows, "failures": failures}


def _dropout_off_errors(
    model: nn.Module,
    inputs: list[torch.Tensor],
    target: torch.Tensor | None,
    device: str,
    backends: list[str],
    failures: list[str],
    case: str,
) -> dict[str, float | None]:
    """Each compiled backend's gradient error against eager PyTorch's with dropout off: fresh
    copies in eval mode, compiled again, so that no random masks enter the comparison."""

    def grads(run: Run) -> list[torch.Tensor]:
        clear_grads(run.model, inputs)
        torch.manual_seed(SEED)
        step_loss(run.fn(*inputs), target).backward()
        result = requested_grads(run.model, inputs)
        clear_grads(run.model, inputs)
        return result

    reference = grads(compile_run("eager", copy.deepcopy(model).to(device).eval()))
    errors: dict[str, float | None] = {}
    for backend in backends:
        try:
            replica = copy.deepcopy(model).to(device).eval()
            errors[backend] = _relative_error(grads(compile_run(backend, replica)), reference)
        except Exception as error:  # the measured rows stand without it
            traceback.print_exc()
            failures.append(f"{case} / {backend} gradient check: {_one_line(error)}")
            errors[backend] = None
        gc.collect()
    return errors


def _one_line(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:300]}"


def _mib(nbytes: int | None, digits: int = 1) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.{digits}f}"


def _ratio(value: float | None, inductor: float | None) -> str:
    return "-" if value is None or not inductor else f"{value / inductor:.2f}x"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def table(cases: list[dict]) -> str:
    """One row per case and backend; each "x ind." column is the value over stock Inductor's."""
    lines = [
        "| case | backend | peak MiB | step peak MiB | x ind. | saved MiB | x ind. | step ms | x ind. "
        "| first step s | x ind. | grad err vs eager | vs inductor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        inductor = next((r for r in case["rows"] if r["backend"] == "inductor"), {})
        for r in case["rows"]:
            lines.append(
                f"| {r['case']} | {r['backend']} | {_mib(r['peak'])} | {_mib(r['step_peak'])} "
                f"| {_ratio(r['step_peak'], inductor.get('step_peak'))} "
                f"| {_mib(r['saved'], 3)} | {_ratio(r['saved'], inductor.get('saved'))} "
                f"| {r['step_s'] * 1e3:.1f} | {_ratio(r['step_s'], inductor.get('step_s'))} "
                f"| {r['first_step_s']:.1f} | {_ratio(r['first_step_s'], inductor.get('first_step_s'))} "
                f"| {'ref' if r['backend'] == 'eager' else _error(r['grad_error'])} "
                f"| {_error(r['grad_error_vs_inductor'])} |"
            )
    return "\n".join(lines) + "\n"


def header(args: argparse.Namespace, device_name: str, warmup: int, steps: int) -> str:
    import peft
    import transformers

    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    tf32 = (
        "off (torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 set to False)"
        if args.device == "cuda"
        else "n/a on CPU"
    )
    return (
        "# memsave_fx on a GPU: eager PyTorch, stock Inductor and memsave\n\n"
        f"`{shlex.join(['python', 'benchmarks/gpu.py', *sys.argv[1:]])}`\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- device: {device_name}\n"
        f"- torch {torch.__version__}{cuda}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"memsave_fx {memsave_fx.__version__}\n"
        f"- TF32: {tf32}\n"
        f"- {warmup} warm-up and {steps} timed steps per backend, interleaved in alternating order"
        f"{'; --quick: tiny models' if args.quick else ''}\n\n"
        "Columns: **peak**: torch.cuda.max_memory_allocated over one step's forward and backward after "
        "warm-up; it includes the inputs and every backend's copy of the model, all kept on the device for "
        "interleaved timing. **step peak**: that peak minus what was allocated when the step began (every "
        "backend's gradients freed). **saved**: activation bytes kept for backward "
        "(memsave_fx.saved_activation_bytes: saved_tensors_hooks, parameters and buffers excluded). "
        "**step ms**: median step time. **first step s**: the first step's wall time, compilation included, "
        "with Inductor's on-disk caches as found (compiled in the order memsave, inductor). "
        "**grad err**: max |g - g_ref| over every requested gradient, divided by max |g_ref|, on separate "
        "copies of the model; the loss is the model's own or an MSE against a random target. "
        "**x ind.**: the value over stock Inductor's.\n\n"
    )


def page(head: str, cases: list[dict], failures: list[str], pending: list[str]) -> str:
    text = head
    for case in cases:
        text += f"- **{case['name']}**: {'; '.join([case['description'], *case['notes']])}\n"
    text += "\n" + table(cases)
    if failures:
        text += "\n**Failed** (no row, or no gradient check):\n\n" + "".join(f"- {f}\n" for f in failures)
    if pending:
        text += f"\n**Not finished**: {', '.join(pending)} (the run was still going, or was stopped).\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run, with --quick")
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 warm-up and 2 timed steps")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=OUT, help="the markdown table (default: %(default)s)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per backend (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per backend (default 10, 2 with --quick)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"CUDA is not available (torch {torch.__version__}). For a smoke run on the CPU: "
            "python benchmarks/gpu.py --device cpu --quick"
        )
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    # fp32 gradients are compared with eager's: TF32 would make both sides differ by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (no GPU: peaks are n/a)"
    head = header(args, device_name, warmup, steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    cases: list[dict] = []
    failures: list[str] = []
    for i, name in enumerate(args.cases):
        log(f"{name}")
        try:
            result = measure_case(CASES[name], args.quick, args.device, warmup, steps, log)
            cases.append(result)
            failures += result["failures"]
        except Exception as error:  # one failing case must not lose the others' rows; the exit status reports it
            traceback.print_exc()
            failures.append(f"{name}: {_one_line(error)}")
        torch.compiler.reset()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        args.out.write_text(page(head, cases, failures, args.cases[i + 1 :]))
    log(f"done; wrote {args.out}")
    print(page(head, cases, failures, []), flush=True)
    if failures:
        sys.exit(f"{len(failures)} failure(s):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
