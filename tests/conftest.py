"""Shared fixtures."""

import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import blobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from fetch_test_weights import mobilenet_v2_weights  # noqa: E402

from edge_m2kd.data.sources import ImageSet


@pytest.fixture(scope="session")
def blob_data() -> ImageSet:
    return blobs()


@pytest.fixture(scope="session")
def mobilenet_v2_pth() -> Path:
    """torchvision's published mobilenet_v2-b0353104.pth (fetched once, see scripts/)."""
    return mobilenet_v2_weights()


@pytest.fixture
def imagenet_hub(tmp_path, monkeypatch, mobilenet_v2_pth) -> Path:
    """A temporary torch hub cache holding the published file, so `--pretrained imagenet`
    goes through torch.hub's real loading path without a network."""
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(mobilenet_v2_pth, checkpoints / mobilenet_v2_pth.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return checkpoints / mobilenet_v2_pth.name


@pytest.fixture(scope="session")
def cifar_mini(tmp_path_factory) -> Path:
    """800 CIFAR-10 JPEGs (train: 50 per class, test: 30 per class), unpacked from tests/data."""
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(Path(__file__).parent / "data" / "cifar10-mini.tar.gz") as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10-mini"
