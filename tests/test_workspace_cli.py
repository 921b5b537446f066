"""The workspace and the CLI as a user drives them: every command, bad input, crash safety."""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from edge_m2kd import workspace
from edge_m2kd.cli import main
from edge_m2kd.config import BACKBONE_NAMES, METHODS, SNAPSHOT_POLICIES
from edge_m2kd.data import load_digits
from edge_m2kd.learner import Learner
from edge_m2kd.locking import reading
from edge_m2kd.models import BACKBONES
from edge_m2kd.snapshots import POLICIES
from edge_m2kd.workspace import FORMAT_VERSION, Workspace

CLASSES_PER_STEP = [["0", "1"], ["2", "3"]]
INIT = ["--backbone", "resnet20", "--input-size", "16", "--exemplars", "40", "--epochs", "4",
        "--batch-size", "32", "--planned-steps", "3", "--device", "cpu", "--no-flip"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Digits as an ImageFolder: train/<class>/*.png (40 per class) and test/<class>/*.png."""
    root = tmp_path_factory.mktemp("digits")
    for split, per_class in (("train", 40), ("test", 15)):
        data = load_digits(split, size=16)
        for c, name in enumerate(data.class_names[:5]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, img in enumerate(data.images[data.labels == c][:per_class]):
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return {"train": root / "train", "test": root / "test"}


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def make_workspace(path: Path, folders: dict[str, Path], steps: int = 1, *extra: str) -> Path:
    assert cli("init", path, *INIT, *extra)[0] == 0
    for classes in CLASSES_PER_STEP[:steps]:
        code, out, err = cli("add-classes", path, folders["train"], "--classes", ",".join(classes))
        assert code == 0, err
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, folders) -> Path:
    return make_workspace(tmp_path_factory.mktemp("ws") / "ws", folders, steps=2)


def test_workspace_commands_end_to_end(ws, folders, tmp_path):
    code, out, _ = cli("snapshots", ws, "--verify", "--json")
    report = json.loads(out)
    assert code == 0 and [s["step"] for s in report["snapshots"]] == [1, 2]
    assert all(s["verified"] for s in report["snapshots"])
    assert all(0 < s["bytes"] < s["full_copy_bytes"] for s in report["snapshots"])
    assert (ws / "workspace.json").is_file()

    code, out, _ = cli("eval", ws, folders["test"], "--json")
    ev = json.loads(out)
    assert code == 0 and ev["samples"] == 4 * 15 and len(ev["accuracy_per_group"]) == 2
    assert ev["deployed_accuracy"] > 0.25  # 4 classes, chance is 0.25; one epoch-light step each
    # eval and predict agree: the fraction of top-1 predictions that name the folder's class
    images = [p for c in "0123" for p in sorted((folders["test"] / c).iterdir())]
    code, out, _ = cli("predict", ws, *images, "--json")
    top1 = [r["predictions"][0]["class"] == Path(r["image"]).parent.name for r in json.loads(out)["results"]]
    assert code == 0 and abs(np.mean(top1) - ev["deployed_accuracy"]) < 1e-9

    image = next((folders["test"] / "2").iterdir())
    code, out, _ = cli("predict", ws, image, "--top-k", "3", "--json")
    preds = json.loads(out)["results"][0]["predictions"]
    assert code == 0 and len(preds) == 3
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert {p["class"] for p in preds} <= {"0", "1", "2", "3"}

    png = tmp_path / "history.png"
    code, out, _ = cli("history", ws, "--plot", png, "--json")
    hist = json.loads(out)
    assert code == 0 and [len(s["accuracy_per_group"]) for s in hist["steps"]] == [1, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    code, out, _ = cli("memory", ws, "--budget", "orin-nano-4gb", "--json")
    mem = json.loads(out)
    assert code == 0 and mem["fits"] and len(mem["snapshots"]) == 2
    assert mem["next_step"]["predicted_peak"]["activations"] > 0
    assert mem["next_step"]["largest_batch_size"] >= 32


def checksum(path: Path) -> str:
    return Workspace.open(path).checksum()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["add-classes", "{ws}", "{missing}"], "does not exist"),
        (["add-classes", "{ws}", "{empty}"], "no class folders"),
        (["add-classes", "{ws}", "{train}", "--classes", "1"], "already exists"),
        (["add-classes", "{ws}", "{train}", "--classes", "4,4"], "given twice"),
        (["add-classes", "{ws}", "{bad}"], "no readable image"),
        (["add-classes", "{ws}", "{train}", "--classes", "0,1,2,3"], "already exists"),
        (["eval", "{ws}", "{unknown}"], "none of the test classes"),
        (["memory", "{ws}", "--budget", "lots"], "cannot read the memory budget"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, folders, tmp_path, args, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "a.jpg").write_bytes(b"not a jpeg at all")
    (bad / "x" / "notes.txt").write_text("hello")
    unknown = tmp_path / "unknown"
    (unknown / "zebra").mkdir(parents=True)
    subs = {"ws": ws, "missing": tmp_path / "nope", "empty": empty, "train": folders["train"], "bad": bad,
            "unknown": unknown}
    before = checksum(ws)
    code, out, err = cli(*[a.format(**{k: str(v) for k, v in subs.items()}) for a in args])
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert checksum(ws) == before


def test_corrupt_image_among_good_ones_is_skipped_or_refused(tmp_path, folders):
    data = tmp_path / "data"
    (data / "4").mkdir(parents=True)
    for i, src in enumerate(sorted((folders["train"] / "4").iterdir())[:20]):
        (data / "4" / f"{i}.png").write_bytes(src.read_bytes())
    good = (data / "4" / "0.png").read_bytes()
    (data / "4" / "broken.png").write_bytes(good[: len(good) // 2])
    # another size and mode: converted, not refused
    Image.fromarray(np.full((40, 30), 128, np.uint8), "L").save(data / "4" / "grey.png")
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    before = checksum(ws)
    code, _, err = cli("add-classes", ws, data, "--on-corrupt", "error")
    assert code == 2 and "broken.png" in err and checksum(ws) == before
    code, _, err = cli("add-classes", ws, data)
    assert code == 0 and "broken.png" in err and "warning" in err
    assert Workspace.open(ws).steps == 2


def test_newer_format_version_is_refused(tmp_path, folders):
    ws = tmp_path / "ws"
    assert cli("init", ws, *INIT)[0] == 0
    manifest = json.loads((ws / "workspace.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (ws / "workspace.json").write_text(json.dumps(manifest))
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "0")
    assert code == 2 and "newer edge-m2kd" in err


def test_budget_too_small_refuses_before_training(tmp_path, folders):
    ws = tmp_path / "ws"
    assert cli("init", ws, *INIT, "--memory-budget", "64MiB")[0] == 0
    before = checksum(ws)
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "0,1")
    assert code == 2 and "exceeds the budget" in err and "even batch size 1" in err
    assert checksum(ws) == before and Workspace.open(ws).steps == 0


def start_cli_process(*args: str, env: dict | None = None, fsize: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, "-m", "edge_m2kd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, preexec_fn=limit)


def run_cli_process(*args: str, env: dict | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    proc = start_cli_process(*args, env=env, fsize=fsize)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def state_of(ws: Path) -> tuple[str, list[bool]]:
    opened = Workspace.open(ws)
    verified = [r.ok for r in opened.load_learner().store.verify()]
    return opened.checksum(), verified


@pytest.mark.parametrize("point", ["train:epoch", "consolidate", "commit:model.safetensors",
                                   "commit:before-switch"])
def test_sigkill_mid_step_leaves_the_previous_state(tmp_path, folders, point):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    reference = tmp_path / "reference"
    shutil.copytree(ws, reference)
    before = state_of(ws)
    proc = run_cli_process("add-classes", ws, folders["train"], "--classes", "2,3", env={"EDGE_M2KD_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr
    assert state_of(ws) == before  # opens, verifies, and is exactly the state before the step
    # the step can be rerun, to the same result as an uninterrupted run from the same state
    for path in (ws, reference):
        assert run_cli_process("add-classes", path, folders["train"], "--classes", "2,3").returncode == 0
    assert Workspace.open(ws).manifest["files"] == Workspace.open(reference).manifest["files"]
    # readers delete nothing; the next writer removed what the killed one left
    assert not any(p.name.endswith(".tmp") for p in ws.iterdir())
    assert [p.name for p in (ws / "generations").iterdir()] == ["gen-000002"]


def test_sigkill_after_the_switch_keeps_the_new_step(tmp_path, folders):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    proc = run_cli_process("add-classes", ws, folders["train"], "--classes", "2,3",
                           env={"EDGE_M2KD_KILL_AT": "commit:after-switch"})
    assert proc.returncode == -9
    opened = Workspace.open(ws)
    assert opened.steps == 2 and all(r.ok for r in opened.load_learner().store.verify())


def test_disk_full_during_commit_changes_nothing(tmp_path, folders):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    before = state_of(ws)
    proc = run_cli_process("add-classes", ws, folders["train"], "--classes", "2,3", fsize=200_000)
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "could not write" in err[0] and "unchanged" in err[0]
    assert state_of(ws) == before


# -- one writer at a time; readers never delete ------------------------------------------------
def wait_for_writer(ws: Path, proc: subprocess.Popen) -> dict:
    """Block until `proc` holds the workspace's writer lock (it writes its pid into the lock file)."""
    lock = ws / "writer.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") == proc.pid:
            return holder
        time.sleep(0.02)
    raise AssertionError("the writer never took the lock")


def verified(ws: Path) -> bool:
    code, out, _ = cli("snapshots", ws, "--verify", "--json")
    return code == 0 and json.loads(out)["all_verified"]


def test_a_second_writer_is_refused_naming_the_holder_or_waits(tmp_path, folders):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    first = start_cli_process("add-classes", ws, folders["train"], "--classes", "2,3")
    holder = wait_for_writer(ws, first)
    assert holder["command"] == "add-classes"
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "4")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert f"pid {first.pid}" in lines[0] and "add-classes" in lines[0] and holder["since"] in lines[0]
    # --wait: starts once the first has committed, from the state the first committed
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "4", "--wait")
    assert first.wait(timeout=300) == 0, first.communicate()
    assert code == 0, err
    opened = Workspace.open(ws)
    assert [h["classes"] for h in opened.manifest["history"]] == [["0", "1"], ["2", "3"], ["4"]]
    assert verified(ws)


def test_reads_during_a_step_neither_fail_nor_break_it(tmp_path, folders):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    writer = start_cli_process("add-classes", ws, folders["train"], "--classes", "2,3")
    wait_for_writer(ws, writer)
    reads_during_step = 0
    while writer.poll() is None or reads_during_step < 50:
        running = writer.poll() is None
        opened = Workspace.open(ws)
        holdout = opened.load_holdout()  # reads a generation's file, as predict and eval do
        assert sorted(holdout) == list(range(2 * opened.steps))
        if reads_during_step % 10 == 0:
            assert opened.load_learner().steps_done == opened.steps
        reads_during_step += running and writer.poll() is None
    assert writer.returncode == 0, writer.communicate()
    assert reads_during_step >= 50
    assert Workspace.open(ws).steps == 2 and verified(ws)


def test_a_busy_reader_keeps_the_old_generation_and_a_stale_reader_follows_the_commit(tmp_path, folders):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    generations = ws / "generations"
    stale = Workspace.open(ws)  # opened before the step, reads its files after it
    with reading(ws):  # another reader is loading files when the step commits
        assert cli("add-classes", ws, folders["train"], "--classes", "2,3")[0] == 0
    assert sorted(p.name for p in generations.iterdir()) == ["gen-000001", "gen-000002"]
    with Workspace.writing(ws, "test"):  # the next writer deletes what no reader needs now
        pass
    assert [p.name for p in generations.iterdir()] == ["gen-000002"]
    assert stale.load_learner().steps_done == 2 and stale.steps == 2


def test_a_failure_after_the_manifest_switch_keeps_the_committed_step(tmp_path, folders, monkeypatch):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    real_fsync_dir = workspace.fsync_dir

    def fsync_dir(path: Path) -> None:
        if Path(path) == ws:  # the workspace root: only synced to make the manifest's rename durable
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(workspace, "fsync_dir", fsync_dir)
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "2,3")
    monkeypatch.undo()
    assert code == 0 and "step 2 is committed" in err and "unchanged" not in err, err
    assert Workspace.open(ws).steps == 2 and verified(ws)


def test_kill_9_of_a_writer_releases_the_lock(tmp_path, folders):
    ws = make_workspace(tmp_path / "ws", folders, steps=1)
    writer = start_cli_process("add-classes", ws, folders["train"], "--classes", "2,3",
                               env={"EDGE_M2KD_KILL_AT": "before-train"})
    assert writer.wait(timeout=300) == -9
    assert json.loads((ws / "writer.lock").read_text())["pid"] == writer.pid  # it held the lock when killed
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "2,3")  # no --wait: free at once
    assert code == 0, err


def test_too_small_exemplar_memory_is_refused_before_training(tmp_path, folders, monkeypatch):
    ws = tmp_path / "ws"
    assert cli("init", ws, *INIT, "--exemplars", "3")[0] == 0
    assert cli("add-classes", ws, folders["train"], "--classes", "0,1")[0] == 0
    before = checksum(ws)
    monkeypatch.setattr(Learner, "step", lambda *a, **k: pytest.fail("trained before refusing"))
    code, _, err = cli("add-classes", ws, folders["train"], "--classes", "2,3")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "exemplar memory of 3" in lines[0] and "4 classes" in lines[0], err
    assert checksum(ws) == before


def test_repeated_first_steps_are_byte_identical(tmp_path, folders):
    torch.manual_seed(0)
    first = make_workspace(tmp_path / "a", folders, steps=1)
    torch.manual_seed(1)  # whatever the process drew before, the step draws the same weights
    second = make_workspace(tmp_path / "b", folders, steps=1)
    gen = Path("generations") / "gen-000001"
    for name in workspace.FILES:
        assert (first / gen / name).read_bytes() == (second / gen / name).read_bytes(), name


def test_a_failed_verify_is_one_line_exit_2_naming_the_step(ws, tmp_path):
    damaged = tmp_path / "ws"
    shutil.copytree(ws, damaged)
    opened = Workspace.open(damaged)
    snapshots = opened.generation_dir / "snapshots.safetensors"
    tensors = load_file(snapshots)
    tensors["probe_logits.1"] += 0.5
    save_file(tensors, snapshots)
    # the checksum matches again, so only the rebuild can tell
    manifest = json.loads((damaged / "workspace.json").read_text())
    manifest["files"]["snapshots.safetensors"] = workspace.sha256(snapshots)
    (damaged / "workspace.json").write_text(json.dumps(manifest))
    code, out, err = cli("snapshots", damaged, "--verify")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "step 1 " in lines[0], err
    assert "step 2  " in out and "verified" in out  # the table is printed first, step 2 passes


def test_the_cli_offers_every_method_and_policy_the_library_has(tmp_path):
    assert set(SNAPSHOT_POLICIES) == set(POLICIES)
    assert set(BACKBONE_NAMES) == set(BACKBONES)
    for method in METHODS:
        code, _, err = cli("init", tmp_path / method, *INIT, "--method", method)
        assert code == 0, err
        assert Workspace.open(tmp_path / method).config.method == method


def test_init_sets_the_teacher_subset_and_keeps_the_default_otherwise(tmp_path):
    from edge_m2kd.config import TrainConfig

    assert cli("init", tmp_path / "all", *INIT, "--teacher-subset", "0")[0] == 0
    assert cli("init", tmp_path / "default", *INIT)[0] == 0
    assert Workspace.open(tmp_path / "all").config.train.teacher_subset == 0
    assert Workspace.open(tmp_path / "default").config.train.teacher_subset == TrainConfig.teacher_subset
    code, _, err = cli("init", tmp_path / "bad", *INIT, "--teacher-subset", "-1")
    assert code == 2 and "teacher-subset" in err


def test_the_cli_sets_a_passive_openmp_wait_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, sys, edge_m2kd.cli; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ACTIVE", "False"]  # a user's own setting wins


# -- DATA as a CIFAR-100 release or an .npz ----------------------------------------------------------
def _digit_arrays(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits 0..4 (the classes the image folders hold), `per_class` each, at 16 px."""
    data = load_digits(split, size=16)
    keep = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in range(5)])
    return data.images[keep], data.labels[keep]


def _cifar100_release(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """A tiny `cifar-100-python` folder with the release's structure: pickled dicts of bytes keys,
    channel-planar uint8 rows of 3072 values (so the images are 32 px), names in `meta`."""
    root.mkdir(parents=True)
    big = np.stack([np.asarray(Image.fromarray(img).resize((32, 32))) for img in images])
    planar = big.transpose(0, 3, 1, 2).reshape(len(big), 3072)
    for split in ("train", "test"):
        with open(root / split, "wb") as fh:
            pickle.dump({b"data": planar, b"fine_labels": [int(x) for x in labels],
                         b"coarse_labels": [0] * len(labels)}, fh, protocol=2)
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in names]}, fh, protocol=2)
    return root


def test_add_classes_from_a_cifar100_release(tmp_path, folders):
    names = ["apple", "bicycle", "castle", "dolphin", "elephant"]
    release = _cifar100_release(tmp_path / "cifar-100-python", *_digit_arrays("train", 40), names)
    ws = tmp_path / "ws"
    assert cli("init", ws, *INIT)[0] == 0
    # the folder the tarball was extracted into works too; class names come from `meta`
    code, out, err = cli("add-classes", ws, tmp_path, "--classes", "apple,bicycle", "--json")
    assert code == 0, err
    assert json.loads(out)["classes"] == ["apple", "bicycle"] and json.loads(out)["train_images"] == 72
    code, out, err = cli("eval", ws, release, "--json")  # the test split
    assert code == 0, err
    assert json.loads(out)["classes"] == ["apple", "bicycle"]
    code, _, err = cli("add-classes", ws, release, "--classes", "zebra")
    assert code == 2 and "unknown class 'zebra'" in err and len(err.strip().splitlines()) == 1, err


def test_add_classes_from_an_npz(tmp_path):
    x, y = _digit_arrays("train", 40)
    npz = tmp_path / "digits.npz"
    np.savez(npz, x=x, y=y)  # no `classes` array: the names are the labels, "0".."4"
    ws = tmp_path / "ws"
    assert cli("init", ws, *INIT)[0] == 0
    code, out, err = cli("add-classes", ws, npz, "--classes", "0,1", "--json")
    assert code == 0, err
    assert json.loads(out)["classes"] == ["0", "1"]
    assert Workspace.open(ws).steps == 1

    np.savez(tmp_path / "bad.npz", x=x.astype(np.float32), y=y)
    code, _, err = cli("add-classes", ws, tmp_path / "bad.npz")
    assert code == 2 and "expected uint8" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "notes.txt").write_text("not data")
    code, _, err = cli("add-classes", ws, tmp_path / "notes.txt")
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1, err


def test_memory_reports_the_boards_figures_on_a_jetson(ws, tmp_path, monkeypatch):
    from device import probes

    kib = 1024
    (tmp_path / "meminfo").write_text("MemTotal:        8038788 kB\nMemFree:         4851052 kB\n"
                                      "MemAvailable:    5642288 kB\nNvMapMemUsed:     805068 kB\n")
    monkeypatch.setattr(probes, "MEMINFO", tmp_path / "meminfo")
    # NvMapMemUsed alone says Jetson; no /etc/nv_tegra_release, so a real board runs this test the same
    monkeypatch.setattr(probes, "TEGRA_RELEASE", tmp_path / "no-nv_tegra_release")
    code, out, _ = cli("memory", ws, "--json")
    assert code == 0 and json.loads(out)["board"] == {
        "total_bytes": 8038788 * kib, "available_bytes": 5642288 * kib, "nvmap_used_bytes": 805068 * kib}
    code, out, _ = cli("memory", ws)
    assert code == 0 and "board memory 7850.38 MiB, available 5510.05 MiB, NvMap (GPU buffers) 786.20 MiB" in out, out
    (tmp_path / "meminfo").write_text("MemTotal:       16318480 kB\nMemAvailable:    9264520 kB\n")  # a PC
    code, out, _ = cli("memory", ws, "--json")
    assert code == 0 and json.loads(out)["board"] is None


def test_add_classes_stores_folder_names_in_nfc_and_refuses_look_alikes(tmp_path, folders):
    data = tmp_path / "data"
    for name, source in (("cafe\u0301", "0"), ("airplane", "1")):  # an NFD folder name, as macOS writes it
        shutil.copytree(folders["train"] / source, data / name)
    ws = make_workspace(tmp_path / "ws", folders, 0)
    code, out, err = cli("add-classes", ws, data, "--json")
    assert code == 0, err
    assert json.loads(out)["classes"] == ["airplane", "caf\u00e9"]
    assert Workspace.open(ws).load_learner().class_names == ["airplane", "caf\u00e9"]
    more = tmp_path / "more"
    for name in ("\u0430irplane", "CAF\u00c9"):  # Cyrillic a; the same name in capitals
        shutil.copytree(folders["train"] / "2", more / name)
        before = Workspace.open(ws).checksum()
        code, _, err = cli("add-classes", ws, more, "--classes", name)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert Workspace.open(ws).checksum() == before
