"""The incremental network: a staged backbone, a main head over all known classes, and
auxiliary heads (global average pool + linear) on intermediate stages. Heads grow when
classes are added; the rows of old classes are kept as they are."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edge_m2kd.models.backbones import build_backbone


class GrowingLinear(nn.Module):
    """A linear layer whose output rows (one per class) can be appended to."""

    def __init__(self, in_features: int, out_features: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))
        if out_features:
            self.grow(out_features)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def grow(self, n: int) -> None:
        if n <= 0:
            return
        new_w = torch.empty(n, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(new_w, a=math.sqrt(5))  # nn.Linear's own initialisation
        bound = 1 / math.sqrt(self.in_features)
        new_b = torch.empty(n, device=self.bias.device).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, new_w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, new_b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class NetOutput:
    logits: torch.Tensor  # main head, all known classes
    aux_logits: list[torch.Tensor]  # one per auxiliary level
    features: torch.Tensor  # pooled last stage, what NME and herding use
    # Every stage's output map, for feature-map distillation (LossConfig.feature_distill).
    maps: list[torch.Tensor] = field(default_factory=list)


class IncrementalNet(nn.Module):
    def __init__(
        self,
        backbone: str = "resnet32",
        aux_levels: list[int] | None = None,
        small_input_stem: bool = False,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone, small_input_stem)
        channels: list[int] = self.backbone.stage_channels
        stages: list[list[nn.Module]] = self.backbone.stage_modules()
        self.n_frozen = len(stages) if frozen_stages < 0 else min(frozen_stages, len(stages))
        # Plain lists, not ModuleLists: the modules are registered once, in the backbone.
        self._stages = stages
        self.frozen_modules: list[nn.Module] = [m for stage in stages[: self.n_frozen] for m in stage]
        for m in self.frozen_modules:
            m.requires_grad_(False)
        # Default: every stage but the last (whose output the main head already reads).
        self.aux_levels = list(range(len(channels) - 1)) if aux_levels is None else list(aux_levels)
        self.main_head = GrowingLinear(channels[-1])
        self.aux_heads = nn.ModuleList([GrowingLinear(channels[i]) for i in self.aux_levels])
        self.feature_dim = channels[-1]

    @property
    def num_classes(self) -> int:
        return self.main_head.out_features

    def frozen_names(self) -> set[str]:
        """state_dict keys of the frozen stages: constant from the first step on."""
        ids = {id(t) for m in self.frozen_modules for t in [*m.parameters(), *m.buffers()]}
        return {k for k, t in self.state_dict(keep_vars=True).items() if id(t) in ids}

    def train(self, mode: bool = True) -> IncrementalNet:
        """Frozen stages stay in eval mode: their BatchNorm statistics are part of what is frozen."""
        super().train(mode)
        for m in self.frozen_modules:
            m.eval()
        return self

    def add_classes(self, n: int) -> None:
        for head in [self.main_head, *self.aux_heads]:
            head.grow(n)

    def _run_stages(self, x: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        # Every backbone's forward is its stage modules applied in order (models/backbones.py).
        outputs = []
        for stage in self._stages[start:stop]:
            for module in stage:
                x = module(x)
            outputs.append(x)
        return outputs

    def frozen_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen stages' outputs. They are the same for the student and for every teacher
        (which share those weights), so a training step computes them once per batch."""
        return self._run_stages(x, 0, self.n_frozen)

    def forward(self, x: torch.Tensor, with_aux: bool = True, frozen: list[torch.Tensor] | None = None,
                with_maps: bool = True) -> NetOutput:
        """`frozen`: frozen_outputs(x), when the caller has them already; `with_maps`: keep every
        stage's map in the output (NetOutput.maps), else leave it empty."""
        frozen = frozen or []
        stages = [*frozen, *self._run_stages(frozen[-1] if frozen else x, len(frozen), len(self._stages))]
        features = stages[-1].mean(dim=(2, 3))
        aux = []
        if with_aux:
            aux = [head(stages[i].mean(dim=(2, 3))) for i, head in zip(self.aux_levels, self.aux_heads)]
        return NetOutput(self.main_head(features), aux, features, stages if with_maps else [])


class DeployedClassifier(nn.Module):
    """What a device runs: backbone, pooled features, one linear layer, and nothing else.

    With NME the class means are written as a linear layer over L2-normalised features:
    argmin |f - m_c|^2 = argmax (m_c . f - |m_c|^2 / 2), since |f| = 1 for every class.
    Input normalisation (mean/std) is folded in, so the runtime feeds [0, 1] RGB in NCHW.
    """

    def __init__(
        self,
        backbone: nn.Module,
        weight: torch.Tensor,
        bias: torch.Tensor,
        normalize_features: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        self.head.weight.data.copy_(weight)
        self.head.bias.data.copy_(bias)
        self.normalize_features = normalize_features
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone((x - self.mean) / self.std)[-1].mean(dim=(2, 3))
        if self.normalize_features:
            features = F.normalize(features, dim=1)
        return self.head(features)
