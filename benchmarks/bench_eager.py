"""Eager PyTorch vs the same model after `memsave_fx.convert`, no torch.compile.

For each workload: saved activation MiB (saved_tensors_hooks, parameters and buffers
excluded) and median step time over interleaved steps; on CUDA also
torch.cuda.max_memory_allocated over forward and backward.

    python benchmarks/bench_eager.py [--steps 30] [--device cpu|cuda] [--workloads resnet_stem ...]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memsave_fx  # noqa: E402
from benchmarks.bench_backends import interleaved_steps, loss_of, workload_parser  # noqa: E402
from benchmarks.workloads import WORKLOADS, build  # noqa: E402


def measure_workload(name: str, steps: int, device: str, batch: int | None, size: int | None) -> dict:
    model, inputs, description = build(name, batch, size)
    model, inputs = model.to(device), [x.to(device) for x in inputs]
    runs = {}
    for variant in ("eager", "converted"):
        copy_ = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers models are converted part by part
            fn = memsave_fx.convert(copy_) if variant == "converted" else copy_
        output, saved = memsave_fx.saved_activation_bytes(fn, *inputs, exclude=[*copy_.parameters(), *copy_.buffers()])
        target = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(device)
        loss_of(output, target).backward()
        runs[variant] = {"fn": fn, "model": copy_, "target": target, "saved": saved}

    times, peaks = interleaved_steps(runs, inputs, steps, device)

    result = {"workload": name, "description": description, "device": device, "batch": batch, "size": size}
    for variant, run in runs.items():
        result[variant] = {
            "saved_mib": run["saved"] / 2**20,
            "step_ms": statistics.median(times[variant]) * 1e3,
            "peak_mib": max(peaks[variant]) / 2**20 if peaks[variant] else None,
        }
    result["ratios"] = {
        "saved": result["converted"]["saved_mib"] / result["eager"]["saved_mib"],
        "step": result["converted"]["step_ms"] / result["eager"]["step_ms"],
    }
    if peaks["eager"]:
        result["ratios"]["peak"] = result["converted"]["peak_mib"] / result["eager"]["peak_mib"]
    return result


def print_table(results: list[dict]) -> None:
    header = f"{'workload':18s} {'variant':10s} {'saved MiB':>10s} {'step ms':>9s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    for result in results:
        for variant in ("eager", "converted"):
            row = result[variant]
            peak = f"{row['peak_mib']:9.1f}" if row["peak_mib"] is not None else f"{'-':>9s}"
            print(f"{result['workload']:18s} {variant:10s} {row['saved_mib']:10.2f} {row['step_ms']:9.1f} {peak}")
        ratios = result["ratios"]
        print(f"{'':18s} converted/eager: saved {ratios['saved']:.2f}x, step {ratios['step']:.3f}x")


def main() -> None:
    args = workload_parser(__doc__, steps=30).parse_args()
    results = [measure_workload(w, args.steps, args.device, args.batch, args.size) for w in args.workloads]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
