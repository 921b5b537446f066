"""The training-peak prediction (edge_m2kd/memory.py, commands._PeakModel): what it counts, and
that it counts nothing twice. The prediction against a measured peak is benchmarks/memory_check.py."""

from __future__ import annotations

import copy

import numpy as np
import torch
from helpers import blobs, quick_config

from edge_m2kd import commands
from edge_m2kd.learner import Learner
from edge_m2kd.memory import GLIBC_MMAP_THRESHOLD_MAX, activation_profile, predict_training_peak


def _learner(**model) -> Learner:
    learner = Learner(quick_config(model=model))
    learner.model.add_classes(2)
    return learner


def _saved_at(model, size: int, batch: int) -> int:
    """Bytes autograd saves in one forward of `batch` images, the model's weights left out."""
    probe = copy.deepcopy(model).train()
    own = {t.untyped_storage().data_ptr() for t in [*probe.parameters(), *probe.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(torch.zeros(batch, 3, size, size), with_aux=True)
        (out.logits.sum() + sum(a.sum() for a in out.aux_logits)).backward()
    return sum(seen.values())


def test_the_activation_profile_is_exact_at_another_batch_size_and_leaves_the_weights_out():
    learner = _learner()
    profile = activation_profile(learner.model, 16, with_aux=True)
    assert profile.saved_bytes(12) == _saved_at(learner.model, 16, 12)
    # The weights every layer saves are held once whatever the batch: not per image. (The old
    # probe divided them by its batch of 2 and multiplied by the batch size: ResNet-18 at
    # 224 px predicted 90% over its measured peak.)
    weights = sum(p.numel() * 4 for p in learner.model.parameters())
    assert profile.saved_bytes(1) < _saved_at(learner.model, 16, 1) + weights
    assert sum(profile.fixed) < weights // 10


def test_large_tensors_are_not_counted_as_heap():
    learner = _learner(input_size=16)
    profile = activation_profile(learner.model, 16, with_aux=True)
    sizes = profile.sizes(4096)
    assert profile.heap_bytes(4096) == sum(s for s in sizes if s <= GLIBC_MMAP_THRESHOLD_MAX) < sum(sizes)
    peak = predict_training_peak(learner.model, 16, 4096, 10, 0, 0, 0, 0, activations=profile)
    assert peak.parts["allocator"] == profile.heap_bytes(4096)  # HEAP_RETENTION 1.0
    assert peak.parts["activations"] == profile.saved_bytes(4096)


def test_the_runtime_baseline_does_not_count_the_decoded_images_again():
    learner = _learner()
    before = commands._PeakModel(learner, 100).runtime
    decoded = np.ones((400, 224, 224, 3), np.uint8)  # 60 MB, resident (every page written)
    after = commands._PeakModel(learner, 100, 0, decoded.nbytes).runtime
    assert abs(after - before) < 15 * 2**20
    assert decoded.sum() > 0


def test_images_are_counted_once_per_copy_the_step_holds():
    learner = _learner()
    learner.memory.images = {0: np.zeros((5, 16, 16, 3), np.uint8)}
    peak = commands._PeakModel(learner, 100, 10).at(16)
    image = 16 * 16 * 3
    assert peak["images"] == 110 * image  # decoded: training images and the hold-out
    assert peak["training_set"] == 100 * image + 5 * image  # the set it trains on, exemplars included
    assert peak["exemplars"] == 5 * image


def test_the_training_set_is_one_array_in_the_order_the_step_always_used():
    data = blobs(n_per_class=7, n_classes=4)
    learner = Learner(quick_config())
    learner.memory.images = {1: np.full((2, 16, 16, 3), 1, np.uint8), 0: np.full((3, 16, 16, 3), 2, np.uint8)}
    images, labels = learner._training_set(data, {5: "c3", 4: "c1"})
    expected = np.concatenate([data.images[data.labels == 3], data.images[data.labels == 1],
                               learner.memory.images[0], learner.memory.images[1]])
    assert np.array_equal(images, expected) and images.flags.c_contiguous and images.base is None
    assert labels.tolist() == [5] * 7 + [4] * 7 + [0] * 3 + [1] * 2


def test_the_largest_batch_that_fits_is_one_that_was_checked():
    from edge_m2kd.memory import largest_batch_that_fits

    def peak(b: int) -> int:  # not linear: a drop where a tensor leaves the heap, as in the prediction
        return 100 + 10 * b - (40 if b >= 30 else 0)

    fit = largest_batch_that_fits(peak, 400)
    assert peak(fit) <= 400 < peak(fit + 1) and fit == 34
    assert largest_batch_that_fits(peak, 50) == 0
    assert largest_batch_that_fits(lambda b: b, 10**9, upper=64) == 64
