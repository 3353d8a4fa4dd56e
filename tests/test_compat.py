"""Private torch APIs live in memsave_fx._compat alone, and each resolves on this torch."""

import ast
import re
from pathlib import Path

import pytest
import torch

import memsave_fx
from memsave_fx import _compat

PACKAGE = Path(memsave_fx.__file__).parent
# torch, and the prims op namespace (Inductor-internal ops); aten ops named with a leading
# underscore are ordinary graph ops, which the passes match and emit.
_ROOTS = {"torch", "prims"}


def _private_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            names = [node.module, *(a.name for a in node.names)]
            if any(part.startswith("_") and not part.startswith("__") for n in names for part in n.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(p.startswith("_") for p in alias.name.split(".")) and alias.name.startswith("torch"):
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in _ROOTS:
                found.append(f"{path.name}:{node.lineno} ...{node.attr}")
    return found


def test_private_torch_apis_only_in_compat():
    uses = [use for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_compat.py" for use in _private_uses(path)]
    assert uses == []


def test_the_scan_finds_private_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom torch._guards import detect_fake_mode\nimport torch.utils._pytree\n"
        "torch._dynamo.reset()\nprims._low_memory_max_pool_with_offsets\ntorch.__version__\n"
    )
    assert len(_private_uses(sample)) == 4


def test_every_internal_resolves_on_this_torch():
    assert _compat.check_internals() == {}


def test_a_missing_internal_names_the_torch_version_and_symbol(monkeypatch):
    monkeypatch.setitem(_compat._INTERNALS, "vanished", ("torch._inductor.compile_fx", "no_such_function"))
    with pytest.raises(_compat.TorchInternalsError, match=rf"torch\._inductor\.compile_fx\.no_such_function, which torch {re.escape(torch.__version__)} does not have"):
        _compat.vanished
    assert "vanished" in _compat.check_internals()


def test_a_renamed_partitioner_tag_is_an_error(monkeypatch):
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    monkeypatch.setattr(_compat, "_checked_tags", set())
    monkeypatch.setitem(_compat._INTERNALS, "unused", ("torch", "nn"))  # keep the table writable
    import torch._functorch.partitioners as partitioners

    monkeypatch.setattr(partitioners, "_has_tag_must_be_in_backward", lambda n: n.meta.get("partitioner_tag") == "renamed")
    with pytest.raises(_compat.TorchInternalsError, match="no longer reads the node tag"):
        _compat.tag_for_backward(node)


def test_an_inductor_wrapper_that_takes_no_patches_compiles_through_compile_fx():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class RecordingPass(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            RecordingPass.calls += 1

        def uuid(self):
            return "recording-pass-test"

    class OldWrapper:  # torch < 2.13: __call__(model_, inputs_), no config_patches
        config = {"epilogue_fusion": False}

        def __call__(self, model_, inputs_):
            raise AssertionError("the patches would be lost")

    def backend(gm, inputs):
        return _compat.compile_with_inductor(OldWrapper(), gm, inputs, {"joint_custom_pre_pass": RecordingPass()})

    x = torch.randn(4, 4, requires_grad=True)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = torch.compile(lambda t: (t.sin() * 2).sum(), backend=backend)(x)
    out.backward()
    assert RecordingPass.calls == 1
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())
