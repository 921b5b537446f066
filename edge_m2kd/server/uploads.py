"""What a client uploads, checked before anything is written: class names by the library's one
rule (classnames.py, in NFC and unlike any known class), every file decoded exactly as the step
will decode it (sources.py), counts and sizes within the server's limits. Files are written
under names the server makes (`000001.png`), never the client's, into a staging folder of the
workspace, so nothing a client sends can choose where a byte lands.

Decoding is what costs memory: a 252 KB PNG can hold 88 megapixels (Pillow's bomb limit is 89),
264 MB as RGB and more while converting, and a step may carry 2,000 files. So an image may
decode to at most `UploadLimits.decoded_pixel_limit(size)` pixels, read from its header before
decoding (for a JPEG after `draft`, the reduced scale libjpeg decodes at, so a camera photo
passes), and at most `decode_slots` images are read and decoded at once in the whole server,
whatever the number of requests: the server's peak memory stays flat under parallel uploads
(README, "serve", for the figures)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from edge_m2kd.classnames import check_class_name, check_new_class_name
from edge_m2kd.data.sources import decode_upload
from edge_m2kd.errors import UserError


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int = 16 * 2**20
    max_files: int = 2000  # a step usually learns from hundreds to a few thousand images
    max_classes: int = 10
    max_request_bytes: int = 512 * 2**20  # whole request, enforced while it streams (security.py)
    max_predict_files: int = 16
    # The model sees size x size pixels; a side more than 16 times that adds nothing it can use
    # (each of its pixels would average over 256 or more). The floor keeps a screenshot or a
    # 1080p frame acceptable for the smallest models.
    decode_side_factor: int = 16
    min_decoded_pixels: int = 2048 * 2048
    decode_slots: int = 2  # images decoded at once in the server: its peak is this times one decode

    def decoded_pixel_limit(self, size: int) -> int:
        """(16 x size)^2 pixels, at least 2048^2, never more than Pillow's decompression-bomb limit."""
        bomb = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's default, should someone have set None
        return min(bomb, max(self.min_decoded_pixels, (self.decode_side_factor * size) ** 2))


class TooLarge(UserError):
    """An upload over a size limit: answered 413, not 400."""


class DecodeSlots:
    """The server's `decode_slots`, shared by every request. Made on first use, inside the event
    loop that will wait on it."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._limiter: anyio.CapacityLimiter | None = None

    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.slots)
        return self._limiter


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


def _decode(data: bytes, size: int, name: str, max_pixels: int) -> tuple[np.ndarray, str]:
    try:
        with Image.open(io.BytesIO(data)) as opened:  # the header only
            opened.draft("RGB", (size, size))  # a JPEG's size becomes the scale libjpeg will decode at
            width, height = opened.size
    except Exception:  # noqa: BLE001 - not an image: decode_upload says so, in the step's words
        width = height = 0
    if width * height > max_pixels:
        raise TooLarge(f"{name!r} decodes to {width}x{height} pixels ({width * height / 1e6:.1f} MP), more than "
                       f"the {max_pixels / 1e6:.1f} MP this server decodes for a {size} px model; scale it down "
                       "or send it as a JPEG")
    return decode_upload(data, size, name)


async def _read_and_decode(f: UploadFile, size: int, limits: UploadLimits,
                           slots: DecodeSlots) -> tuple[bytes, np.ndarray, str]:
    name = f.filename or "upload"
    # The read is inside the slot too: a request waiting for one holds no file in memory.
    async with slots.limiter():
        data = await _read(f, limits)
        pixels, ext = await run_in_threadpool(_decode, data, size, name, limits.decoded_pixel_limit(size))
    return data, pixels, ext


async def read_images(files: list[UploadFile], size: int, limits: UploadLimits,
                      slots: DecodeSlots) -> tuple[list[str], np.ndarray]:
    """Images to predict: their names and uint8 (N, size, size, 3), decoded as training decodes."""
    _count(len(files), limits.max_predict_files)
    pixels = [(await _read_and_decode(f, size, limits, slots))[1] for f in files]
    return [f.filename or f"image {i + 1}" for i, f in enumerate(files)], np.stack(pixels)


def check_names(names: list[str], limits: UploadLimits, known: list[str]) -> list[str]:
    """The names in NFC, each checked against the ``known`` classes and the names before it."""
    if not names:
        raise UserError("no class named; give the new class a name")
    if len(names) > limits.max_classes:
        raise UserError(f"{len(names)} classes in one step, more than the limit of {limits.max_classes}")
    out: list[str] = []
    for name in names:
        nfc = check_new_class_name(name, [*known, *out])
        if nfc in out:
            raise UserError(f"class {name!r} given twice; name each class once")
        out.append(nfc)
    return out


async def stage(staging: Path, per_class: dict[str, list[UploadFile]], size: int, limits: UploadLimits,
                slots: DecodeSlots) -> int:
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
            # Decoded at the model's size, so a file the step could not read is refused now,
            # naming it, rather than skipped by the step.
            data, _, ext = await _read_and_decode(f, size, limits, slots)
            (folder / f"{i:06d}{ext}").write_bytes(data)
            count += 1
    return count
