import numpy as np
import torch
import torch.nn.functional as F

from edge_m2kd.config import MemoryConfig
from edge_m2kd.exemplars import ExemplarMemory, herding


def test_herding_running_mean_approaches_class_mean():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(200, 16), dim=1)
    mu = feats.mean(0)
    order = herding(feats, 50)
    assert len(set(order)) == 50
    gaps = [(feats[order[:k]].mean(0) - mu).norm().item() for k in (1, 5, 20, 50)]
    assert gaps == sorted(gaps, reverse=True)
    # far closer than a random subset of the same size
    random_gap = np.mean([(feats[torch.randperm(200)[:20]].mean(0) - mu).norm().item() for _ in range(20)])
    assert gaps[2] < 0.5 * random_gap
    # the first pick is the sample nearest the mean
    assert order[0] == int((feats - mu).norm(dim=1).argmin())


def test_memory_is_equal_per_class_and_shrinks_by_truncation():
    mem = ExemplarMemory(MemoryConfig(total=12))
    rng = np.random.default_rng(0)

    def embed(images):
        return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))

    first = {0: rng.integers(0, 255, (10, 2, 2, 3), dtype=np.uint8), 1: rng.integers(0, 255, (10, 2, 2, 3), dtype=np.uint8)}
    mem.update(first, {c: embed(v) for c, v in first.items()})
    assert {c: len(v) for c, v in mem.images.items()} == {0: 6, 1: 6}
    kept0 = mem.images[0].copy()
    second = {2: rng.integers(0, 255, (10, 2, 2, 3), dtype=np.uint8), 3: rng.integers(0, 255, (10, 2, 2, 3), dtype=np.uint8)}
    mem.update(second, {c: embed(v) for c, v in second.items()})
    assert {c: len(v) for c, v in mem.images.items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    assert np.array_equal(mem.images[0], kept0[:3])
    images, labels = mem.arrays()
    assert images.dtype == np.uint8 and list(labels) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
