"""The classifiers a workspace can deploy over the backbone's pooled features, each written as one
linear layer (DESIGN.md, "The deployed classifier"): the corrected main head, nearest mean of
exemplars (NME), and the closed-form ("analytic") head.

The analytic head is a function of sums over images only: per class its image count and feature
sum, and one Gram matrix of every feature seen (`FeatureStats`, float64). Sums add up, so on a
frozen backbone the head after any sequence of steps is exactly the head of all images at once,
in any class order, and it reads every training image of a step, not only the exemplars kept.
Its regularisation is chosen on held-out images from one eigendecomposition, after which every
candidate costs one matrix product. Prior art: RanPAC and FeCAM (NeurIPS 2023).

Every head here reads L2-normalised features except the corrected main head, which the network
trained on raw pooled features.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from edge_m2kd.config import ANALYTIC_SOLVERS, OldStatistics

# Candidates, scaled to the data: ridge's lambda in units of trace(Gram) / dim (the mean
# eigenvalue; with normalised features trace = image count), LDA's shrinkage toward a multiple
# of the identity. The validation search (docs/benchmarks.md, "The closed-form head") found its
# optimum inside both ranges at 96, 160 and 224 px.
RIDGE_GRID = tuple(float(x) for x in np.logspace(-3, 1, 17))
LDA_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
DEFAULT_CHOICE = {"ridge": 0.1, "lda": 0.1}  # without held-out images (never in add-classes)

Linear = tuple[torch.Tensor, torch.Tensor]  # (weight (C, D), bias (C,))


def linear_scores(features: torch.Tensor, linear: Linear) -> torch.Tensor:
    w, b = linear
    return features @ w.to(features).T + b.to(features)


# -- the statistics -------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """Per class the image count and feature sum, and one Gram matrix of all features seen."""

    counts: torch.Tensor  # (C,) float64
    sums: torch.Tensor  # (C, D) float64
    gram: torch.Tensor  # (D, D) float64

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        f64 = torch.float64
        return cls(torch.zeros(0, dtype=f64), torch.zeros(0, dim, dtype=f64), torch.zeros(dim, dim, dtype=f64))

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def grow(self, n_classes: int) -> None:
        """Rows of no image for classes not seen yet (class ids are head rows, in order)."""
        extra = n_classes - self.num_classes
        if extra > 0:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])

    def add(self, class_id: int, features: torch.Tensor) -> None:
        """Add the (normalised) features of images of one class."""
        f = features.detach().to("cpu", torch.float64)
        self.grow(class_id + 1)
        self.counts[class_id] += len(f)
        self.sums[class_id] += f.sum(dim=0)
        self.gram += f.T @ f

    def merge(self, other: FeatureStats) -> None:
        """Add another set of sums (over other images) to these."""
        self.grow(other.num_classes)
        self.counts[: other.num_classes] += other.counts
        self.sums[: other.num_classes] += other.sums
        self.gram += other.gram

    def copy(self) -> FeatureStats:
        return FeatureStats(self.counts.clone(), self.sums.clone(), self.gram.clone())

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "sums": self.sums, "gram": self.gram}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor]) -> FeatureStats:
        return cls(tensors["counts"].double(), tensors["sums"].double(), tensors["gram"].double())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def checksum(self) -> str:
        h = hashlib.sha256()
        for t in self.state().values():
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def old_class_statistics(stats: FeatureStats, mode: OldStatistics, old_ids: list[int],
                         exemplar_features: Mapping[int, torch.Tensor], step_stats: FeatureStats) -> FeatureStats:
    """The statistics a trained backbone's analytic head is solved from at the end of a step.
    `stats` holds every image as summed (the old classes under older backbones), `step_stats` the
    step's new images alone, `exemplar_features` the old classes' exemplars under today's backbone
    (normalised features)."""
    if mode == "keep" or not old_ids or any(c not in exemplar_features for c in old_ids):
        return stats  # without exemplars (finetune, lwf) the sums are all there is
    if mode == "recompute":
        out = step_stats.copy()
        for c in old_ids:
            out.add(c, exemplar_features[c])
        out.grow(stats.num_classes)
        return out
    # "blend": move each old class's mean to where today's exemplars put it, and keep the spread
    # around the mean that every image summed: G = sum_c (W_c + n_c mu_c mu_c^T).
    out = stats.copy()
    for c in old_ids:
        n = float(stats.counts[c])
        mu_old = stats.sums[c] / n
        mu_new = exemplar_features[c].to(torch.float64).mean(dim=0)
        out.gram += n * (torch.outer(mu_new, mu_new) - torch.outer(mu_old, mu_old))
        out.sums[c] = n * mu_new
    return out


# -- solving the closed-form head -----------------------------------------------------------
@dataclass
class AnalyticFit:
    """A solved analytic head: its linear layer, the regularisation chosen and how."""

    solver: str
    regularisation: float
    weight: torch.Tensor  # (C, D) float32
    bias: torch.Tensor  # (C,)
    held_out_accuracy: float | None  # of the chosen candidate, on the images that chose it

    def linear(self) -> Linear:
        return self.weight, self.bias


def _spectral(stats: FeatureStats, solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(eigenvalues, eigenvectors, targets, per-class means or None, scale) of the system each
    candidate solves; `features @ U` and `U.T @ targets` are all a candidate needs besides."""
    n, s, g = stats.counts, stats.sums, stats.gram
    if solver == "ridge":
        # Ridge regression onto one-hot targets with a bias: the features get a constant 1, whose
        # Gram row is the sum of all features and the image count. X^T Y is the class sums.
        total = s.sum(dim=0)
        ga = torch.cat([torch.cat([g, total[:, None]], 1), torch.cat([total, n.sum().view(1)])[None]], 0)
        targets = torch.cat([s, n[:, None]], 1).T  # (D+1, C)
        ev, u = torch.linalg.eigh(ga)
        return ev, u, targets, torch.zeros(0), float(torch.trace(g)) / g.shape[0]
    # Shrinkage LDA with one covariance for all classes and equal priors.
    means = s / n[:, None]
    within = (g - s.T @ means) / max(float(n.sum()) - len(n), 1.0)
    ev, u = torch.linalg.eigh(within)
    return ev, u, means.T, means, float(torch.trace(within)) / g.shape[0]


