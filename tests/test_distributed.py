"""memsave under torch.distributed: 2 ranks on gloo over 127.0.0.1, on CPU.

DDP (with the DDP optimizer's graph splitting and gradient buckets) and FSDP2 (`fully_shard`,
with module groups that mix trainable and frozen parameters). Each rank's gradients, and its
parameters after optimizer steps, are compared with single-process eager PyTorch on the full
batch; each rank's saved bytes with stock Inductor's under the same wrapper.
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import memsave_fx
from memsave_fx.analysis import InputKind

from .utils import assert_grads_close, loopback_interface

WORLD_SIZE = 2
BATCH = 4  # the full batch; each rank takes an equal slice
STEPS = 2  # the second step runs on DDP's rebuilt buckets
LEARNING_RATE = 0.05
TIMEOUT = datetime.timedelta(seconds=240)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


class FrozenConvNet(nn.Module):
    """A frozen conv between trainable ones, then 4.5 MB of linears: with 1 MB buckets the DDP
    optimizer splits the graph in three. A user-defined class, as under DDP Dynamo compiles the
    frames of user code (an `nn.Sequential`'s forward is torch's own, and runs eagerly)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc1 = nn.Linear(8 * 8 * 8, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, 4)
        self.conv2.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        x = torch.relu(self.fc1(torch.relu(x).flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(torch.relu(x)))) + x


class BlockNet(nn.Module):
    """FSDP2 groups: each block, and the root (stem and head). The first block's group mixes a
    frozen conv weight with its trainable bias and norm; the root's a frozen stem with the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8 * 12 * 12, 4)
        self.stem.requires_grad_(False)
        self.blocks[0].conv.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 3, 12, 12, generator=generator), torch.randn(BATCH, 4, generator=generator)


def new_model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()


def train(
    model: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
    full: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, Any]:
    """`STEPS` SGD steps of `fn` on this rank's slice of the batch, with a mean loss: the
    wrappers average gradients over ranks, which gives the full batch's mean. Returns the first
    step's gradients and saved bytes, and the parameters after the last step, `full` of each
    (FSDP2 shards them), as numpy arrays: a tensor sent from a worker dies with it."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=LEARNING_RATE)
    local = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    result: dict[str, Any] = {}
    for step in range(STEPS):
        x, target = batch(step)
        output, saved = memsave_fx.saved_activation_bytes(fn, x[local], exclude=[*model.parameters()])
        nn.functional.mse_loss(output, target[local]).backward()
        if step == 0:
            result["saved"] = saved
            result["grads"] = {name: full(p.grad).numpy().copy() for name, p in trainable.items()}
        optimizer.step()
        optimizer.zero_grad()
    result["params"] = {name: full(p.detach()).numpy().copy() for name, p in trainable.items()}
    return result


def eager_reference(cls: type[nn.Module]) -> dict[str, Any]:
    model = new_model(cls)
    return train(model, model)


