import copy
import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx import MemsaveConfig
from memsave_fx.backend import memsave_backend

from .utils import assert_grads_match, run_step, saved_bytes_of


def small_frozen_convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model[2].weight.requires_grad_(False)
    return model, [torch.randn(2, 3, 16, 16)]


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_found_by_name_without_importing_the_package():
    out = run_python(
        "import sys, torch\n"
        "print('memsave' in torch._dynamo.list_backends(), 'memsave_fx' in sys.modules)"
    )
    assert out.split() == ["True", "False"]


def test_import_stays_lean():
    out = run_python(
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import memsave_fx\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.startswith(('torch._inductor', 'sympy', 'transformers', 'matplotlib'))))"
    )
    assert out.strip() == "[]"


def test_signature():
    params = inspect.signature(memsave_backend).parameters
    assert list(params) == ["gm", "example_inputs", "mode", "options"]
    assert params["mode"].kind is inspect.Parameter.KEYWORD_ONLY and params["mode"].default is None
    assert params["options"].kind is inspect.Parameter.KEYWORD_ONLY and params["options"].default is None


@pytest.mark.parametrize(
    "options,valid",
    [
        ({"compiler": "gpu"}, "'inductor', 'eager'"),
        ({"exact_compression": "yes"}, "True, False"),
        ({"share_norms": 1}, "True, False"),
        ({"pool_activations": 0}, "int >= 1"),
        ({"pool_activations": 2.0}, "int >= 1"),
    ],
)
def test_bad_options_raise_naming_valid_values(options, valid):
    with pytest.raises(ValueError, match=valid):
        memsave_fx.backend(**options)
    model, inputs = small_frozen_convnet()
    with pytest.raises(ValueError, match=valid):
        memsave_backend(torch.fx.symbolic_trace(model), inputs, options=options)
    with pytest.raises(Exception, match=valid):
        torch.compile(model, backend="memsave", options=options)(*inputs)


def test_unknown_keys_go_to_inductor_which_rejects_them():
    model, inputs = small_frozen_convnet()
    with pytest.raises(RuntimeError, match="Unexpected optimization option no_such_option"):
        memsave_backend(torch.fx.symbolic_trace(model), inputs, options={"no_such_option": 1})


@pytest.mark.parametrize("key,meant", [("approx_activation", "approx_activations"), ("share_norm", "share_norms"),
                                       ("pool_activation", "pool_activations"), ("exact_compresion", "exact_compression")])  # fmt: skip
def test_misspelt_memsave_options_name_the_valid_ones(key, meant):
    model, inputs = small_frozen_convnet()
    with pytest.raises(ValueError, match=f"unknown option '{key}'; did you mean memsave's '{meant}'"):
        memsave_backend(torch.fx.symbolic_trace(model), inputs, options={key: True})


def test_mode_goes_to_inductor():
    model, inputs = small_frozen_convnet()
    with pytest.raises(RuntimeError, match="Unrecognized mode=no-such-mode"):
        memsave_backend(torch.fx.symbolic_trace(model), inputs, mode="no-such-mode")


def test_inductor_options_and_mode_reach_the_compiled_model():
    model, inputs = small_frozen_convnet()
    backend = memsave_fx.backend()
    compiled = torch.compile(model, backend=backend, options={"compiler": "inductor", "epilogue_fusion": False})
    assert compiled(*inputs).shape == (2, 4, 4, 4)
    assert backend.compiled[0].config == MemsaveConfig()


def test_eager_compiler_takes_no_inductor_options():
    model, inputs = small_frozen_convnet()
    with pytest.raises(ValueError, match="compiler='eager'"):
        memsave_backend(torch.fx.symbolic_trace(model), inputs, options={"compiler": "eager", "epilogue_fusion": False})


def test_reserved_inductor_hook_is_refused():
    model, inputs = small_frozen_convnet()
    with pytest.raises(ValueError, match="joint_custom_pre_pass"):
        memsave_backend(torch.fx.symbolic_trace(model), inputs, options={"joint_custom_pre_pass": None})


def test_options_override_the_backend_config():
    model, inputs = small_frozen_convnet()
    backend = memsave_fx.backend(compiler="inductor")
    torch.compile(model, backend=backend, options={"compiler": "eager"})(*inputs)
    assert backend.compiled[0].config.compiler == "eager"