def _candidate(solver: str, ev: torch.Tensor, scale: float, reg: float) -> torch.Tensor:
    if solver == "ridge":
        return 1.0 / (ev.clamp_min(0) + reg * scale)
    return 1.0 / ((1 - reg) * ev.clamp_min(0) + reg * scale)


def _gcv_choice(ev: torch.Tensor, proj_targets: torch.Tensor, n: float, scale: float,
                grid: tuple[float, ...]) -> float:
    """Ridge's lambda of least generalised cross-validation error (Golub, Heath and Wahba 1979),
    n * RSS / (n - df)^2 with df = trace of the hat matrix, all from the eigendecomposition and the
    projected targets (one-hot targets: |Y|^2 = n)."""
    ev = ev.clamp_min(0)
    p2 = (proj_targets**2).sum(1)  # per eigenvector, over the classes
    scores = {}
    for reg in grid:
        inv = 1.0 / (ev + reg * scale)
        rss = n - 2 * float((p2 * inv).sum()) + float((p2 * ev * inv**2).sum())
        df = float((ev * inv).sum())
        if df < n:  # with fewer images than features a weak lambda fits them all: no estimate
            scores[reg] = n * rss / (n - df) ** 2
    return min(scores, key=scores.__getitem__) if scores else max(grid)


