"""Fine-tune a small BERT classifier with LoRA under DistributedDataParallel, compiled with
backend="memsave", and print each rank's memory.

    torchrun --standalone --nproc-per-node 2 examples/ddp_finetune.py
    torchrun --standalone --nproc-per-node 2 examples/ddp_finetune.py --backend inductor   # stock, to compare
    torchrun --standalone --nproc-per-node 2 examples/ddp_finetune.py --options share_norms approx_activations

Ranks run on GPUs with NCCL when there are enough for one each, else on the CPU with gloo.
Each rank's memory: what its step keeps for backward (measured with saved_tensors_hooks), the
memory plan's figures for memsave and for stock Inductor, and on a GPU the step's peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import memsave_fx

VOCAB = 1000
MiB = 2**20


def make_model() -> nn.Module:
    """BERT (2 layers, width 128) with LoRA (rank 8) on the attention queries and values; the
    classifier head is trained in full, the rest is frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=512, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(BertForSequenceClassification(config), lora)


def make_dataset(samples: int, length: int) -> TensorDataset:
    """Random token sequences, labelled by whether their first token is in the vocabulary's
    lower half: a task the model can learn from its [CLS] position."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (samples, length), generator=generator)
    return TensorDataset(tokens, (tokens[:, 0] < VOCAB // 2).long())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="memsave", help="torch.compile backend (default: memsave)")
    parser.add_argument("--options", nargs="*", default=[], metavar="OPTION", help="memsave options to switch on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --standalone --nproc-per-node 2 examples/ddp_finetune.py")

    local_rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()

    model = make_model().to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    options = dict.fromkeys(args.options, True)
    compiled = torch.compile(ddp, backend=args.backend, options=options or None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    dataset = make_dataset(args.steps * args.batch_size * world_size, args.length)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=DistributedSampler(dataset, seed=0))

    # The plan of one rank's step, on fake tensors: what memsave keeps, and what stock would.
    first_tokens = next(iter(loader))[0].to(device)
    plan = memsave_fx.plan(ddp, input_ids=first_tokens, options=options)

    losses, seconds, saved, peak = [], [], 0, 0
    for step, (tokens, labels) in enumerate(loader):
        tokens, labels = tokens.to(device), labels.to(device)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        output, saved = memsave_fx.saved_activation_bytes(compiled, input_ids=tokens)
        loss = nn.functional.cross_entropy(output.logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())

    # Every rank's figures, printed by rank 0.
    row = (rank, saved, plan.saved_bytes, plan.baseline_saved_bytes, plan.peak_bytes, peak, statistics.median(seconds[1:] or seconds))
    rows: list = [None] * world_size
    dist.all_gather_object(rows, row)
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"BERT + LoRA, {trainable} of {sum(p.numel() for p in model.parameters())} parameters trained")
        switched_on = f" with {', '.join(options)}" if options else ""
        print(f"{world_size} ranks on {device.type} ({dist.get_backend()}), backend={args.backend!r}{switched_on}, "
              f"{args.batch_size} x {args.length} tokens per rank, {len(losses)} steps")  # fmt: skip
        print(f"loss: {losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last (rank 0)\n")
        print("rank  saved for backward  plan: memsave  plan: stock Inductor  plan: peak  peak (GPU)  step")
        for r, kept, planned, stock, planned_peak, measured_peak, step_time in rows:
            gpu = f"{measured_peak / MiB:7.2f} MiB" if measured_peak else "          -"
            print(f"{r:4d}  {kept / MiB:14.2f} MiB  {planned / MiB:9.2f} MiB  {stock / MiB:16.2f} MiB  "
                  f"{planned_peak / MiB:6.2f} MiB  {gpu}  {step_time * 1e3:.0f} ms")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
