"""Typed configuration. Every method is a configuration of the one learner (DESIGN.md
section 2): baselines and ablations differ only in these fields, never in code paths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

SnapshotPolicy = Literal["full", "packed", "sparse"]
# The names snapshots.POLICIES implements, importable without torch (the CLI's choices).
SNAPSHOT_POLICIES: tuple[str, ...] = get_args(SnapshotPolicy)
# The number formats teachers can run in (teacher_precision.py); "auto" picks one per step.
TEACHER_PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
# Where a step trains and a predictor runs; "cuda:N" names one GPU (learner.resolve_device).
DEVICES = ("auto", "cpu", "cuda")
Backbone = Literal["resnet20", "resnet32", "resnet18", "mobilenetv2"]  # models/backbones.py builds them
BACKBONE_NAMES: tuple[str, ...] = get_args(Backbone)
BiasCorrection = Literal["weight_aligning", "balanced_finetune", "none"]
# The deployed classifier (heads.py): the corrected head, NME, the closed-form head over every
# image's statistics, or "auto": chosen on held-out images after each step.
Classifier = Literal["cnn", "nme", "analytic", "auto"]
CLASSIFIERS: tuple[str, ...] = get_args(Classifier)
AnalyticSolver = Literal["ridge", "lda"]
ANALYTIC_SOLVERS: tuple[str, ...] = get_args(AnalyticSolver)
# How a trained backbone's old classes enter the analytic head, whose statistics were summed
# under the backbone of their own step: "keep" them as summed, "recompute" them from the
# exemplars under today's backbone, or "blend" (today's exemplar means, the summed spread).
OldStatistics = Literal["keep", "recompute", "blend"]
OLD_STATISTICS: tuple[str, ...] = get_args(OldStatistics)
FreeRestart = Literal["small_random", "pretrained"]

# Per-channel statistics of natural RGB images (ImageNet); folded into exported models.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    backbone: Backbone = "resnet32"
    input_size: int = 32
    small_input_stem: bool = False  # ResNet-18 only: keep small inputs at full resolution
    aux_levels: list[int] | None = None  # None: every stage but the last
    # Where the backbone's weights start: None (random), "imagenet" (torchvision's published
    # file, through torch.hub's cache) or a local .pth/.safetensors path; the sha256 of the
    # file is recorded at init and checked whenever the weights are read again.
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    # The first N stages (stem included) keep their starting weights and BatchNorm statistics
    # for good: they save no activations, and every snapshot shares them at no extra bytes.
    # -1 freezes every stage (a frozen feature extractor).
    frozen_stages: int = 0


@dataclass
class LossConfig:
    temperature: float = 2.0
    aux_weight: float = 1.0  # a: deep supervision of the auxiliary heads
    multi_model_weight: float = 1.0  # b: L_mm
    multi_level_weight: float = 1.0  # c: L_ml
    aux_heads: bool = True  # train auxiliary heads at all (L_aux)
    multi_model: bool = True  # every snapshot M_k teaches its own group C_k
    multi_level: bool = True  # ... also at the auxiliary levels
    last_model_all_old: bool = False  # conventional term: M_{t-1} teaches all old classes
    # How the teacher terms add up. "mean": L_mm keeps one scale whatever the step, so each old
    # group's pull shrinks as 1/(t-1); "sum": every old group pulls with weight 1 at every step.
    distill_reduction: str = "mean"
    # What snapshot M_k's own-group term (L_mm, L_ml) distills: "own" (a softmax over C_k alone:
    # identically zero for a one-class group), "own+rest" (C_k plus one column pooling the other
    # classes M_k knew, T*logsumexp(z/T): how sure M_k is that an image is in C_k at all) or
    # "all-known" (every class M_k knew). "own+rest" was chosen on validation (docs/benchmarks.md,
    # "M2KD against iCaRL"): on one-class steps it scored 21.3 (NME 29.1) against own's 18.1 (24.5).
    distill_scope: str = "own+rest"
    # Feature-map distillation of the newest snapshot's stage outputs: "none" or "pod" (PODNet's
    # width- and height-pooled maps), weighted by feature_weight.
    feature_distill: str = "none"
    feature_weight: float = 1.0
    # "fixed": the distillation terms keep their weights; "adaptive": all of them scaled by
    # sqrt(old classes / new classes), as UCIR and PODNet do. "adaptive" was chosen on validation
    # (docs/benchmarks.md, "The adaptive weight on one-class steps"): at the full cpu-short schedule,
    # 2 then 8 one-class steps, packed M2KD scored 37.1 against fixed's 35.6; iCaRL scored 39.5 fixed
    # and 35.9 adaptive, so the single-teacher methods keep "fixed" (LAST_MODEL_ONLY).
    distill_weight: str = "adaptive"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    # The backbone's learning rate is lr * backbone_lr_scale (the heads' is lr): a pretrained
    # backbone needs small steps to keep its features, new heads need large ones.
    backbone_lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 1993
    device: str = "cpu"
    channels_last: bool = True  # about 1.6x faster convolutions on CPU
    # How teachers run: "folded" (BatchNorm folded, one forward each), "stacked" (folded and
    # all in one grouped convolution) or "separate" (as trained). benchmarks/overhead.py
    # measures them; on one CPU thread here grouped convolutions were the slowest.
    teacher_mode: str = "folded"
    # The number format teachers run in (edge_m2kd/teacher_precision.py): one of TEACHER_PRECISIONS.
    # "auto": int8 on a CPU, fp16 under CUDA, each used only while its logits stay within
    # teacher_tolerance_kl (KL at the loss temperature, checked against fp32 at every step).
    teacher_precision: str = "auto"
    teacher_tolerance_kl: float = 0.01
    # Teacher terms asked per batch: 0 asks every one; k > 0 a uniformly random k of them per
    # batch, weighted so that the loss's expectation is the full multi-model term (losses.sample_terms).
    # 4: up to 4 teachers (5 steps) nothing changes; past that a step costs about what t = 5 costs
    # instead of growing with every group learned (t = 10: 1.1x to 1.3x an iCaRL step instead of
    # 1.6x to 1.8x; digits, one class per step, final accuracy 62.5 against 64.4 with every teacher
    # and 61.8 in fp32, 4 seeds; docs/benchmarks.md, "Teacher cost").
    teacher_subset: int = 4
    sync_batchnorm: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch
    crop_pad: int = 4
    flip: bool = True  # off for data where a mirror image is another class (digits)
    bias_correction: BiasCorrection = "weight_aligning"
    # weight_aligning: also give every class the same bias. Chosen on validation: on one-class
    # steps iCaRL's head went from 17.1% to 22.0% (docs/benchmarks.md, "M2KD against iCaRL").
    align_biases: bool = True
    balanced_finetune_epochs: int = 5
    # What the workspace deploys: the corrected head, NME, or "auto": NME unless the head scores
    # clearly higher (a sign test at 2 sigma) on held-out images of every class that no step
    # trained on (chosen after each step). "auto" by default: NME beat the corrected head in 17 of
    # 18 validation runs (one-class: all six, by 3 to 8 points; five steps of two: 11 of 12).
    classifier: Classifier = "auto"
    # The analytic head (heads.py): ridge regression onto the classes or shrinkage LDA, over
    # L2-normalised features. Ridge by validation (docs/benchmarks.md, "The closed-form head"):
    # 72.6 against LDA's 72.5 at 96 px, 78.0 against 77.7 at 160 px, frozen MobileNetV2.
    analytic_solver: AnalyticSolver = "ridge"
    analytic_old_statistics: OldStatistics = "keep"


@dataclass
class MemoryConfig:
    total: int = 2000  # exemplar images kept over all classes, equal per class
    keep_all: bool = False  # joint training: keep every image (the upper bound)


@dataclass
class SnapshotConfig:
    policy: SnapshotPolicy = "packed"
    planned_steps: int = 10  # packed: sizes each step's share of the free weights
    # packed: fraction of all weights the first step keeps. 0.3 rather than half: later steps
    # get 0.7/(planned-1) each, and on digits the packed-vs-full gap fell from 6.4 to 2.2 points.
    first_step_share: float = 0.3
    # packed: fraction of all weights each later step keeps, at most; the equal part of the rest,
    # (1 - first_step_share) / (planned_steps - 1), when that is smaller (the planned steps always
    # fit) or when None. A small share leaves the late steps free weights to learn with: the equal
    # share leaves step 9 of 2 then 8 one-class steps 8.75%, 0.05 leaves it 35%. Chosen on
    # validation (docs/benchmarks.md, "Packed capacity for the late steps"): at the full cpu-short
    # schedule, 2 then 8 one-class steps, 38.4 (0.05) and 37.9 (0.03) against 37.1 (equal share).
    later_step_share: float | None = 0.05
    # packed: what a weight no step owns holds: "small_random" (zero in the snapshots, restarted
    # at reinit_scale of Kaiming scale) or "pretrained" (its pretrained value: snapshots keep
    # each step's largest changes from the pretrained network, and free weights restart there).
    free_restart: FreeRestart = "small_random"
    reinit_scale: float = 0.1  # packed: free weights restart at this fraction of Kaiming scale
    prune_finetune_epochs: int = 5  # packed/sparse: fine-tuning of the kept weights after pruning
    prune_finetune_lr: float = 0.01
    # packed/sparse: the prune fine-tuning also distills the step's unpruned model (all classes).
    prune_distill: bool = False
    # sparse: kept fraction of each prunable tensor. At 0.1 a pruned ResNet-20 teacher fell to
    # chance on digits; 0.2 keeps it useful at about 14% of a full copy's bytes.
    sparse_density: float = 0.2
    min_free_fraction: float = 0.02  # packed: warn when a step would get less than this


@dataclass
class LearnerConfig:
    method: str = "m2kd"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerConfig:
        return cls(
            method=d["method"],
            model=ModelConfig(**d["model"]),
            loss=LossConfig(**d["loss"]),
            train=TrainConfig(**d["train"]),
            memory=MemoryConfig(**d["memory"]),
            # A workspace saved before later_step_share existed keeps the equal share it was
            # planned with, so an upgrade does not change how its remaining steps are packed.
            snapshots=SnapshotConfig(**{"later_step_share": None, **d["snapshots"]}),
        )


# What a pretrained start changes in the defaults (init --pretrained, benchmarks.cil's
# cpu-pretrained schedule): few epochs at a small learning rate, the first two of three stages
# frozen, NME deployed. Chosen on a validation split carved from CIFAR-10's training images
# (docs/benchmarks.md, "Pretrained MobileNetV2: the validation search").
PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"frozen_stages": 2},
    "train": {"epochs": 8, "lr": 0.01, "backbone_lr_scale": 1.0, "classifier": "nme"},
    "snapshots": {"free_restart": "pretrained"},
}

# The input size of a frozen pretrained backbone when none is given (init --pretrained with a
# method that trains nothing): it costs a forward pass only, so it can read larger images. The
# size with the best validation accuracy, frozen MobileNetV2, closed-form head, CIFAR-10 (32 px
# images upsampled; docs/benchmarks.md, "The closed-form head"): 96 px 72.6, 160 px 78.0,
# 224 px 75.2. Other trained methods keep the 32 px default (96 px in the README's examples).
FROZEN_PRETRAINED_INPUT_SIZE = 160
DEFAULT_INPUT_SIZE = 32

NO_DISTILLATION = dict(multi_model=False, multi_level=False, last_model_all_old=False)
LAST_MODEL_ONLY = dict(multi_model=False, multi_level=False, last_model_all_old=True, distill_weight="fixed")
SECTIONS = ("model", "loss", "train", "memory", "snapshots")

# name -> {section: field overrides}; sections as in LearnerConfig
METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "finetune": {"loss": {**NO_DISTILLATION, "aux_heads": False}, "memory": {"total": 0}, "snapshots": {"policy": "full"}},
    "lwf": {"loss": {**LAST_MODEL_ONLY, "aux_heads": False}, "memory": {"total": 0}, "snapshots": {"policy": "full"}},
    "icarl": {"loss": {**LAST_MODEL_ONLY, "aux_heads": False}, "snapshots": {"policy": "full"}},
    "m2kd": {},
    # Ablations of M2KD: one ingredient each.
    "m2kd-multi-model": {"loss": {"multi_level": False}},
    "m2kd-multi-level": {"loss": {"multi_model": False, "last_model_all_old": True}},
    "joint": {"loss": {**NO_DISTILLATION, "aux_heads": False}, "memory": {"keep_all": True},
              "snapshots": {"policy": "full"}},
    # The bar a trained method must clear on a pretrained backbone: no training at all, the
    # frozen features classified by the nearest mean of the exemplars.
    "ncm-frozen": {"model": {"frozen_stages": -1}, "loss": {**NO_DISTILLATION, "aux_heads": False},
                   "train": {"epochs": 0, "classifier": "nme", "bias_correction": "none"},
                   "snapshots": {"policy": "full"}},
    # Learning without backprop: the frozen features, the closed-form head solved from every
    # image's statistics, NME where held-out images say it is better (few images per class).
    "analytic-frozen": {"model": {"frozen_stages": -1}, "loss": {**NO_DISTILLATION, "aux_heads": False},
                        "train": {"epochs": 0, "classifier": "auto", "bias_correction": "none"},
                        "snapshots": {"policy": "full"}},
}


def method_config(method: str, defaults: dict[str, dict[str, Any]] | None = None,
                  **sections: dict[str, Any]) -> LearnerConfig:
    """The config of a named method, field overrides per section, e.g.
    ``method_config("m2kd", train={"epochs": 5}, snapshots={"policy": "full"})``. In order:
    `defaults` (a schedule's, PRETRAINED_DEFAULTS), then the method's own settings (ncm-frozen
    trains no epochs, whatever a schedule says), then `sections` (a caller's explicit choice)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cfg = LearnerConfig(method=method)
    for overrides in (defaults or {}, METHODS[method], sections):
        for name, fields in overrides.items():
            section = getattr(cfg, name)
            for key, value in fields.items():
                if not hasattr(section, key):
                    raise ValueError(f"unknown {name} option {key!r}")
                setattr(section, key, value)
    return cfg
