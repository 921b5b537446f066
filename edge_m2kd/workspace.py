"""On-disk state of a device's learner, crash-safe.

Layout:
    WS/workspace.json            the manifest, and the one pointer a commit switches
    WS/generations/gen-NNNNNN/   model, snapshots and exemplars of one committed step
    WS/writer.lock, readers.lock one writer at a time, readers never lose files (locking.py)

A commit writes a new generation directory, fsyncs every file and the directory, then
replaces workspace.json atomically (write a temporary file, fsync, rename, fsync the
directory). A crash or power cut at any moment leaves either the old or the new manifest,
each pointing at a complete generation. Only a writer (`Workspace.writing`, holding the
writer lock) deletes anything: older generations and whatever a crash left half-written, and
only while no reader is loading files. Tensors are safetensors and metadata JSON, so opening
a workspace cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from edge_m2kd import faults
from edge_m2kd.config import LearnerConfig
from edge_m2kd.errors import UserError
from edge_m2kd.exemplars import class_arrays, from_class_arrays
from edge_m2kd.files import fsync_dir, fsync_file, write_json_atomic
from edge_m2kd.hashing import sha256
from edge_m2kd.learner import Learner
from edge_m2kd.locking import LOCK_FILES, no_readers, reading, writer_lock

FORMAT_VERSION = 1
MANIFEST = "workspace.json"
GENERATIONS = "generations"
# Learner.state()'s parts, a file each; "statistics" (the analytic head's sums, heads.py) is absent
# from a workspace saved before it existed, which gets it at its next step.
LEARNER_PARTS = ("model", "snapshots", "exemplars", "statistics")
FILES = (*(f"{part}.safetensors" for part in LEARNER_PARTS), "holdout.safetensors")


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).split(": ")[-1]


def _disk_error(e: Exception, what: str) -> UserError:
    return UserError(f"could not write {what}: {_reason(e)}; the workspace is unchanged - free disk space "
                     "(or check permissions) and run the step again")


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not a workspace (no {MANIFEST}); create one with `edge-m2kd init {path}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest_path} is not valid JSON ({e}); restore it from a backup") from e
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer edge-m2kd (format {version}, this one reads up to "
                        f"{FORMAT_VERSION}); upgrade edge-m2kd to open it")
    return manifest


def _refuse_unless_new(path: Path) -> None:
    if (path / MANIFEST).exists():
        raise UserError(f"{path} already holds a workspace; choose another directory or remove it")
    if path.exists() and any(p.name not in LOCK_FILES for p in path.iterdir()):
        raise UserError(f"{path} exists and is not empty; choose an empty or new directory")


class Workspace:
    def __init__(self, path: Path, manifest: dict[str, Any], writer: bool = False) -> None:
        self.path = path
        self.manifest = manifest
        self.writer = writer  # holds the writer lock: may commit and delete

    # -- create and open -----------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, cfg: LearnerConfig, extra: dict[str, Any] | None = None,
               wait: bool = False) -> Workspace:
        path = Path(path)
        _refuse_unless_new(path)  # before the lock, so a refused directory gets no lock file
        manifest = {
            "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "generation": None,
            "classes": [],  # registry: one entry per class id, in head order
            "history": [],
            "files": {},
            **(extra or {}),
        }
        try:
            path.mkdir(parents=True, exist_ok=True)
            with writer_lock(path, "init", wait):
                _refuse_unless_new(path)  # again: a writer we waited for may have made one here
                (path / GENERATIONS).mkdir(exist_ok=True)
                write_json_atomic(path / MANIFEST, manifest)
        except OSError as e:
            raise _disk_error(e, f"a workspace at {path}") from e
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        """Open for reading: takes no writer lock and deletes nothing."""
        path = Path(path)
        return cls(path, _read_manifest(path))

    @classmethod
    @contextmanager
    def writing(cls, path: str | Path, command: str, wait: bool = False) -> Iterator[Workspace]:
        """Open as the one writer: the writer lock is held until the block ends. The state is
        read once the lock is held, so a writer that waited starts from what the last one
        committed, not from what it saw before."""
        path = Path(path)
        _read_manifest(path)  # refuse a directory that is no workspace before putting a lock file in it
        with writer_lock(path, command, wait):
            ws = cls(path, _read_manifest(path), writer=True)
            ws._remove_unused_generations()
            yield ws

    def _remove_unused_generations(self) -> None:
        """Delete what the manifest no longer names: older generations, and what an interrupted
        commit left (a half-written generation, a temporary manifest). Only while no reader is
        loading files (locking.py); with one busy, they stay for the next writer to delete."""
        assert self.writer, "only the writer deletes"
        current = self.manifest.get("generation")
        gens = self.path / GENERATIONS
        with no_readers(self.path) as free:
            if not free:
                return
            for child in gens.iterdir() if gens.is_dir() else []:
                if child.name != current:
                    shutil.rmtree(child, ignore_errors=True)
            # a manifest staged by a writer that died before its rename
            for tmp in [self.path / (MANIFEST + ".tmp"), *self.path.glob(f".{MANIFEST}.*.tmp")]:
                tmp.unlink(missing_ok=True)

    def _follow_newer_commit(self) -> None:
        """Called under the readers lock. Since `open`, a writer may have committed a newer
        step and deleted the generation this object's manifest names: read the manifest again.
        The generation it names now stays while the readers lock is held."""
        gen = self.generation_dir
        if gen is not None and not gen.is_dir():
            self.manifest = _read_manifest(self.path)

    # -- properties ------------------------------------------------------------------------
    @property
    def config(self) -> LearnerConfig:
        return LearnerConfig.from_dict(self.manifest["config"])

    @property
    def steps(self) -> int:
        return len(self.manifest["history"])

    @property
    def generation_dir(self) -> Path | None:
        gen = self.manifest.get("generation")
        return self.path / GENERATIONS / gen if gen else None

    # -- learner state -----------------------------------------------------------------------
    def load_learner(self, device: str | None = None) -> Learner:
        """The committed learner; `device` replaces the configured one in memory (a reader's CPU
        for a workspace made on a board), and nothing on disk changes."""
        cfg = self.config
        if device is not None:
            cfg.train.device = device
        with reading(self.path):
            self._follow_newer_commit()
            gen = self.generation_dir
            if gen is None:
                return Learner(cfg)
            for name, digest in self.manifest["files"].items():
                if not (gen / name).is_file() or sha256(gen / name) != digest:
                    raise UserError(f"{gen / name} is missing or damaged (checksum mismatch); "
                                    "restore the workspace from a backup")
            try:
                return self._load_state(gen, cfg)
            except (KeyError, ValueError, RuntimeError) as e:  # e.g. tensors of another layout
                raise UserError(f"{gen} cannot be read by this edge-m2kd ({type(e).__name__}: {str(e)[:80]}); "
                                "restore the workspace from a backup") from e

    def _load_state(self, gen: Path, cfg: LearnerConfig) -> Learner:
        tensors = {part: load_file(gen / f"{part}.safetensors") for part in LEARNER_PARTS
                   if f"{part}.safetensors" in self.manifest["files"]}
        meta = {"classes": self.manifest["classes"], "snapshots": self.manifest["snapshots"],
                "heads": self.manifest.get("heads", {})}
        return Learner.from_state(cfg, tensors, meta)

    def load_holdout(self) -> dict[int, np.ndarray]:
        """Held-out images per class id, kept to fill the accuracy matrix after each step."""
        with reading(self.path):
            self._follow_newer_commit()
            gen = self.generation_dir
            if gen is None:
                return {}
            return from_class_arrays(load_file(gen / "holdout.safetensors"))

    def first_exemplars(self) -> dict[int, np.ndarray]:
        """Each class's first exemplar, the one herding picked first (the closest to the class
        mean: its most typical image), read alone from the exemplar file (`serve`'s thumbnails)."""
        with reading(self.path):
            self._follow_newer_commit()
            gen = self.generation_dir
            if gen is None:
                return {}
            with safe_open(gen / "exemplars.safetensors", framework="np") as f:
                slices = {int(k.split(".")[1]): f.get_slice(k) for k in f.keys()}
                return {c: s[0:1][0] for c, s in slices.items() if s.get_shape()[0] > 0}

    def commit(self, learner: Learner, history_entry: dict[str, Any], holdout: dict[int, np.ndarray]) -> None:
        """Write the learner as a new generation, then switch the manifest to it."""
        if not self.writer:
            raise RuntimeError("commit needs the writer lock: open the workspace with Workspace.writing")
        gen_name = f"gen-{self.steps + 1:06d}"
        gen = self.path / GENERATIONS / gen_name
        tensors, meta = learner.state()
        parts = [tensors[part] for part in LEARNER_PARTS] + [class_arrays(holdout)]
        try:
            if gen.exists():
                shutil.rmtree(gen)
            gen.mkdir(parents=True)
            for name, part in zip(FILES, parts):
                save_file({k: v.contiguous() for k, v in part.items()}, gen / name)
                fsync_file(gen / name)
                faults.checkpoint(f"commit:{name}")
            fsync_dir(gen)
            fsync_dir(gen.parent)
            faults.checkpoint("commit:before-switch")
            manifest = dict(self.manifest)
            manifest.update(
                generation=gen_name,
                files={name: sha256(gen / name) for name in FILES},
                classes=meta["classes"],
                snapshots=meta["snapshots"],
                heads=meta["heads"],
                history=[*self.manifest["history"], history_entry],
            )
            # The directory is synced below: a failure there comes after the switch.
            write_json_atomic(self.path / MANIFEST, manifest, sync_dir=False)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            shutil.rmtree(gen, ignore_errors=True)
            raise _disk_error(e, f"step {self.steps + 1} to {self.path}") from e
        # The manifest names the new generation now: it is the workspace's state, and from here
        # on no error may remove it or report the workspace as unchanged.
        self.manifest = manifest
        try:
            fsync_dir(self.path)
        except OSError as e:
            warnings.warn(f"step {self.steps} is committed, but syncing {self.path} failed ({_reason(e)}): "
                          "a power cut before the disk syncs could undo the step", stacklevel=2)
        faults.checkpoint("commit:after-switch")
        self._remove_unused_generations()

    def checksum(self) -> str:
        """One digest over the manifest and the current generation: equal iff the state is."""
        h = hashlib.sha256((self.path / MANIFEST).read_bytes())
        for name, digest in sorted(self.manifest.get("files", {}).items()):
            h.update(f"{name}:{digest}".encode())
        return h.hexdigest()

    def disk_bytes(self) -> dict[str, int]:
        gen = self.generation_dir
        return {name: (gen / name).stat().st_size for name in self.manifest["files"]} if gen else {}
