"""The project's static checks run with the tests, so CI's one test command runs them too:
ruff over the tree, and mypy over the TensorRT-facing code against TensorRT's stubs."""

import ast
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


# The core may be imported by device/, exporters/, the CLI and the web server; the reverse would tie
# the learner to a runtime (TensorRT, onnxruntime) or a web framework it does not need. Only these
# three modules and the server package (edge_m2kd/server/) sit above both.
ABOVE_THE_CORE = {"cli.py", "commands.py", "demo.py"}
SERVER = "server"
UPWARD = ("device", "exporters")


def _upward_imports(source: str) -> list[tuple[int, str]]:
    """Every import of device/ or exporters/ in a module, including those inside functions."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in UPWARD]
    return found


def test_upward_import_is_seen_even_inside_a_function():
    assert _upward_imports("def f():\n    from device.probes import x\n") == [(2, "device.probes")]
    assert _upward_imports("import exporters.onnx_export as e\nimport devices\n") == [(1, "exporters.onnx_export")]


def _core_modules() -> list[Path]:
    package = ROOT / "edge_m2kd"
    return [p for p in sorted(package.rglob("*.py"))
            if not (p.parent == package and p.name in ABOVE_THE_CORE)
            and p.relative_to(package).parts[0] != SERVER]


def test_core_imports_nothing_from_device_or_exporters():
    core = _core_modules()
    assert len(core) > 20  # the walk found the package
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in core for line, name in _upward_imports(p.read_text())]
    assert not bad, "the core imports upward:\n" + "\n".join(bad)


def test_nothing_but_the_cli_imports_the_web_server():
    importers = []
    for p in [*_core_modules(), *sorted((ROOT / "device").rglob("*.py")),
              *sorted((ROOT / "exporters").rglob("*.py")), ROOT / "edge_m2kd" / "commands.py"]:
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            importers += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.startswith("edge_m2kd.server")
                          or n in ("fastapi", "starlette", "uvicorn")]
    assert not importers, "imports the server (or its framework):\n" + "\n".join(importers)
