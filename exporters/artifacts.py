"""Files the exporters write: atomic writes, model hashes, and the metadata JSON that sits
beside every artifact (``model.onnx`` -> ``model.onnx.json``, ``model.plan`` -> ``model.plan.json``).

An export is read by another program on another machine (the device runtime on the Jetson), so
the metadata says everything that program needs and nothing it has to guess: the class names in
head order, the input contract (name, shape, dtype, layout, value range, the normalisation that
is already folded into the graph), the classifier kind, the model hash that ties an engine to its
ONNX file, the precision and the versions of the tools that made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import IO, Any

from edge_m2kd import files
from edge_m2kd.errors import UserError

METADATA_FORMAT = "edge-m2kd-export"
METADATA_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def prepare_output(path: str | Path, what: str) -> Path:
    """Make the parent directory and prove it is writable, or raise a one-line UserError.

    Checked before any long work, so a typo in ``--onnx`` fails in a second, not after an export.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write the {what} to {path}: {e.strerror or e}; choose another path") from e
    return path


@contextlib.contextmanager
def staged_file(path: str | Path, what: str) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file beside ``path`` that the caller fills and later publishes with
    :func:`publish`; removed if the block raises, so a refused export leaves nothing behind."""
    path = Path(path)
    tmp = None
    try:
        with files.staged(path) as (tmp, f):
            yield tmp, f
    except OSError as e:
        if tmp is not None:  # raised by the caller's block, not by staging: not ours to reword
            raise
        raise UserError(f"cannot write the {what} to {path}: {e.strerror or e}; choose another path") from e


publish = files.publish  # rename a fully written temporary file onto its final name, durably


def write_bytes_atomic(path: str | Path, data: bytes, what: str) -> Path:
    path = prepare_output(path, what)
    with staged_file(path, what) as (tmp, f):
        f.write(data)
        f.flush()
    try:
        publish(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the {what} to {path}: {e.strerror or e}; choose another path") from e
    return path


def tool_versions(tensorrt_version: str | None = None) -> dict[str, str | None]:
    """Versions of everything that shaped the artifact; ``None`` for a tool not involved/installed."""

    def dist(name: str) -> str | None:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            return None

    import onnx
    import torch

    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "edge_m2kd": dist("edge-m2kd"),
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "onnxruntime": ort_version,
        "tensorrt": tensorrt_version,
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_metadata(artifact: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``<artifact>.json`` atomically; the artifact's own file name is recorded in it."""
    artifact = Path(artifact)
    doc = {"format": METADATA_FORMAT, "format_version": METADATA_VERSION, "artifact": artifact.name, **meta}
    data = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()
    return write_bytes_atomic(metadata_path(artifact), data, "export metadata")


def read_metadata(artifact: str | Path) -> dict[str, Any]:
    path = metadata_path(artifact)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing; export the model again") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); export the model again") from e
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT:
        raise UserError(f"{path} is not edge-m2kd export metadata; export the model again")
    return doc
