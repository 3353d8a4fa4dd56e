"""A short fine-tuning run with and without the Approx-BP options: the loss curves side by side.

A tiny ViT with LoRA on its attention, trained on a fixed synthetic classification task (each
class a fixed random image, seen under noise): with exact backward, with the ReGELU2 surrogate
(`approx_activations`), and with that and `share_norms`. All start from the same weights and
see the same batches.

    python benchmarks/approx_training.py [--steps 100]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memsave_fx  # noqa: E402
from benchmarks.workloads import vit_lora  # noqa: E402


def train(model: torch.nn.Module, backend, steps: int, batch: int, image: int, classes: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    features = model(torch.randn(1, 3, image, image)).shape[-1]
    head = torch.nn.Linear(features, classes)
    torch.nn.init.zeros_(head.weight)
    prototypes = torch.randn(classes, 3, image, image, generator=generator)
    step_fn = torch.compile(torch.nn.Sequential(model, head), backend=backend)
    parameters = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, classes, (batch,), generator=generator)
        x = prototypes[labels] + 2.0 * torch.randn(batch, 3, image, image, generator=generator)
        loss = torch.nn.functional.cross_entropy(step_fn(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args()
    model, _, _ = vit_lora(batch=args.batch, size=args.image)
    curves = {}
    backends = {
        "exact": memsave_fx.backend(),
        "approx": memsave_fx.backend(approx_activations=True),
        "approx+share": memsave_fx.backend(approx_activations=True, share_norms=True),
    }
    for name, backend in backends.items():
        torch.manual_seed(0)
        torch._dynamo.reset()
        curves[name] = train(copy.deepcopy(model), backend, args.steps, args.batch, args.image, args.classes)
    window = max(args.steps // 10, 1)
    for step in range(0, args.steps, window):
        print(f"step {step:4d}: " + "  ".join(f"{name} {curve[step]:.4f}" for name, curve in curves.items()))
    final = {name: statistics.mean(curve[-window:]) for name, curve in curves.items()}
    print(f"final loss (mean of last {window} steps): exact {final['exact']:.4f}")
    for name in list(backends)[1:]:
        gap = final[name] - final["exact"]
        print(f"  {name} {final[name]:.4f}, gap {gap:+.4f} ({gap / final['exact']:+.1%})")


if __name__ == "__main__":
    main()
