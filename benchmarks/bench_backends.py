"""Eager vs stock Inductor vs memsave on fine-tuning workloads.

For each workload: saved activation MiB (saved_tensors_hooks, parameters and buffers
excluded), median step time over interleaved steps, and cold compile time. On CUDA it also
reports torch.cuda.max_memory_allocated over forward and backward.

    python benchmarks/bench_backends.py [--steps 20] [--device cpu|cuda] [--workloads resnet_stem ...]
        [--options approx_activations share_norms] [--pool-activations 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memsave_fx  # noqa: E402
from benchmarks.workloads import WORKLOADS, build  # noqa: E402

BACKENDS = ("eager", "inductor", "memsave")
LOSSY_OPTIONS = ("approx_activations", "share_norms")


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output.float(), target)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_steps(runs: dict[str, dict], inputs: list[torch.Tensor], steps: int, device: str) -> tuple[dict, dict]:
    """Time `steps` training steps of every run (`fn`, `model`, `target`), interleaved so that
    drift hits them alike; also the CUDA peak over each step. Returns (times, peaks) by run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, list[int]] = {name: [] for name in runs}
    for step in range(steps):
        # Alternate the order each step, so that position effects cancel out.
        for name, run in (list(runs.items()) if step % 2 else list(runs.items())[::-1]):
            run["model"].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            synchronize(device)
            start = time.perf_counter()
            loss_of(run["fn"](*inputs), run["target"]).backward()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device == "cuda":
                peaks[name].append(torch.cuda.max_memory_allocated() - base)
    return times, peaks


def measure_workload(
    name: str, steps: int, device: str, batch: int | None, size: int | None, options: dict[str, bool]
) -> dict:
    model, inputs, description = build(name, batch, size)
    model, inputs = model.to(device), [x.to(device) for x in inputs]
    runs = {}
    for backend in BACKENDS:
        copy_ = copy.deepcopy(model)
        torch._dynamo.reset()
        if backend == "memsave":
            compiled = torch.compile(copy_, backend=memsave_fx.backend(**options))
        else:
            compiled = copy_ if backend == "eager" else torch.compile(copy_, backend=backend)
        excluded = [*copy_.parameters(), *copy_.buffers()]
        # Cold compile: Inductor's and AOTAutograd's caches off, for this compile only.
        with torch._inductor.config.patch(force_disable_caches=True):
            synchronize(device)
            start = time.perf_counter()
            output, saved = memsave_fx.saved_activation_bytes(compiled, *inputs, exclude=excluded)
            target = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(device)
            loss_of(output, target).backward()
            synchronize(device)
            first_step = time.perf_counter() - start
        runs[backend] = {"fn": compiled, "model": copy_, "target": target, "saved": saved, "first_step": first_step}

    times, peaks = interleaved_steps(runs, inputs, steps, device)

    result = {"workload": name, "description": description, "device": device, "batch": batch, "size": size, "options": options}
    for backend, run in runs.items():
        step = statistics.median(times[backend])
        result[backend] = {
            "saved_mib": run["saved"] / 2**20,
            "step_ms": step * 1e3,
            # Cold compile = first step minus a steady-state step.
            "compile_s": max(run["first_step"] - step, 0.0) if backend != "eager" else 0.0,
            "peak_mib": max(peaks[backend]) / 2**20 if peaks[backend] else None,
        }
    result["ratios_vs_inductor"] = {
        "saved": result["memsave"]["saved_mib"] / result["inductor"]["saved_mib"],
        "step": result["memsave"]["step_ms"] / result["inductor"]["step_ms"],
        "compile": result["memsave"]["compile_s"] / max(result["inductor"]["compile_s"], 1e-9),
    }
    return result


def print_table(results: list[dict]) -> None:
    header = f"{'workload':24s} {'backend':9s} {'saved MiB':>10s} {'step ms':>9s} {'compile s':>10s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    for result in results:
        for backend in BACKENDS:
            row = result[backend]
            peak = f"{row['peak_mib']:9.1f}" if row["peak_mib"] is not None else f"{'-':>9s}"
            print(
                f"{result['workload']:24s} {backend:9s} {row['saved_mib']:10.2f} {row['step_ms']:9.1f} "
                f"{row['compile_s']:10.1f} {peak}"
            )
        ratios = result["ratios_vs_inductor"]
        print(
            f"{'':24s} memsave/inductor: saved {ratios['saved']:.2f}x, step {ratios['step']:.3f}x, "
            f"compile {ratios['compile']:.2f}x"
        )
    means = geometric_means(results)
    print(f"geometric mean over {len(results)} workloads, memsave/inductor: saved {means['saved']:.2f}x, step {means['step']:.3f}x")


def geometric_means(results: list[dict]) -> dict[str, float]:
    """The geometric mean of each memsave/inductor ratio over the workloads."""
    return {
        key: math.prod(r["ratios_vs_inductor"][key] for r in results) ** (1 / len(results))
        for key in ("saved", "step")
    }


def workload_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The command line both benchmark scripts take: which workloads, at what size, where."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, help="default: each workload's own")
    parser.add_argument("--size", type=int, help="image side or sequence length; default: each workload's own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main() -> None:
    parser = workload_parser(__doc__, steps=20)
    parser.add_argument("--options", nargs="+", default=[], choices=LOSSY_OPTIONS, help="memsave options to turn on")
    parser.add_argument("--pool-activations", type=int, default=1, help="memsave's pool_activations (k > 1 pools)")
    args = parser.parse_args()
    options = dict.fromkeys(args.options, True) | {"pool_activations": args.pool_activations}
    results = [measure_workload(w, args.steps, args.device, args.batch, args.size, options) for w in args.workloads]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"workloads": results, "geometric_means": geometric_means(results)}, indent=2))


if __name__ == "__main__":
    main()
