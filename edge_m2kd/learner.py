"""The class-incremental learner: one step = train, consolidate snapshots, update
exemplars, correct the new-class bias, commit the snapshot. Every method (M2KD, its
ablations and its baselines) is a configuration of this one class."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from edge_m2kd import distributed, faults, teacher_precision
from edge_m2kd.config import DEVICES, IMAGE_MEAN, IMAGE_STD, OLD_STATISTICS, LearnerConfig
from edge_m2kd.data.augment import random_crop_flip_nhwc
from edge_m2kd.data.sources import ImageSet
from edge_m2kd.errors import UserError
from edge_m2kd.exemplars import ExemplarMemory, class_means
from edge_m2kd.heads import (
    AnalyticFit,
    AnalyticHead,
    CorrectedHead,
    FeatureStats,
    Head,
    NMEHead,
    old_class_statistics,
    solve_analytic,
)
from edge_m2kd.losses import m2kd_loss, sample_terms, teacher_terms
from edge_m2kd.models import DeployedClassifier, IncrementalNet
from edge_m2kd.models.pretrained import PretrainedWeights, fetch_pretrained, load_pretrained
from edge_m2kd.phases import PhaseTimer
from edge_m2kd.snapshots import build_model, make_store
from edge_m2kd.teachers import build_teachers

# progress(phase, epoch, epochs, mean loss of the epoch, images per second); phase is "train" or "finetune"
Progress = Callable[[str, int, int, float, float], None]
PROBE_SIZE = 8
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class StepReport:
    step: int
    classes: list[str]
    train_images: int
    seconds: float
    images_per_second: float  # over the whole step
    train_images_per_second: float  # over the training phase alone (what the bare loop compares to)
    losses: dict[str, float] = field(default_factory=dict)
    teachers: list[int] = field(default_factory=list)
    # seconds per phase (PhaseTimer): "train.augment", "train.teachers", "train.student", the same
    # for "finetune." (the packed store's fine-tuning after pruning), "teachers.prepare",
    # "herding", "commit", ...; "other" is what no phase claimed. They add up to `seconds`.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    teacher_precision: dict[str, Any] = field(default_factory=dict)  # teacher_precision.PrecisionChoice


def resolve_device(device: str) -> torch.device:
    """The torch device for a config's or a command's device name (one of DEVICES, or cuda:N)."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but this torch has no CUDA device; train where it is, or "
                        "create the workspace with `init --device cpu` or `--device auto`")
    return torch.device(device)


