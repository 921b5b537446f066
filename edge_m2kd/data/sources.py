"""Data sources: every loader returns an `ImageSet` of uint8 RGB images, so the rest of the
pipeline (stream, exemplar memory, augmentation) never cares where the pixels came from.

Images stay uint8 NHWC in memory: a quarter of the bytes of float32, which matters on a Jetson
whose CPU and GPU share one memory budget, and the exemplar memory stores exactly this form.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_m2kd.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def _q(value: object) -> str:
    """Quote a name or path for a one-line message; repr() escapes a newline hidden in a file name."""
    text = str(value)
    if text.isprintable():
        return f"'{text}'"
    return repr(text)


def _one_line(text: str) -> str:
    """Collapse an exception's text (PIL's can span lines) so messages stay one line."""
    return " ".join(str(text).split())


@dataclass(eq=False, repr=False)
class ImageSet:
    """Images with integer labels indexing `class_names`.

    `class_names` is the label space, not the set of classes present: `subset` and `only_classes`
    keep it unchanged so a label means the same class before and after any selection.
    """

    images: np.ndarray  # uint8, (N, H, W, 3), RGB
    labels: np.ndarray  # int64, (N,)
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray):
            raise ValueError(f"images must be a numpy array, got {type(self.images).__name__}")
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(f"images must have shape (N, H, W, 3), got {self.images.shape}")
        labels = np.asarray(self.labels)
        if labels.dtype.kind not in "iu" and not (labels.size == 0 and labels.dtype.kind == "f"):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        self.labels = labels.astype(np.int64, copy=False)
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels must have shape ({len(self.images)},) to match images, got {self.labels.shape}"
            )
        self.class_names = [str(n) for n in self.class_names]
        if len(set(self.class_names)) != len(self.class_names):
            dup = next(n for n in self.class_names if self.class_names.count(n) > 1)
            raise ValueError(f"class name {dup!r} appears twice in class_names")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageSet(n={len(self)}, image_shape={self.images.shape[1:]}, "
            f"classes={len(self.class_names)})"
        )

    def subset(self, index: np.ndarray) -> ImageSet:
        """Samples selected by an int index array or a boolean mask (copies, never views)."""
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},), got {index.shape}")
        elif index.dtype.kind not in "iu" and index.size:
            raise ValueError(f"index must be integers or a boolean mask, got {index.dtype}")
        else:
            index = index.astype(np.int64, copy=False)
        return ImageSet(self.images[index], self.labels[index], list(self.class_names))

    def only_classes(self, names: list[str]) -> ImageSet:
        """Samples of the named classes; the label space (`class_names`) is kept as it is."""
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise UserError(
                f"unknown class {_q(unknown[0])}; available: {', '.join(self.class_names)}; "
                "use one of these names"
            )
        wanted = np.array([self.class_names.index(n) for n in names], dtype=np.int64)
        return self.subset(np.isin(self.labels, wanted))


def check_images(images: np.ndarray, size: int | tuple[int, int], what: str = "images", hint: str = "") -> np.ndarray:
    """uint8 RGB (N, H, W, 3) at a model's input size (`size` square, or (H, W)), or a UserError
    saying what arrived instead; `hint` says how to get it right."""
    h, w = (size, size) if isinstance(size, int) else size
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or \
            images.shape[1:] != (h, w, 3):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise UserError(f"{what}: expected uint8 RGB of shape (N, {h}, {w}, 3), got {got}" + (f"; {hint}" if hint else ""))
    return images


# ----------------------------------------------------------------------------- ImageFolder

# Files bigger than this are decode-bound: PIL's C decoders release the GIL, so threads pay off.
# Smaller ones (CIFAR's 1 KB JPEGs) are bound by PIL's Python-side header parsing, where threads
# only add contention: measured on 2 cores, 10k CIFAR JPEGs take 2.5 s in a loop, 3.5 s threaded,
# while 640x480 photos go 1.7x faster threaded.
_THREADED_MEAN_FILE_BYTES = 32 * 1024


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    High-bit-depth greyscale (16-bit PNG/TIFF open as I;16 or I, float TIFF as F) would clip to
    white under a plain convert("RGB"), so it is rescaled to 0..255 first.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # float images conventionally hold 0..1
        elif img.mode != "F" and (img.mode.startswith("I;16") or (arr.size and arr.max() > 255)):
            arr = arr / 257.0  # 0..65535 -> 0..255
        grey = np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def _decode(path: str, size: int) -> np.ndarray:
    """One file to a (size, size, 3) uint8 array; raises on anything PIL cannot fully decode."""
    # Reading the file in one call and parsing from memory is ~20% faster for small files than
    # letting PIL issue dozens of small reads on the file (measured on CIFAR's 1 KB JPEGs).
    with open(path, "rb") as fh:
        data = fh.read()
    return _decode_bytes(data, size)


def _decode_bytes(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as opened:
        # Image.open reads only the header: refuse a decompression bomb before decoding it.
        # PIL itself raises above twice its MAX_IMAGE_PIXELS and only warns below that.
        if max_pixels is not None and opened.width * opened.height > max_pixels:
            raise Image.DecompressionBombError(f"{opened.width}x{opened.height} pixels, more than the limit of "
                                               f"{max_pixels}")
        # JPEG only: let libjpeg decode at 1/2..1/8 scale when the target is much smaller,
        # the main cost of big camera photos. Never below `size`, so quality is kept.
        opened.draft("RGB", (size, size))
        opened.load()  # forces the full decode: a truncated file fails here, not later
        # Phone photos carry their rotation in EXIF; apply it so the image is the one the user saw.
        ImageOps.exif_transpose(opened, in_place=True)
        img = _to_rgb(opened)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def decode_upload(data: bytes, size: int, name: str = "upload") -> tuple[np.ndarray, str]:
    """Bytes a client sent (`serve`'s uploads) decoded exactly as an image folder's files are:
    the (size, size, 3) uint8 array and the file extension of its format, or a one-line
    UserError. Stricter than a folder: no more pixels than PIL's decompression-bomb limit
    (`Image.MAX_IMAGE_PIXELS`, on even if a caller turned it off), and a format whose extension
    the folder loader reads, so the staged file is read back the same way."""
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's default, should someone have set None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            fmt = (opened.format or "").lower()
        pixels = _decode_bytes(data, size, max_pixels=limit)
    except UnidentifiedImageError:
        raise UserError(f"{_q(name)} is not an image (not in a format PIL can decode); upload JPEG or PNG files") from None
    except Exception as exc:  # noqa: BLE001 - any failure to decode makes the upload unreadable
        raise UserError(f"cannot read image {_q(name)} ({type(exc).__name__}: {_one_line(str(exc))}); "
                        "upload another file") from exc
    # MPO: the multi-picture JPEG many phones write; PIL reads it from a .jpg by content.
    ext = {"jpeg": ".jpg", "mpo": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")
    if ext not in IMAGE_EXTENSIONS:
        raise UserError(f"{_q(name)} is a {fmt.upper() or 'unknown'} image, which image folders do not read; "
                        f"upload one of {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return pixels, ext


def _try_decode(path: str, size: int) -> np.ndarray | str:
    """The array, or the reason it could not be read (workers never raise, so order is kept)."""
    try:
        return _decode(path, size)
    except UnidentifiedImageError:
        return "not in an image format PIL can decode"  # PIL's own text names only a BytesIO
    except Exception as exc:  # noqa: BLE001 - any failure to decode makes the file unreadable
        return f"{type(exc).__name__}: {_one_line(str(exc))}"


def _list_images(folder: Path) -> list[tuple[str, int]]:
    """(path, size in bytes) of image files under `folder`, recursively, in sorted order.

    Hidden files and folders are skipped: macOS leaves '._photo.jpg' resource forks next to real
    photos, which carry an image extension but are not images.
    """
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            try:
                nbytes = os.stat(path).st_size
            except OSError:
                nbytes = 0  # a dangling link: decoding will report it
            found.append((path, nbytes))
    return found


def load_image_folder(
    root: str | Path,
    size: int,
    classes: list[str] | None = None,
    on_corrupt: Literal["skip", "error"] = "skip",
) -> ImageSet:
    """Load `root/<class_name>/**/<image>` as (N, size, size, 3) uint8 RGB.

    Class names are the sorted sub-folder names (hidden ones excluded); `classes` restricts to
    those names, still in sorted order so labels do not depend on how the user listed them.
    Files are read in sorted order, so the result is deterministic. Every image is resized to
    size x size (bilinear), without keeping the aspect ratio.

    Unreadable files with an image extension are skipped with a warning (on_corrupt="skip") or
    refused (on_corrupt="error"); other files are ignored.
    """
    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if int(size) != size or size < 1:
        raise UserError(f"image size must be a positive integer, got {size}; pass e.g. --size 32")
    size = int(size)
    root = Path(root)
    if not root.exists():
        raise UserError(f"image folder {_q(root)} does not exist; check the path")
    if not root.is_dir():
        raise UserError(
            f"{_q(root)} is not a directory; pass a folder with one sub-folder of images per class"
        )
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not available:
        raise UserError(
            f"image folder {_q(root)} has no class sub-folders; "
            "put the images of each class in root/<class_name>/"
        )
    if classes is None:
        names = available
    else:
        seen: set[str] = set()
        for name in classes:
            if name in seen:
                raise UserError(f"class {_q(name)} given twice; list each class once")
            seen.add(name)
            if name not in available:
                raise UserError(
                    f"class {_q(name)} is not a sub-folder of {_q(root)}; "
                    f"available: {', '.join(available)}"
                )
        names = sorted(seen)
        if not names:
            raise UserError("no classes given; name at least one class folder, or none to load all")

    files: list[tuple[str, int, int]] = []  # (path, bytes, label)
    for label, name in enumerate(names):
        listed = _list_images(root / name)
        if not listed:
            raise UserError(
                f"class folder {_q(root / name)} has no readable image (no file with an image "
                f"extension: {', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        files.extend((path, nbytes, label) for path, nbytes in listed)

    decode: Callable[[str], np.ndarray | str] = functools.partial(_try_decode, size=size)
    paths = [f[0] for f in files]
    mean_bytes = sum(f[1] for f in files) / len(files)
    workers = min(8, os.cpu_count() or 1)
    results: list[np.ndarray | str]
    if workers > 1 and mean_bytes > _THREADED_MEAN_FILE_BYTES:
        chunks = [paths[i : i + 32] for i in range(0, len(paths), 32)]
        with ThreadPoolExecutor(workers) as pool:
            results = [r for chunk in pool.map(lambda ps: [decode(p) for p in ps], chunks) for r in chunk]
    else:
        results = [decode(p) for p in paths]

    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    keep = np.zeros(len(files), dtype=bool)
    readable = np.zeros(len(names), dtype=np.int64)
    unreadable = np.zeros(len(names), dtype=np.int64)
    for i, ((path, _, label), result) in enumerate(zip(files, results, strict=True)):
        if isinstance(result, str):
            if on_corrupt == "error":
                raise UserError(
                    f"cannot read image {_q(path)} ({result}); delete or replace the file, "
                    "or load with on_corrupt='skip'"
                )
            warnings.warn(f"skipped unreadable image {path}: {result}", stacklevel=2)
            unreadable[label] += 1
            continue
        images[i] = result
        keep[i] = True
        readable[label] += 1
    for label, name in enumerate(names):
        if readable[label] == 0:
            raise UserError(
                f"class folder {_q(root / name)} has no readable image ({unreadable[label]} "
                "unreadable file(s) skipped); add valid images or remove the folder"
            )
    labels = np.array([f[2] for f in files], dtype=np.int64)
    if keep.all():
        return ImageSet(images, labels, list(names))
    return ImageSet(images[keep], labels[keep], list(names))


# ----------------------------------------------------------------------------- CIFAR-100


def _numpy_global(module: str, name: str) -> Any:
    """numpy's own object for a name numpy 1.x (numpy.core) or 2.x (numpy._core) pickles use,
    imported from whichever package exists so numpy 2 does not warn about numpy.core."""
    import importlib

    for candidate in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What Python 3 writes for a bytes object at pickle protocol <= 2: _codecs.encode(s, 'latin1').
    Admitted for that one codec only, and only on str, so it stays a pure conversion."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only as encode(str, 'latin1')")
    return text.encode("latin1")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Protocol-5 numpy pickles rebuild arrays with numpy's _frombuffer; the same, with no
    object dtype (its items would be live Python objects)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are refused")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


class _CifarUnpickler(pickle.Unpickler):
    """Admits exactly the globals a CIFAR-100 python release (or a re-pickled copy of it) holds.

    A pickle can call any importable callable while loading; CIFAR files come from the internet,
    so anything outside numpy's array reconstruction is refused before it is even imported.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    _FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            if (module, name) == ("numpy", "ndarray"):
                return np.ndarray
            if (module, name) == ("numpy", "dtype"):
                return np.dtype
            return _numpy_global(module, name)
        if (module, name) in self._FROMBUFFER:
            return _frombuffer
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise _RefusedGlobal(f"refused global {module}.{name}")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a callable outside the allow-list (as opposed to being garbled)."""


def _restricted_load(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _CifarUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise UserError(
            f"refusing to load {_q(path)}: {_one_line(str(exc))}, which a CIFAR-100 python release "
            "never contains; re-download cifar-100-python.tar.gz from the official site"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read {_q(path)} ({_one_line(str(exc))}); check the file") from exc
    except Exception as exc:  # noqa: BLE001 - truncated or garbled pickles fail in many ways
        raise UserError(
            f"{_q(path)} is not a readable CIFAR-100 pickle ({type(exc).__name__}: "
            f"{_one_line(str(exc))}); re-download and extract cifar-100-python.tar.gz"
        ) from exc


def _get(d: Any, key: str, path: Path) -> Any:
    """d[key] whether the pickle was written with bytes keys (the release) or str keys."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise UserError(
        f"{_q(path)} has no {key!r} entry; it is not a CIFAR-100 python release file, "
        "re-download and extract cifar-100-python.tar.gz"
    )


