"""Guards and modes: recompiles, dynamic shapes, graph breaks, grad modes, autocast,
activation checkpointing and double backward, each against eager PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import memsave_fx

from .utils import TOLERANCE, assert_grads_close, assert_grads_match


def frozen_convnet() -> nn.Sequential:
    """Conv, BatchNorm, ReLU, a conv with a frozen weight, pooling and a linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    model[3].weight.requires_grad_(False)
    return model


def image(batch: int = 2, side: int = 12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, dtype=dtype, generator=torch.Generator().manual_seed(batch + side))


def step(fn, model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """One step against a random target; the gradients of what trains and of the input."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    output = fn(x)
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    torch.nn.functional.mse_loss(output, target).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return grads | {"input": x.grad}


def test_train_eval_and_dtype_switches_recompile_and_stay_correct():
    model = frozen_convnet()
    reference = copy.deepcopy(model)
    backend = memsave_fx.backend()
    compiled = torch.compile(model, backend=backend)

    def assert_step_matches(x: torch.Tensor) -> None:
        # BatchNorm's running statistics differ by rounding after a compiled training step.
        model.load_state_dict(reference.state_dict())
        assert_grads_close(step(compiled, model, x), step(reference, reference, x))

    x = image()
    assert_step_matches(x)
    model.eval(), reference.eval()
    assert_step_matches(x)
    model.double(), reference.double()
    assert_step_matches(x.double())
    model.train(), reference.train()
    assert_step_matches(x.double())
    assert len(backend.compiled) == 4
    # Eval-mode BatchNorm is frozen arithmetic: the conv ahead of it keeps less.
    train, evaluation = backend.compiled[0], backend.compiled[1]
    assert len(evaluation.released) >= len(train.released) >= 1


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_shapes(how):
    def graphs_compiled(backend) -> int:
        """Steps over three batch sizes; gradients checked; how many graphs `backend` compiled."""
        torch._dynamo.reset()
        model = frozen_convnet()
        reference = copy.deepcopy(model)
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return backend(gm, example_inputs)

        compiled = torch.compile(model, backend=counting, dynamic=True if how == "dynamic=True" else None)
        for batch in (2, 3, 5):
            x = image(batch)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 0)
            model.load_state_dict(reference.state_dict())
            assert_grads_close(step(compiled, model, x), step(reference, reference, x))
        return len(graphs)

    memsave = memsave_fx.backend()
    assert graphs_compiled(memsave) == graphs_compiled(torch._dynamo.lookup_backend("inductor"))
    assert len(memsave.compiled) <= 2
    # The frozen conv's input is still dropped with a symbolic batch size.
    training = [graph for graph in memsave.compiled if graph.has_backward]
    assert training and all(graph.released for graph in training)


def test_dynamic_shapes_keep_less_than_inductor():
    model, x = frozen_convnet(), image(4, 12)

    def saved(backend) -> int:
        torch._dynamo.reset()
        fn = torch.compile(model, backend=backend, dynamic=True)
        return memsave_fx.saved_activation_bytes(fn, x, exclude=[*model.parameters(), *model.buffers()])[1]

    assert saved(memsave_fx.backend()) < saved("inductor")


class WithGraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = frozen_convnet()[:5], nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_graph_breaks():
    model = WithGraphBreak()
    backend = memsave_fx.backend()
    assert_grads_match(model, [image().requires_grad_()], backend)
    assert len(backend.compiled) == 2 and all(g.has_backward for g in backend.compiled)
    assert backend.compiled[0].released


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_without_gradients(mode):
    model = frozen_convnet().eval()
    backend = memsave_fx.backend()
    x = image()
    with mode():
        out = torch.compile(model, backend=backend)(x)
        expected = model(x)
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad
    (graph,) = backend.compiled
    assert not graph.has_backward and graph.rewrites == []


def test_autocast_bf16():
    model = frozen_convnet()
    x = image()
    reference, ours = copy.deepcopy(model), copy.deepcopy(model)
    backend = memsave_fx.backend()
    compiled = torch.compile(ours, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = step(reference, reference, x)
        actual = step(compiled, ours, x)
    assert_grads_close(actual, expected, tolerance=TOLERANCE[torch.bfloat16])
    assert backend.compiled[0].released


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = frozen_convnet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint(self.model[:5], x, use_reentrant=False)
        return self.model[5:](x)


def test_activation_checkpointing_inside_the_model():
    model = Checkpointed()
    backend = memsave_fx.backend()
    assert_grads_match(model, [image().requires_grad_()], backend)
    (graph,) = backend.compiled
    assert graph.has_backward and graph.released
    # The checkpointed region is rerun in the backward, so its convolutions' inputs stay as they are.
    assert any("activation-checkpointed" in r.reason for r in graph.rewrites if not r.applied)


def test_double_backward_raises_as_stock_inductor_does():
    def second_derivative(backend):
        torch._dynamo.reset()
        model = frozen_convnet()
        x = image().requires_grad_()
        output = torch.compile(model, backend=backend)(x)
        (grad,) = torch.autograd.grad(output.square().sum(), x, create_graph=True)
        grad.sum().backward()

    with pytest.raises(RuntimeError) as stock:
        second_derivative("inductor")
    with pytest.raises(RuntimeError) as ours:
        second_derivative(memsave_fx.backend())
    assert str(ours.value) == str(stock.value)
    assert "double backward" in str(ours.value)


def test_model_with_nothing_frozen_is_left_to_inductor():
    """Without frozen weights no gradient-driven rewrite applies: with exact compression off
    memsave keeps exactly what stock Inductor keeps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.GELU(), nn.Flatten(), nn.Linear(512, 4)
    )
    x = image().requires_grad_()
    backend = memsave_fx.backend(exact_compression=False)
    assert_grads_match(model, [x], backend)
    assert not [r for r in backend.compiled[0].rewrites if r.applied]
    torch._dynamo.reset()
    assert saved_tensors(model, x, memsave_fx.backend(exact_compression=False)) == saved_tensors(model, x, "inductor")
    # By default only the lossless compressions apply: packed masks, weights saved as themselves.
    torch._dynamo.reset()
    backend = memsave_fx.backend()
    saved, stock = assert_grads_match(model, [x], backend, reference="inductor")
    assert {r.pass_name for r in backend.compiled[0].rewrites if r.applied} == {"flatten_saved_conv_inputs"}
    assert saved < stock


def saved_tensors(model: nn.Module, x: torch.Tensor, backend) -> list[tuple]:
    """The shapes, dtypes and strides of what one compiled forward keeps for backward."""
    model = copy.deepcopy(model)
    kept = []

    def pack(tensor):
        if not any(tensor.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in model.parameters()):
            kept.append((tuple(tensor.shape), tensor.dtype, tensor.stride()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.compile(model, backend=backend)(x.detach().clone().requires_grad_())
    return sorted(kept, key=str)


def test_model_with_everything_frozen():
    model = frozen_convnet().requires_grad_(False)
    backend = memsave_fx.backend()
    x = image()
    out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x))
    assert not out.requires_grad and not backend.compiled[0].has_backward
    # Only the input wants a gradient: every weight's input is dropped.
    torch._dynamo.reset()
    assert_grads_match(model, [x.requires_grad_()], backend := memsave_fx.backend())
    assert backend.compiled[0].released