def saved_on_one_rank_slice(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """What `fn` keeps for backward on one rank's slice, in this process, without a wrapper."""
    x, _ = batch(0)
    _, saved = memsave_fx.saved_activation_bytes(fn, x[: BATCH // WORLD_SIZE], exclude=[*model.parameters()])
    return saved


def ddp_worker(rank: int) -> dict[str, dict[str, Any]]:
    """Under DDP, memsave's run on this rank, then stock Inductor's."""
    model = new_model(FrozenConvNet)
    backend = memsave_fx.backend()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    memsave = train(model, torch.compile(ddp, backend=backend), rank, WORLD_SIZE)
    plan = memsave_fx.plan(ddp, batch(0)[0][: BATCH // WORLD_SIZE])
    memsave["plan"] = plan.graphs, plan.saved_bytes, plan.baseline_saved_bytes
    memsave["graphs"] = [
        ([i.name for i in graph.inputs if i.kind is InputKind.PARAMETER], graph.has_backward, graph.released)
        for graph in backend.compiled
    ]
    torch._dynamo.reset()
    model = new_model(FrozenConvNet)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    return {"memsave": memsave, "inductor": train(model, torch.compile(ddp, backend="inductor"), rank, WORLD_SIZE)}


def fsdp2_worker(rank: int) -> dict[str, dict[str, Any]]:
    """Under FSDP2, memsave's run on this rank, then stock Inductor's."""
    backend = memsave_fx.backend()
    model = fully_sharded_block_net(backend)
    memsave = train(model, model, rank, WORLD_SIZE, full=lambda t: t.full_tensor())
    memsave["graphs"] = [(graph.has_backward, graph.released) for graph in backend.compiled]
    try:
        memsave_fx.plan(model, batch(0)[0])
    except TypeError as error:
        memsave["plan_error"] = str(error)
    torch._dynamo.reset()
    model = fully_sharded_block_net("inductor")
    return {"memsave": memsave, "inductor": train(model, model, rank, WORLD_SIZE, full=lambda t: t.full_tensor())}


def fully_sharded_block_net(backend: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = new_model(BlockNet)
    # Blocks are compiled one by one, as FSDP2's own recipes do: FSDP2's hooks break the graph,
    # and Dynamo runs a frame with a graph break inside a loop eagerly.
    for block in model.blocks:
        block.compile(backend=backend)
        fully_shard(block)
    return fully_shard(model)


def test_ddp_matches_eager_and_keeps_less_than_inductor(tmp_path):
    reference = eager_reference(FrozenConvNet)
    runs = run_ranks(tmp_path, ddp_worker)
    all_trainable = set(reference["grads"])
    for rank, (memsave, inductor) in enumerate((run["memsave"], run["inductor"]) for run in runs):
        assert_close(memsave["grads"], reference["grads"])
        assert_close(memsave["params"], reference["params"])
        assert memsave["saved"] < inductor["saved"], rank
        # The DDP optimizer split the one Dynamo graph at the 1 MB bucket boundaries, and
        # memsave compiled every piece: together they read each trainable parameter.
        graphs = memsave["graphs"]
        assert len(graphs) >= 3
        assert all(has_backward for _, has_backward, _ in graphs)
        assert {name for names, _, _ in graphs for name in names} >= all_trainable
        assert ["relu"] in [released for _, _, released in graphs]  # conv2's input
        # The plan of the DDP model is of one rank, split as DDP splits it.
        assert memsave["plan"] == (len(graphs), memsave["saved"], inductor["saved"])


def test_fsdp2_with_mixed_frozen_groups_matches_eager_and_keeps_less_than_inductor(tmp_path):
    reference = eager_reference(BlockNet)
    runs = run_ranks(tmp_path, fsdp2_worker)
    model = new_model(BlockNet)
    for block in model.blocks:
        block.compile(backend="memsave")
    unwrapped = saved_on_one_rank_slice(model, model)
    for rank, (memsave, inductor) in enumerate((run["memsave"], run["inductor"]) for run in runs):
        assert_close(memsave["grads"], reference["grads"])
        assert_close(memsave["params"], reference["params"])
        assert memsave["saved"] < inductor["saved"], rank
        # FSDP2's gathered parameters, saved by the compiled blocks, are not activations.
        assert memsave["saved"] == unwrapped
        graphs = memsave["graphs"]
        assert len(graphs) == 2 and all(has_backward for has_backward, _ in graphs)
        # Only the first block's conv weight is frozen: only its input is dropped.
        assert [released for _, released in graphs] == [["relu"], []]
        assert "plan the model before sharding it" in memsave["plan_error"]


def assert_close(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert_grads_close(
        {name: torch.from_numpy(value) for name, value in actual.items()},
        {name: torch.from_numpy(value) for name, value in expected.items()},
    )


# --- running ranks ---------------------------------------------------------------------------


def run_ranks(tmp_path, worker: Callable[..., Any], *args: Any) -> list[Any]:
    """`worker(rank, *args)` in `WORLD_SIZE` spawned processes joined in one gloo group; the
    results by rank. A rank's exception fails the test with its traceback."""
    context = mp.get_context("spawn")
    results = context.Queue()
    rendezvous = tmp_path / f"rendezvous-{worker.__name__}-{'-'.join(map(str, args))}"
    processes = [
        context.Process(target=_rank_main, args=(rank, str(rendezvous), results, worker, args))
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    by_rank: dict[int, Any] = {}
    try:
        for _ in processes:
            rank, result, error = results.get(timeout=2 * TIMEOUT.total_seconds())
            if error is not None:
                pytest.fail(f"rank {rank} failed:\n{error}")
            by_rank[rank] = result
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(WORLD_SIZE)) - by_rank.keys())} did not finish")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [by_rank[rank] for rank in range(WORLD_SIZE)]


def _rank_main(rank: int, rendezvous: str, results: Any, worker: Callable[..., Any], args: tuple) -> None:
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
        # A graph served from AOTAutograd's cache skips memsave's pass and its records.
        torch._functorch.config.enable_autograd_cache = False
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE, timeout=TIMEOUT
        )
        try:
            results.put((rank, worker(rank, *args), None))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
