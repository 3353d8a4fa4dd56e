"""MemsaveConfig: options from MEMSAVE_<OPTION> environment variables, under explicit options."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import memsave_fx
from memsave_fx.backend import MemsaveBackend, memsave_backend
from memsave_fx.config import MemsaveConfig, environment_options


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MEMSAVE_SHARE_NORMS": "1"}, {"share_norms": True}),
        ({"MEMSAVE_SHARE_NORMS": "Yes", "MEMSAVE_APPROX_ACTIVATIONS": "true"}, {"share_norms": True, "approx_activations": True}),
        ({"MEMSAVE_EXACT_COMPRESSION": "off"}, {"exact_compression": False}),
        ({"MEMSAVE_EXACT_COMPRESSION": " 0 "}, {"exact_compression": False}),
        ({"MEMSAVE_COMPILER": "EAGER"}, {"compiler": "eager"}),
        ({"MEMSAVE_POOL_ACTIVATIONS": "2"}, {"pool_activations": 2}),
        ({"MEMSAVE_SHARE_NORMS": "", "MEMSAVE_COMPILER": " "}, {}),  # set to nothing: unset
        # Not memsave options: the test suite's own switch, and other programs' variables.
        ({"MEMSAVE_FUZZ": "nightly", "TORCHINDUCTOR_SHARE_NORMS": "1", "memsave_share_norms": "1"}, {}),
    ],
)
def test_variables_are_parsed(environ, expected):
    assert environment_options(environ) == expected
    config = MemsaveConfig.from_options(environ=environ)
    assert config == MemsaveConfig(**expected)
    assert config.from_environment == tuple(sorted(expected))


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MEMSAVE_SHARE_NORMS": "2"}, "MEMSAVE_SHARE_NORMS='2' is invalid; valid values: 1, true, yes, on, 0, false, no, off"),
        ({"MEMSAVE_COMPILER": "cuda"}, "MEMSAVE_COMPILER='cuda' is invalid; valid values: inductor, eager"),
        ({"MEMSAVE_POOL_ACTIVATIONS": "0"}, "MEMSAVE_POOL_ACTIVATIONS='0' is invalid; valid values: an int >= 1"),
        ({"MEMSAVE_POOL_ACTIVATIONS": "two"}, "valid values: an int >= 1"),
        ({"MEMSAVE_POOL_ACTIVATIONS": "²"}, "MEMSAVE_POOL_ACTIVATIONS='²' is invalid"),
        ({"MEMSAVE_SHARE_NORM": "1"}, "MEMSAVE_SHARE_NORM is not a memsave option; did you mean MEMSAVE_SHARE_NORMS?"),
    ],
)
def test_bad_variables_name_the_variable_and_the_valid_values(environ, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        MemsaveConfig.from_options(environ=environ)


def test_explicit_options_win_over_the_environment():
    environ = {"MEMSAVE_SHARE_NORMS": "1", "MEMSAVE_APPROX_ACTIVATIONS": "1"}
    config = MemsaveConfig.from_options({"share_norms": False}, environ)
    assert (config.share_norms, config.approx_activations) == (False, True)
    assert config.from_environment == ("approx_activations",)


def test_an_explicit_option_ignores_its_variable_even_when_bad():
    config = MemsaveConfig.from_options({"share_norms": True}, {"MEMSAVE_SHARE_NORMS": "maybe"})
    assert config.share_norms and not config.from_environment


def test_a_config_object_is_every_option_given(monkeypatch):
    monkeypatch.setenv("MEMSAVE_SHARE_NORMS", "1")
    assert MemsaveBackend(MemsaveConfig(approx_activations=True)).config == MemsaveConfig(approx_activations=True)


def test_a_bad_variable_does_not_break_the_import():
    # The "memsave" backend is made at import; the variable is read, and refused, at compile.
    code = "from memsave_fx.backend import memsave_backend; print(memsave_backend)"
    environment = {**os.environ, "MEMSAVE_SHARE_NORM": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MemsaveBackend({})" in result.stdout


def test_where_options_came_from_is_no_part_of_their_identity():
    from_environment = MemsaveConfig.from_options(environ={"MEMSAVE_SHARE_NORMS": "1"})
    explicit = MemsaveConfig(share_norms=True)
    assert from_environment == explicit and hash(from_environment) == hash(explicit)
    assert repr(from_environment) == repr(explicit)  # the compile caches key on the repr
    assert "from_environment" not in MemsaveConfig.option_names()


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown memsave option share_norm; valid: approx_activations, chunked_loss, compiler"):
        memsave_fx.backend(share_norm=True)


def model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    model[2].requires_grad_(False)
    return model, torch.randn(2, 3, 8, 8)


def step(compiled, x):
    compiled(x).backward(torch.randn(2, 4, 4, 4))


def test_the_backend_name_reads_the_environment_at_each_compile(monkeypatch):
    monkeypatch.setenv("MEMSAVE_EXACT_COMPRESSION", "0")
    model, x = model_and_input()
    step(torch.compile(model, backend="memsave"), x)
    assert memsave_backend.compiled[-1].config == MemsaveConfig(exact_compression=False)
    assert memsave_backend.compiled[-1].config.from_environment == ("exact_compression",)
    assert memsave_backend.compiled[-1].packed_masks == 0  # what the option does took effect

    torch.compiler.reset()
    step(torch.compile(model, backend="memsave", options={"exact_compression": True}), x)
    assert memsave_backend.compiled[-1].config == MemsaveConfig() and not memsave_backend.compiled[-1].config.from_environment
    assert memsave_backend.compiled[-1].packed_masks > 0


def test_a_backend_object_takes_its_own_options_then_the_environment(monkeypatch):
    backend = memsave_fx.backend(share_norms=True)
    monkeypatch.setenv("MEMSAVE_SHARE_NORMS", "0")
    monkeypatch.setenv("MEMSAVE_EXACT_COMPRESSION", "0")  # set after the backend was made
    model, x = model_and_input()
    step(torch.compile(model, backend=backend), x)
    assert backend.compiled[0].config == MemsaveConfig(share_norms=True, exact_compression=False)
    assert backend.compiled[0].config.from_environment == ("exact_compression",)


def test_a_bad_variable_fails_the_compile_naming_it(monkeypatch):
    monkeypatch.setenv("MEMSAVE_SHARE_NORMS", "maybe")
    backend = memsave_fx.backend()  # read at each compile, not here
    with pytest.raises(ValueError, match="MEMSAVE_SHARE_NORMS='maybe' is invalid"):
        backend.config
    model, x = model_and_input()
    with pytest.raises(Exception, match="MEMSAVE_SHARE_NORMS='maybe' is invalid"):
        step(torch.compile(model, backend="memsave"), x)


def test_the_plan_says_which_options_came_from_the_environment(monkeypatch):
    model, x = model_and_input()
    assert "from the environment" not in str(memsave_fx.plan(model, x))
    monkeypatch.setenv("MEMSAVE_EXACT_COMPRESSION", "0")
    plan = memsave_fx.plan(model, x)
    assert str(plan).splitlines()[1] == "options from the environment: exact_compression=False (MEMSAVE_EXACT_COMPRESSION)"
    assert "compressed" not in {t.decision.value for t in plan.tensors}
    explicit = memsave_fx.plan(model, x, options={"exact_compression": True})
    assert "from the environment" not in str(explicit)
    assert "compressed" in {t.decision.value for t in explicit.tensors}
