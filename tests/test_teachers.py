import pytest
import torch
from helpers import quick_config

import edge_m2kd.learner as learner_module
from edge_m2kd.models import IncrementalNet
from edge_m2kd.teachers import FoldedTeachers, SeparateTeachers, StackedTeachers, fold_bn


def trained_like(backbone: str, n_classes: int, seed: int, **kw) -> IncrementalNet:
    torch.manual_seed(seed)
    net = IncrementalNet(backbone, **kw)
    net.add_classes(n_classes)
    for m in net.modules():  # BatchNorm statistics away from their defaults, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_fold_bn_matches_conv_then_bn():
    net = trained_like("resnet20", 2, 0)
    block = net.backbone.stages[1][0]
    x = torch.randn(3, 16, 8, 8)
    w, b = fold_bn(block.conv1, block.bn1)
    expected = block.bn1(block.conv1(x))
    folded = torch.nn.functional.conv2d(x, w, b, block.conv1.stride, block.conv1.padding)
    assert torch.allclose(folded, expected, atol=1e-5)


@pytest.mark.parametrize("backbone, kw, size", [("resnet20", {}, 16), ("resnet18", {}, 64),
                                                ("resnet18", {"small_input_stem": True}, 16)])
@pytest.mark.parametrize("k", [1, 3])
def test_stacked_teachers_equal_separate_teachers(backbone, kw, size, k):
    teachers = {step: trained_like(backbone, 2 * step, step, **kw) for step in range(1, k + 1)}
    x = torch.randn(4, 3, size, size)
    with torch.inference_mode():
        expected = SeparateTeachers(teachers)(x)
        got = StackedTeachers(teachers)(x)
        folded = FoldedTeachers(teachers)(x)
    assert sorted(got) == sorted(expected) == sorted(folded) == list(range(1, k + 1))
    for step in expected:
        assert torch.allclose(folded[step].logits, expected[step].logits, atol=1e-4, rtol=1e-4)
        assert got[step].logits.shape == expected[step].logits.shape == (4, 2 * step)
        assert torch.allclose(got[step].logits, expected[step].logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(got[step].aux_logits, expected[step].aux_logits, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        # The stage maps (what feature-map distillation reads) are each teacher's own.
        for a, b in zip(got[step].maps, expected[step].maps, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_stacked_teachers_do_not_mix_channels():
    """Changing teacher 2's weights must not change teacher 1's outputs."""
    teachers = {1: trained_like("resnet20", 2, 1), 2: trained_like("resnet20", 4, 2)}
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        before = StackedTeachers(teachers)(x)
        for p in teachers[2].backbone.parameters():
            p.data.mul_(-3.0)
        after = StackedTeachers(teachers)(x)
    assert torch.equal(before[1].logits, after[1].logits)
    assert not torch.allclose(before[2].logits, after[2].logits)


@pytest.mark.parametrize("feature_distill", ["none", "pod"])
def test_the_loss_gets_teacher_maps_only_when_a_term_reads_them(blob_data, monkeypatch, feature_distill):
    # Stage maps held past the teachers' forward cost memory at the step's peak; only pod reads them.
    seen, loss = [], learner_module.m2kd_loss

    def recording_loss(out, y, terms, teacher_outs, cfg, scale):
        seen.extend(bool(o.maps) for o in teacher_outs.values())
        return loss(out, y, terms, teacher_outs, cfg, scale)

    monkeypatch.setattr(learner_module, "m2kd_loss", recording_loss)
    learner = learner_module.Learner(quick_config("m2kd", epochs=1, loss={"feature_distill": feature_distill}))
    learner.step(blob_data, ["c0", "c1"])
    learner.step(blob_data, ["c2", "c3"])
    assert seen and all(has_maps == (feature_distill == "pod") for has_maps in seen)
