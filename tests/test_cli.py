"""`memsave-fx plan pkg.module:factory`: factories, their arguments, and bad input."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from memsave_fx.cli import main


def tiny_workload(batch_size: int = 1, frozen: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    model[2].requires_grad_(not frozen)
    return model, torch.randn(batch_size, 3, 10, 10)


def returns_nonsense():
    return "not a model"


def test_prints_the_plan_with_the_factory_arguments(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "tests.test_cli:tiny_workload", "--batch-size", "3", "--frozen=true", "--json", str(path)]) == 0
    assert "saved for backward" in capsys.readouterr().out
    plan = json.loads(path.read_text())
    assert {t["shape"][0] for t in plan["tensors"] if t["op"] != "parameter"} == {3}
    assert "dropped" in {t["decision"] for t in plan["tensors"]}


def test_passes_options_to_the_backend(tmp_path):
    path = tmp_path / "plan.json"
    main(["plan", "tests.test_cli:tiny_workload", "--option", "exact_compression=false", "--json", str(path)])
    assert "compressed" not in {t["decision"] for t in json.loads(path.read_text())["tensors"]}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["plan", "tiny_workload"], "pkg.module:function"),
        (["plan", "tests.no_such_module:f"], "cannot import"),
        (["plan", "tests.test_cli:missing"], "no function"),
        (["plan", "tests.test_cli:returns_nonsense"], "must return (model, inputs)"),
        (["plan", "tests.test_cli:tiny_workload", "--option", "exact_compression"], "KEY=VALUE"),
        (["plan", "tests.test_cli:tiny_workload", "stray"], "--name value"),
    ],
)
def test_bad_input_names_what_is_valid(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "memsave_fx", "plan", "tests.test_cli:tiny_workload", "--largest", "3"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "largest saved tensors (3 of" in result.stdout
