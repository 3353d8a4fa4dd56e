"""Shared test machinery: gradients against eager PyTorch, saved bytes, captured joint graphs."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from memsave_fx import saved_activation_bytes

# Errors are judged against the largest gradient entry of the eager run.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def clone_inputs(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]


def run_step(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    backend: Any | None,
    target_seed: int = 0,
    *,
    prepare: Callable[[torch.nn.Module], Callable[..., Any]] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """One forward/backward with a loss against a random target, on `prepare(model)` if given,
    else on `model` compiled with `backend` (eager PyTorch when None).

    Returns the gradients of every trainable parameter and input, and the saved bytes. The
    random generator is seeded first, so that runs draw the same dropout masks.
    """
    if prepare is not None:
        fn = prepare(model)
    else:
        fn = torch.compile(model, backend=backend) if backend is not None else model
    torch.manual_seed(target_seed)
    output, saved = saved_activation_bytes(fn, *inputs, exclude=[*model.parameters(), *model.buffers()])
    generator = torch.Generator().manual_seed(target_seed)
    target = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output.dtype)
    torch.nn.functional.mse_loss(output.float(), target.float()).backward()
    grads = {f"param {n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads |= {f"input {i}": x.grad for i, x in enumerate(inputs) if x.requires_grad}
    return grads, saved


def assert_grads_match(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    backend: Any,
    *,
    reference: Any | None = None,
    tolerance: float | None = None,
    prepare: Callable[[torch.nn.Module], Callable[..., Any]] | None = None,
) -> tuple[int, int]:
    """Compare gradients of `backend` (or of `prepare(model)`) with those of `reference`
    (eager PyTorch by default) on deep copies; return both runs' saved bytes."""
    expected, reference_saved = run_step(copy.deepcopy(model), clone_inputs(inputs), reference)
    actual, saved = run_step(copy.deepcopy(model), clone_inputs(inputs), backend, prepare=prepare)
    assert expected, "nothing requires grad: the test would check nothing"
    assert_grads_close(actual, expected, tolerance=tolerance)
    return saved, reference_saved


def assert_grads_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    *,
    tolerance: float | None = None,
    scale: float | None = None,
) -> None:
    """Each gradient within `tolerance` (by default, that of the most precise dtype among the
    expected gradients) of the expected one, judged on one global `scale` (by default, the
    largest expected entry)."""
    assert actual.keys() == expected.keys()
    if scale is None:
        scale = max(g.abs().max().item() for g in expected.values() if g is not None) or 1.0
    if tolerance is None:
        tolerance = min(TOLERANCE[g.dtype] for g in expected.values() if g is not None)
    for name, want in expected.items():
        got = actual[name]
        assert got is not None and want is not None, name
        assert got.shape == want.shape and got.dtype == want.dtype, name
        error = (got.double() - want.double()).abs().max().item() / scale
        assert error <= tolerance, f"{name}: error {error:.3g} x max|grad| > {tolerance}"


def joint_graph(model: torch.nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """The joint forward/backward graph AOTAutograd builds for `model` (no decompositions)."""
    captured: list[fx.GraphModule] = []

    def partition(joint_module: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        captured.append(copy.deepcopy(joint_module))
        return min_cut_rematerialization_partition(joint_module, joint_inputs, **kwargs)

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, partition_fn=partition)
    torch.compile(model, backend=backend)(*inputs)
    (graph_module,) = captured
    return graph_module


def graph_code(gm: fx.GraphModule) -> str:
    gm.recompile()
    return gm.code


def assert_pass_leaves_graph_unchanged(
    rewrite_pass: Any,
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    config: Any = None,
    *,
    decomposed: bool = False,
) -> None:
    """Run one pass over `model`'s analysed joint graph: it must apply nothing and change
    nothing. With `decomposed`, over the graph memsave's pass sees: after Inductor's
    decompositions, where a pass may find its pattern and decline it (and record why)."""
    from memsave_fx import MemsaveConfig
    from memsave_fx.analysis import analyze_joint_graph

    gm = decomposed_joint_graph(model, *inputs) if decomposed else joint_graph(model, *inputs)
    before = graph_code(gm)
    analyze_joint_graph(gm.graph)
    rewrites = rewrite_pass(gm.graph, config or MemsaveConfig())
    if decomposed:
        assert not [r for r in rewrites if r.applied], rewrites
    else:
        assert rewrites == []
    assert graph_code(gm) == before


def decomposed_joint_graph(model: torch.nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """The joint graph Inductor hands its `joint_custom_pre_pass`: decomposed, not partitioned."""
    captured: list[fx.GraphModule] = []

    def capture(graph: fx.Graph) -> None:
        captured.append(copy.deepcopy(graph.owning_module))

    with torch._inductor.config.patch(joint_custom_pre_pass=capture, force_disable_caches=True):
        torch.compile(model, backend="inductor")(*inputs)
    (graph_module,) = captured
    return graph_module


def saved_bytes_of(model: torch.nn.Module, inputs: Sequence[torch.Tensor], backend: Any) -> int:
    fn: Callable[..., Any] = torch.compile(model, backend=backend)
    _, saved = saved_activation_bytes(fn, *inputs, exclude=[*model.parameters(), *model.buffers()])
    return saved


def loopback_interface() -> str:
    """The loopback network interface's name, for GLOO_SOCKET_IFNAME: tests talk over it only."""
    names = {name for _, name in socket.if_nameindex()}
    return next(name for name in ("lo", "lo0") if name in names)
