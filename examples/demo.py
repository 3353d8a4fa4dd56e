"""Compile a small CNN whose backbone is frozen with backend="memsave", and show what it saves.

    python examples/demo.py
    memsave-fx plan examples.demo:workload --batch-size 32    # the plan alone, from the command line
"""

import copy
import time

import torch
from torch import nn

import memsave_fx


def make_model() -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    torch.manual_seed(0)
    model = nn.Sequential(
        block(3, 16),  # the stem: trained
        block(16, 32), nn.MaxPool2d(2),  # the backbone: frozen
        block(32, 64), nn.MaxPool2d(2),
        block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),  # the head: trained
    )  # fmt: skip
    for module in model[1:8]:
        module.requires_grad_(False)
        module.eval()  # frozen BatchNorm uses its running statistics
    return model


def workload(batch_size: int = 8, image: int = 64) -> tuple[nn.Module, torch.Tensor]:
    """The demo's model and an input batch (a factory for `memsave-fx plan`)."""
    return make_model(), torch.randn(batch_size, 3, image, image)


def step(model: nn.Module, backend, x: torch.Tensor, target: torch.Tensor) -> tuple[int, dict, float]:
    fn = torch.compile(model, backend=backend) if backend else model
    start = time.perf_counter()
    output, saved = memsave_fx.saved_activation_bytes(fn, x)
    nn.functional.cross_entropy(output, target).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return saved, grads, time.perf_counter() - start


def main() -> None:
    model, x = workload()
    target = torch.randint(0, 10, (x.shape[0],))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, {trainable} trainable\n")

    # The plan: computed on fake tensors, before anything runs.
    plan = memsave_fx.plan(model, x)
    print(plan.table(largest=8))

    memsave = memsave_fx.backend()
    results = {}
    for name, backend in (("eager", None), ("inductor", "inductor"), ("memsave", memsave)):
        torch._dynamo.reset()
        results[name] = step(copy.deepcopy(model), backend, x, target)

    print("\nwhat memsave changed in what is kept for backward (per compiled graph):")
    for graph in memsave.compiled:
        for rewrite in graph.rewrites or ():
            status = "applied: " if rewrite.applied else "declined:"
            print(f"  graph {graph.index} {status} {rewrite.reason}")
        print(f"  graph {graph.index} applied:  {graph.packed_masks} saved boolean masks packed at 1 bit per element")

    print("\nsaved activations, one training step:")
    for name, (saved, _, seconds) in results.items():
        ratio = saved / results["inductor"][0]
        print(f"  {name:9s} {saved / 2**20:7.2f} MiB  ({ratio:.2f}x inductor)  first step {seconds:.1f} s")

    for name, predicted in (("memsave", plan.saved_bytes), ("inductor", plan.baseline_saved_bytes)):
        print(f"  {name} measured {results[name][0]} bytes; the plan predicted {predicted}")

    eager_grads, memsave_grads = results["eager"][1], results["memsave"][1]
    worst = max((memsave_grads[n] - g).abs().max().item() / g.abs().max().item() for n, g in eager_grads.items())
    print(f"\nlargest gradient difference vs eager PyTorch: {worst:.1e} (relative)")


if __name__ == "__main__":
    main()
