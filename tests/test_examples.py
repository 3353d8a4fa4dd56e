"""The README's examples run as written."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_eager_example(capsys):
    runpy.run_path(str(EXAMPLES / "eager.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "convert:" in out and "rewrite: conv input primals_1 was read only for the gradient of frozen primals_2" in out
    ours, eager = [float(part.split(" MiB")[0].split()[-1]) for part in out.splitlines()[0].split(",")]
    assert ours < 0.2 * eager


@pytest.mark.slow
def test_demo(capsys):
    runpy.run_path(str(EXAMPLES / "demo.py"), run_name="__main__")
    assert "saved" in capsys.readouterr().out
