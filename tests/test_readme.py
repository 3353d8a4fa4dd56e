"""The README's snippets run as written: those marked `<!-- readme-test -->`, in order."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
MARKED_BLOCK = re.compile(r"<!-- readme-test -->\n```python\n(.*?)```", re.DOTALL)


def test_marked_snippets_run_in_order(tmp_path):
    blocks = MARKED_BLOCK.findall(README.read_text())
    assert len(blocks) >= 3, "the README's runnable snippets are no longer marked"
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The records loop printed the frozen conv's rewrite, and the plan printed its table.
    assert "was read only for the gradient of frozen 2.weight" in result.stdout, result.stdout
    assert "memsave memory plan" in result.stdout
