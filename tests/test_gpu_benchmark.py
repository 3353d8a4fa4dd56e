"""benchmarks/gpu.py on its --quick sizes on the CPU: the table it writes, and what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
CASES = ("resnet101_input", "llama_lora", "resnet50_stem")
BACKENDS = ("eager", "inductor", "memsave")
COLUMNS = (
    "case", "backend", "peak", "step_peak", "step_peak_ratio", "saved", "saved_ratio", "step_ms", "step_ratio",
    "first_step_s", "first_step_ratio", "grad_error", "grad_error_vs_inductor",
)  # fmt: skip


def parse(page: str) -> dict[tuple[str, str], dict[str, str]]:
    """The table's rows by (case, backend)."""
    lines = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    rows = [dict(zip(COLUMNS, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines]
    return {(row["case"], row["backend"]): row for row in rows}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict[tuple[str, str], dict[str, str]]]:
    out = tmp_path_factory.mktemp("gpu") / "gpu.md"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    # Minutes with Inductor's caches cold (C++ kernels compile), about one with them warm.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    page = out.read_text()
    assert page.strip() in result.stdout  # also printed
    return page, parse(page)


@pytest.mark.slow
def test_a_row_per_case_and_backend(quick_run):
    page, rows = quick_run
    assert sorted(rows) == sorted((case, backend) for case in CASES for backend in BACKENDS)
    assert "Failed" not in page and "Not finished" not in page
    assert "`python benchmarks/gpu.py --device cpu --quick --out " in page
    for word in ("torch ", "transformers ", "peft ", "memsave_fx ", "TF32: ", "date: ", "device: CPU"):
        assert word in page
    for row in rows.values():
        # No CUDA allocator on the CPU: no peak, and none made up.
        assert row["peak"] == row["step_peak"] == "n/a"
        assert float(row["saved"]) > 0 and float(row["step_ms"]) > 0 and float(row["first_step_s"]) >= 0


@pytest.mark.slow
def test_memsave_gradients_agree_with_eager(quick_run):
    _, rows = quick_run
    for case in CASES:
        memsave, inductor = rows[(case, "memsave")], rows[(case, "inductor")]
        # The Llama's weights are bf16: any compiled kernel rounds differently from eager's,
        # so memsave is held to stock Inductor's error there.
        tolerance = 1e-5 if case.startswith("resnet") else max(3e-2, 2 * float(inductor["grad_error"]))
        assert float(memsave["grad_error"]) <= tolerance, (case, memsave["grad_error"])
        assert float(memsave["grad_error_vs_inductor"]) <= tolerance, (case, memsave["grad_error_vs_inductor"])
        assert rows[(case, "eager")]["grad_error"] == "ref"


@pytest.mark.slow
def test_memsave_keeps_no_more_than_inductor(quick_run):
    _, rows = quick_run
    for case in CASES:
        assert float(rows[(case, "memsave")]["saved"]) <= float(rows[(case, "inductor")]["saved"]), case
        assert float(rows[(case, "memsave")]["saved_ratio"].rstrip("x")) <= 1.0, case
    # The frozen convolutions' inputs are the headline: far less than Inductor keeps.
    assert float(rows[("resnet101_input", "memsave")]["saved_ratio"].rstrip("x")) < 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_without_cuda_it_says_so_and_exits_non_zero(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "CUDA is not available" in result.stderr and "--device cpu --quick" in result.stderr
    assert not out.exists()


def test_a_failing_case_is_reported_and_the_others_still_written(tmp_path, monkeypatch):
    from benchmarks import gpu

    def measure_case(case, *args, **kwargs):
        if case.name == "llama_lora":
            raise RuntimeError("boom")
        row = {
            "case": case.name, "peak": None, "step_peak": None, "saved": 2**20, "step_s": 1e-3, "first_step_s": 1.0,
            "grad_error": 0.0, "grad_error_vs_inductor": None,
        }  # fmt: skip
        rows = [row | {"backend": backend} for backend in BACKENDS]
        return {"name": case.name, "description": "a test case", "notes": [], "rows": rows, "failures": []}

    monkeypatch.setattr(gpu, "measure_case", measure_case)
    out = tmp_path / "gpu.md"
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"1 failure\(s\):\nllama_lora: RuntimeError: boom"):
        gpu.main()
    page = out.read_text()
    assert "- llama_lora: RuntimeError: boom" in page and "Not finished" not in page
    assert sorted(parse(page)) == sorted((case, backend) for case in ("resnet101_input", "resnet50_stem") for backend in BACKENDS)
