"""Every Python block in README.md runs as written.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is skipped with that reason
(it needs a file the tests cannot make, or a GPU). Blocks run in a fresh namespace, in a
temporary working directory, one test per block, named by its line number.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<skip>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    text = README.read_text()
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        marks = [pytest.mark.skip(reason=m.group("skip"))] if m.group("skip") else []
        yield pytest.param(m.group("code"), id=f"line{line}", marks=marks)


def test_readme_has_python_blocks():
    assert len(list(_blocks())) >= 4


@pytest.mark.parametrize("code", list(_blocks()))
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
