"""The project's static checks run with the tests, so CI's one test command runs them too:
ruff over the tree, and mypy over the TensorRT-facing code against TensorRT's stubs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[dev]')")
def test_ruff_is_clean():
    proc = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_mypy_against_tensorrt_stubs():
    """Installs tensorrt-stubs into build/ on first use (pip, from PyPI), then runs mypy."""
    proc = subprocess.run([sys.executable, "scripts/typecheck.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
