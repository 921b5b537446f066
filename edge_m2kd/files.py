"""Writing a file so that a crash or a power cut leaves the old one or the new one, never half of
one (the workspace's manifest, exported models, the engine cache, benchmark results), and where a
workspace keeps its exports. Torch-free, so device/ and exporters/ can use it cheaply."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

EXPORTS = "exports"


def default_onnx_path(ws: str | Path) -> Path:
    return Path(ws) / EXPORTS / "model.onnx"


def default_engine_path(ws: str | Path) -> Path:
    return Path(ws) / EXPORTS / "model.plan"


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file beside ``path`` (same filesystem, so the rename is atomic) for the caller
    to fill and then :func:`publish`; removed if the block raises. Its name is unique, so two
    processes staging the same path do not write into one file."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield tmp, f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(tmp: Path, path: str | Path, sync_dir: bool = True) -> None:
    """Rename a fully written temporary file onto ``path``. The rename survives a power cut only
    once the directory is synced; ``sync_dir=False`` leaves that to a caller that must treat its
    failure differently (the workspace's commit: after the rename the step is committed)."""
    try:
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(Path(path).parent)


def write_atomic(path: str | Path, data: bytes, sync_dir: bool = True) -> None:
    with staged(path) as (tmp, f):
        f.write(data)
    publish(tmp, path, sync_dir)


def write_json_atomic(path: str | Path, obj: Any, sync_dir: bool = True) -> None:
    write_atomic(path, json.dumps(obj, indent=2).encode(), sync_dir)
