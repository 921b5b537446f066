"""Snapshot stores: how the models of earlier steps are kept and handed back as teachers.

One interface for every policy (DESIGN.md section 2, "Snapshots"):

- hooks into the learner's step: ``prepare`` (before training), ``grad_masks`` (which
  entries of which parameters may move), ``consolidate`` (after training: prune, fine-tune);
- ``commit`` the model at the end of a step, ``teacher(k)`` hands back snapshot k frozen,
  ``bytes_report`` says what each snapshot costs, ``verify`` rebuilds each snapshot and
  compares its logits on a probe batch with the logits recorded at commit time;
- ``state``/``load`` turn a store into safetensors-ready tensors plus JSON metadata.

Policies: ``full`` (a copy per step), ``packed`` (PackNet-style nesting: an owner step per
prunable weight, snapshot k = current weights where owner <= k, plus per-step extras) and
``sparse`` (an independent magnitude-pruned copy per step: bitmap + fp16 values).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edge_m2kd.config import ModelConfig, SnapshotConfig
from edge_m2kd.models import IncrementalNet
from edge_m2kd.preprocess import model_input

State = dict[str, torch.Tensor]
# finetune(model, grad_masks, epochs): train `model` on the step's data with the step's losses,
# moving only the entries where the masks are 1 (parameters without a mask move freely).
Finetune = Callable[[IncrementalNet, dict[str, torch.Tensor], int], None]


def prunable_names(model: IncrementalNet) -> list[str]:
    """Backbone conv and linear weights outside the frozen stages: what pruning and ownership
    apply to. BatchNorm, biases and heads are small and stored per step instead; the frozen
    stages never change, so every snapshot shares the student's (see SnapshotStore.shared)."""
    frozen = model.frozen_names()
    names = [f"backbone.{name}.weight" for name, m in model.backbone.named_modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]
    return [n for n in names if n not in frozen]


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def build_model(model_cfg: ModelConfig, n_classes: int) -> IncrementalNet:
    model = IncrementalNet(model_cfg.backbone, model_cfg.aux_levels, model_cfg.small_input_stem,
                           model_cfg.frozen_stages)
    model.add_classes(n_classes)
    return model