def load_cifar100(root: str | Path, split: Literal["train", "test"]) -> ImageSet:
    """The CIFAR-100 python release (`cifar-100-python/` with train, test, meta), fine labels.

    Read with a restricted unpickler: loading a downloaded pickle must never run code.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    # Users often point at the folder they extracted the tarball into; accept that too.
    root = cifar100_root(Path(root)) or Path(root)
    for name in (split, "meta"):
        if not (root / name).is_file():
            raise UserError(
                f"{_q(root / name)} not found; pass the cifar-100-python/ folder extracted from "
                "cifar-100-python.tar.gz (it holds train, test and meta)"
            )
    batch = _restricted_load(root / split)
    meta = _restricted_load(root / "meta")
    path = root / split
    data = _get(batch, "data", path)
    labels = np.asarray(_get(batch, "fine_labels", path))
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _get(meta, "fine_label_names", root / "meta")]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise UserError(
            f"{_q(path)} holds data of shape {shape}, expected uint8 (N, 3072); "
            "re-download cifar-100-python.tar.gz"
        )
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise UserError(
            f"{_q(path)} has {labels.shape} fine_labels for {len(data)} images; re-download the release"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise UserError(
            f"{_q(path)} has labels outside the {len(names)} fine_label_names in meta; "
            "use train/test and meta from the same release"
        )
    # The release stores each image channel-planar: 1024 R, then 1024 G, then 1024 B values.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return ImageSet(images, labels.astype(np.int64), names)


# ----------------------------------------------------------------------------- NPZ


def load_npz(path: str | Path) -> ImageSet:
    """Arrays `x` (uint8 NHWC RGB, or NHW greyscale), `y` (integer labels), optional `classes`.

    allow_pickle=False always: an .npz with object arrays could run code when loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"NPZ file {_q(path)} not found; check the path")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{_q(path)} is a single .npy array, not an .npz; save x and y with np.savez")
        with loaded as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise UserError(
                    f"{_q(path)} has no array {missing[0]!r} (it has: {', '.join(npz.files) or 'nothing'}); "
                    "save images as x and labels as y with np.savez"
                )
            x = npz["x"]
            y = npz["y"]
            classes = npz["classes"] if "classes" in npz.files else None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad zip, object arrays, truncated members
        raise UserError(
            f"cannot read {_q(path)} as .npz ({type(exc).__name__}: {_one_line(str(exc))}); "
            "write it with np.savez and plain numeric arrays"
        ) from exc

    if x.dtype != np.uint8:
        raise UserError(
            f"{_q(path)}: x has dtype {x.dtype}, expected uint8 0..255; convert it, "
            "e.g. (x * 255).round().astype(np.uint8) for 0..1 floats"
        )
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=3)  # greyscale to RGB
    if x.ndim != 4 or x.shape[3] != 3:
        hint = "; it looks channels-first, use x.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise UserError(f"{_q(path)}: x has shape {x.shape}, expected (N, H, W, 3) or (N, H, W){hint}")
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != len(x):
        raise UserError(
            f"{_q(path)}: y has shape {y.shape} and dtype {y.dtype}, expected {len(x)} integer labels"
        )
    if y.size and y.min() < 0:
        raise UserError(f"{_q(path)}: y has negative labels; labels must be 0..K-1")
    if classes is None:
        k = int(y.max()) + 1 if y.size else 0
        names = [str(i) for i in range(k)]
    else:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise UserError(f"{_q(path)}: classes must be a 1-D string array, got {classes.dtype} {classes.shape}")
        names = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in classes.tolist()]
        if len(set(names)) != len(names):
            raise UserError(f"{_q(path)}: classes lists a name twice; class names must be unique")
        if y.size and y.max() >= len(names):
            raise UserError(
                f"{_q(path)}: y has label {int(y.max())} but classes lists only {len(names)} names"
            )
    return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), names)


