"""Every package directory is installed: an editable install (CI's) would hide a miss."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapped = {name: ROOT / path for name, path in cfg.get("package-dir", {}).items()}
    found = set()
    for init in (ROOT / "gradscore").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for name, path in mapped.items():
        found |= {name + "".join("." + p for p in i.parent.relative_to(path).parts) for i in path.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def _module_imports() -> dict[str, set[str]]:
    """{module: modules it imports, at import time or inside a function}, for gradscore,
    from the source; not those under ``if TYPE_CHECKING:``, which annotations alone read."""
    import ast
    files = {}
    for path in (ROOT / "gradscore").rglob("*.py"):
        files[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    files = {m.removesuffix(".__init__"): p for m, p in files.items()}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        edges = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
        graph[mod] = edges & set(files)
    return graph


def test_no_module_imports_back_up_and_no_cycles():
    """`import gradscore` imports no module that imports the package root back, and the
    module graph (package __init__s re-exporting aside) has no cycle."""
    graph = _module_imports()
    up = sorted(m for m, e in graph.items() if "gradscore" in e and m != "gradscore")
    assert not up, f"modules importing the package root: {up}"
    inits = {m for m in graph if (ROOT / Path(*m.split("."))).is_dir()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m] - inits):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2
    for m in sorted(set(graph) - inits):
        if m not in state:
            visit(m, [])


def test_the_public_api_loads_on_first_use_and_type_checkers_see_it():
    """``gradscore/__init__.py`` names each public object three times: in ``__all__``, in the
    lazy map (imported on first use) and under ``TYPE_CHECKING``; the three agree, and each
    name resolves to the object its module defines."""
    import ast
    import importlib

    import gradscore as gs
    tree = ast.parse((ROOT / "gradscore" / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {a.asname or a.name: node.module for node in guarded.body for a in node.names}
    eager = {"__version__", *(a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                              and n.module == "exceptions" for a in n.names)}
    assert set(typed) == set(gs._LAZY) and set(gs.__all__) == set(gs._LAZY) | eager
    for name, module in gs._LAZY.items():
        assert typed[name] == module and getattr(gs, name) is getattr(importlib.import_module(f"gradscore.{module}"),
                                                                      name)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        gs.Nothing


def test_the_checkout_root_shadows_no_installed_package():
    """``python -m pytest`` and ``python script.py`` from the checkout put its root first on
    ``sys.path``; a top-level package there (the kernels once were one) hides an installed
    package of the same name. transformers 5.25 imports Hugging Face's ``kernels``."""
    importable = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    importable |= {p.stem for p in ROOT.glob("*.py")}
    assert importable <= {"gradscore", "bench"}, f"top-level packages in the checkout: {sorted(importable)}"