def freeze(model: IncrementalNet) -> IncrementalNet:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def top_magnitude_mask(weight: torch.Tensor, candidates: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` largest-magnitude entries among `candidates`."""
    mask = torch.zeros_like(candidates)
    if keep <= 0:
        return mask
    scores = weight.abs().masked_fill(~candidates, -1.0).flatten()
    mask.view(-1)[scores.topk(keep).indices] = True
    return mask


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned integers (< 2**bits) into a byte string of len*bits bits."""
    as_bits = np.unpackbits(values.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(as_bits.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    as_bits = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    padded = np.concatenate([np.zeros((count, 8 - bits), np.uint8), as_bits], axis=1)
    return np.packbits(padded, axis=1).reshape(count)


@dataclass
class SnapshotBytes:
    step: int
    bytes: int  # what keeping this snapshot costs, shared structures shared out evenly
    full_copy_bytes: int  # a full fp32 copy of that step's model
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class VerifyResult:
    step: int
    max_abs_diff: float
    ok: bool


class SnapshotStore(ABC):
    policy: ClassVar[str]

    def __init__(self, cfg: SnapshotConfig, model_cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.n_classes: dict[int, int] = {}  # step -> classes known at that step
        self.probe: np.ndarray | None = None  # uint8 images, fixed at the first commit
        self.probe_logits: dict[int, torch.Tensor] = {}
        self._skeletons: dict[int, IncrementalNet] = {}
        # The frozen stages' tensors, the same in every snapshot: taken from the student, stored
        # with it, never per step.
        self.shared: State = {}
        # free_restart "pretrained": the learner sets this to a reader of the backbone's
        # pretrained weights, which a policy may take as what "no change" means (packed does).
        # The file is on disk, pinned by its sha256, so that costs a snapshot no bytes.
        self.base_weights: Callable[[], State] | None = None

    @property
    def steps(self) -> list[int]:
        return sorted(self.n_classes)

    # -- hooks into the learner's step (no-ops unless a policy needs them) --------------
    def prepare(self, model: IncrementalNet, step: int) -> None:
        """Before training step `step`."""

    def grad_masks(self, model: IncrementalNet) -> dict[str, torch.Tensor]:
        """Parameter name -> 0/1 mask of the entries training may change this step."""
        return {}

    def consolidate(self, model: IncrementalNet, step: int, finetune: Finetune) -> None:
        """After training, before the bias correction and the commit."""

    # -- storage ---------------------------------------------------------------------------
    def commit(self, step: int, model: IncrementalNet, probe: np.ndarray) -> None:
        if self.probe is None:
            self.probe = probe.copy()
        self.n_classes[step] = model.num_classes
        self.shared = _shared_state(model)
        snapshot_model = self._store(step, model)
        # verify() asks "is the stored snapshot intact?", so the reference logits come from the
        # same CPU rebuild that verify() runs: the trained model's logits on a GPU (TF32
        # convolutions on Ampere) differ from a CPU rebuild's by more than verify's tolerance.
        rebuilt = self._probe_logits(self.teacher(step))
        trained = self._probe_logits(snapshot_model)
        diff = (rebuilt - trained).abs().max().item()
        if diff > 1e-2 * max(1.0, trained.abs().max().item()):  # float noise passes, a wrong weight does not
            raise RuntimeError(f"snapshot {step} does not rebuild the model it was taken of (max abs logit diff {diff:.3g})")
        self.probe_logits[step] = rebuilt

    @abstractmethod
    def _store(self, step: int, model: IncrementalNet) -> nn.Module:
        """Keep step `step`; return the model whose outputs the snapshot must reproduce."""

    @abstractmethod
    def _snapshot_state(self, step: int) -> State:
        """Snapshot `step`'s tensors, from what the store keeps (the shared ones aside)."""

    def _rebuild(self, step: int) -> IncrementalNet:
        model = build_model(self.model_cfg, self.n_classes[step])
        return _load_partial(model, {**self._snapshot_state(step), **self.shared})

    def teacher(self, step: int) -> IncrementalNet:
        return freeze(self._rebuild(step))

    def _probe_logits(self, model: nn.Module) -> torch.Tensor:
        assert self.probe is not None
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.inference_mode():
            logits = model(model_input(self.probe, device), with_aux=False).logits.cpu()
        model.train(was_training)
        return logits

    def verify(self, atol: float = 1e-5) -> list[VerifyResult]:
        results = []
        for k in self.steps:
            diff = (self._probe_logits(self.teacher(k)) - self.probe_logits[k]).abs().max().item()
            results.append(VerifyResult(k, diff, diff <= atol))
        return results

    @abstractmethod
    def bytes_report(self) -> list[SnapshotBytes]: ...

    def full_copy_bytes(self, step: int) -> int:
        return state_bytes(self._skeleton(step).state_dict())

    def _skeleton(self, step: int) -> IncrementalNet:
        """An untrained model of step `step`'s shape (cached: building ResNet-18 takes a while)."""
        n = self.n_classes[step]
        if n not in self._skeletons:
            self._skeletons[n] = build_model(self.model_cfg, n)
        return self._skeletons[n]

    def _extras_layout(self, step: int) -> State:
        return _extras(self._skeleton(step))

    # -- persistence: tensors for safetensors, metadata for JSON -----------------------------
    def state(self) -> tuple[State, dict[str, Any]]:
        tensors = {f"probe_logits.{k}": v for k, v in self.probe_logits.items()}
        if self.probe is not None:
            tensors["probe"] = torch.from_numpy(self.probe)
        tensors.update(self._tensors())
        meta = {"policy": self.policy, "n_classes": {str(k): v for k, v in self.n_classes.items()}}
        return tensors, meta

    def load(self, tensors: State, meta: dict[str, Any], model: IncrementalNet) -> None:
        """`model`: the student, its weights loaded already; the store shares tensors with it."""
        self.n_classes = {int(k): v for k, v in meta["n_classes"].items()}
        self.probe = tensors["probe"].numpy() if "probe" in tensors else None
        self.probe_logits = {k: tensors[f"probe_logits.{k}"] for k in self.n_classes}
        self._load_tensors(tensors)
        self.attach(model, tensors)

    def attach(self, model: IncrementalNet, tensors: State) -> None:
        """Take what the store shares with the student (called by `load`)."""
        self.shared = _shared_state(model)

    @abstractmethod
    def _tensors(self) -> State: ...

    @abstractmethod
    def _load_tensors(self, tensors: State) -> None: ...


def _prefixed(prefix: str, state: State) -> State:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _unprefixed(prefix: str, tensors: State) -> State:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def _flatten(state: State) -> torch.Tensor:
    """One fp32 tensor for many small ones: a safetensors header entry costs about 100 bytes,
    as much as a BatchNorm layer's parameters, so per-step extras are stored flat."""
    return torch.cat([v.detach().float().flatten() for v in state.values()]) if state else torch.zeros(0)


def _unflatten(flat: torch.Tensor, like: State) -> State:
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = flat[offset : offset + ref.numel()].view(ref.shape).to(ref.dtype)
        offset += ref.numel()
    if offset != flat.numel():
        raise ValueError(f"stored extras hold {flat.numel()} values, the model expects {offset}")
    return out


def _shared_state(model: IncrementalNet) -> State:
    """The frozen stages' tensors, which every snapshot takes from the student."""
    frozen = model.frozen_names()
    return _cpu_copy({k: v for k, v in model.state_dict().items() if k in frozen})


def _cpu_copy(state: State) -> State:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class FullSnapshots(SnapshotStore):
    """A copy of every tensor per step: the naive multi-model cost and the accuracy reference."""

    policy = "full"

    def __init__(self, cfg: SnapshotConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.copies: dict[int, State] = {}

    def _store(self, step: int, model: IncrementalNet) -> nn.Module:
        self.copies[step] = _cpu_copy({k: v for k, v in model.state_dict().items() if k not in self.shared})
        return model

    def _snapshot_state(self, step: int) -> State:
        return self.copies[step]

    def bytes_report(self) -> list[SnapshotBytes]:
        return [
            SnapshotBytes(k, state_bytes(self.copies[k]), self.full_copy_bytes(k),
                          {"weights": state_bytes(self.copies[k])})
            for k in self.steps
        ]

    def _tensors(self) -> State:
        return {k: v for s, c in self.copies.items() for k, v in _prefixed(f"copy.{s}", c).items()}

    def _load_tensors(self, tensors: State) -> None:
        self.copies = {k: _unprefixed(f"copy.{k}", tensors) for k in self.n_classes}


def _extras(model: IncrementalNet) -> State:
    """What a snapshot keeps per step besides the prunable weights: BatchNorm statistics and
    affine parameters, biases, and the main and auxiliary head rows known at that step.
    (BatchNorm's batch counter only matters for training with momentum=None: not kept.)"""
    skip = set(prunable_names(model)) | model.frozen_names()
    return _cpu_copy({k: v for k, v in model.state_dict().items()
                      if k not in skip and not k.endswith("num_batches_tracked")})


def _load_partial(model: IncrementalNet, state: State) -> IncrementalNet:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"snapshot does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


class PackedSnapshots(SnapshotStore):
    """PackNet-style nesting: every prunable weight has an owner step (0 = free). At the end
    of step t the largest free weights are kept, fine-tuned, owned by t and frozen; snapshot
    k is the current weights where 0 < owner <= k plus step k's extras."""

    policy = "packed"

    def __init__(self, cfg: SnapshotConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.owner: dict[str, torch.Tensor] = {}  # name -> uint8 owner step per weight
        self.weights: State = {}  # the owned weights: the student's, frozen entries
        self.extras: dict[int, State] = {}
        self._base: State | None = None

    def base(self) -> State:
        """name -> what a weight no step owns holds (empty: zero). With a pretrained base, every
        snapshot is the pretrained network plus the changes of steps 1..k, and pruning keeps
        each step's largest changes from it."""
        if self._base is None:
            self._base = self.base_weights() if self.base_weights is not None else {}
        return self._base

    def share(self, step: int) -> float:
        """Fraction of all prunable weights step `step` keeps: the first step a fixed share,
        later steps `later_step_share`, capped at an equal part of the rest so `planned_steps` steps fit."""
        if step == 1:
            return self.cfg.first_step_share
        equal = (1.0 - self.cfg.first_step_share) / max(self.cfg.planned_steps - 1, 1)
        return equal if self.cfg.later_step_share is None else min(self.cfg.later_step_share, equal)

    def free_fraction(self) -> float:
        total = sum(o.numel() for o in self.owner.values())
        return sum(int((o == 0).sum()) for o in self.owner.values()) / max(total, 1)

    def prepare(self, model: IncrementalNet, step: int) -> None:
        params = dict(model.named_parameters())
        if not self.owner:
            self.owner = {n: torch.zeros_like(params[n], dtype=torch.uint8, device="cpu") for n in prunable_names(model)}
            return
        if self.free_fraction() < self.cfg.min_free_fraction:
            warnings.warn(
                f"packed snapshots: only {self.free_fraction():.1%} of the weights are free for step {step}; "
                "accuracy on new classes will suffer (plan more steps, or use --snapshots sparse)",
                stacklevel=2,
            )
        # Free weights were reset when the last step was packed: to their pretrained values (they
        # restart from there), or to zero. Restart zeros small: at full Kaiming scale they would
        # swamp the frozen weights' signal and the step would begin by destroying the features
        # every old class relies on; at zero they could not learn.
        base = self.base()
        with torch.no_grad():
            for name, owner in self.owner.items():
                w = params[name]
                if base:
                    fresh = base[name].to(w.device, w.dtype)
                else:
                    fresh = torch.empty_like(w)
                    nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu")
                    fresh.mul_(self.cfg.reinit_scale)
                free = (owner == 0).to(w.device)
                w.copy_(torch.where(free, fresh, w))

    def grad_masks(self, model: IncrementalNet) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        return {n: (o == 0).to(device, torch.float32) for n, o in self.owner.items()}

    def consolidate(self, model: IncrementalNet, step: int, finetune: Finetune) -> None:
        params = dict(model.named_parameters())
        base = self.base()
        kept: dict[str, torch.Tensor] = {}
        for name, owner in self.owner.items():
            w = params[name]
            free = (owner == 0).to(w.device)
            n_free = int(free.sum())
            keep = n_free if step >= self.cfg.planned_steps else min(n_free, round(self.share(step) * w.numel()))
            start = base[name].to(w.device) if base else torch.zeros((), device=w.device)
            kept[name] = top_magnitude_mask(w.detach() - start, free, keep)  # the largest changes
            with torch.no_grad():
                w.copy_(torch.where(free & ~kept[name], start, w))
        if self.cfg.prune_finetune_epochs > 0:
            finetune(model, {n: m.float() for n, m in kept.items()}, self.cfg.prune_finetune_epochs)
        for name, mask in kept.items():
            self.owner[name][mask.cpu()] = step
        if step < self.cfg.planned_steps and self.free_fraction() < self.cfg.min_free_fraction:
            warnings.warn(f"packed snapshots: {self.free_fraction():.1%} of the weights left free after step {step}",
                          stacklevel=2)

    def _store(self, step: int, model: IncrementalNet) -> nn.Module:
        params = dict(model.named_parameters())
        self.weights = {n: params[n].detach().to("cpu", copy=True) for n in self.owner}
        self.extras[step] = _extras(model)
        return model

    def _snapshot_state(self, step: int) -> State:
        state = dict(self.extras[step])
        base = self.base()
        for name, owner in self.owner.items():
            visible = (owner > 0) & (owner <= step)
            state[name] = torch.where(visible, self.weights[name], base[name] if base else torch.zeros(()))
        return state

    def owner_bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.n_classes) + 1)))

    def packed_owner_map(self) -> np.ndarray:
        if not self.owner:  # no step packed yet
            return np.zeros(0, np.uint8)
        flat = torch.cat([o.flatten() for o in self.owner.values()]).numpy()
        return pack_bits(flat, self.owner_bits())

    def bytes_report(self) -> list[SnapshotBytes]:
        share = self.packed_owner_map().nbytes / max(len(self.steps), 1)
        return [
            SnapshotBytes(
                k, round(share) + state_bytes(self.extras[k]), self.full_copy_bytes(k),
                {"owner_map_share": round(share), "extras": state_bytes(self.extras[k])},
            )
            for k in self.steps
        ]

    def _tensors(self) -> State:
        tensors = {"owner_map": torch.from_numpy(self.packed_owner_map())}
        tensors.update({f"extras.{s}": _flatten(extras) for s, extras in self.extras.items()})
        # The owned weights live in the student; they are saved with it, not here.
        return tensors

    def _load_tensors(self, tensors: State) -> None:
        self.extras = {k: _unflatten(tensors[f"extras.{k}"], self._extras_layout(k)) for k in self.n_classes}

    def attach(self, model: IncrementalNet, tensors: State) -> None:
        """Unpack the owner map against the student's shapes and take its weights."""
        super().attach(model, tensors)
        params = dict(model.named_parameters())
        names = prunable_names(model)
        count = sum(params[n].numel() for n in names)
        flat = torch.from_numpy(unpack_bits(tensors["owner_map"].numpy(), self.owner_bits(), count).copy())
        self.owner, offset = {}, 0
        for n in names:
            numel = params[n].numel()
            self.owner[n] = flat[offset : offset + numel].view(params[n].shape).clone()
            offset += numel
        self.weights = {n: params[n].detach().to("cpu", copy=True) for n in names}


class SparseSnapshots(SnapshotStore):
    """An independent magnitude-pruned copy per step (bitmap + fp16 values of the kept
    weights), fine-tuned briefly; the student itself stays dense and free."""

    policy = "sparse"

    def __init__(self, cfg: SnapshotConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.pruned: dict[int, IncrementalNet] = {}  # made by consolidate, kept by commit
        self.bitmaps: dict[int, State] = {}
        self.values: dict[int, State] = {}
        self.extras: dict[int, State] = {}

    def consolidate(self, model: IncrementalNet, step: int, finetune: Finetune) -> None:
        copy = build_model(self.model_cfg, model.num_classes).to(next(model.parameters()).device)
        copy.load_state_dict(model.state_dict())
        params = dict(copy.named_parameters())
        masks = {}
        for name in prunable_names(copy):
            w = params[name]
            keep = max(1, round(self.cfg.sparse_density * w.numel()))
            masks[name] = top_magnitude_mask(w.detach(), torch.ones_like(w, dtype=torch.bool), keep)
            with torch.no_grad():
                w.mul_(masks[name])
        if self.cfg.prune_finetune_epochs > 0:
            finetune(copy, {n: m.float() for n, m in masks.items()}, self.cfg.prune_finetune_epochs)
        # The snapshot is what the store can give back: round the kept values to fp16 now,
        # so its probe logits are those of the stored model.
        with torch.no_grad():
            for name in masks:
                params[name].copy_(params[name].half().float())
        self.pruned[step] = copy

    def _store(self, step: int, model: IncrementalNet) -> nn.Module:
        copy = self.pruned.pop(step)
        params = dict(copy.named_parameters())
        names = prunable_names(copy)
        self.bitmaps[step] = {n: torch.from_numpy(np.packbits((params[n] != 0).cpu().numpy().reshape(-1))) for n in names}
        self.values[step] = {n: params[n].detach().cpu()[params[n].detach().cpu() != 0].half() for n in names}
        self.extras[step] = _extras(copy)
        return copy

    def _snapshot_state(self, step: int) -> State:
        state = dict(self.extras[step])
        shapes = {k: v.shape for k, v in self._skeleton(step).state_dict().items()}
        for name, bitmap in self.bitmaps[step].items():
            numel = math.prod(shapes[name])
            mask = torch.from_numpy(np.unpackbits(bitmap.numpy())[:numel].astype(bool))
            w = torch.zeros(numel)
            w[mask] = self.values[step][name].float()
            state[name] = w.view(shapes[name])
        return state

    def bytes_report(self) -> list[SnapshotBytes]:
        rows = []
        for k in self.steps:
            parts = {
                "bitmap": state_bytes(self.bitmaps[k]),
                "values_fp16": state_bytes(self.values[k]),
                "extras": state_bytes(self.extras[k]),
            }
            rows.append(SnapshotBytes(k, sum(parts.values()), self.full_copy_bytes(k), parts))
        return rows

    def _tensors(self) -> State:
        tensors: State = {}
        for s in self.bitmaps:
            tensors.update(_prefixed(f"bitmap.{s}", self.bitmaps[s]))
            tensors.update(_prefixed(f"values.{s}", self.values[s]))
            tensors[f"extras.{s}"] = _flatten(self.extras[s])
        return tensors

    def _load_tensors(self, tensors: State) -> None:
        for k in self.n_classes:
            self.bitmaps[k] = _unprefixed(f"bitmap.{k}", tensors)
            self.values[k] = _unprefixed(f"values.{k}", tensors)
            self.extras[k] = _unflatten(tensors[f"extras.{k}"], self._extras_layout(k))


POLICIES: dict[str, type[SnapshotStore]] = {
    p.policy: p for p in (FullSnapshots, PackedSnapshots, SparseSnapshots)
}


def make_store(cfg: SnapshotConfig, model_cfg: ModelConfig) -> SnapshotStore:
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown snapshot policy {cfg.policy!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[cfg.policy](cfg, model_cfg)
