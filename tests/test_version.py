"""Which torch versions import: older than 2.11 refused, newer than the tested range warned."""

import re
import subprocess
import sys
import warnings

import pytest

import memsave_fx
from memsave_fx._version import NEWEST_TESTED_TORCH, UntestedTorchWarning, check_torch_version

NEWER = f"{NEWEST_TESTED_TORCH[0]}.{NEWEST_TESTED_TORCH[1] + 1}.0"


@pytest.mark.parametrize("version", ["2.10.1", "2.9.0+cu126", "1.13.1", "nightly"])
def test_older_torch_raises_import_error(version):
    with pytest.raises(ImportError, match=rf"needs torch >= 2\.11; found torch {re.escape(version)}|cannot read the torch version"):
        check_torch_version(version)


@pytest.mark.parametrize("version", ["2.11.0", "2.12.1+cu126", "2.13.0+cpu", "2.14.1"])
def test_tested_torch_imports_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_torch_version(version)


@pytest.mark.parametrize("version", [NEWER, "2.16.0.dev20270101+cpu", "3.0.0"])
def test_newer_torch_warns_naming_the_tested_range(version):
    with pytest.warns(UntestedTorchWarning, match=rf"tested on torch 2\.11 to 2\.14; found torch {re.escape(version)}"):
        check_torch_version(version)


def test_import_under_newer_torch_warns_once_and_works():
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        f"import torch; torch.__version__ = {NEWER!r}\n"
        "import memsave_fx, importlib\n"
        "print(memsave_fx.MemsaveConfig().compiler)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "inductor"
    assert result.stderr.count("UntestedTorchWarning") == 1, result.stderr


def test_import_under_older_torch_fails():
    code = "import torch; torch.__version__ = '2.10.0'\nimport memsave_fx\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"ImportError: memsave_fx {memsave_fx.__version__} needs torch >= 2.11; found torch 2.10.0" in result.stderr
