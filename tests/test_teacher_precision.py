"""Teachers in cheaper number formats, the per-phase profile, the teacher-subset estimator."""

import itertools

import numpy as np
import pytest
import torch

from edge_m2kd import teacher_precision as tp
from edge_m2kd.config import TEACHER_PRECISIONS, LossConfig
from edge_m2kd.data.augment import random_crop_flip, random_crop_flip_nhwc
from edge_m2kd.errors import UserError
from edge_m2kd.learner import Learner
from edge_m2kd.losses import m2kd_loss, sample_terms
from edge_m2kd.models import IncrementalNet, NetOutput
from edge_m2kd.preprocess import normalize, to_unit
from edge_m2kd.teachers import FoldedTeachers, SeparateTeachers, StackedTeachers
from tests.helpers import blobs, quick_config

needs_int8 = pytest.mark.skipif(tp.int8_engine() is None, reason="this torch has no quantized CPU kernels")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def trained():
    """A learner after two real steps on blobs (so step 1's snapshot is a trained teacher),
    and batches of its own training images as a step would draw them."""
    learner = Learner(quick_config(epochs=3))
    data = blobs(n_per_class=40)
    learner.step(data, ["c0", "c1"])
    learner.step(data, ["c2", "c3"])
    images = data.images[np.random.default_rng(0).permutation(len(data.images))[:64]]
    gen = torch.Generator().manual_seed(0)
    batches = [(learner._batch(images[i : i + 16], True, gen), []) for i in range(0, 64, 16)]
    return learner, batches


def _teachers(learner: Learner) -> FoldedTeachers:
    return FoldedTeachers({k: learner.store.teacher(k) for k in (1, 2)}).to(memory_format=torch.channels_last)


@needs_int8
def test_int8_teachers_stay_within_tolerance_of_fp32(trained):
    learner, batches = trained
    fp32 = _teachers(learner)
    int8 = tp.build(fp32, "int8", batches[:2])
    assert isinstance(int8, tp.Int8Teachers)
    with torch.inference_mode():
        for x, frozen in batches[2:]:
            ref, got = fp32(x, frozen=frozen), int8(x, frozen=frozen)
            err = tp.logit_error(ref, got, temperature=2.0)
            assert err["kl"] < 0.01 and err["max_abs"] < 0.15 * err["scale"], err
            assert err["max_abs"] > 0  # it really is another number format
            for k in ref:
                assert got[k].logits.dtype == torch.float32 and len(got[k].aux_logits) == len(ref[k].aux_logits)


@needs_int8
def test_int8_teachers_fuse_every_relu_into_its_convolution(trained):
    """Folding leaves an Identity where each BatchNorm was; left in the traced graph it keeps
    conv+ReLU apart, and each ReLU runs as an int8 op of its own."""
    learner, batches = trained
    int8 = tp.build(_teachers(learner), "int8", batches[:2])
    kinds = [type(m).__name__ for net in int8.nets for m in net.int8_stages.modules()]
    assert "ConvReLU2d" in kinds
    assert "ReLU" not in kinds and "Identity" not in kinds, sorted(set(kinds))


@needs_int8
def test_auto_refuses_int8_when_the_tolerance_is_violated(trained):
    learner, batches = trained
    args = dict(device=torch.device("cpu"), batches=lambda n: batches[:n], with_aux=True, temperature=2.0)
    teachers = _teachers(learner)
    kept, choice = tp.prepare(teachers, "auto", tolerance_kl=0.0, **args)
    assert kept is teachers and choice.used == "fp32" and choice.errors["int8"]["kl"] > 0
    assert list(choice.errors) == tp.candidates(torch.device("cpu"))  # every candidate was checked, and refused
    lowered, choice = tp.prepare(teachers, "auto", tolerance_kl=1.0, **args)
    assert isinstance(lowered, tp.Int8Teachers) and choice.used == "int8"
    # a step too small to win back int8's set-up keeps it out of auto
    few = tp.prepare(teachers, "auto", tolerance_kl=1.0, teacher_images=tp.INT8_MIN_IMAGES - 1, **args)[1]
    assert "int8" not in few.errors and few.used == ("bf16" if tp.fast_cpu_bf16() else "fp32")
    # an explicit int8 is used whatever the error, and stacked teachers have no int8 path
    assert tp.prepare(teachers, "int8", tolerance_kl=0.0, **args)[1].used == "int8"
    stacked = StackedTeachers({k: learner.store.teacher(k) for k in (1, 2)})
    assert tp.prepare(stacked, "auto", tolerance_kl=1.0, **args)[1].used == ("bf16" if tp.fast_cpu_bf16() else "fp32")
    with pytest.raises(UserError, match="teacher_mode folded"):
        tp.build(stacked, "int8", batches[:1])


