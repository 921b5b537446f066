from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import quick_config

from edge_m2kd.config import LearnerConfig
from edge_m2kd.learner import Learner
from edge_m2kd.snapshots import PackedSnapshots, make_store, pack_bits, prunable_names, unpack_bits


def test_bit_packing_round_trips_at_every_width():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        values = rng.integers(0, 2**bits, 1001).astype(np.uint8)
        packed = pack_bits(values, bits)
        assert packed.nbytes == -(-1001 * bits // 8)
        assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def run_steps(policy, data, steps=3, method="m2kd"):
    learner = Learner(quick_config(method, policy))
    for k in range(steps):
        learner.step(data, data.class_names[2 * k : 2 * k + 2])
    return learner


@pytest.fixture(scope="module")
def packed(blob_data):
    return run_steps("packed", blob_data)


@pytest.mark.parametrize("policy", ["full", "sparse"])
def test_every_policy_rebuilds_each_snapshot_exactly(policy, blob_data):
    learner = run_steps(policy, blob_data)
    results = learner.store.verify()
    assert [r.step for r in results] == [1, 2, 3]
    assert all(r.ok for r in results), results


def test_packed_snapshots_are_exact_and_small(packed):
    results = packed.store.verify()
    assert all(r.ok and r.max_abs_diff <= 1e-5 for r in results), results
    rows = packed.store.bytes_report()
    assert all(r.bytes < 0.1 * r.full_copy_bytes for r in rows)
    assert packed.store.owner_bits() == 2  # ceil(log2(3 + 1))


def test_flipping_one_owner_entry_fails_verification(packed):
    store: PackedSnapshots = packed.store
    name = prunable_names(packed.model)[3]
    owner = store.owner[name]
    # Give a weight owned by step 1 to step 2: snapshot 1 loses it and no longer matches.
    idx = int((owner.flatten() == 1).nonzero()[0])
    saved = owner.flatten()[idx].item()
    owner.view(-1)[idx] = 2
    try:
        assert not store.verify()[0].ok
    finally:
        owner.view(-1)[idx] = saved
    assert all(r.ok for r in store.verify())


def test_owned_weights_stay_bit_identical_through_a_later_step(blob_data):
    learner = run_steps("packed", blob_data, steps=2)
    params = dict(learner.model.named_parameters())
    before = {n: (params[n].detach().clone(), learner.store.owner[n].clone()) for n in learner.store.owner}
    learner.step(blob_data, blob_data.class_names[4:6])
    params = dict(learner.model.named_parameters())
    moved_free = 0
    for n, (w, owner) in before.items():
        owned = owner > 0
        assert torch.equal(params[n].detach()[owned], w[owned]), n
        moved_free += int((params[n].detach()[~owned] != w[~owned]).sum())
    assert moved_free > 0  # the free weights did learn


def test_packed_store_capacity_shares(packed):
    store = packed.store
    assert 0.0 <= store.free_fraction() < 1.0
    assert store.share(1) == store.cfg.first_step_share
    # the last planned step takes whatever is still free
    assert store.free_fraction() == 0.0


def test_a_later_step_share_leaves_the_later_steps_free_weights(blob_data):
    """Step 2 of 3 keeps later_step_share of every tensor, not an equal part of the rest (0.35),
    so step 3 learns with 1 - 0.3 - 0.1 of the weights free instead of 0.35."""
    learner = Learner(quick_config("m2kd", "packed", snapshots={"later_step_share": 0.1}))
    for k in range(2):
        learner.step(blob_data, blob_data.class_names[2 * k : 2 * k + 2])
    owner = learner.store.owner
    total = sum(o.numel() for o in owner.values())
    assert sum(int((o == 2).sum()) for o in owner.values()) / total == pytest.approx(0.1, abs=0.01)
    assert learner.store.free_fraction() == pytest.approx(0.6, abs=0.01)


def test_the_later_step_share_is_capped_so_the_planned_steps_fit():
    cfg = quick_config("m2kd", "packed").snapshots
    many = PackedSnapshots(replace(cfg, planned_steps=30, later_step_share=0.05), quick_config().model)
    assert many.share(2) == pytest.approx(0.7 / 29)  # 0.05 x 29 later steps would not fit in 0.7
    equal = PackedSnapshots(replace(cfg, planned_steps=3, later_step_share=None), quick_config().model)
    assert equal.share(2) == pytest.approx(0.35)


def test_a_config_saved_before_later_step_share_keeps_the_equal_share():
    saved = quick_config("m2kd", "packed").to_dict()
    assert LearnerConfig.from_dict(saved).snapshots.later_step_share == 0.05
    del saved["snapshots"]["later_step_share"]
    assert LearnerConfig.from_dict(saved).snapshots.later_step_share is None


def test_state_round_trip_keeps_every_snapshot(packed):
    tensors, meta = packed.store.state()
    fresh = make_store(packed.cfg.snapshots, packed.cfg.model)
    fresh.load(tensors, meta, packed.model)
    for k in (1, 2, 3):
        a, b = fresh.teacher(k), packed.store.teacher(k)
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), (k, n)