@pytest.mark.parametrize("compiler", ["inductor", "eager"])
def test_records_what_each_graph_dropped(compiler):
    class WithGraphBreak(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = small_frozen_convnet()[0], small_frozen_convnet()[0]
            self.middle = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = self.middle(self.first(x))
            torch._dynamo.graph_break()
            return self.second(x)

    model = WithGraphBreak()
    x = torch.randn(2, 3, 40, 40)
    backend = memsave_fx.backend(compiler=compiler)
    assert_grads_match(model, [x], backend)
    assert len(backend.compiled) == 2
    for graph in backend.compiled:
        assert graph.has_backward
        assert graph.released and all(r.applied for r in graph.rewrites)


def test_inference_graph_is_left_alone():
    model, inputs = small_frozen_convnet()
    backend = memsave_fx.backend()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
    torch.testing.assert_close(out, model(*inputs))
    (graph,) = backend.compiled
    assert not graph.has_backward and graph.rewrites == []


def test_changing_requires_grad_recompiles():
    model, inputs = small_frozen_convnet()
    inputs[0].requires_grad_(True)
    reference = copy.deepcopy(model)
    backend = memsave_fx.backend()
    compiled = torch.compile(model, backend=backend)
    for frozen in (False, True, False):
        model[2].weight.requires_grad_(not frozen)
        reference[2].weight.requires_grad_(not frozen)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        x = inputs[0].detach().clone().requires_grad_()
        x_ref = inputs[0].detach().clone().requires_grad_()
        target = torch.randn(2, 4, 4, 4)
        torch.nn.functional.mse_loss(compiled(x), target).backward()
        torch.nn.functional.mse_loss(reference(x_ref), target).backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        assert (model[2].weight.grad is None) == frozen
        if not frozen:
            torch.testing.assert_close(model[2].weight.grad, reference[2].weight.grad)
    assert len(backend.compiled) == 2  # the third step reuses the first graph
    assert [bool(g.released) for g in backend.compiled] == [False, True]


def test_cache_keys_cover_code_version_and_config():
    from memsave_fx.joint_pass import MemsavePass

    keys = {MemsavePass(MemsaveConfig(**c)).uuid() for c in ({}, {"exact_compression": False}, {"compiler": "eager"})}
    assert len(keys) == 3
    assert MemsavePass(MemsaveConfig()).uuid() == MemsavePass(MemsaveConfig()).uuid()


def test_caches_do_not_serve_graphs_compiled_under_other_settings():
    model, inputs = small_frozen_convnet()
    inputs[0].requires_grad_(True)
    with torch._functorch.config.patch(enable_autograd_cache=True):
        saved = {}
        for name in ("inductor", "memsave", "inductor", "memsave"):
            torch._dynamo.reset()
            saved.setdefault(name, set()).add(saved_bytes_of(model, inputs, name))
    assert len(saved["inductor"]) == len(saved["memsave"]) == 1
    assert saved["memsave"].pop() < saved["inductor"].pop()


@pytest.mark.skipif(torch._inductor.config.force_disable_caches, reason="Inductor's caches are switched off")
def test_a_warm_compile_is_served_from_inductors_graph_cache_as_stock_is():
    """A second process (here: Dynamo reset) compiling the same model finds both the forward
    and the backward in Inductor's FX graph cache, under memsave as under stock Inductor, and
    the served graphs give eager's gradients."""
    from torch._inductor.utils import fresh_cache

    model, inputs = small_frozen_convnet()
    inputs[0].requires_grad_(True)
    served = {}
    with fresh_cache():
        for name in ("inductor", "memsave"):
            for compile_ in ("cold", "warm"):
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                backend = memsave_fx.backend() if name == "memsave" else name
                assert_grads_match(model, inputs, backend)
                counters = torch._dynamo.utils.counters["inductor"]
                served[name, compile_] = (counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"], counters["fxgraph_cache_bypass"])
    assert served["inductor", "cold"] == served["memsave", "cold"] == (0, 2, 0), served
    assert served["inductor", "warm"] == served["memsave", "warm"] == (2, 0, 0), served


def test_step_with_plain_backend_string():
    model, inputs = small_frozen_convnet()
    inputs[0].requires_grad_(True)
    grads, saved = run_step(copy.deepcopy(model), inputs, "memsave")
    assert saved > 0 and grads
