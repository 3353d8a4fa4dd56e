"""memsave with PyTorch's own memory tools on, side by side with stock Inductor on the same
setting: the partitioner's activation memory budget and Inductor's conv-BN folding in eval
mode. For each workload and setting: the bytes kept for backward (saved_tensors_hooks,
parameters and buffers excluded) and the largest gradient difference from eager PyTorch,
relative to the largest gradient.

    python benchmarks/memory_tools.py [--workloads resnet_stem mobilenet_v2_bitfit] [--batch 4] [--size 64]

It writes `memory_tools.md` to --results-dir (default: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memsave_fx  # noqa: E402
from benchmarks.bench_backends import loss_of  # noqa: E402
from benchmarks.run import _relative_error as relative_error, recorded_command  # noqa: E402
from benchmarks.workloads import WORKLOADS, build  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (torch._functorch.config patches, torch._inductor.config patches)
SETTINGS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "budget 0.5": ({"activation_memory_budget": 0.5}, {}),
    "budget 0.2": ({"activation_memory_budget": 0.2}, {}),
    "conv-BN folding": ({}, {"efficient_conv_bn_eval_fx_passes": True}),
}


def step(model: torch.nn.Module, inputs: list[torch.Tensor], backend: object | None) -> tuple[list[torch.Tensor], int]:
    """One forward and backward against a random target: the gradients and the saved bytes."""
    model = copy.deepcopy(model)
    fn = model if backend is None else torch.compile(model, backend=backend)
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    output, saved = memsave_fx.saved_activation_bytes(fn, *inputs, exclude=[*model.parameters(), *model.buffers()])
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(0))
    loss_of(output, target).backward()
    return [p.grad for p in model.parameters() if p.requires_grad], saved


def measure(name: str, batch: int, size: int) -> list[dict]:
    model, inputs, description = build(name, batch, size)
    reference, _ = step(model, inputs, None)
    rows = []
    for setting, (functorch, inductor) in SETTINGS.items():
        row = {"workload": name, "description": description, "setting": setting}
        for backend in ("inductor", "memsave"):
            torch._dynamo.reset()
            with torch._functorch.config.patch(functorch), torch._inductor.config.patch(force_disable_caches=True, **inductor):
                grads, saved = step(model, inputs, memsave_fx.backend() if backend == "memsave" else backend)
            row[backend] = saved
            row[f"{backend}_error"] = relative_error(grads, reference)
        print(row, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| workload | setting | Inductor MiB | memsave MiB | memsave / Inductor | gradient error (Inductor, memsave) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['setting']} | {r['inductor'] / 2**20:.2f} | {r['memsave'] / 2**20:.2f} "
            f"| {r['memsave'] / r['inductor']:.2f}x | {r['inductor_error']:.1e}, {r['memsave_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=["resnet_stem", "mobilenet_v2_bitfit", "convnext_bitfit"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [row for name in args.workloads for row in measure(name, args.batch, args.size)]
    table = markdown(rows)
    print(table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# memsave with PyTorch's memory tools\n\n`{recorded_command('benchmarks/memory_tools.py', sys.argv[1:])}`, "
        f"torch {torch.__version__}, batch {args.batch}, images {args.size}x{args.size}. Saved MiB: what one step keeps "
        "for backward (parameters and buffers excluded). Gradient error: the largest difference from eager PyTorch, "
        "relative to the largest gradient.\n\n"
        + "".join(f"- {r['workload']}: {r['description']}\n" for r in rows if r["setting"] == "default")
        + "\n"
    )
    (args.results_dir / "memory_tools.md").write_text(header + table)


if __name__ == "__main__":
    main()
