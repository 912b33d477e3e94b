"""Every ```python block of README.md and docs/**/*.md runs, page by page.

The blocks of one page run in order in one namespace, in a fresh temporary working
directory. Other fences (```bash, ```text, ...) are not run. Two HTML comments on the
line before a block change that:

    <!-- skip: reason -->              the block is shown but not run (say why on the page)
    <!-- requires: transformers peft --> the block is skipped when a package is missing

A block that raises fails the test, with the page, the block's first line and the error.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_MARK = re.compile(r"^\s*<!--\s*(?P<what>skip|requires)\s*:\s*(?P<arg>.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int                    # 1-based line of the opening fence
    language: str
    code: str
    skip: Optional[str] = None   # reason, from <!-- skip: ... -->
    requires: Tuple[str, ...] = ()


def blocks(text: str) -> List[Block]:
    """The fenced blocks of a markdown text, with the marks on the line before each."""
    out: List[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        language = (m["info"].strip().split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ {{0,{indent + 3}}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        block = Block(i + 1, language, "\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and (mark := _MARK.match(lines[k])):
            if mark["what"] == "skip":
                block.skip = mark["arg"] or "marked skip"
            else:
                block.requires += tuple(mark["arg"].split())
            k -= 1
        out.append(block)
        i = j + 1
    return out


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def run_page(path: Path, tmp_path: Path, monkeypatch) -> List[str]:
    """Run the python blocks of ``path``; return what was skipped and why."""
    skipped = []
    namespace = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    monkeypatch.chdir(tmp_path)
    for block in blocks(path.read_text(encoding="utf-8")):
        if block.language not in ("python", "py"):
            continue
        where = f"{_name(path)}:{block.line}"
        if block.skip:
            skipped.append(f"{where}: {block.skip}")
            continue
        missing = [name for name in block.requires if importlib.util.find_spec(name) is None]
        if missing:
            skipped.append(f"{where}: needs {', '.join(missing)}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(compile(block.code, where, "exec"), namespace)
        except Exception as e:
            first = block.code.strip().splitlines()[0]
            raise AssertionError(f"the snippet at {where} ({first!r}) raised {type(e).__name__}: {e}") from e
    return skipped


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_snippets_run(path, tmp_path, monkeypatch, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        skipped = run_page(path, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    python = [b for b in blocks(path.read_text(encoding="utf-8")) if b.language in ("python", "py")]
    if python and len(skipped) == len(python):
        pytest.skip("; ".join(skipped))


def test_there_are_snippets_and_the_readme_has_the_one_liner():
    found = {p.name: [b for b in blocks(p.read_text(encoding="utf-8")) if b.language == "python"] for p in PAGES}
    assert sum(map(len, found.values())) >= 15
    readme = "".join(b.code for b in found["README.md"])
    assert "graph_rewrite.optimize(model)" in readme and "graph_rewrite.verify(model, lean" in readme


def test_a_broken_snippet_fails(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```bash\nexit 1\n```\n\n```python\nassert x == 2\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:11 .*AssertionError"):
        run_page(page, tmp_path, monkeypatch)


def test_marks_skip_and_require(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- skip: shown only -->\n```python\nraise SystemExit(1)\n```\n"
        "<!-- requires: no_such_package_for_docs -->\n```python\nimport no_such_package_for_docs\n```\n"
        "```text\nnot python\n```\n"
        "~~~python\nran = True\n~~~\n"
    )
    skipped = run_page(page, tmp_path, monkeypatch)
    assert [s.split(": ", 1)[1] for s in skipped] == ["shown only", "needs no_such_package_for_docs"]
    assert [b.language for b in blocks(page.read_text())] == ["python", "python", "text", "python"]


def test_readme_is_short_and_its_quick_start_matches_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[vision,test]' && .venv/bin/python -m pytest"
    assert test_command in readme and test_command in ci
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e '.[demo]' && .venv/bin/python demos/quickstart.py" in readme
