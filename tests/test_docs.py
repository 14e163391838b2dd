"""The docs cannot rot: the README's quickstart runs as written, every `gradscore` command
and option named in the README and docs exists, every link resolves, every Python block
compiles, and the README stays a front door (at most 200 lines)."""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradscore.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, the comment line before it, code) of every fenced block."""
    return [(m.group(2), m.group(1) or "", m.group(3))
            for m in re.finditer(r"(?:<!-- (\S+) -->\n)?```(\w*)\n(.*?)```", text, re.S)]


def _code(text: str) -> list[str]:
    """Every piece of code: fenced blocks, indented blocks and inline spans."""
    spans = [c for _, _, c in _blocks(text)]
    spans += re.findall(r"(?m)^(?: {4}.*\n?)+", re.sub(r"```.*?```", "", text, flags=re.S))
    spans += re.findall(r"`([^`\n]+)`", text)
    return spans


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", DOCS[:2] + DOCS[3:], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_option_named_exists(doc):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    from bench.engines import build_parser as bench_parser
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    options["bench"] = {o for a in bench_parser()._actions for o in a.option_strings}
    checked = 0
    for code in _code(doc.read_text()):
        for line in code.replace("\\\n", " ").splitlines():
            if "import " in line:
                continue   # Python, not a command line
            for m in re.finditer(r"gradscore ([a-z][a-z-]*)((?: +[^|#`;&]+)?)", line):
                name, rest = m.group(1), m.group(2)
                if name in ("demos", "integrations", "kernels", "scores", "engines", "io", "reports", "cli"):
                    continue   # a module path, not a command
                assert name in options, f"{doc.name}: unknown command `gradscore {name}` in: {line.strip()}"
                for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    assert opt in options[name], f"{doc.name}: `gradscore {name}` has no {opt}: {line.strip()}"
                checked += 1
    for module in re.findall(r"python -m bench\.([a-z_]+)", doc.read_text()):
        assert (ROOT / "bench" / f"{module}.py").is_file(), f"{doc.name}: no bench/{module}.py"
    if doc.name == "README.md" and doc.parent == ROOT:
        assert checked >= 10


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_compile(doc):
    for lang, _, code in _blocks(doc.read_text()):
        if lang == "python":
            ast.parse(code)


def test_the_readme_quickstart_runs_as_written(tmp_path):
    blocks = {name: code for _, name, code in _blocks((ROOT / "README.md").read_text()) if name}
    assert set(blocks) == {"quickstart.py", "quickstart.sh"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, env=env, check=True, capture_output=True)
    done = subprocess.run(["bash", "-e", "quickstart.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for out in ("scores.h5", "diagnosis/diagnosis.json", "flagged.json", "keep.json", "datamap.png"):
        assert (tmp_path / out).is_file(), out
    assert "flagging the" in done.stdout and "selection -> keep.json" in done.stdout
    # flag's line: a count, or where no population separates (another init), that there is none
    assert "a rough count" in done.stdout or "mislabel: no count" in done.stdout
