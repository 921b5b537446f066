"""What a client uploads, checked before anything is written: class names by the library's one
rule (classnames.py), every file decoded exactly as the step will decode it (sources.py, with
PIL's decompression-bomb limit), counts and sizes within the server's limits. Files are written
under names the server makes (`000001.png`), never the client's, into a staging folder of the
workspace, so nothing a client sends can choose where a byte lands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from edge_m2kd.classnames import check_class_name
from edge_m2kd.data.sources import decode_upload
from edge_m2kd.errors import UserError


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int = 16 * 2**20
    max_files: int = 2000  # a step usually learns from hundreds to a few thousand images
    max_classes: int = 10
    max_request_bytes: int = 512 * 2**20  # whole request, enforced while it streams (security.py)
    max_predict_files: int = 16


class TooLarge(UserError):
    """An upload over a size limit: answered 413, not 400."""


def _count(n: int, max_count: int) -> None:
    if n == 0:
        raise UserError("no image uploaded; choose at least one image file")
    if n > max_count:
        raise TooLarge(f"{n} files uploaded, more than the limit of {max_count}; upload fewer at a time")


async def _read(f: UploadFile, limits: UploadLimits) -> bytes:
    # One byte past the limit: enough to know it is over without holding a huge file.
    data = await f.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise TooLarge(f"{f.filename or 'upload'!r} is larger than the limit of {limits.max_file_bytes / 2**20:.0f} MiB "
                       "per image; resize it or upload a smaller file")
    return data


async def read_images(files: list[UploadFile], size: int, limits: UploadLimits) -> tuple[list[str], np.ndarray]:
    """Images to predict: their names and uint8 (N, size, size, 3), decoded as training decodes."""
    _count(len(files), limits.max_predict_files)
    pixels = [(await run_in_threadpool(decode_upload, await _read(f, limits), size, f.filename or "upload"))[0]
              for f in files]
    return [f.filename or f"image {i + 1}" for i, f in enumerate(files)], np.stack(pixels)


def check_names(names: list[str], limits: UploadLimits) -> list[str]:
    if not names:
        raise UserError("no class named; give the new class a name")
    if len(names) > limits.max_classes:
        raise UserError(f"{len(names)} classes in one step, more than the limit of {limits.max_classes}")
    for name in names:
        check_class_name(name)
        if names.count(name) > 1:
            raise UserError(f"class {name!r} given twice; name each class once")
    return names


async def stage(staging: Path, per_class: dict[str, list[UploadFile]], size: int, limits: UploadLimits) -> int:
    """Check each file and write it as `staging/<class>/<n><ext>`, one at a time (one image in
    memory, not the whole request); the image count. The caller removes `staging` on a refusal."""
    for name, files in per_class.items():
        check_class_name(name)
        if not files:
            raise UserError(f"class {name!r} has no images; add at least one image for it")
    _count(sum(len(files) for files in per_class.values()), limits.max_files)
    root = staging.resolve()
    count = 0
    for name, files in per_class.items():
        folder = (root / name).resolve()
        if folder.parent != root:  # check_class_name makes this impossible; keep it impossible
            raise UserError(f"class name {name!r} would leave the staging folder")
        folder.mkdir()
        for i, f in enumerate(files):
            data = await _read(f, limits)
            # Decoded at the model's size, so a file the step could not read is refused now,
            # naming it, rather than skipped by the step.
            _, ext = await run_in_threadpool(decode_upload, data, size, f.filename or "upload")  # off the event loop
            (folder / f"{i:06d}{ext}").write_bytes(data)
            count += 1
    return count