# ----------------------------------------------------------------------------- DATA, as the CLI takes it
# `add-classes` and `eval` take DATA in any of the three forms a user is likely to have: an image
# folder (DATA/<class>/*.jpg), the CIFAR-100 python release, or an .npz of arrays.


def cifar100_root(path: Path) -> Path | None:
    """The release folder (holding train, test and meta) at or just below `path`, or None."""
    for root in (path, path / "cifar-100-python"):
        if (root / "meta").is_file():
            return root
    return None


def source_classes(data: str | Path) -> list[str]:
    """The class names DATA offers, read before any image is decoded where the format allows:
    sub-folder names, the release's meta file, an .npz's `classes` (or 0..K-1)."""
    data = Path(data)
    if data.suffix == ".npz":
        return load_npz(data).class_names
    cifar = cifar100_root(data) if data.is_dir() else None
    if cifar is not None:
        meta = _restricted_load(cifar / "meta")
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n)
                for n in _get(meta, "fine_label_names", cifar / "meta")]
    if data.is_file():
        raise UserError(f"{_q(data)} is a file; give an image folder (DATA/<class>/*.jpg), a cifar-100-python "
                        "folder or an .npz file")
    if not data.is_dir():
        raise UserError(f"data directory {_q(data)} does not exist; give a folder with one subfolder per class")
    names = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"data directory {_q(data)} has no class folders; put each class's images in DATA/<class>/")
    return names


