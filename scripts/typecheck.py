#!/usr/bin/env python3
"""mypy over the TensorRT-facing code (exporters/, device/) against TensorRT's real Python API.

TensorRT cannot be installed here (no wheels for this machine, and no GPU), but the community
package ``tensorrt-stubs`` (10.13.0.35.1, generated from the TensorRT 10.13 bindings) describes its
API. This script:

1. installs it with ``pip --no-deps --target`` into build/trt-stubs/pkg (never into the active
   environment: its ``tensorrt/__init__.pyi`` alone would make ``import tensorrt`` succeed there as
   an empty namespace package, and code would think TensorRT is installed);
2. copies the ``.pyi`` files to build/trt-stubs/stubs and patches what does not parse as shipped:
   parameters named ``in`` (a Python keyword) in a few plugin methods, a parameter without a
   default after defaulted ones (``add_scale_nd``), and ``import tensorrt_libs`` (a runtime-only
   package with no stubs);
3. runs mypy with that directory on MYPYPATH and scripts/mypy-trt.ini (stub modules get
   ``ignore_errors``; we check our calls, not NVIDIA's stubs);
4. runs a canary: a file calling ``context.execute_async_v9(...)`` and ``engine.num_bindings``
   (removed in 10.0) must be rejected, or the stubs are not in effect and a pass would mean nothing.

Idempotent and fast on reruns: steps 1-2 run once per stubs version (a stamp file), mypy keeps its
cache. Exit status: 0 clean, 1 type errors (or a failed canary), 2 setup failure.

    python scripts/typecheck.py                  # exporters device
    python scripts/typecheck.py exporters/x.py   # other targets
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

STUBS_VERSION = "10.13.0.35.1"
ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "trt-stubs"
STUBS = BUILD / "stubs"
STAMP = BUILD / f".ready-{STUBS_VERSION}"
CONFIG = ROOT / "scripts" / "mypy-trt.ini"
DEFAULT_TARGETS = ["exporters", "device"]
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")

CANARY = '''\
import tensorrt as trt


def run(engine: trt.ICudaEngine, context: trt.IExecutionContext) -> int:
    context.execute_async_v9(0)
    return engine.num_bindings
'''
CANARY_EXPECTED = ('"IExecutionContext" has no attribute "execute_async_v9"',
                   '"ICudaEngine" has no attribute "num_bindings"')


def _split_params(params: str) -> list[str]:
    """Split a parameter list on top-level commas (defaults and annotations may nest brackets)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    parts.append(params[start:])
    return parts


def _fix_def(line: str) -> str:
    m = re.match(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*(?:\.\.\.)?\s*)$", line)
    if not m:
        return line
    head, params, tail = m.groups()
    fixed, seen_default = [], False
    for p in _split_params(params):
        name = p.strip()
        # ``in`` is a keyword: rename the parameter (positional use is unaffected).
        p = re.sub(r"^(\s*)in(\s*:)", r"\1in_\2", p)
        if name.startswith("*") or name == "/" or not name:
            seen_default = seen_default and not name.startswith("*")
        elif "=" in name:
            seen_default = True
        elif seen_default:
            # A required parameter after defaulted ones (add_scale_nd's channel_axis): give it a
            # placeholder default so the stub parses; we never call these methods.
            p = p.rstrip() + " = ..."
        fixed.append(p)
    return head + ",".join(fixed) + tail


def patch_stub(text: str) -> str:
    out = []
    for line in text.splitlines():
        if re.match(r"^\s*import tensorrt_libs\b", line):
            continue  # runtime-only package (the shared libraries); nothing to type
        out.append(_fix_def(line) if line.lstrip().startswith("def ") else line)
    return "\n".join(out) + "\n"


def prepare_stubs() -> None:
    if STAMP.is_file():
        return
    shutil.rmtree(BUILD, ignore_errors=True)
    pkg = BUILD / "pkg"
    pkg.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(pkg), f"tensorrt-stubs=={STUBS_VERSION}"]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"typecheck: could not install tensorrt-stubs=={STUBS_VERSION} (network? pip?)")
    for name in STUB_PACKAGES:
        src = pkg / name
        if not src.is_dir():
            sys.exit(f"typecheck: tensorrt-stubs {STUBS_VERSION} has no {name}/ package; update this script")
        for pyi in src.rglob("*.pyi"):
            dest = STUBS / pyi.relative_to(pkg)
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = patch_stub(pyi.read_text())
            try:
                ast.parse(text, filename=str(dest))
            except SyntaxError as e:
                sys.exit(f"typecheck: {dest} still does not parse after patching: {e}")
            dest.write_text(text)
    STAMP.write_text(STUBS_VERSION + "\n")


def mypy(targets: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(STUBS)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(CONFIG), *targets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    try:
        prepare_stubs()
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    canary = BUILD / "canary" / "trt_canary.py"
    canary.parent.mkdir(parents=True, exist_ok=True)
    canary.write_text(CANARY)
    probe = mypy([str(canary)])
    missing = [msg for msg in CANARY_EXPECTED if msg not in probe.stdout]
    if missing:
        print(probe.stdout + probe.stderr, file=sys.stderr)
        print(f"typecheck: the canary was not rejected as expected ({missing}); the TensorRT stubs are not in "
              "effect, so a clean run would prove nothing", file=sys.stderr)
        return 1
    result = mypy(argv or DEFAULT_TARGETS)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return 0 if result.returncode == 0 else (1 if result.returncode == 1 else 2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