class Learner:
    def __init__(self, cfg: LearnerConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        teacher_precision.check_precision(cfg.train.teacher_precision)
        self.timer = PhaseTimer()
        self.sync_phases = False  # a profile run sets it: CUDA work is timed in the phase that queued it
        # The first step trains these initial weights: draw them from the configured seed, so
        # the same step on the same data gives the same workspace, byte for byte.
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, 0).to(self.device)
        self.store = make_store(cfg.snapshots, cfg.model)
        self.memory = ExemplarMemory(cfg.memory)
        self.class_names: list[str] = []  # in head order
        self.groups: list[list[int]] = []  # class ids first learned at each step
        self.class_means: torch.Tensor | None = None  # NME, over normalised features
        # The analytic head's sums over every training image (heads.py), and its solved head.
        self.stats: FeatureStats | None = None
        self.analytic: AnalyticFit | None = None
        # The statistics the last step's analytic head is solved from, per way of treating the old
        # classes, until held-out images choose its regularisation (choose_classifier).
        self._solve_from: dict[str, FeatureStats] = {}
        self.analytic_variants: dict[str, AnalyticFit | None] = {}
        self.compare_old_statistics = False  # a benchmark sets it: solve every OLD_STATISTICS way
        self.chosen_classifier: str | None = None  # classifier "auto": a HEADS name, by held-out images
        self._pretrained: PretrainedWeights | None = None  # read when a step needs it
        if cfg.snapshots.free_restart == "pretrained" and cfg.model.pretrained:
            self.store.base_weights = self._pretrained_backbone

    def pretrained(self) -> PretrainedWeights | None:
        """The backbone's starting weights, checked against the sha256 recorded at init."""
        spec = self.cfg.model
        if spec.pretrained is None:
            return None
        if self._pretrained is None:
            weights = fetch_pretrained(spec.backbone, spec.pretrained)
            if spec.pretrained_sha256 and weights.sha256 != spec.pretrained_sha256:
                raise UserError(f"pretrained weights {weights.source} changed since the workspace was created "
                                f"(sha256 {weights.sha256[:12]}..., recorded {spec.pretrained_sha256[:12]}...); "
                                "restore the original file")
            self._pretrained = weights
        return self._pretrained

    @property
    def steps_done(self) -> int:
        return len(self.groups)

    # -- state: what a workspace stores ---------------------------------------------------------
    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Tensors per part ("model", "snapshots", "exemplars"; safetensors-ready) and JSON
        metadata (the class registry, the snapshot store's own)."""
        model_t = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.class_means is not None:
            model_t["class_means"] = self.class_means.detach().cpu().contiguous()
        snap_t, snap_meta = self.store.state()
        classes = [{"name": n, "id": i, "step": self.step_of(n)} for i, n in enumerate(self.class_names)]
        stats_t: dict[str, torch.Tensor] = {}
        heads: dict[str, Any] = {"chosen_classifier": self.chosen_classifier}
        if self.stats is not None:
            stats_t = self.stats.state()
            heads["statistics_sha256"] = self.stats.checksum()
        if self.analytic is not None:
            stats_t = {**stats_t, "analytic.weight": self.analytic.weight, "analytic.bias": self.analytic.bias}
            heads["analytic"] = {"solver": self.analytic.solver, "regularisation": self.analytic.regularisation,
                                 "held_out_accuracy": self.analytic.held_out_accuracy}
        return ({"model": model_t, "snapshots": snap_t, "exemplars": self.memory.state(), "statistics": stats_t},
                {"classes": classes, "snapshots": snap_meta, "heads": heads})

    @classmethod
    def from_state(cls, cfg: LearnerConfig, tensors: dict[str, dict[str, torch.Tensor]],
                   meta: dict[str, Any]) -> Learner:
        learner = cls(cfg)
        classes = meta["classes"]
        learner.class_names = [c["name"] for c in classes]
        steps = max((c["step"] for c in classes), default=0)
        learner.groups = [[c["id"] for c in classes if c["step"] == k] for k in range(1, steps + 1)]
        model_t = dict(tensors["model"])
        learner.class_means = model_t.pop("class_means", None)
        heads = meta.get("heads") or {}
        learner.chosen_classifier = heads.get("chosen_classifier")
        stats_t = tensors.get("statistics") or {}  # none in a workspace saved before the statistics
        if "gram" in stats_t:
            learner.stats = FeatureStats.from_state(stats_t)
        if "analytic.weight" in stats_t:
            a = heads["analytic"]
            learner.analytic = AnalyticFit(a["solver"], a["regularisation"], stats_t["analytic.weight"],
                                           stats_t["analytic.bias"], a.get("held_out_accuracy"))
        learner.model.add_classes(len(learner.class_names))
        learner.model.load_state_dict(model_t)
        learner.model.to(learner.device)
        learner.store.load(tensors["snapshots"], meta["snapshots"], learner.model)
        learner.memory.load(tensors["exemplars"])
        return learner

    def _pretrained_backbone(self) -> dict[str, torch.Tensor]:
        weights = self.pretrained()
        assert weights is not None
        return {f"backbone.{k}": v for k, v in weights.state.items()}

    # -- one class-incremental step ----------------------------------------------------
    def step(self, data: ImageSet, classes: list[str] | None = None, progress: Progress | None = None) -> StepReport:
        classes = self._new_classes(data, classes)
        t, start = self.steps_done + 1, time.perf_counter()
        self.timer = timer = PhaseTimer(self.sync_phases)
        torch.manual_seed(self.cfg.train.seed + t)
        new_ids = list(range(len(self.class_names), len(self.class_names) + len(classes)))
        if t == 1 and (weights := self.pretrained()) is not None:
            load_pretrained(self.model.backbone, weights, self.cfg.model.backbone)
        self.class_names += classes
        self.groups.append(new_ids)
        self.model.add_classes(len(classes))
        self.model.to(self.device)

        images, labels = self._training_set(data, dict(zip(new_ids, classes)))
        terms = teacher_terms(t, self.groups, self.cfg.loss)
        with timer("teachers.prepare"):
            snapshots = {k: self.store.teacher(k) for k in sorted({k for k, _ in terms})}
            teachers, precision = self._teachers(snapshots, images)
        self.store.prepare(self.model, t)

        def train(model: IncrementalNet, masks: dict[str, torch.Tensor], epochs: int, lr: float, phase: str,
                  teachers: torch.nn.Module | None = teachers, terms: list = terms) -> dict[str, float]:
            report = (lambda *a: progress(phase, *a)) if progress else None
            return self._train(model, images, labels, teachers, terms, masks, epochs, lr, report, phase)

        train_start = time.perf_counter()
        losses = train(self.model, self.store.grad_masks(self.model), self.cfg.train.epochs, self.cfg.train.lr, "train")
        train_seconds = time.perf_counter() - train_start
        sc = self.cfg.snapshots
        unpruned = copy.deepcopy(self.model).requires_grad_(False) if sc.prune_distill and sc.policy != "full" else None

        def finetune_pruned(model: IncrementalNet, masks: dict[str, torch.Tensor], epochs: int) -> None:
            faults.checkpoint("consolidate")
            if unpruned is None:
                train(model, masks, epochs, sc.prune_finetune_lr, "finetune")
                return
            # The step's own model before pruning is the best teacher of what pruning must keep:
            # one more term, over every class, beside the step's own terms.
            train(model, masks, epochs, sc.prune_finetune_lr, "finetune",
                  build_teachers({**snapshots, t: unpruned}, self.cfg.train.teacher_mode),
                  [*terms, (t, list(range(model.num_classes)))])

        with timer("consolidate"):  # pruning; its fine-tuning is timed as "finetune.*"
            self.store.consolidate(self.model, t, finetune_pruned)
        with timer("features"):  # one forward per new image, read by herding and by the statistics
            # The training set holds the new classes first, class by class: views, not copies.
            n_new = int(np.count_nonzero(labels >= new_ids[0]))  # the exemplars' labels are all older
            starts = np.searchsorted(labels[:n_new], [*new_ids, new_ids[-1] + 1])
            new = {c: images[a:b] for c, a, b in zip(new_ids, starts[:-1], starts[1:])}
            new_features = {c: self.normalized_features(x) for c, x in new.items()}
        with timer("herding"):
            self.memory.update(new, new_features)
        with timer("bias_correction"):
            self._correct_bias(new_ids)
        with timer("class_means"):
            exemplar_features = {c: self.normalized_features(x) for c, x in self.memory.images.items()}
            self.class_means = class_means(exemplar_features, self.model.num_classes)
        with timer("solve"):
            self._add_statistics(new_features, exemplar_features, new_ids)
        with timer("commit"):
            self.store.commit(t, self.model, probe=images[:PROBE_SIZE])
        seconds = time.perf_counter() - start
        n_seen = len(images) * self.cfg.train.epochs
        return StepReport(t, classes, len(images), seconds, n_seen / seconds, n_seen / max(train_seconds, 1e-9), losses,
                          sorted(snapshots), timer.total(seconds), precision.to_dict())

    def _add_statistics(self, new_features: dict[int, torch.Tensor], exemplar_features: dict[int, torch.Tensor],
                        new_ids: list[int]) -> None:
        """Add the step's images to the analytic head's statistics and solve the head (at the
        default regularisation until held-out images choose one, in choose_classifier)."""
        old_ids = list(range(new_ids[0]))
        if self.stats is None:
            # A fresh learner, or a workspace saved before the statistics existed: its old classes
            # start from their exemplars under today's backbone (a class without any has none yet).
            self.stats = FeatureStats.empty(self.model.feature_dim)
            for c in old_ids:
                if c in exemplar_features:
                    self.stats.add(c, exemplar_features[c])
        step_stats = FeatureStats.empty(self.model.feature_dim)
        for c, f in new_features.items():
            step_stats.add(c, f)
        self.stats.merge(step_stats)
        # On a frozen backbone every way is "keep": the old classes' features have not moved.
        trained = self.cfg.model.frozen_stages != -1 and self.cfg.train.epochs > 0
        modes = OLD_STATISTICS if self.compare_old_statistics else (self.cfg.train.analytic_old_statistics,)
        self._solve_from = {m: old_class_statistics(self.stats, m if trained else "keep", old_ids, exemplar_features,
                                                    step_stats) for m in modes}
        self._solve_analytic(None)

    def _solve_analytic(self, held_out: tuple[torch.Tensor, np.ndarray] | None) -> None:
        solver = self.cfg.train.analytic_solver
        self.analytic_variants = {m: solve_analytic(s, solver, held_out) for m, s in self._solve_from.items()}
        self.analytic = self.analytic_variants.get(self.cfg.train.analytic_old_statistics)

    def _teachers(self, snapshots: dict[int, IncrementalNet], images: np.ndarray,
                  teacher_images: int | None = None) -> tuple[torch.nn.Module | None, teacher_precision.PrecisionChoice]:
        """The step's teachers, in the configured precision; int8 is calibrated (and ``auto``
        checked against fp32) on batches of the step's own augmented training images, drawn
        from a generator of their own so that training sees the same batches either way.
        `teacher_images`: how many images each teacher reads in the step (default: the training
        set times the training and fine-tuning epochs, times K/n under a subset of K of n teachers)."""
        tc = self.cfg.train
        if teacher_images is None:
            finetune = self.cfg.snapshots.prune_finetune_epochs if self.cfg.snapshots.policy != "full" else 0
            teacher_images = len(images) * (tc.epochs + finetune)
            if 0 < tc.teacher_subset < len(snapshots):  # each teacher is asked in about K of n batches
                teacher_images = teacher_images * tc.teacher_subset // len(snapshots)
        teachers = build_teachers(snapshots, tc.teacher_mode)
        if teachers is not None:
            self._to_device(teachers)
        gen = torch.Generator().manual_seed(tc.seed + 7919 * (self.steps_done + 1))
        images_t = _as_tensor(images)

        @torch.no_grad()
        def batches(n: int) -> list[teacher_precision.Batch]:
            # IncrementalNet.train puts the frozen stages in eval mode, which a freshly built (or
            # loaded) model's are not yet: in training mode this forward would move their
            # BatchNorm statistics, which every snapshot shares.
            self.model.train(self.model.training)
            out = []
            for idx in torch.randperm(len(images), generator=gen)[: n * tc.batch_size].split(tc.batch_size):
                x = self._batch(images_t[idx], True, gen)
                out.append((x, self.model.frozen_outputs(x)))
            return out

        with_aux = self.cfg.loss.multi_level
        return teacher_precision.prepare(teachers, tc.teacher_precision, self.device, batches, with_aux,
                                         self.cfg.loss.temperature, tc.teacher_tolerance_kl,
                                         teacher_images=teacher_images)

    def _new_classes(self, data: ImageSet, classes: list[str] | None) -> list[str]:
        present = [n for i, n in enumerate(data.class_names) if np.any(data.labels == i)]
        if classes is None:
            classes = [n for n in present if n not in self.class_names]
            if not classes:
                raise UserError("no new classes in the data: every class is already known; add folders of new classes")
        self.refuse_known_or_repeated(classes)
        for n in classes:
            if n not in present:
                raise UserError(f"class {n!r} has no images in the data; check the folder name")
        return list(classes)

    def refuse_known_or_repeated(self, classes: list[str]) -> None:
        for n in classes:
            if classes.count(n) > 1:
                raise UserError(f"class {n!r} given twice; name each class once")
            if n in self.class_names:
                raise UserError(f"class {n!r} already exists (learned at step {self.step_of(n)}); "
                                "rename the folder or leave it out with --classes")

    def step_of(self, name: str) -> int:
        cid = self.class_names.index(name)
        return next(k + 1 for k, g in enumerate(self.groups) if cid in g)

    def _training_set(self, data: ImageSet, new: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """The new classes' images (class by class, in data order) then the exemplars, written
        into one array: the step holds `data` and this, and nothing else of its images."""
        rows = [np.flatnonzero(data.labels == data.class_names.index(name)) for name in new.values()]
        ex_labels = self.memory.labels()
        n_new = sum(len(r) for r in rows)
        images = np.empty((n_new + len(ex_labels), *data.images.shape[1:]), data.images.dtype)
        np.take(data.images, np.concatenate(rows), axis=0, out=images[:n_new])
        self.memory.write_images(images[n_new:])
        labels = np.concatenate([*(np.full(len(r), c, np.int64) for c, r in zip(new, rows)), ex_labels])
        return images, labels

    def _to_device(self, model: M) -> M:
        model = model.to(self.device)
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _batch(self, images: np.ndarray | torch.Tensor, augment: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 NHWC images -> the normalised float NCHW batch the model reads. Cropped and
        flipped as uint8 NHWC (a quarter of the bytes), moved to the device as uint8, then one
        multiply-add per pixel; NHWC read as NCHW is already channels_last, so that layout costs
        no copy."""
        u8 = _as_tensor(images)
        if u8.dtype != torch.uint8 or u8.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {u8.dtype} {tuple(u8.shape)}")
        if augment:
            u8 = random_crop_flip_nhwc(u8, self.cfg.train.crop_pad, self.cfg.train.flip, generator)
        scale, shift = self._normalizer()
        x = u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).mul_(scale).add_(shift)
        return x if self.cfg.train.channels_last else x.contiguous()

    def _normalizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / 255 - mean) / std as x * scale + shift, per channel, on the device."""
        if getattr(self, "_norm", None) is None or self._norm[0].device != self.device:
            std, mean = torch.tensor(IMAGE_STD), torch.tensor(IMAGE_MEAN)
            self._norm = ((1 / (255 * std)).view(1, -1, 1, 1).to(self.device), (-mean / std).view(1, -1, 1, 1).to(self.device))
        return self._norm

    def _train(self, model, images, labels, teachers, terms, masks, epochs, lr, progress,  # noqa: ANN001
               phase: str = "train") -> dict[str, float]:
        """SGD with a cosine schedule. Weight decay is applied to the gradient by hand so the
        masks also cover it: a frozen (owned) weight must not move at all. Time goes to the
        phases `phase`.augment, `phase`.teachers and `phase`.student of self.timer."""
        tc, n = self.cfg.train, len(images)
        if epochs == 0:  # e.g. ncm-frozen: nothing is trained
            return {}
        self._to_device(model).train()
        if teachers is not None:
            self._to_device(teachers)
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        rank, world_size = distributed.world()
        net = distributed.wrap(model, self.device, tc.sync_batchnorm)
        backbone = [p for name, p in params.items() if name.startswith("backbone.")]
        heads = [p for name, p in params.items() if not name.startswith("backbone.")]
        groups = [{"params": backbone, "lr": lr * tc.backbone_lr_scale}, {"params": heads, "lr": lr}]
        # foreach: one fused update over all parameters, not a Python loop over 100 tensors
        # (torch picks it by itself on CUDA only).
        opt = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=tc.momentum, weight_decay=0.0,
                              foreach=True)
        batches = max(1, -(-n // tc.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * batches)
        # A mask of all ones changes nothing: only the others are applied, in one foreach call.
        masked = [(params[name], m.to(self.device)) for name, m in masks.items()
                  if name in params and not bool(m.all())]
        # Every rank draws the same global batches and the same augmentation, then trains on its
        # share, so N ranks see exactly the images one process would (only BatchNorm's batch
        # statistics are per rank).
        gen = torch.Generator().manual_seed(tc.seed + len(self.groups))
        labels_t = torch.from_numpy(labels)
        images_t = _as_tensor(images)  # no copy: batches are indexed out of it
        with_aux = self.cfg.loss.aux_heads or self.cfg.loss.multi_level
        # Only feature distillation reads the teachers' stage maps (7 MB a teacher for a batch of 64 at
        # 32 px); without it they are not kept through the student's forward and backward, the peak.
        with_maps = self.cfg.loss.feature_distill != "none"
        timer = self.timer
        # Its own generator: asking a subset of the teachers leaves the batches and their augmentation as they were.
        subset_gen = torch.Generator().manual_seed(tc.seed + 104729 * len(self.groups))
        keys = ("loss", "cls", "aux", "mm", "ml", "pod")
        totals: dict[str, float] = {}
        seen = 0
        for epoch in range(epochs):
            # Loss sums stay on the device until the epoch ends: no host sync per batch.
            sums, seen, start = torch.zeros(len(keys), device=self.device), 0, time.perf_counter()
            for idx in torch.randperm(n, generator=gen).split(tc.batch_size):
                if len(idx) < world_size:
                    continue  # every rank must take part in every batch, or DDP waits forever
                with timer(f"{phase}.augment"):
                    x = self._batch(images_t[idx], True, gen)[rank::world_size]
                    idx = idx[rank::world_size]
                    y = labels_t[idx].to(self.device, non_blocking=True)
                teacher_outs = {}
                batch_terms, scale = sample_terms(terms, tc.teacher_subset, self.cfg.loss.distill_reduction, subset_gen)
                with torch.no_grad():  # frozen stages: once per batch, for the student and every teacher
                    with timer(f"{phase}.student"):
                        frozen = model.frozen_outputs(x)  # [] when nothing is frozen
                    if teachers is not None:
                        with timer(f"{phase}.teachers"):
                            asked = None if batch_terms is terms else {k for k, _ in batch_terms}
                            teacher_outs = teachers(x, with_aux=self.cfg.loss.multi_level, frozen=frozen, steps=asked,
                                                    with_maps=with_maps)
                with timer(f"{phase}.student"):
                    out = net(x, with_aux=with_aux, frozen=frozen)
                    loss = m2kd_loss(out, y, batch_terms, teacher_outs, self.cfg.loss, scale)
                    opt.zero_grad(set_to_none=True)
                    loss.total.backward()
                    if tc.weight_decay:
                        with_grad = [p for p in params.values() if p.grad is not None]
                        torch._foreach_add_([p.grad for p in with_grad], [p.detach() for p in with_grad],
                                            alpha=tc.weight_decay)
                    if masked:
                        present = [(p.grad, m) for p, m in masked if p.grad is not None]
                        torch._foreach_mul_([g for g, _ in present], [m for _, m in present])
                    opt.step()
                    sched.step()
                    sums += torch.stack([loss.total.detach(), loss.cls, loss.aux, loss.mm, loss.ml, loss.pod]) * len(idx)
                seen += len(idx)
            faults.checkpoint("train:epoch")
            *summed, seen = distributed.sum_across_ranks([*sums.tolist(), seen])
            totals = dict(zip(keys, summed))
            if progress:
                progress(epoch + 1, epochs, totals["loss"] / seen, seen / (time.perf_counter() - start))
        distributed.sync_buffers(model)
        return {k: v / max(seen, 1) for k, v in totals.items()}

    # -- the new-class bias --------------------------------------------------------------
    def _correct_bias(self, new_ids: list[int]) -> None:
        """Thousands of new images against a few exemplars per old class bias the head
        toward the new classes; distillation alone does not remove that (DESIGN.md)."""
        mode = self.cfg.train.bias_correction
        if mode == "none" or not self.memory.enabled or self.cfg.memory.keep_all or self.steps_done < 2:
            return
        head = self.model.main_head
        if mode == "weight_aligning":  # Zhao et al. 2020: match the mean norm of old rows
            with torch.no_grad():
                norms = head.weight.norm(dim=1)
                old = [c for c in range(head.out_features) if c not in new_ids]
                gamma = norms[old].mean() / norms[new_ids].mean()
                head.weight[new_ids] *= gamma
                head.bias[new_ids] *= gamma
                if self.cfg.train.align_biases:
                    # The bias is where the imbalance goes as well: after a step of one class
                    # against a few exemplars of each old class, old biases sat near -1 and the
                    # new one near +1.6, and the head named the newest class for nearly every
                    # image. Every class gets the same bias (a uniform prior), as the aligned
                    # norms give every class the same scale.
                    head.bias.fill_(float(head.bias.mean()))
        elif mode == "balanced_finetune":  # the exemplar set is class-balanced by construction
            self._finetune_head(*self.memory.arrays())

    def _finetune_head(self, images: np.ndarray, labels: np.ndarray) -> None:
        tc = self.cfg.train
        feats = self.embed(images)
        head = self.model.main_head
        opt = torch.optim.SGD(head.parameters(), lr=tc.lr * 0.1, momentum=tc.momentum)
        y = torch.from_numpy(labels).to(self.device)
        for _ in range(tc.balanced_finetune_epochs * max(1, len(images) // tc.batch_size)):
            idx = torch.randint(0, len(images), (tc.batch_size,))
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    # -- inference -------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward_all(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        logits, feats = [], []
        batch = self.eval_batch()
        for i in range(0, len(images), batch):
            out = self.model(self._batch(images[i : i + batch], augment=False), with_aux=False)
            logits.append(out.logits)
            feats.append(out.features)
        self.model.train()
        if not logits:
            return torch.zeros(0, self.model.num_classes), torch.zeros(0, self.model.feature_dim)
        return torch.cat(logits), torch.cat(feats)

    def eval_batch(self) -> int:
        """Inference batch size: the training batch. Its tensors are the sizes the training loop
        freed, so the heap it left is reused, and a step's peak stays its training peak (memory.py
        predicts that one). Measured: at 256 images of 32 px (the size this was before), the
        herding after a ResNet-32 step grew the process 117 MiB past its training peak, and the
        step's peak was 0.76 of the prediction; at the training batch it stays 50 MiB below. A
        256-image batch at 224 px alone took 2.5 GiB (a MobileNetV2 step: 4.0 GiB against 1.5)."""
        return self.cfg.train.batch_size

    def embed(self, images: np.ndarray) -> torch.Tensor:
        return self._forward_all(images)[1].clone()

    def normalized_features(self, images: np.ndarray) -> torch.Tensor:
        """The L2-normalised pooled features that NME, herding and the analytic head read."""
        return F.normalize(self._forward_all(images)[1], dim=1)

    def heads(self) -> dict[str, Head]:
        """Every classifier this learner can deploy now (HEADS names): the corrected head always,
        NME where every class has exemplars, the analytic head where every class has statistics."""
        out: dict[str, Head] = {"cnn": CorrectedHead(self.model.main_head)}
        if self.class_means is not None:
            out["nme"] = NMEHead(self.class_means)
        if self.analytic is not None:
            out["analytic"] = AnalyticHead(self.analytic)
        return out

    def scores(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """Every head's scores of the images (higher is likelier), from one forward pass."""
        logits, feats = self._forward_all(images)
        out = {name: head.scores(feats.cpu()) for name, head in self.heads().items() if name != "cnn"}
        return {"cnn": logits.cpu(), **out}

    @property
    def deployed_head(self) -> str:
        """The HEADS name of the classifier a device runs: the configured one, or under "auto" the
        held-out images' choice; NME (else the corrected head) while that one is not there yet."""
        choice = self.cfg.train.classifier
        name = self.chosen_classifier if choice == "auto" else choice
        available = self.heads()
        return name if name in available else ("nme" if "nme" in available else "cnn")

    def choose_classifier(self, images: np.ndarray, labels: np.ndarray) -> None:
        """After a step, on held-out images of every known class (never trained on): choose the
        analytic head's regularisation, then, under classifier "auto", the deployed head.

        Between NME and the analytic head, which no step trains, the one that classifies more of
        these images correctly, a tie to the analytic head: on a validation split (frozen
        MobileNetV2, 20 to 500 images per class) that rule lost the least against the better of
        the two, 0 to 1.6 points on average, where a sign test at two standard deviations lost 0.5
        to 4 (docs/benchmarks.md, "The closed-form head"). The corrected head, trained on these
        classes with a bias toward the newest, is deployed only where it classifies clearly more of
        them correctly: a sign test (McNemar's) at two standard deviations over the images exactly
        one of the two gets right. 20 images per class are few: a plain majority once deployed a
        corrected head that scored 36.8 on the test set against NME's 41.9 (icarl, cpu-short, class
        order 1995)."""
        if not len(images):
            return
        if self._solve_from:
            self._solve_analytic((self.normalized_features(images), labels))
            self._solve_from = {}
        if self.cfg.train.classifier != "auto":
            return
        right = {name: s.argmax(1).numpy() == labels for name, s in self.scores(images).items()}
        untrained = [name for name in ("analytic", "nme") if name in right]  # a tie to the first
        base = max(untrained, key=lambda name: int(right[name].sum())) if untrained else "cnn"
        only_cnn, only_base = int((right["cnn"] & ~right[base]).sum()), int((right[base] & ~right["cnn"]).sum())
        self.chosen_classifier = "cnn" if only_cnn - only_base > 2 * math.sqrt(only_cnn + only_base) else base

    def deployed(self) -> DeployedClassifier:
        """The classifier a device runs: the backbone and the deployed head as one linear layer."""
        backbone = build_model(self.cfg.model, 0).backbone
        backbone.load_state_dict(self.model.backbone.state_dict())
        head = self.heads()[self.deployed_head]
        w, b = head.linear()
        return DeployedClassifier(backbone, w, b, head.normalized, IMAGE_MEAN, IMAGE_STD).eval()


def _as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of a numpy array (a copy only where numpy marks it read-only)."""
    if isinstance(images, torch.Tensor):
        return images
    return torch.from_numpy(images if images.flags.writeable and images.flags.c_contiguous else images.copy())