def test_packed_on_a_pretrained_base_keeps_each_steps_largest_changes(blob_data):
    """With a base (the pretrained weights), a weight no step owns holds its base value, not 0:
    snapshot k is the base plus the changes of steps 1..k, rebuilt exactly."""
    cfg = quick_config("m2kd", "packed")
    learner = Learner(cfg)
    torch.manual_seed(3)
    base = {n: torch.randn_like(p) * 0.05 for n, p in learner.model.named_parameters() if n in prunable_names(learner.model)}
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            if n in base:
                p.copy_(base[n])  # the run starts from the base, as from pretrained weights
    learner.store.base_weights = lambda: base
    for k in range(2):
        learner.step(blob_data, blob_data.class_names[2 * k : 2 * k + 2])
    store = learner.store
    assert all(r.ok for r in store.verify())
    one = store.teacher(1).state_dict()
    for n, owner in store.owner.items():
        unowned_at_1 = (owner == 0) | (owner > 1)
        assert torch.equal(one[n][unowned_at_1], base[n][unowned_at_1]), n
        owned = owner == 1
        assert owned.any() and not torch.equal(one[n][owned], base[n][owned])  # real changes kept


def test_learner_state_round_trip(packed):
    """Learner.state() and from_state(): what a workspace writes and reads back."""
    tensors, meta = packed.state()
    back = Learner.from_state(packed.cfg, tensors, meta)
    assert back.class_names == packed.class_names and back.groups == packed.groups
    assert torch.equal(back.class_means, packed.class_means)
    assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(), packed.model.state_dict().values()))
    assert all(np.array_equal(back.memory.images[c], packed.memory.images[c]) for c in packed.memory.images)
    assert all(r.ok for r in back.store.verify())



@pytest.mark.parametrize("prune_distill", [False, True])
def test_prune_finetuning_can_distill_the_unpruned_model(blob_data, monkeypatch, prune_distill):
    calls = []
    original = Learner._train

    def spy(self, model, images, labels, teachers, terms, *rest):
        calls.append((sorted(teachers.steps) if teachers is not None else [], list(terms)))
        return original(self, model, images, labels, teachers, terms, *rest)

    monkeypatch.setattr(Learner, "_train", spy)
    learner = Learner(quick_config("m2kd", "packed", epochs=1, snapshots={"prune_distill": prune_distill},
                                   train={"teacher_precision": "fp32"}))  # plain teachers, whose steps we read
    learner.step(blob_data, ["c0", "c1"])
    learner.step(blob_data, ["c2", "c3"])
    (_, train_terms), (ft_teachers, ft_terms) = calls[2:]  # step 2: training, then the prune fine-tuning
    if prune_distill:  # the step's own unpruned model teaches every class, beside the step's own terms
        assert ft_teachers == [1, 2] and ft_terms == [*train_terms, (2, [0, 1, 2, 3])]
    else:
        assert ft_terms == train_terms
    assert all(v.ok for v in learner.store.verify())
