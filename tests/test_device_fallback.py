"""A workspace set up for a CUDA device (as on a board), read on a machine without one: the
reading commands answer on the CPU with one line saying so; training refuses, in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks.step_profile import digits_folder
from edge_m2kd import commands
from edge_m2kd.cli import main
from edge_m2kd.workspace import Workspace

INIT = ["--backbone", "resnet20", "--input-size", "16", "--exemplars", "20", "--epochs", "1", "--batch-size", "32",
        "--planned-steps", "2", "--no-flip", "--snapshots", "full"]
NOTE = "which this machine does not have; reading it on the CPU"


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    return {"train": digits_folder(root / "train", 20), "test": digits_folder(root / "test", 5, split="test")}


def set_device(ws: Path, device: str) -> None:
    """What `init --device cuda` on a board writes: the config's device (the manifest is not checksummed)."""
    manifest = json.loads((ws / "workspace.json").read_text())
    manifest["config"]["train"]["device"] = device
    (ws / "workspace.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def board_ws(tmp_path_factory, folders) -> Path:
    """A workspace of one step, trained here on the CPU, then marked as made on a CUDA board."""
    ws = tmp_path_factory.mktemp("board") / "ws"
    assert cli("init", ws, *INIT, "--device", "cpu")[0] == 0
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "0,1")
    assert code == 0, err
    set_device(ws, "cuda")
    return ws


@pytest.fixture
def no_cuda(monkeypatch) -> None:
    """No CUDA device, even where the tests run on a GPU machine; each command notes afresh."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(commands, "_NOTED", set())


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if NOTE in line]


@pytest.mark.parametrize("args", [
    ["eval", "{ws}", "{test}", "--json"],
    ["memory", "{ws}", "--json"],
    ["snapshots", "{ws}", "--verify", "--json"],
    ["export", "{ws}", "--json"],
    ["predict", "{ws}", "{image}", "--json"],
])
def test_reading_commands_answer_on_the_cpu_with_one_note(board_ws, folders, no_cuda, args):
    image = next((folders["test"] / "0").iterdir())
    args = [a.format(ws=board_ws, test=folders["test"], image=image) for a in args]
    before = Workspace.open(board_ws).checksum()
    code, out, err = cli(*args)
    assert code == 0, err
    report = json.loads(out)
    assert len(notes(err)) == 1 and "device cuda" in notes(err)[0] and str(board_ws) in notes(err)[0]
    assert Workspace.open(board_ws).checksum() == before  # the config still says cuda: nothing rewritten
    assert json.loads((board_ws / "workspace.json").read_text())["config"]["train"]["device"] == "cuda"
    if args[0] == "snapshots":
        assert report["all_verified"] is True
    if args[0] == "export":
        assert report["parity"]["passed"] is True and Path(report["onnx"]).is_file()
    if args[0] == "eval":
        assert report["samples"] == 10  # the two classes it knows, 5 images each
    if args[0] == "predict":
        assert report["device"] == "cpu"


def test_a_workspace_on_a_device_that_is_here_gets_no_note(board_ws, folders, no_cuda, tmp_path):
    ws = tmp_path / "cpu-ws"
    assert cli("init", ws, *INIT, "--device", "cpu")[0] == 0
    code, _, err = cli("memory", ws, "--json")
    assert code == 0 and not notes(err)


def test_training_on_an_absent_device_is_refused_in_one_line(board_ws, folders, no_cuda):
    before = Workspace.open(board_ws).checksum()
    code, out, err = cli("add-classes", board_ws, folders["train"], "--classes", "2")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "device cuda" in err and "no CUDA device" in err
    assert Workspace.open(board_ws).checksum() == before


def test_bench_in_its_own_process_notes_once(board_ws):
    """The command as a user runs it, CUDA hidden: bench opens the workspace for each batch size,
    and says it once."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "edge_m2kd", "bench", str(board_ws), "--iterations", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(notes(proc.stderr)) == 1
    rows = json.loads(proc.stdout)["rows"]
    assert {r["backend"] for r in rows} >= {"torch"} and all(r["device"] == "cpu" for r in rows)
