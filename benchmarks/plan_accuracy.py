"""How close the memory plan comes to a real step on this machine.

For each workload: the plan's saved bytes against `saved_tensors_hooks`, and its estimated peak
against the peak of the allocations the CPU allocator reports to the profiler over one forward
and backward (above the parameters and inputs, which exist before the step), for memsave and
stock Inductor.

    python benchmarks/plan_accuracy.py [--workloads resnet_stem vit_lora] [--batch 8] [--size 128]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memsave_fx  # noqa: E402
from benchmarks.workloads import WORKLOADS, build  # noqa: E402


def measured_step(model: torch.nn.Module, inputs: list[torch.Tensor], backend: str) -> tuple[int, int]:
    """Saved bytes and the allocation peak of one step after compiling (a warm-up step first)."""
    compiled = torch.compile(model, backend=backend)
    output = compiled(*inputs)
    output.backward(torch.randn_like(output))
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output, saved = memsave_fx.saved_activation_bytes(compiled, *inputs)
        output.backward(torch.randn_like(output))
    allocations = []

    def collect(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
            collect(node.children)

    collect(profiler.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return saved, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side or sequence length")
    args = parser.parse_args()
    print(f"{'workload':16} {'backend':9} {'saved: plan / hooks':>24} {'peak above inputs: plan / measured (MiB)':>44}")
    for name in args.workloads:
        model, inputs, _ = build(name, args.batch, args.size)
        plan = memsave_fx.plan(model, *inputs)
        resident = plan.parameter_bytes + plan.input_bytes
        for backend, saved_predicted, peak_predicted in (
            ("memsave", plan.saved_bytes, plan.peak_bytes),
            ("inductor", plan.baseline_saved_bytes, plan.baseline_peak_bytes),
        ):
            torch._dynamo.reset()
            saved, peak = measured_step(copy.deepcopy(model), inputs, backend)
            above = peak_predicted - resident
            print(
                f"{name:16} {backend:9} {saved_predicted / saved:>17.4f}x of {saved / 2**20:6.2f} MiB"
                f" {above / 2**20:>14.2f} / {peak / 2**20:6.2f} = {above / peak:.2f}x"
            )


if __name__ == "__main__":
    main()
