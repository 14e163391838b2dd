"""The README's two set-up commands, one after the other in one fresh venv, leave a
working CLI (slow: a venv, a wheel build, the demo and the test extras).

The demo once wrote numba's cache into site-packages/gradscore/kernels/__pycache__;
pip's uninstall leaves such files, and the leftover folder became a namespace package
that shadowed the editable install: `cannot import name '__version__' from 'gradscore'`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sh(cmd: str, cwd: Path, env: dict) -> str:
    done = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_readme_setup_commands_in_sequence_in_one_venv(tmp_path):
    import torch
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", PIP_NO_CACHE_DIR="1", HOME=str(tmp_path / "home"))
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    _sh(f"pip install -q {torch_pin} && pip install -q . && gradscore demo --out {tmp_path / 'demo'} --epochs 2 "
        f"--quiet", src, env)
    leftovers = [p for p in (venv / "lib").rglob("gradscore/**/*") if p.suffix in (".nbi", ".nbc")]
    assert not leftovers, f"numba's cache inside the installed package: {leftovers[:3]}"
    _sh(f"pip install -q {torch_pin} && pip install -q -e '.[test]'", src, env)
    out = _sh("gradscore --help && gradscore --version", tmp_path, env)
    assert "usage: gradscore" in out
    assert (tmp_path / "home" / ".cache" / "gradscore" / "numba").is_dir()


def test_numba_caches_outside_the_package(tmp_path):
    """The fast half: compiled kernels land in GRADSCORE_CACHE_DIR, nothing beside the module."""
    import gradscore.kernels as kernels
    package = Path(kernels.__file__).parent
    before = {p for p in package.rglob("*") if p.suffix in (".nbi", ".nbc")}
    code = ("import torch; from gradscore.kernels.norm_dot_numba import norm_dot_numba; "
            "norm_dot_numba(torch.randn(3, 50), torch.randn(2, 50)); import numba; print(repr(numba.config.CACHE_DIR))")
    env = {**os.environ, "GRADSCORE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "''"          # numba's own setting is left as it was
    assert any(p.suffix in (".nbi", ".nbc") for p in (tmp_path / "cache").rglob("*"))
    assert {p for p in package.rglob("*") if p.suffix in (".nbi", ".nbc")} == before
