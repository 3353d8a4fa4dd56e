"""The backend's records: they never hold the user's model, and say what a graph served from
AOTAutograd's cache does."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.backend import memsave_backend


def frozen_convnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3))
    model[2].requires_grad_(False)
    return model, torch.randn(2, 3, 16, 16, requires_grad=True)


def train_and_drop(backend) -> list[weakref.ref]:
    """Compile, run a step, drop the model and the compiled function; what should be freed."""
    model, x = frozen_convnet()
    compiled = torch.compile(model, backend=backend)
    compiled(x).square().mean().backward()
    tensors = [weakref.ref(t) for t in (*model.parameters(), x)]
    del model, x, compiled
    torch._dynamo.reset()
    gc.collect()
    return tensors


@pytest.mark.parametrize("backend", ["inductor", "memsave", "memsave-object"])
def test_dropping_a_compiled_model_frees_its_tensors(backend):
    records = memsave_fx.backend() if backend == "memsave-object" else None
    before = len(memsave_backend.compiled)
    alive = [ref for ref in train_and_drop(records or backend) if ref() is not None]
    assert alive == []
    if backend == "memsave":  # the shared backend recorded the graph, and keeps only the record
        assert len(memsave_backend.compiled) == before + 1
        assert memsave_backend.compiled[-1].released


def test_a_kept_backend_object_still_reports_after_the_model_is_freed():
    backend = memsave_fx.backend()
    train_and_drop(backend)
    (graph,) = backend.compiled
    assert any(r.applied for r in graph.rewrites) and graph.packed_masks > 0
    with pytest.raises(RuntimeError, match="compiled function .* was freed"):
        graph.plan()


def test_a_backend_object_plans_while_the_model_lives():
    backend = memsave_fx.backend()
    model, x = frozen_convnet()
    torch.compile(model, backend=backend)(x)
    (plan,) = backend.plans()
    assert 0 < plan.saved_bytes < plan.baseline_saved_bytes


def compile_once(backend) -> None:
    model, x = frozen_convnet()
    torch.compile(model, backend=backend)(x).square().mean().backward()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def warm_cache():
    """Fresh Inductor and AOTAutograd cache directories, holding the frozen convnet compiled
    once by memsave; the record of that cold compile."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache(), torch._functorch.config.patch(enable_autograd_cache=True):
        cold = memsave_fx.backend()
        compile_once(cold)
        yield cold.compiled[0]


@pytest.fixture
def autograd_cache_on(warm_cache):
    with torch._functorch.config.patch(enable_autograd_cache=True):  # the suite turns it off
        yield warm_cache


def test_a_record_served_from_cache_says_what_the_graph_does(autograd_cache_on):
    first, warm = autograd_cache_on, memsave_fx.backend()
    model, x = frozen_convnet()
    compiled = torch.compile(model, backend=warm)
    compiled(x).square().mean().backward()
    (second,) = warm.compiled
    assert not first.from_cache and second.from_cache
    assert not second.traced  # nothing re-derived until read
    assert second.has_backward and second.traced  # reading any of what the passes record re-derives it
    assert second.rewrites == first.rewrites and any(r.applied for r in second.rewrites)
    assert second.packed_masks == first.packed_masks > 0
    assert second.released == first.released and second.has_backward


def test_a_cached_record_whose_model_was_freed_says_so(autograd_cache_on):
    backend = memsave_fx.backend()
    train_and_drop(backend)
    (graph,) = backend.compiled
    assert graph.from_cache and graph.rewrites is None and graph.packed_masks == 0


def test_gradients_of_a_cached_graph_match_eager(autograd_cache_on):
    from tests.utils import assert_grads_match

    model, x = frozen_convnet()
    before = len(memsave_backend.compiled)
    assert_grads_match(copy.deepcopy(model), [x], "memsave")
    assert memsave_backend.compiled[before].from_cache
