"""`memsave-fx selftest`: the real run passes and says what it checked; a wrong gradient, a
rewrite that did not apply, a case that crashes or a missing torch internal fails it, naming
the case."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from memsave_fx import _compat, selftest
from memsave_fx.cli import main


@pytest.fixture(scope="module")
def cpu_run() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memsave_fx", "selftest"], capture_output=True, text=True, check=False, timeout=900
    )


def test_passes_on_this_torch(cpu_run):
    assert cpu_run.returncode == 0, cpu_run.stdout[-3000:] + cpu_run.stderr[-3000:]
    assert f"torch {torch.__version__}" in cpu_run.stdout
    assert f"all {len(selftest.CASES)} cases passed" in cpu_run.stdout


def test_prints_a_row_and_the_rewrites_per_case(cpu_run):
    lines = cpu_run.stdout.splitlines()
    header = next(line for line in lines if line.startswith("case "))
    assert header.split()[:7] == ["case", "grad", "err", "inductor", "memsave", "ratio", "plan"]
    for case in selftest.CASES:
        (row,) = [line for line in lines if line.startswith(case.name + " ")]
        assert row.endswith("  ok")
        (rewrites,) = [line for line in lines if line.startswith(f"  {case.name}: ")]
        assert all(name in rewrites for name in case.rewrites)


# Opt-in passes, and the one that applies only with compiler="eager" (Inductor's decompositions
# already do what it does): every other pass is an exact rewrite the selftest must cover.
NOT_COVERED = {
    "pool_convolution_inputs", "approximate_activation_backward", "share_normalized_output",
    "replace_eval_batch_norm_backward",
}  # fmt: skip


def test_every_exact_rewrite_is_covered():
    from memsave_fx.passes import PASSES

    covered = set().union(*(case.rewrites for case in selftest.CASES))
    assert covered == {p.__name__ for p in PASSES} - NOT_COVERED
    assert any(case.packs_masks for case in selftest.CASES)
    assert any(case.random for case in selftest.CASES)


class OffWhenCompiled(nn.Module):
    """A linear layer whose compiled forward scales its output: compiled gradients are wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 1.01 if torch.compiler.is_compiling() else y


def wrong_gradients(device: torch.device):
    torch.manual_seed(0)
    return selftest._seeded(device, OffWhenCompiled(), ((4, 8), False))


def no_convolution(device: torch.device):
    torch.manual_seed(0)
    return selftest._seeded(device, nn.Linear(8, 8, bias=False), ((4, 8), False))


def crashes(device: torch.device):
    raise RuntimeError("the model cannot be built")


def run_cases(monkeypatch, capsys, *cases: selftest.Case) -> tuple[int, str]:
    monkeypatch.setattr(selftest, "CASES", list(cases))
    code = main(["selftest"])
    return code, capsys.readouterr().out


def test_a_wrong_gradient_fails_naming_the_case_and_parameter(monkeypatch, capsys):
    ok = selftest.Case("linear_ok", no_convolution, "a frozen-nothing linear", saves=False)
    wrong = selftest.Case("scaled_when_compiled", wrong_gradients, "compiled output off by 1%", saves=False)
    code, out = run_cases(monkeypatch, capsys, ok, wrong)
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("scaled_when_compiled"))
    assert "FAIL: param linear.weight gradient off by" in row
    assert next(line for line in out.splitlines() if line.startswith("linear_ok ")).endswith("ok")
    assert out.splitlines()[-1] == "FAILED: scaled_when_compiled"


def test_a_rewrite_that_does_not_apply_fails(monkeypatch, capsys):
    case = selftest.Case(
        "expects_a_conv", no_convolution, "nothing to rewrite",
        rewrites=frozenset({"replace_frozen_convolution_backward"}), packs_masks=True,
    )  # fmt: skip
    code, out = run_cases(monkeypatch, capsys, case)
    assert code == 1
    assert "replace_frozen_convolution_backward did not apply; no saved mask was packed" in out
    assert "memsave keeps as much as Inductor" in out
    assert out.splitlines()[-1] == "FAILED: expects_a_conv"


def test_a_crashing_case_is_reported_and_the_others_run(monkeypatch, capsys):
    ok = selftest.Case("linear_ok", no_convolution, "a frozen-nothing linear", saves=False)
    code, out = run_cases(monkeypatch, capsys, selftest.Case("crashes", crashes, "raises"), ok)
    assert code == 1
    assert "FAIL: RuntimeError: the model cannot be built" in out
    assert next(line for line in out.splitlines() if line.startswith("linear_ok ")).endswith("ok")


def test_a_missing_torch_internal_fails(monkeypatch, capsys):
    monkeypatch.setitem(_compat._INTERNALS, "vanished", ("torch._inductor.compile_fx", "no_such_function"))
    code, out = run_cases(monkeypatch, capsys, selftest.Case("linear_ok", no_convolution, "linear", saves=False))
    assert code == 1
    assert "missing torch internal vanished: memsave_fx needs torch._inductor.compile_fx.no_such_function" in out
    assert out.splitlines()[-1] == "FAILED: torch internals"


def test_checks_the_defaults_whatever_the_environment_says(monkeypatch, capsys):
    monkeypatch.setenv("MEMSAVE_EXACT_COMPRESSION", "0")
    case = selftest.Case("masks", selftest.dropout_relu, "masks packed", random=True, packs_masks=True)
    code, out = run_cases(monkeypatch, capsys, case)
    assert code == 0, out
    assert "ignored here: the options exact_compression set by MEMSAVE_ variables" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_a_gpu_names_the_valid_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["selftest", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_passes_on_cuda_and_reports_peaks():
    result = selftest.run_selftest("cuda", out=lambda line: None)
    assert result.passed, [(case.name, case.failures) for case in result.cases]
    for case in result.cases:
        assert set(case.peaks) == {"eager", "inductor", "memsave"} and all(p > 0 for p in case.peaks.values())
