"""benchmarks/run.py on its smallest slice: the rows it writes, and what they say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import WORKLOADS, build

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    command = [
        sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", "cnn", "--cases", "all",
        "--steps", "2", "--json", str(out / "rows.json"), "--results-dir", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    page = (out / "results.md").read_text()
    assert page.count("| cnn | all |") == 5
    assert "- memsave: cold compile " in page and "Inductor's (geometric mean of 1)" in page
    assert str(out) not in page  # no local path on the results page
    assert "![saved bytes](results.png)" in page
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    return {row["backend"]: row for row in json.loads((out / "rows.json").read_text())}


def test_a_page_without_eager_rows_has_no_chart(tmp_path):
    """The chart's bars are saved bytes relative to eager PyTorch: without eager rows it would be empty."""
    command = [
        sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", "cnn", "--cases", "all",
        "--backends", "convert", "--steps", "1", "--results-dir", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    page = (tmp_path / "results.md").read_text()
    assert "| cnn | all | convert |" in page
    assert "results.png" not in page and not (tmp_path / "results.png").exists()


def test_every_backend_reports_every_metric(rows):
    assert list(rows) == ["eager", "inductor", "memsave", "memsave_lossy", "convert"]
    for row in rows.values():
        assert row["saved_bytes"] > 0 and row["step_ms"] > 0 and row["grad_error"] is not None
        assert row["peak_is_estimate"] == (row["backend"] in ("inductor", "memsave", "memsave_lossy"))
        compiles = row["backend"] in ("inductor", "memsave", "memsave_lossy")
        assert (row["compile_vs_inductor"] > 0) if compiles else row["compile_vs_inductor"] is None, row


def test_exact_backends_agree_and_keep_less(rows):
    for backend in ("memsave", "convert"):
        assert rows[backend]["grad_error"] < 1e-5 and rows[backend]["grad_cosine"] > 0.99999
    assert rows["memsave"]["saved_bytes"] < rows["inductor"]["saved_bytes"] < rows["eager"]["saved_bytes"]
    assert rows["convert"]["saved_bytes"] < rows["eager"]["saved_bytes"]
    assert rows["memsave_lossy"]["saved_bytes"] <= rows["memsave"]["saved_bytes"]


def test_a_failing_case_is_reported_and_the_others_still_written(tmp_path, monkeypatch):
    from benchmarks import run

    def measure(name, case, backends, *args, **kwargs):
        if case.name == "surgical_first":
            raise RuntimeError("boom")
        return [
            {"model": name, "case": case.name, "backend": backend, "saved_bytes": 2**20, "peak_bytes": None,
             "peak_is_estimate": False, "step_ms": 1.0, "compile_s": 0.0, "grad_error": 0.0, "grad_cosine": 1.0}
            for backend in backends
        ]  # fmt: skip

    monkeypatch.setattr(run, "measure", measure)
    monkeypatch.setattr(run, "warm_up", lambda backends, device: None)
    monkeypatch.setattr(sys, "argv", ["run.py", "--models", "cnn", "--cases", "all", "surgical_first",
                                      "--backends", "eager", "memsave", "--results-dir", str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit, match=r"1 case\(s\) failed:\ncnn / surgical_first: RuntimeError: boom"):
        run.main()
    page = (tmp_path / "results.md").read_text()
    assert "- cnn / surgical_first: RuntimeError: boom" in page
    assert page.count("| cnn | all |") == 2 and "| cnn | surgical_first |" not in page


def test_compile_summary_is_the_geometric_mean_and_the_worst_case():
    from benchmarks.run import compile_summary

    rows = [
        {"model": "cnn", "case": "all", "backend": "inductor", "compile_vs_inductor": 1.0},
        {"model": "cnn", "case": "all", "backend": "memsave", "compile_vs_inductor": 2.0},
        {"model": "vit", "case": "lora", "backend": "memsave", "compile_vs_inductor": 0.5},
        {"model": "vit", "case": "lora", "backend": "eager", "compile_vs_inductor": None},
    ]
    assert compile_summary(rows) == "\n- memsave: cold compile 1.00x Inductor's (geometric mean of 2), at most 2.00x (cnn / all)\n"


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_workload_builds_and_trains(name):
    model, inputs, description = build(name, batch=2, size=32)
    model(*inputs).float().square().mean().backward()
    assert description and any(p.grad is not None for p in model.parameters())


def test_memory_tools_table_gives_both_backends_and_their_ratio():
    from benchmarks.memory_tools import SETTINGS, markdown

    assert {"default", "budget 0.5", "budget 0.2", "conv-BN folding"} == set(SETTINGS)
    row = {"workload": "resnet_stem", "setting": "budget 0.5", "inductor": 4 * 2**20, "memsave": 2**20,
           "inductor_error": 1e-7, "memsave_error": 2e-7}  # fmt: skip
    assert markdown([row]).splitlines()[-1] == "| resnet_stem | budget 0.5 | 4.00 | 1.00 | 0.25x | 1.0e-07, 2.0e-07 |"


def test_cold_compiles_interleave_the_compiling_backends(monkeypatch):
    import torch
    from torch import nn

    from benchmarks import run

    calls = []

    def first_step(backend, replica, inputs, device):
        calls.append(backend)
        return float(len(calls)), None, 0, None

    monkeypatch.setattr(run, "first_step", first_step)
    firsts = run.cold_compiles(nn.Linear(2, 2), [torch.randn(1, 2)], ["eager", "inductor", "memsave"], 2, "cpu")
    assert calls == ["inductor", "memsave", "inductor", "memsave"]
    assert firsts == {"inductor": [1.0, 3.0], "memsave": [2.0, 4.0]}
