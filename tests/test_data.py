"""Tests for edge_m2kd.data: sources, the class-incremental stream, and augmentation."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_cifar100
from PIL import Image

from edge_m2kd.data import (
    ImageSet,
    class_order,
    load_cifar100,
    load_digits,
    load_image_folder,
    load_npz,
    normalize,
    per_class_limit,
    random_crop_flip,
    split_into_steps,
    to_float,
    train_val_split,
)
from edge_m2kd.errors import UserError


def _one_line_error(excinfo: pytest.ExceptionInfo[UserError], *names: str) -> str:
    """The message is one line (the CLI prints it as such) and names what it is about."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


def _solid(mode: str, size: tuple[int, int], value: int | tuple[int, ...]) -> Image.Image:
    return Image.new(mode, size, value)


def _noise_jpeg(path: Path, size: int = 48, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


# ----------------------------------------------------------------------------- ImageSet


def test_imageset_validates_and_selects() -> None:
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    data = ImageSet(images, np.array([0, 1, 2, 1], dtype=np.int32), ["a", "b", "c"])
    assert data.labels.dtype == np.int64 and len(data) == 4
    sub = data.subset(np.array([3, 0]))
    assert sub.labels.tolist() == [1, 0] and np.array_equal(sub.images[1], images[0])
    masked = data.subset(data.labels == 1)
    assert masked.labels.tolist() == [1, 1] and masked.class_names == ["a", "b", "c"]
    only = data.only_classes(["c", "a"])
    assert only.labels.tolist() == [0, 2] and only.class_names == ["a", "b", "c"]
    with pytest.raises(UserError) as exc:
        data.only_classes(["zebra"])
    _one_line_error(exc, "zebra", "a, b, c")
    with pytest.raises(ValueError):
        ImageSet(images.astype(np.float32), data.labels, ["a", "b", "c"])
    with pytest.raises(ValueError):
        ImageSet(images[..., :2], data.labels, ["a", "b", "c"])
    with pytest.raises(ValueError):
        ImageSet(images, np.array([0, 1, 2, 3]), ["a", "b", "c"])  # label 3 out of range
    with pytest.raises(ValueError):
        ImageSet(images, np.array([0, 1, 2]), ["a", "b", "c"])  # length mismatch
    with pytest.raises(ValueError):
        ImageSet(images, data.labels, ["a", "a", "c"])
    empty = data.subset(np.zeros(4, dtype=bool))
    assert len(empty) == 0 and empty.images.shape == (0, 2, 2, 3)


# ----------------------------------------------------------------------------- ImageFolder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes, images of many modes and sizes, plus files a loader must ignore."""
    root = tmp_path / "imgs"
    (root / "zebra").mkdir(parents=True)
    (root / "apple").mkdir()
    (root / ".git").mkdir()  # hidden: not a class
    _solid("RGB", (10, 12), (200, 10, 30)).save(root / "apple" / "a0.png")
    _solid("L", (5, 5), 77).save(root / "apple" / "a1.JPG", quality=100)
    _solid("RGBA", (20, 7), (1, 2, 3, 128)).save(root / "apple" / "a2.png")
    _solid("P", (9, 9), 0).save(root / "apple" / "a3.gif")
    _solid("CMYK", (8, 8), (0, 0, 0, 0)).save(root / "apple" / "a4.tiff")
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(root / "apple" / "a5.png")  # 16-bit
    (root / "apple" / "README.txt").write_text("not an image, ignored")
    (root / "apple" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "apple" / "._a0.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    _solid("RGB", (33, 40), (0, 255, 0)).save(root / "zebra" / "z1.bmp")
    _solid("RGB", (8, 8), (0, 0, 255)).save(root / "zebra" / "z0.webp", lossless=True)
    _solid("L", (4, 4), 9).save(root / "zebra" / "z2.ppm")
    return root


def test_image_folder_any_mode_any_size(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ignored files must not warn
        data = load_image_folder(folder, size=8)
    assert data.class_names == ["apple", "zebra"]
    assert data.images.shape == (9, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [0] * 6 + [1] * 3
    px = data.images[:, 4, 4].tolist()
    # sorted file order: a0.png a1.JPG a2.png a3.gif a4.tiff a5.png | z0.webp z1.bmp z2.ppm
    assert px[0] == [200, 10, 30]
    assert all(abs(v - 77) <= 1 for v in px[1])  # L -> grey RGB (JPEG round trip)
    assert px[2] == [1, 2, 3]  # alpha dropped
    assert px[4] == [255, 255, 255]  # CMYK 0,0,0,0 is white
    assert px[5] == [255, 255, 255]  # 16-bit full scale, not clipped garbage
    assert px[6] == [0, 0, 255] and px[7] == [0, 255, 0] and px[8] == [9, 9, 9]


def test_image_folder_applies_exif_orientation(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:, :32] = (255, 0, 0)  # left red
    img[:, 32:] = (0, 0, 255)  # right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    Image.fromarray(img).save(tmp_path / "cls" / "photo.jpg", quality=95, exif=exif)
    shown = load_image_folder(tmp_path, size=16).images[0].astype(int)
    # Displayed upright, red is on top and blue at the bottom.
    assert shown[2, 8, 0] > 200 and shown[2, 8, 2] < 50
    assert shown[13, 8, 2] > 200 and shown[13, 8, 0] < 50


def test_image_folder_large_files_keep_order(tmp_path: Path) -> None:
    """Files big enough for the threaded decode path still come back in sorted order."""
    rng = np.random.default_rng(2)
    expected = []
    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # noise PNG: ~49 KB
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
            expected.append((cls, i, pixels))
    data = load_image_folder(tmp_path, size=128)
    expected.sort(key=lambda e: (e[0], e[1]))
    assert data.labels.tolist() == [0] * 4 + [1] * 4
    for got, (_, _, pixels) in zip(data.images, expected, strict=True):
        assert np.array_equal(got, pixels)


def test_image_folder_restrict_classes(folder: Path) -> None:
    data = load_image_folder(folder, size=4, classes=["zebra", "apple"])
    assert data.class_names == ["apple", "zebra"]  # sorted whatever the order given
    only = load_image_folder(folder, size=4, classes=["zebra"])
    assert only.class_names == ["zebra"] and len(only) == 3 and only.labels.tolist() == [0, 0, 0]
    again = load_image_folder(folder, size=4, classes=["zebra"])
    assert np.array_equal(only.images, again.images)


def test_image_folder_class_errors(folder: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_image_folder(folder, 8, classes=["apple", "apple"])
    assert "class 'apple' given twice" in _one_line_error(exc, "apple")
    with pytest.raises(UserError) as exc:
        load_image_folder(folder, 8, classes=["pear"])
    _one_line_error(exc, "pear", "apple, zebra")


def test_image_folder_path_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_image_folder(tmp_path / "nowhere", 8)
    _one_line_error(exc, "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError) as exc:
        load_image_folder(tmp_path / "file.txt", 8)
    _one_line_error(exc, "file.txt")
    flat = tmp_path / "flat"
    flat.mkdir()
    _solid("RGB", (4, 4), (0, 0, 0)).save(flat / "img.png")
    (flat / ".hidden").mkdir()
    with pytest.raises(UserError) as exc:
        load_image_folder(flat, 8)
    _one_line_error(exc, "flat", "class")


def test_image_folder_empty_class(folder: Path) -> None:
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError) as exc:
        load_image_folder(folder, 8)
    assert "has no readable image" in _one_line_error(exc, "empty")


def test_image_folder_corrupt_files(folder: Path) -> None:
    fake = folder / "zebra" / "fake.png"
    fake.write_bytes(b"this is text, not a PNG")
    good = folder / "zebra" / "big.jpg"
    _noise_jpeg(good)
    truncated = folder / "zebra" / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    with pytest.warns(UserWarning) as record:
        data = load_image_folder(folder, 8)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert any(f"skipped unreadable image {fake}" in m for m in messages)
    assert any(f"skipped unreadable image {truncated}" in m for m in messages)
    assert len(data) == 9 + 1  # the fixture's nine plus big.jpg

    with pytest.raises(UserError) as exc:
        load_image_folder(folder, 8, on_corrupt="error")
    _one_line_error(exc, "cut.jpg")  # sorted order: big, cut, fake
    fake.unlink()
    truncated.unlink()
    fake2 = folder / "apple" / "zz.jpeg"
    fake2.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(UserError) as exc:
        load_image_folder(folder, 8, on_corrupt="error")
    _one_line_error(exc, "zz.jpeg")


def test_image_folder_only_corrupt_images(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.png").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="broken.png"), pytest.raises(UserError) as exc:
        load_image_folder(tmp_path, 8)
    assert "has no readable image" in _one_line_error(exc, "cls")


# ----------------------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar100_round_trip(tmp_path: Path, protocol: int, str_keys: bool) -> None:
    root = tmp_path / "cifar-100-python"
    data = fake_cifar100(root, protocol=protocol, str_keys=str_keys)
    for split in ("train", "test"):
        ds = load_cifar100(root, split)
        assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.images[0, 1, 2].tolist() == [11, 22, 33]
        assert np.array_equal(ds.images[3, :, :, 1].ravel(), data[3, 1024:2048])  # G plane
        assert ds.labels.tolist() == [0, 1, 2, 3, 4]
        assert len(ds.class_names) == 100 and ds.class_names[7] == "class_7"
    # The folder the tarball was extracted into works too.
    assert len(load_cifar100(tmp_path, "train")) == 5


def test_cifar100_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_cifar100(tmp_path, "train")
    _one_line_error(exc, "train")


class _Evil:
    def __init__(self, fn: object, args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar100_malicious_pickle_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    fake_cifar100(tmp_path)
    payloads = [
        (os.system, (f"touch {marker}",), "system"),
        (builtins.eval, (f"open({str(marker)!r}, 'w')",), "eval"),
        (subprocess.Popen, (["touch", str(marker)],), "Popen"),
    ]
    for fn, args, name in payloads:
        evil = {b"data": _Evil(fn, args), b"fine_labels": [0]}
        with open(tmp_path / "train", "wb") as fh:
            pickle.dump(evil, fh, protocol=protocol)
        with pytest.raises(UserError) as exc:
            load_cifar100(tmp_path, "train")
        assert "refused global" in _one_line_error(exc, name, "train")
        assert not marker.exists()
    # A malicious meta is refused as well, not only the data files.
    with open(tmp_path / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": _Evil(os.system, (f"touch {marker}",))}, fh, protocol=protocol)
    fake_cifar100(tmp_path / "x")  # fresh train/test
    (tmp_path / "x" / "meta").write_bytes((tmp_path / "meta").read_bytes())
    with pytest.raises(UserError, match="refused global"):
        load_cifar100(tmp_path / "x", "test")
    assert not marker.exists()


def test_cifar100_garbage_file(tmp_path: Path) -> None:
    fake_cifar100(tmp_path)
    (tmp_path / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError) as exc:
        load_cifar100(tmp_path, "test")
    _one_line_error(exc, "test")


# ----------------------------------------------------------------------------- NPZ


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["cat", "dog", "owl"]))
    ds = load_npz(tmp_path / "d.npz")
    assert np.array_equal(ds.images, x) and ds.labels.tolist() == y.tolist()
    assert ds.labels.dtype == np.int64 and ds.class_names == ["cat", "dog", "owl"]

    np.savez(tmp_path / "g.npz", x=x[..., 0], y=np.array([0, 3, 3, 0, 1, 1]))
    grey = load_npz(tmp_path / "g.npz")
    assert grey.images.shape == (6, 5, 4, 3) and np.array_equal(grey.images[..., 2], x[..., 0])
    assert grey.class_names == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((2, 4, 4, 4), np.uint8), "y": np.zeros(2, np.int64)}, "(2, 4, 4, 4)"),
        ({"x": np.zeros((2, 3, 8, 8), np.uint8), "y": np.zeros(2, np.int64)}, "transpose"),
        ({"x": np.zeros((2, 4, 4, 3), np.float32), "y": np.zeros(2, np.int64)}, "uint8"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(3, np.int64)}, "y has shape"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8)}, "no array 'y'"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 2]), "classes": np.array(["a", "b"])}, "label 2"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 1]), "classes": np.array([1, 2], dtype=object)}, "bad.npz"),
    ],
)
def test_npz_bad_input(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # the object array is pickled here; loading must refuse it
    with pytest.raises(UserError) as exc:
        load_npz(path)
    _one_line_error(exc, "bad.npz", needle)


def test_npz_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_npz(tmp_path / "none.npz")
    _one_line_error(exc, "none.npz")


# ----------------------------------------------------------------------------- digits


def test_digits_split() -> None:
    train = load_digits("train")
    test = load_digits("test")
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert train.class_names == [str(i) for i in range(10)]
    assert len(train) + len(test) == 1797 and len(test) == 450
    # stratified: every class is in the test part in about a quarter of its count
    counts = np.bincount(test.labels, minlength=10) / np.bincount(
        np.concatenate([train.labels, test.labels]), minlength=10
    )
    assert np.all(np.abs(counts - 0.25) < 0.02)
    again = load_digits("test")
    assert np.array_equal(again.images, test.images) and np.array_equal(again.labels, test.labels)
    other = load_digits("test", seed=1)
    assert not np.array_equal(other.labels, test.labels)
    raw = load_digits("train", size=8)
    assert raw.images.shape[1:] == (8, 8, 3) and raw.images.max() == 255
    assert np.array_equal(raw.images[..., 0], raw.images[..., 2])  # grey as RGB


# ----------------------------------------------------------------------------- stream


def test_class_order() -> None:
    names = [f"c{i}" for i in range(20)]
    assert class_order(names, None) == names
    a = class_order(names, 1993)
    assert a == class_order(names, 1993) and sorted(a) == sorted(names) and a != names
    assert a != class_order(names, 7)
    with pytest.raises(ValueError):
        class_order(["a", "a"], 0)


def test_split_into_steps() -> None:
    order = [str(i) for i in range(100)]
    steps = split_into_steps(order, 50, 10)
    assert [len(s) for s in steps] == [50] + [10] * 5
    assert sum(steps, []) == order
    assert split_into_steps(order[:10], 2, 2) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"], ["8", "9"]]
    assert split_into_steps(order[:4], 4, 3) == [order[:4]]
    for first, per in [(50, 7), (0, 10), (101, 10), (50, 0), (-1, 5)]:
        with pytest.raises(ValueError):
            split_into_steps(order, first, per)


def _toy(counts: list[int]) -> ImageSet:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.zeros((len(labels), 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels)) % 256  # identifies the sample
    images[:, 0, 0, 1] = np.arange(len(labels)) // 256
    return ImageSet(images, labels, [f"k{i}" for i in range(len(counts))])


def _ids(data: ImageSet) -> set[int]:
    return set((data.images[:, 0, 0, 0].astype(int) + 256 * data.images[:, 0, 0, 1].astype(int)).tolist())


def test_train_val_split_stratified() -> None:
    data = _toy([100, 40, 3, 2, 1])
    train, val = train_val_split(data, 0.1, seed=0)
    assert np.bincount(val.labels, minlength=5).tolist() == [10, 4, 1, 1, 0]
    assert np.bincount(train.labels, minlength=5).tolist() == [90, 36, 2, 1, 1]
    assert _ids(train).isdisjoint(_ids(val)) and _ids(train) | _ids(val) == _ids(data)
    assert np.all(np.diff(train.labels) >= 0)  # data order kept
    again_train, again_val = train_val_split(data, 0.1, seed=0)
    assert _ids(again_val) == _ids(val)
    assert _ids(train_val_split(data, 0.1, seed=1)[1]) != _ids(val)
    # A class's val samples do not depend on which other classes are present.
    alone = train_val_split(data.only_classes(["k0"]), 0.1, seed=0)[1]
    assert _ids(alone) == _ids(val.only_classes(["k0"]))
    train0, val0 = train_val_split(data, 0.0, seed=0)
    assert len(val0) == 0 and len(train0) == len(data) and val0.class_names == data.class_names
    with pytest.raises(ValueError):
        train_val_split(data, 1.0, seed=0)


def test_per_class_limit() -> None:
    data = _toy([50, 5, 20])
    limited = per_class_limit(data, 10, seed=3)
    assert np.bincount(limited.labels).tolist() == [10, 5, 10]
    assert _ids(limited) == _ids(per_class_limit(data, 10, seed=3))
    assert _ids(limited) != _ids(per_class_limit(data, 10, seed=4))
    assert _ids(limited.only_classes(["k0"])) != set(range(10))  # random, not the first files
    assert per_class_limit(data, None, seed=0) is data
    with pytest.raises(ValueError):
        per_class_limit(data, 0, seed=0)


# ----------------------------------------------------------------------------- augment


def test_to_float_and_normalize() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 128, 255]
    x = to_float(images)
    assert x.shape == (2, 3, 3, 4) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    assert torch.allclose(x[1, 2, 1, 3] * 255, torch.tensor(float(images[1, 1, 3, 2])))
    assert torch.equal(to_float(torch.from_numpy(images)), x)
    readonly = images.copy()
    readonly.flags.writeable = False
    assert torch.equal(to_float(readonly), x)
    with pytest.raises(ValueError):
        to_float(images.astype(np.float32))
    y = normalize(x, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert torch.allclose(y[:, 0], (x[:, 0] - 0.5) / 0.25) and torch.allclose(y[:, 2], x[:, 2] - 0.5)
    with pytest.raises(ValueError):
        normalize(x, [0.5], [1.0])


def test_crop_flip_identity_and_flip() -> None:
    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(random_crop_flip(x, 0, False), x)
    out = random_crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same | flipped)
    assert 10 < int(flipped.sum()) < 54  # p = 0.5 per sample


def test_crop_is_a_window_of_the_padded_image() -> None:
    n, pad = 32, 3
    x = torch.rand(n, 3, 10, 12)
    out = random_crop_flip(x, pad, flip=True, generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    seen = set()
    for i in range(n):
        matches = []
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                window = padded[i, :, dy : dy + 10, dx : dx + 12]
                for f in (False, True):
                    if torch.equal(out[i], window.flip(2) if f else window):
                        matches.append((dy, dx, f))
        assert len(matches) == 1, f"sample {i} is not one window of its padded image"
        seen.add(matches[0])
    assert len(seen) > 10  # offsets and flips vary per sample
    again = random_crop_flip(x, pad, flip=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, out)
