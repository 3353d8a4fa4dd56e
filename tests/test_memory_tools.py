"""memsave with PyTorch's own memory tools on: the partitioner's activation memory budget,
Inductor's conv-BN folding in eval mode, activation offloading. Each against eager PyTorch for
the gradients and against stock Inductor with the same setting for the saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memsave_fx

from .utils import assert_grads_close, run_step


def inverted_residual_net() -> nn.Module:
    """A MobileNetV2-style stack in eval mode (BatchNorm on running statistics) whose first
    convolution alone trains: expansion, depthwise and projection convolutions, ReLU6."""
    torch.manual_seed(0)

    def conv_bn(inputs: int, outputs: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(outputs)]
        return layers + [nn.ReLU6()] if act else layers

    model = nn.Sequential(
        *conv_bn(3, 8, 3, 2),
        *conv_bn(8, 32), *conv_bn(32, 32, 3, 1, groups=32), *conv_bn(32, 16, act=False),
        *conv_bn(16, 48), *conv_bn(48, 48, 3, 2, groups=48), *conv_bn(48, 24, act=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index == 0)
    return model.eval()


def images() -> list[torch.Tensor]:
    return [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]


def steps(model: nn.Module, **config_patches) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
    """Eager, stock Inductor and memsave, each on a copy of the model, with the functorch and
    Inductor settings given (keys prefixed "functorch_" go to torch._functorch.config)."""
    functorch = {k.removeprefix("functorch_"): v for k, v in config_patches.items() if k.startswith("functorch_")}
    inductor = {k: v for k, v in config_patches.items() if not k.startswith("functorch_")}
    results = {"eager": run_step(copy.deepcopy(model), images(), None)}
    for name, backend in (("inductor", "inductor"), ("memsave", memsave_fx.backend())):
        torch._dynamo.reset()
        with torch._functorch.config.patch(functorch), torch._inductor.config.patch(force_disable_caches=True, **inductor):
            results[name] = run_step(copy.deepcopy(model), images(), backend)
    return results


# --- the partitioner's activation memory budget ----------------------------------------------------


@pytest.fixture(scope="module")
def budget_runs() -> dict[float, dict[str, tuple[dict[str, torch.Tensor], int]]]:
    model = inverted_residual_net()
    return {budget: steps(model, functorch_activation_memory_budget=budget) for budget in (1.0, 0.5, 0.2)}


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.2])
def test_memory_budget_keeps_gradients_exact_and_no_more_than_stock(budget_runs, budget):
    runs = budget_runs[budget]
    assert_grads_close(runs["memsave"][0], runs["eager"][0])
    assert runs["memsave"][1] <= runs["inductor"][1], (runs["memsave"][1], runs["inductor"][1])


def test_memory_budget_saved_bytes_fall_as_the_budget_falls(budget_runs):
    saved = [budget_runs[budget]["memsave"][1] for budget in (1.0, 0.5, 0.2)]
    assert saved == sorted(saved, reverse=True), saved


# --- Inductor's conv-BN folding in eval mode -----------------------------------------------------


def test_conv_bn_folding_keeps_no_more_and_stays_exact(budget_runs):
    """The folded weight of the trained convolution is a value of parameters read only for its
    shape: memsave keeps it no more than the unfolded graph's inputs."""
    plain = budget_runs[1.0]  # the default budget: no tool on
    folded = steps(inverted_residual_net(), efficient_conv_bn_eval_fx_passes=True)
    assert_grads_close(folded["memsave"][0], folded["eager"][0])
    assert folded["memsave"][1] <= plain["memsave"][1], (folded["memsave"][1], plain["memsave"][1])
    assert folded["memsave"][1] < folded["inductor"][1] / 2, (folded["memsave"][1], folded["inductor"][1])


# --- activation offloading ----------------------------------------------------------------------


def test_save_on_cpu_moves_every_saved_tensor_and_stays_exact():
    """What memsave saves, packed masks included, goes through the hooks `save_on_cpu` uses:
    each tensor is copied out at the save and back at its use in the backward."""
    from .test_modes import frozen_convnet, image, step

    model = frozen_convnet()
    compiled = torch.compile(copy.deepcopy(model), backend=memsave_fx.backend())
    expected = step(model, model, image())
    saved_dtypes: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_dtypes.append(tensor.dtype)
        return tensor.to("cpu", copy=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda copied: copied.clone()):
        assert_grads_close(step(compiled, compiled._orig_mod, image()), expected)
    assert torch.uint8 in saved_dtypes, saved_dtypes  # the ReLU masks, packed at 1 bit
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        assert_grads_close(step(compiled, compiled._orig_mod, image()), expected)


@pytest.mark.skipif(
    not hasattr(torch._functorch.config, "enable_activation_offloading"),
    reason="this torch has no AOTAutograd activation offloading",
)
def test_aot_activation_offloading_option_compiles_and_stays_exact():
    """AOTAutograd's offload pass runs on memsave's partitioned graphs too. It moves only
    values tagged `should_offload`, and only to a CPU from an accelerator: here it must leave
    memsave's graphs working and exact."""
    model = inverted_residual_net()
    runs = steps(model, functorch_enable_activation_offloading=True)
    assert_grads_close(runs["memsave"][0], runs["eager"][0])
    assert runs["memsave"][1] <= runs["inductor"][1]
