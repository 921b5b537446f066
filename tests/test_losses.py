import pytest
import torch

from edge_m2kd.config import LossConfig, method_config
from edge_m2kd.losses import distill_weight, group_kd, m2kd_loss, pod_spatial, teacher_terms
from edge_m2kd.models import NetOutput

GROUPS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_group_kd_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(8, 3)
    assert group_kd(z, z.clone(), 2.0).abs().item() < 1e-6
    assert group_kd(z, z + torch.randn(8, 3), 2.0).item() > 1e-3


def test_group_kd_reads_only_the_given_columns():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    t2 = t.clone()
    t2[:, 2:] += 5.0  # change columns outside the group
    assert torch.allclose(group_kd(s[:, :2], t[:, :2], 2.0), group_kd(s[:, :2], t2[:, :2], 2.0))


def test_multi_model_terms_ask_every_snapshot_about_its_own_group():
    terms = teacher_terms(4, GROUPS, LossConfig())
    assert terms == [(1, [0, 1]), (2, [2, 3]), (3, [4, 5])]


def test_conventional_terms_ask_only_the_last_model_about_all_old_classes():
    cfg = method_config("icarl").loss
    assert teacher_terms(4, GROUPS, cfg) == [(3, [0, 1, 2, 3, 4, 5])]
    assert teacher_terms(1, GROUPS, cfg) == []
    assert teacher_terms(4, GROUPS, method_config("finetune").loss) == []


def _out(logits, aux):
    return NetOutput(logits, aux, torch.zeros(len(logits), 4))


def test_loss_uses_only_the_named_teachers():
    torch.manual_seed(0)
    cfg = LossConfig(multi_model=True, multi_level=True, distill_scope="own")
    student = _out(torch.randn(5, 6), [torch.randn(5, 6)])
    y = torch.randint(0, 6, (5,))
    terms = teacher_terms(3, GROUPS, cfg)
    teachers = {1: _out(torch.randn(5, 2), [torch.randn(5, 2)]), 2: _out(torch.randn(5, 4), [torch.randn(5, 4)])}
    base = m2kd_loss(student, y, terms, teachers, cfg)
    assert base.mm > 0 and base.ml > 0
    # An extra teacher the terms do not name changes nothing.
    extra = {**teachers, 7: _out(torch.randn(5, 6), [torch.randn(5, 6)])}
    assert m2kd_loss(student, y, terms, extra, cfg).total.item() == base.total.item()
    # A teacher that agrees with the student on its own group contributes nothing.
    agree = {1: _out(student.logits[:, :2].clone(), [student.aux_logits[0][:, :2].clone()]),
             2: _out(student.logits[:, :4].clone(), [student.aux_logits[0][:, :4].clone()])}
    same = m2kd_loss(student, y, terms, agree, cfg)
    assert abs(same.mm) < 1e-6 and abs(same.ml) < 1e-6
    # Teacher 2 is asked about classes 2,3 only: changing its columns 0,1 changes nothing.
    moved = {1: teachers[1], 2: _out(teachers[2].logits + torch.tensor([9.0, -9.0, 0, 0]), teachers[2].aux_logits)}
    assert abs(m2kd_loss(student, y, terms, moved, cfg).mm - base.mm) < 1e-6


def test_sum_reduction_gives_every_old_group_weight_one():
    torch.manual_seed(0)
    mean_cfg = LossConfig(distill_scope="own")
    sum_cfg = LossConfig(distill_reduction="sum", distill_scope="own")
    student = _out(torch.randn(5, 6), [torch.randn(5, 6), torch.randn(5, 6)])
    y = torch.randint(0, 6, (5,))
    terms = teacher_terms(3, GROUPS, mean_cfg)  # two old groups
    teachers = {k: _out(torch.randn(5, 2 * k), [torch.randn(5, 2 * k), torch.randn(5, 2 * k)]) for k in (1, 2)}
    mean = m2kd_loss(student, y, terms, teachers, mean_cfg)
    total = m2kd_loss(student, y, terms, teachers, sum_cfg)
    assert abs(total.mm - 2 * mean.mm) < 1e-5 and abs(total.ml - 2 * mean.ml) < 1e-5
    # The sum of the terms, each the mean over its levels, in full.
    by_hand = sum(group_kd(student.logits[:, cols], teachers[k].logits[:, cols], 2.0) for k, cols in terms)
    assert abs(total.mm - float(by_hand)) < 1e-5
    with pytest.raises(ValueError, match="distill_reduction"):
        m2kd_loss(student, y, terms, teachers, LossConfig(distill_reduction="max"))