def solve_analytic(stats: FeatureStats, solver: str, held_out: tuple[torch.Tensor, np.ndarray] | None = None,
                   grid: tuple[float, ...] | None = None) -> AnalyticFit | None:
    """The analytic head of `stats`, or None while some class has no image (a workspace made
    before the statistics existed, for a class no exemplar remembers).

    Ridge's lambda is chosen by generalised cross-validation, from the statistics alone: every
    training image takes part, and the choice is as order-free as the sums. LDA's shrinkage is
    chosen on `held_out` (normalised features, labels) where given: the most images right, ties to
    the stronger shrinkage. Why not ridge on held-out images too: 20 images per class are few; at
    160 px they picked a lambda 2.1 points below GCV's on the test set of the same run, while GCV's
    choice was within 0.2 points of the best on a validation split at 96, 160 and 224 px
    (docs/benchmarks.md, "The closed-form head")."""
    if solver not in ANALYTIC_SOLVERS:
        raise ValueError(f"unknown analytic solver {solver!r}; choose one of {', '.join(ANALYTIC_SOLVERS)}")
    if stats.num_classes == 0 or bool((stats.counts <= 0).any()):
        return None
    grid = grid or (RIDGE_GRID if solver == "ridge" else LDA_GRID)
    ev, u, targets, means, scale = _spectral(stats, solver)
    proj_targets = u.T @ targets  # (D', C)
    chosen = DEFAULT_CHOICE[solver] if DEFAULT_CHOICE[solver] in grid else grid[len(grid) // 2]
    best: int | None = None
    if solver == "ridge" and len(grid) > 1:
        chosen = _gcv_choice(ev, proj_targets, float(stats.counts.sum()), scale, grid)
    elif held_out is not None and len(held_out[1]):
        x = held_out[0].to("cpu", torch.float64)
        if solver == "ridge":
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        xu, labels = x @ u, torch.as_tensor(held_out[1])
        for reg in sorted(grid, reverse=True):  # strongest first, so a tie keeps it
            inv = _candidate(solver, ev, scale, reg)
            w_t = proj_targets * inv[:, None]  # (D', C) in the eigenbasis
            if solver == "ridge":
                scores = xu @ w_t
            else:  # w_c = S^-1 mu_c, b_c = -mu_c . w_c / 2
                scores = xu @ w_t - 0.5 * (proj_targets * w_t).sum(0)
            right = int((scores.argmax(1) == labels).sum())
            if best is None or right > best:
                chosen, best = reg, right
    inv = _candidate(solver, ev, scale, chosen)
    w = (u @ (proj_targets * inv[:, None])).T  # (C, D')
    if solver == "ridge":
        weight, bias = w[:, :-1], w[:, -1]
    else:
        weight, bias = w, -0.5 * (w * means).sum(1)
        # The inverse covariance scales these logits far past 1 (the class means' Mahalanobis
        # distances), where float32 rounding alone exceeds the export's parity limit; a common
        # positive scale changes no decision, so rows get a mean norm of 1, as NME's have.
        scale = weight.norm(dim=1).mean().clamp_min(1e-12)
        weight, bias = weight / scale, bias / scale
    weight, bias = weight.float().contiguous(), bias.float().contiguous()
    accuracy = None
    if held_out is not None and len(held_out[1]):
        scores = linear_scores(held_out[0].cpu().float(), (weight, bias))
        accuracy = float((scores.argmax(1) == torch.as_tensor(held_out[1])).float().mean())
    return AnalyticFit(solver, chosen, weight, bias, accuracy)


# -- the heads ------------------------------------------------------------------------------
class Head(ABC):
    """One deployable classifier: a linear layer over pooled (or normalised) features."""

    name: ClassVar[str]
    normalized: ClassVar[bool]  # reads L2-normalised features

    @abstractmethod
    def linear(self) -> Linear: ...

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        return linear_scores(F.normalize(pooled, dim=1) if self.normalized else pooled, self.linear())


class CorrectedHead(Head):
    """The network's main head, after the step's bias correction."""

    name, normalized = "cnn", False

    def __init__(self, head: torch.nn.Linear) -> None:
        self.head = head

    def linear(self) -> Linear:
        return self.head.weight.detach().cpu(), self.head.bias.detach().cpu()


class NMEHead(Head):
    """Nearest mean of exemplars: argmin |f - m_c|^2 = argmax (m_c . f - |m_c|^2 / 2), |f| = 1."""

    name, normalized = "nme", True

    def __init__(self, class_means: torch.Tensor) -> None:
        self.class_means = class_means

    def linear(self) -> Linear:
        w = self.class_means.detach().cpu()
        return w, -0.5 * (w * w).sum(dim=1)


class AnalyticHead(Head):
    """The closed-form head solved from every image's statistics (ridge or shrinkage LDA)."""

    name, normalized = "analytic", True

    def __init__(self, fit: AnalyticFit) -> None:
        self.fit = fit

    def linear(self) -> Linear:
        return self.fit.linear()


HEADS: dict[str, type[Head]] = {h.name: h for h in (CorrectedHead, NMEHead, AnalyticHead)}