@needs_int8
def test_the_precision_check_builds_no_stage_maps(trained, monkeypatch):
    # The check compares logits only; stage maps would be built (and cast) for nothing.
    learner, batches = trained
    seen, logit_error = [], tp.logit_error

    def recording(reference, got, temperature):
        seen.extend(bool(out.maps) for out in [*reference.values(), *got.values()])
        return logit_error(reference, got, temperature)

    monkeypatch.setattr(tp, "logit_error", recording)
    tp.prepare(_teachers(learner), "auto", torch.device("cpu"), lambda n: batches[:n], True, 2.0, 1.0)
    assert seen and not any(seen)


def test_auto_counts_only_the_images_each_teacher_reads_under_the_subset(trained, monkeypatch):
    """With a random K of n teachers per batch each teacher reads about K/n of the step's images:
    that share, not every image, must win back int8's set-up (INT8_MIN_IMAGES)."""
    learner, _ = trained
    asked: list[int] = []

    def prepare(teachers, *args, teacher_images=None, **kwargs):
        asked.append(teacher_images)
        return teachers, None

    monkeypatch.setattr(tp, "prepare", prepare)
    images = np.zeros((100, 8, 8, 3), np.uint8)
    eight = {k: learner.store.teacher(1) for k in range(1, 9)}
    cfg = learner.cfg
    every = 100 * (cfg.train.epochs + (cfg.snapshots.prune_finetune_epochs if cfg.snapshots.policy != "full" else 0))
    for subset, teachers, expected in [(4, eight, every * 4 // 8), (0, eight, every), (4, {1: eight[1]}, every)]:
        monkeypatch.setattr(cfg.train, "teacher_subset", subset)
        learner._teachers(teachers, images)
        assert asked[-1] == expected


@needs_int8
def test_int8_teachers_traced_once_equal_teachers_traced_alone(trained):
    """The second teacher loads its weights into the first one's traced graph: the same as tracing its own."""
    learner, batches = trained
    both = tp.build(_teachers(learner), "int8", batches[:2])
    alone = tp.build(FoldedTeachers({2: learner.store.teacher(2)}).to(memory_format=torch.channels_last), "int8",
                     batches[:2])
    with torch.inference_mode():
        x = batches[3][0]
        assert torch.equal(both(x)[2].logits, alone(x)[2].logits)
        assert not torch.equal(both(x)[1].logits, alone(x)[2].logits[:, :2])


@needs_int8
def test_int8_teachers_read_the_frozen_stages_of_the_student():
    torch.manual_seed(0)
    net = IncrementalNet("resnet20", frozen_stages=1)
    net.add_classes(4)
    net.eval()
    x = torch.randn(8, 3, 16, 16)
    batches = [(x, net.frozen_outputs(x))]
    int8 = tp.build(FoldedTeachers({1: net}), "int8", batches)
    assert len(int8.nets[0].int8_stages) == 2  # the frozen stage stays float, shared with the student
    with torch.inference_mode():
        ref, got = SeparateTeachers({1: net})(x, frozen=batches[0][1]), int8(x, frozen=batches[0][1])
    assert tp.logit_error(ref, got, 2.0)["max_abs"] < 0.1 * max(1.0, ref[1].logits.abs().max().item())


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cast_teachers_run_in_their_dtype_and_return_fp32(trained, name):
    learner, batches = trained
    fp32 = _teachers(learner)
    lowered = tp.build(fp32, name, batches)
    assert next(lowered.parameters()).dtype == tp.DTYPES[name]
    assert next(fp32.parameters()).dtype == torch.float32  # the fp32 teachers are kept as they were
    x = batches[0][0]
    try:
        with torch.inference_mode():
            got = lowered(x)
    except RuntimeError as e:  # an old torch without half convolutions on the CPU
        pytest.skip(f"{name} does not run on this CPU: {e}")
    with torch.inference_mode():
        ref = fp32(x)
    assert all(o.logits.dtype == torch.float32 and all(a.dtype == torch.float32 for a in o.aux_logits)
               for o in got.values())
    assert tp.logit_error(ref, got, 2.0)["kl"] < 0.01


def test_bf16_stacked_teachers_cast_their_heads_too(trained):
    learner, batches = trained
    stacked = StackedTeachers({k: learner.store.teacher(k) for k in (1, 2)})
    lowered = tp.build(stacked, "bf16", batches)
    with torch.inference_mode():
        got, ref = lowered(batches[0][0]), stacked(batches[0][0])
    assert tp.logit_error(ref, got, 2.0)["kl"] < 0.01


@needs_cuda
def test_auto_picks_fp16_under_cuda(trained):
    learner, batches = trained
    teachers = _teachers(learner).cuda()
    cuda_batches = [(x.cuda(), []) for x, _ in batches]
    lowered, choice = tp.prepare(teachers, "auto", torch.device("cuda"), lambda n: cuda_batches[:n], True, 2.0, 0.01)
    assert choice.used == "fp16" and choice.errors["fp16"]["kl"] < 0.01
    with pytest.raises(UserError, match="CPU only"):
        tp.build(teachers, "int8", cuda_batches)


def test_an_unknown_precision_is_one_line_naming_the_choices():
    with pytest.raises(UserError) as e:
        Learner(quick_config(train={"teacher_precision": "int4"}))
    message = str(e.value)
    assert "\n" not in message and "'int4'" in message and all(p in message for p in TEACHER_PRECISIONS)


def test_step_phases_are_present_and_add_up_to_the_step():
    learner = Learner(quick_config(train={"teacher_subset": 1}))
    data = blobs()
    learner.step(data, ["c0", "c1"])
    learner.step(data, ["c2", "c3"])
    report = learner.step(data, ["c4", "c5"])
    phases = report.phase_seconds
    for key in ("teachers.prepare", "train.augment", "train.student", "train.teachers", "consolidate",
                "finetune.student", "finetune.teachers", "herding", "class_means", "commit", "other"):
        assert key in phases and phases[key] >= 0, key
    assert sum(phases.values()) == pytest.approx(report.seconds, rel=1e-6)
    assert phases["other"] < 0.2 * report.seconds  # the named phases cover the step
    assert phases["train.student"] > phases["train.augment"]
    assert report.teacher_precision["requested"] == "auto"


def test_the_teacher_subset_estimate_is_unbiased():
    """Exact enumeration: the mean over every equally likely subset is the full loss, for both reductions."""
    torch.manual_seed(0)
    groups = [[0, 1], [2], [3, 4]]
    terms = [(k + 1, g) for k, g in enumerate(groups)]
    student = NetOutput(torch.randn(5, 6), [torch.randn(5, 6), torch.randn(5, 6)], torch.randn(5, 8))
    outs = {k: NetOutput(torch.randn(5, 6), [torch.randn(5, 6), torch.randn(5, 6)], torch.randn(5, 8))
            for k, _ in terms}
    y = torch.randint(0, 6, (5,))
    for reduction in ("mean", "sum"):
        cfg = LossConfig(distill_reduction=reduction)
        full = m2kd_loss(student, y, terms, outs, cfg)
        for size in (1, 2):
            _, scale = sample_terms(terms, size, reduction)
            estimates = [m2kd_loss(student, y, [terms[i] for i in subset], outs, cfg, scale)
                         for subset in itertools.combinations(range(len(terms)), size)]
            for field in ("mm", "ml", "total"):
                mean = torch.stack([getattr(e, field) for e in estimates]).mean()
                assert torch.allclose(mean, getattr(full, field), atol=1e-6), (reduction, size, field)
    gen = torch.Generator().manual_seed(0)
    drawn = {tuple(k for k, _ in sample_terms(terms, 2, "mean", gen)[0]) for _ in range(200)}
    assert drawn == {(1, 2), (1, 3), (2, 3)}  # every subset is drawn
    assert sample_terms(terms, 0, "sum") == (terms, 1.0) and sample_terms(terms, 3, "sum") == (terms, 1.0)


def test_nhwc_crop_flip_equals_nchw_crop_flip():
    x = torch.randint(0, 256, (6, 10, 12, 3), dtype=torch.uint8)
    for pad, flip in [(0, True), (2, False), (3, True)]:
        a = random_crop_flip_nhwc(x, pad, flip, torch.Generator().manual_seed(1))
        b = random_crop_flip(x.permute(0, 3, 1, 2).contiguous(), pad, flip, torch.Generator().manual_seed(1))
        assert torch.equal(a.permute(0, 3, 1, 2), b)


def test_learner_batch_is_the_shared_input_transform():
    learner = Learner(quick_config())
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x = learner._batch(images, augment=False)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, normalize(to_unit(images)), atol=1e-5)


def test_preparing_teachers_leaves_the_frozen_stages_alone():
    """The calibration batches run the student's frozen stages: a model fresh from a workspace
    has them in training mode until .train() is called, and their BatchNorm statistics are shared
    by every snapshot."""
    learner = Learner(quick_config(model={"frozen_stages": 1}))
    data = blobs()
    learner.step(data, ["c0", "c1"])
    fresh = Learner.from_state(learner.cfg, *learner.state())
    before = {k: v.clone() for k, v in fresh.model.state_dict().items() if "running" in k}
    snapshots = {1: fresh.store.teacher(1)}
    fresh._teachers(snapshots, data.images[:64], teacher_images=10**6)
    after = fresh.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