def test_own_plus_rest_gives_a_one_class_group_a_real_term():
    """A one-class group: "own" is identically zero, "own+rest" is a two-way distribution that
    is zero when student and teacher agree and positive when they do not."""
    torch.manual_seed(0)
    groups = [[0, 1], [2]]
    own, rest = LossConfig(distill_scope="own"), LossConfig(distill_scope="own+rest")
    assert teacher_terms(3, groups, rest) == [(1, [0, 1]), (2, [2])]
    y = torch.zeros(6, dtype=torch.long)
    student = _out(torch.randn(6, 4), [])
    teacher_2 = torch.randn(6, 3)  # snapshot 2 knew classes 0, 1, 2
    disagree = {2: _out(teacher_2, [])}
    terms = [(2, [2])]
    assert m2kd_loss(student, y, terms, disagree, own).mm == 0.0
    assert m2kd_loss(student, y, terms, disagree, rest).mm > 1e-3
    agree = {2: _out(student.logits[:, :3].clone(), [])}
    assert abs(m2kd_loss(student, y, terms, agree, rest).mm) < 1e-6


def test_the_rest_column_pools_the_other_classes_the_teacher_knew():
    from edge_m2kd.losses import scoped_logits

    z = torch.randn(5, 6)
    T = 2.0
    got = scoped_logits(z, [2, 3], 4, "own+rest", T)  # the teacher knew classes 0..3
    assert got.shape == (5, 3)
    assert torch.allclose(got[:, :2], z[:, [2, 3]])
    assert torch.allclose(got[:, 2], T * torch.logsumexp(z[:, [0, 1]] / T, dim=1))
    # the softmax over [own, rest] is the softmax over classes 0..3 with 0 and 1 merged
    p = torch.softmax(z[:, :4] / T, dim=1)
    q = torch.softmax(got / T, dim=1)
    assert torch.allclose(q[:, 2], p[:, 0] + p[:, 1], atol=1e-6)
    assert torch.equal(scoped_logits(z, [2, 3], 4, "own", T), z[:, [2, 3]])


def test_all_known_scope_asks_each_snapshot_about_every_class_it_knew():
    cfg = LossConfig(distill_scope="all-known")
    assert teacher_terms(3, GROUPS, cfg) == [(1, [0, 1]), (2, [0, 1, 2, 3])]


def test_pod_distills_the_newest_snapshots_pooled_maps():
    torch.manual_seed(0)
    cfg = LossConfig(feature_distill="pod", multi_model=False, multi_level=False, last_model_all_old=True)
    maps = [torch.randn(4, 3, 5, 5), torch.randn(4, 6, 2, 2)]
    student = NetOutput(torch.randn(4, 4), [], torch.zeros(4, 6), [m.clone().requires_grad_() for m in maps])
    y = torch.randint(0, 4, (4,))
    terms = teacher_terms(2, [[0, 1], [2, 3]], cfg)
    same = m2kd_loss(student, y, terms, {1: NetOutput(torch.randn(4, 2), [], torch.zeros(4, 6), maps)}, cfg)
    assert abs(same.pod) < 1e-6
    # A different map costs something, and the gradient reaches the student's maps.
    other = [torch.randn_like(m) for m in maps]
    moved = m2kd_loss(student, y, terms, {1: NetOutput(torch.randn(4, 2), [], torch.zeros(4, 6), other)}, cfg)
    assert moved.pod > 1e-2
    moved.total.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student.maps)
    # Each axis profile is compared in place: the mirrored map differs, a uniform scale does not.
    assert pod_spatial(maps[0], maps[0].flip(2).flip(3)) > 1e-2
    assert pod_spatial(maps[0], 3 * maps[0]) < 1e-6
    with pytest.raises(ValueError, match="stage maps"):
        m2kd_loss(student, y, terms, {1: NetOutput(torch.randn(4, 2), [], torch.zeros(4, 6))}, cfg)


def test_adaptive_weight_scales_distillation_by_sqrt_old_over_new():
    assert distill_weight(LossConfig(distill_weight="adaptive"), 9, 1) == pytest.approx(3.0)
    assert distill_weight(LossConfig(distill_weight="adaptive"), 8, 2) == pytest.approx(2.0)
    assert distill_weight(LossConfig(distill_weight="fixed"), 9, 1) == 1.0
    torch.manual_seed(1)
    student = _out(torch.randn(5, 3), [])
    teachers = {1: _out(torch.randn(5, 2), [])}
    y = torch.randint(0, 3, (5,))
    terms = teacher_terms(2, [[0, 1], [2]], LossConfig())
    fixed = m2kd_loss(student, y, terms, teachers, LossConfig(multi_level=False, distill_weight="fixed"))
    adaptive = m2kd_loss(student, y, terms, teachers, LossConfig(multi_level=False, distill_weight="adaptive"))
    assert adaptive.mm == pytest.approx(fixed.mm)  # the term itself is the same ...
    assert (adaptive.total - adaptive.cls).item() == pytest.approx(2 ** 0.5 * (fixed.total - fixed.cls).item())
    with pytest.raises(ValueError, match="distill_weight"):
        distill_weight(LossConfig(distill_weight="grow"), 2, 2)


def test_m2kd_weights_distillation_adaptively_and_the_single_teacher_methods_do_not():
    # Chosen on validation per method (config.py): M2KD adaptive, iCaRL and LwF fixed.
    assert method_config("m2kd").loss.distill_weight == "adaptive"
    assert method_config("m2kd-multi-model").loss.distill_weight == "adaptive"
    assert {method_config(m).loss.distill_weight for m in ("icarl", "lwf")} == {"fixed"}
