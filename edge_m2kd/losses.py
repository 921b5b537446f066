"""The M2KD loss (DESIGN.md section 2), one function per term.

L = L_cls + a*L_aux + w*(b*L_mm + c*L_ml + d*L_pod). A teacher term is a (teacher step, class
columns) pair: M2KD's own-group terms ask snapshot M_k about its group C_k (with one more
column pooling the rest of what M_k knew, under the "own+rest" scope); the conventional term
asks M_{t-1} about every old class. The same terms serve the main head (L_mm) and, when
multi-level is on, each auxiliary head (L_ml). L_pod (off by default) distills the newest
snapshot's stage feature maps themselves, pooled along width and height as in PODNet. w is 1,
or sqrt(old classes / new classes) under the "adaptive" weight (UCIR, PODNet): the fewer
images the old classes have against the new, the harder distillation must pull.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_m2kd.config import LossConfig
from edge_m2kd.models import NetOutput


def group_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, softmax over the given columns only."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def pod_spatial(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PODNet's spatial distillation of one stage (Douillard et al. 2020): the squared maps
    summed along the width and along the height, L2-normalised, compared by Euclidean distance
    (mean over the batch). Pooled statistics leave the new classes room to move individual
    pixels while keeping where, along each axis, the old features fire."""
    def pooled(h: torch.Tensor) -> torch.Tensor:
        h = h.pow(2)
        return F.normalize(torch.cat([h.sum(dim=3).flatten(1), h.sum(dim=2).flatten(1)], dim=1), dim=1)

    return (pooled(student) - pooled(teacher)).norm(dim=1).mean()


def teacher_terms(step: int, groups: list[list[int]], cfg: LossConfig) -> list[tuple[int, list[int]]]:
    """(teacher step, class columns) for every distillation term of step `step` (1-based).
    `groups[k-1]` are the class ids first learned at step k."""
    terms: list[tuple[int, list[int]]] = []
    if step <= 1:
        return terms
    if cfg.multi_model:
        if cfg.distill_scope == "all-known":
            terms += [(k, [c for g in groups[:k] for c in g]) for k in range(1, step)]
        else:
            terms += [(k, groups[k - 1]) for k in range(1, step)]
    if cfg.last_model_all_old:
        terms.append((step - 1, [c for g in groups[: step - 1] for c in g]))
    return terms


@dataclass
class LossTerms:
    total: torch.Tensor
    # The terms as detached 0-d tensors: a float() per term and batch would wait for a GPU.
    cls: torch.Tensor
    aux: torch.Tensor
    mm: torch.Tensor
    ml: torch.Tensor
    pod: torch.Tensor


def scoped_logits(z: torch.Tensor, cols: list[int], known: int, scope: str, temperature: float) -> torch.Tensor:
    """The columns a term distills. "own+rest" appends one column pooling the other classes the
    teacher knew (ids below `known`), T*logsumexp(z/T), so that the softmax at temperature T
    gives the rest exactly the probability mass those classes have together."""
    rest = [c for c in range(known) if c not in cols] if scope == "own+rest" else []
    if not rest:
        return z[:, cols]
    pooled = temperature * torch.logsumexp(z[:, rest] / temperature, dim=1, keepdim=True)
    return torch.cat([z[:, cols], pooled], dim=1)


def _distill(student: list[torch.Tensor], teachers: list[list[torch.Tensor]],
             terms: list[tuple[int, list[int]]], cfg: LossConfig) -> torch.Tensor:
    """Mean over levels; over terms the mean (one scale at every step) or the sum (one weight
    per old group). `student[level]`, `teachers[i][level]` are logits; teachers[i] belongs to terms[i]
    and knows the classes of its own width."""
    T = cfg.temperature
    losses = torch.stack([
        group_kd(scoped_logits(s, cols, t.shape[1], cfg.distill_scope, T),
                 scoped_logits(t, cols, t.shape[1], cfg.distill_scope, T), T)
        for (_, cols), t_levels in zip(terms, teachers)
        for s, t in zip(student, t_levels)
    ])
    reduction = cfg.distill_reduction
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum() / len(student)
    raise ValueError(f"unknown distill_reduction {reduction!r}; use mean or sum")


def m2kd_loss(
    out: NetOutput,
    targets: torch.Tensor,
    terms: list[tuple[int, list[int]]],
    teacher_outs: dict[int, NetOutput],
    cfg: LossConfig,
    distill_scale: float = 1.0,  # sample_terms' weight, when the terms are a random subset
) -> LossTerms:
    zero = out.logits.new_zeros(())
    cls = F.cross_entropy(out.logits, targets)
    known = max((teacher_outs[k].logits.shape[1] for k, _ in terms), default=0)  # the old classes
    aux = zero
    if cfg.aux_heads and out.aux_logits:
        aux = torch.stack([F.cross_entropy(z, targets) for z in out.aux_logits]).mean()
    mm = ml = pod = zero
    if terms:
        mm = _distill([out.logits], [[teacher_outs[k].logits] for k, _ in terms], terms, cfg)
        if cfg.multi_level and out.aux_logits:
            ml = _distill(out.aux_logits, [teacher_outs[k].aux_logits for k, _ in terms], terms, cfg)
        if cfg.feature_distill == "pod":
            newest = teacher_outs[max(k for k, _ in terms)]
            if not newest.maps:
                raise ValueError("feature_distill 'pod' needs teachers that return their stage maps")
            pod = torch.stack([pod_spatial(s, t) for s, t in zip(out.maps, newest.maps)]).mean()
        elif cfg.feature_distill != "none":
            raise ValueError(f"unknown feature_distill {cfg.feature_distill!r}; use none or pod")
    mm, ml = mm * distill_scale, ml * distill_scale
    weight = distill_weight(cfg, known, out.logits.shape[1] - known)
    total = cls + cfg.aux_weight * aux + weight * (
        cfg.multi_model_weight * mm + cfg.multi_level_weight * ml + cfg.feature_weight * pod)
    return LossTerms(total, *(x.detach() for x in (cls, aux, mm, ml, pod)))


def distill_weight(cfg: LossConfig, old: int, new: int) -> float:
    """1 ("fixed"), or sqrt(old / new) classes ("adaptive", UCIR's lambda): at a one-class step
    after nine classes it is 3."""
    if cfg.distill_weight == "fixed" or old == 0 or new == 0:
        return 1.0
    if cfg.distill_weight == "adaptive":
        return (old / new) ** 0.5
    raise ValueError(f"unknown distill_weight {cfg.distill_weight!r}; use fixed or adaptive")


def sample_terms(terms: list[tuple[int, list[int]]], size: int, reduction: str,
                 generator: torch.Generator | None = None) -> tuple[list[tuple[int, list[int]]], float]:
    """A uniformly random subset of `size` terms (all of them when size is 0 or not smaller) and
    the distill_scale that makes m2kd_loss on it an unbiased estimate of m2kd_loss on all terms:
    1 for the mean over terms (a random subset's mean is unbiased), n/size for their sum."""
    n = len(terms)
    if size <= 0 or size >= n:
        return terms, 1.0
    chosen = sorted(torch.randperm(n, generator=generator)[:size].tolist())
    return [terms[i] for i in chosen], (n / size if reduction == "sum" else 1.0)
