"""Shared fixtures."""

import pytest
from helpers import blobs

from edge_m2kd.data.sources import ImageSet


@pytest.fixture(scope="session")
def blob_data() -> ImageSet:
    return blobs()
