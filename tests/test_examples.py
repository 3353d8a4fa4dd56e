"""The README's examples run as written."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import loopback_interface

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


@pytest.mark.slow
def test_ddp_finetune_example_on_two_ranks():
    # As the README launches it, on gloo over the loopback interface.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(EXAMPLES / "ddp_finetune.py"), "--steps", "2", "--length", "32"]
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": loopback_interface()}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    rows = [line.split() for line in finished.stdout.splitlines() if re.match(r"\s+\d+\s+[\d.]+ MiB", line)]
    assert [int(row[0]) for row in rows] == [0, 1], finished.stdout
    for row in rows:
        measured, planned, stock = float(row[1]), float(row[3]), float(row[5])
        assert measured == planned < stock, finished.stdout