def load_source(data: str | Path, size: int, classes: list[str], split: Literal["train", "test"] = "train",
                on_corrupt: Literal["skip", "error"] = "skip") -> ImageSet:
    """The images of `classes` in DATA at size x size. `split` picks the release's train or test
    file; an image folder or an .npz is one split already."""
    data = Path(data)
    cifar = cifar100_root(data) if data.is_dir() else None
    if data.suffix != ".npz" and cifar is None:
        return load_image_folder(data, size, classes, on_corrupt=on_corrupt)
    whole = load_npz(data) if cifar is None else load_cifar100(cifar, split)
    chosen = whole.only_classes(classes)
    del whole  # the release holds 50,000 images; keep only the chosen classes'
    return ImageSet(_resized(chosen.images, size), chosen.labels, chosen.class_names)


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """Arrays resized as image folders are (PIL bilinear, aspect ratio not kept)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
                     for img in images]) if len(images) else np.zeros((0, size, size, 3), np.uint8)


# ----------------------------------------------------------------------------- digits


def load_digits(
    split: Literal["train", "test"], size: int = 16, test_fraction: float = 0.25, seed: int = 0
) -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as RGB size x size, for demos
    and tests. The split is stratified and fixed by `seed`, so train and test never overlap."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    digits = sk_load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    index = np.sort(train_idx if split == "train" else test_idx)
    grey = grey[index]
    if size != grey.shape[1]:
        grey = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey]
        )
    rgb = np.repeat(grey[..., None], 3, axis=3)
    return ImageSet(np.ascontiguousarray(rgb), labels[index], [str(i) for i in range(10)])
