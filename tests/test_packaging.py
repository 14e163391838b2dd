"""Every package directory is installed: an editable install (CI's) would hide a miss."""
from __future__ import annotations

import tomllib
from pathlib import Path

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
