"""Differential fuzzing: random layer stacks and freeze patterns, memsave against eager PyTorch.

Each generated case compiles a random stack with memsave, runs one step against a random
target and checks that
- every requested gradient matches eager PyTorch's (dropout draws from eager's generator:
  `fallback_random`), and
- memsave keeps no more for backward than stock Inductor, by the memory plan (what the plan
  says and what saved_tensors_hooks see agree on real models: tests/test_plan.py).

The many cases run through memsave's whole compile path (Dynamo, AOTAutograd, Inductor's
decompositions, the passes, the partitioner and mask packing) and stop short of code
generation, which costs seconds per graph on CPU; a smaller set also generates code.

CI runs the same 94 cases every time, as regression tests; MEMSAVE_FUZZ=nightly draws 3,060
from a fresh seed, to find new failures.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn

from memsave_fx.backend import MemsaveBackend

from .utils import assert_grads_close, clone_inputs, run_step

NIGHTLY = os.environ.get("MEMSAVE_FUZZ") == "nightly"
FUZZ_SETTINGS = settings(
    max_examples=1000 if NIGHTLY else 30,  # per spatial rank
    derandomize=not NIGHTLY,  # CI runs the same cases every time; nightly explores
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
CODEGEN_SETTINGS = settings(FUZZ_SETTINGS, max_examples=60 if NIGHTLY else 4)

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONVS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
SIDE = {1: 12, 2: 8, 3: 5}  # input side per spatial rank: a few hundred elements per channel
ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "hardswish": lambda: nn.Hardswish(),
    "tanh": lambda: nn.Tanh(),
}
FREEZE_PATTERNS = ("first_layer", "biases", "random", "input_only", "none_frozen")


@dataclasses.dataclass
class Case:
    model: nn.Module
    inputs: list[torch.Tensor]
    description: str

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints for a failing case
        printer.text(self.description)


@st.composite
def conv_block(draw, rank: int, channels: int, side: int) -> tuple[list[nn.Module], list[str], int, int]:
    """A convolution with its optional norm, activation, pooling and dropout; returns the
    layers, their description, and the channels and side they leave."""
    out_channels = draw(st.sampled_from([2, 4, 6]))
    groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out_channels % g == 0]))
    kernel = draw(st.sampled_from([1, 2, 3]))
    dilation = draw(st.sampled_from([1, 2])) if kernel > 1 else 1
    reach = dilation * (kernel - 1)
    side_in = side
    if draw(st.booleans()):
        # Transposed convolutions take zero padding only; this one keeps the side.
        padding = reach // 2
        conv = TRANSPOSED_CONVS[rank](channels, out_channels, kernel, padding=padding, dilation=dilation, groups=groups)
        side = side + reach - 2 * padding
        what = f"convT{rank}d(k{kernel} d{dilation} g{groups})"
    else:
        stride = draw(st.sampled_from([1, 2])) if side > 3 else 1
        padding = draw(st.sampled_from([0, reach // 2])) if reach < side else 0
        modes = ["zeros", "reflect", "replicate", "circular"] if 0 < padding < side else ["zeros"]
        padding_mode = draw(st.sampled_from(modes))
        conv = CONVS[rank](channels, out_channels, kernel, stride, padding, dilation, groups, padding_mode=padding_mode)
        side = (side + 2 * padding - reach - 1) // stride + 1
        what = f"conv{rank}d(k{kernel} s{stride} p{padding} d{dilation} g{groups} {padding_mode})"
    if side < 1:
        return [], [], channels, side_in
    layers, described, channels = [conv], [what], out_channels
    norm = draw(st.sampled_from(["none", "batch_norm", "batch_norm_eval", "group_norm"]))
    if norm != "none":
        layer = nn.GroupNorm(2, channels) if norm == "group_norm" else BATCH_NORMS[rank](channels)
        if norm == "batch_norm_eval":
            layer.eval()
        layers.append(layer)
        described.append(norm)
    activation = draw(st.sampled_from(list(ACTIVATIONS)))
    layers.append(ACTIVATIONS[activation]())
    described.append(activation)
    if side >= 2 and draw(st.booleans()):
        pool = draw(st.sampled_from(["max", "avg"]))
        layers.append((MAX_POOLS if pool == "max" else AVG_POOLS)[rank](2))
        described.append(f"{pool}_pool")
        side //= 2
    if draw(st.booleans()):
        layers.append(nn.Dropout(0.25))
        described.append("dropout")
    return layers, described, channels, side


@st.composite
def cases(draw, rank: int | None = None) -> Case:
    rank = rank or draw(st.sampled_from([1, 2, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    channels_last = rank > 1 and draw(st.booleans())
    channels, side = 2, SIDE[rank]
    layers: list[nn.Module] = []
    described: list[str] = [f"{rank}d {str(dtype).removeprefix('torch.')}" + (" channels_last" * channels_last)]
    for _ in range(draw(st.integers(1, 3))):
        block, what, channels, side = draw(conv_block(rank, channels, side))
        if not block:
            break
        layers += block
        described += what
    features = channels * side**rank
    layers.append(nn.Flatten())
    if draw(st.booleans()):
        layers.append(nn.LayerNorm(features))
        described.append("layer_norm")
    layers.append(nn.Linear(features, 3))
    described.append("linear")

    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = nn.Sequential(*layers).to(dtype)
    x = torch.randn(2, 2, *[SIDE[rank]] * rank, dtype=dtype)
    if channels_last:
        memory_format = torch.channels_last if rank == 2 else torch.channels_last_3d
        model, x = model.to(memory_format=memory_format), x.to(memory_format=memory_format)

    pattern = draw(st.sampled_from(FREEZE_PATTERNS))
    parameters = list(model.named_parameters())
    first_layer = parameters[0][0].rpartition(".")[0]
    for name, parameter in parameters:
        trains = {
            "first_layer": name.rpartition(".")[0] == first_layer,
            "biases": name.endswith("bias"),
            "random": draw(st.booleans()),
            "input_only": False,
            "none_frozen": True,
        }[pattern]
        parameter.requires_grad_(trains)
    input_grad = pattern == "input_only" or draw(st.booleans())
    if not input_grad and not any(p.requires_grad for p in model.parameters()):
        input_grad = True  # nothing to differentiate otherwise
    described.append(f"trains: {pattern}" + (", input" * input_grad))
    return Case(model, [x.requires_grad_(input_grad)], " -> ".join(described))


def check_case(case: Case, backend: MemsaveBackend) -> None:
    """memsave's gradients equal eager's and it keeps no more than stock Inductor."""
    torch._dynamo.reset()  # each case is a new model: a fresh recompile budget
    with torch._inductor.config.patch(fallback_random=True):
        expected, _ = run_step(copy.deepcopy(case.model), clone_inputs(case.inputs), None)
        prepare = lambda model: torch.compile(model, backend=backend, fullgraph=True)  # noqa: E731
        actual, _ = run_step(copy.deepcopy(case.model), clone_inputs(case.inputs), None, prepare=prepare)
        (graph,) = backend.compiled
        plan = graph.plan()  # under the same settings: fallback_random changes what stock Inductor keeps
    assert graph.has_backward and graph.rewrites is not None, "memsave's joint pass did not run"

    assert_grads_close(actual, expected, scale=gradient_scale(case))
    assert plan.saved_bytes <= plan.baseline_saved_bytes, str(plan)


def gradient_scale(case: Case) -> float:
    """The largest gradient of any parameter or the input in eager PyTorch, all trainable.

    Errors are judged on this scale, not on the requested gradients' alone: a gradient that
    is zero by the maths (a conv ahead of train-mode BatchNorm with one weight per output
    channel is scale-invariant) is rounding noise, in eager PyTorch as anywhere else.
    """
    model = copy.deepcopy(case.model).requires_grad_(True)
    grads, _ = run_step(model, [x.detach().clone().requires_grad_() for x in case.inputs], None)
    return max(g.abs().max().item() for g in grads.values()) or 1.0


@pytest.mark.parametrize("rank", [1, 2, 3])
@FUZZ_SETTINGS
@given(data=st.data())
def test_random_stacks_without_code_generation(rank, data):
    case = data.draw(cases(rank))
    note(case.description)
    check_case(case, MemsaveBackend(generate_code=False))


@CODEGEN_SETTINGS
@given(case=cases())
def test_random_stacks_with_code_generation(case):
    note(case.description)
    check_case(case, MemsaveBackend())



