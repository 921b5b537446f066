"""The frozen teachers a step reads, run as one forward.

Step t asks t-1 snapshots about every batch. Run one after another, the narrow layers of a
ResNet-32 (16 to 64 channels) cannot keep two CPU cores busy, and each teacher costs a
full forward's overhead. So the teachers are folded and stacked:

- BatchNorm is folded into the convolution before it (frozen statistics make it affine);
- the K teachers' convolutions become one convolution with K times the output channels:
  the stem reads the shared input image (groups=1), every later layer reads its own
  teacher's channels (groups=K), so teacher i's channels never mix with teacher j's.

The outputs equal the teachers' own to float tolerance (tests/test_teachers.py); the loss
reads them exactly as it reads unstacked teachers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edge_m2kd.models import IncrementalNet, NetOutput
from edge_m2kd.models.resnet import BasicBlock


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to conv followed by (eval-mode) bn."""
    fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
    assert fused.bias is not None
    return fused.weight.detach(), fused.bias.detach()


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm into the convolution registered just before it in the
    same module (conv1/bn1 of a ResNet block, conv/BN of a Sequential): our backbones apply
    each such BatchNorm directly to that convolution's output, and only there."""
    for module in list(net.modules()):
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(module, bn_name, nn.Identity())
    return net


class StackedConv(nn.Module):
    """K folded conv+BN pairs as one convolution. `shared_input`: all K read the same input
    (the stem); otherwise each reads its own slice of the input channels (groups=K)."""

    def __init__(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], shared_input: bool) -> None:
        super().__init__()
        folded = [fold_bn(conv, bn) for conv, bn in pairs]
        self.register_buffer("weight", torch.cat([w for w, _ in folded]))
        self.register_buffer("bias", torch.cat([b for _, b in folded]))
        conv = pairs[0][0]
        self.stride, self.padding = conv.stride, conv.padding
        self.groups = 1 if shared_input else len(pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=self.groups)


class StackedBlock(nn.Module):
    def __init__(self, blocks: list[BasicBlock]) -> None:
        super().__init__()
        self.conv1 = StackedConv([(b.conv1, b.bn1) for b in blocks], shared_input=False)
        self.conv2 = StackedConv([(b.conv2, b.bn2) for b in blocks], shared_input=False)
        self.shortcut: nn.Module = nn.Identity()
        if not isinstance(blocks[0].shortcut, nn.Identity):
            self.shortcut = StackedConv([(b.shortcut[0], b.shortcut[1]) for b in blocks], shared_input=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


def _stacked_stem(stems: list[nn.Module]) -> nn.Sequential:
    """The stems are conv, BN, ReLU (and a max-pool for ResNet-18) in that order."""
    leaves = [[m for m in stem.modules() if not list(m.children())] for stem in stems]
    layers: list[nn.Module] = []
    i = 0
    while i < len(leaves[0]):
        m = leaves[0][i]
        if isinstance(m, nn.Conv2d):
            layers.append(StackedConv([(ls[i], ls[i + 1]) for ls in leaves], shared_input=not layers))
            i += 2
            continue
        if not isinstance(m, nn.ReLU | nn.MaxPool2d):
            raise TypeError(f"cannot stack a stem layer of type {type(m).__name__}")
        layers.append(m)
        i += 1
    return nn.Sequential(*layers)


class StackedTeachers(nn.Module):
    """Frozen snapshots (same backbone) as one module: forward(x) -> {step: NetOutput}."""

    def __init__(self, teachers: dict[int, IncrementalNet]) -> None:
        super().__init__()
        self.steps = sorted(teachers)
        nets = [teachers[k].eval() for k in self.steps]
        self.k = len(nets)
        self.stem = _stacked_stem([n.backbone.stem for n in nets])
        self.stages = nn.ModuleList(
            nn.Sequential(*(StackedBlock([n.backbone.stages[s][b] for n in nets]) for b in range(len(stage))))
            for s, stage in enumerate(nets[0].backbone.stages)
        )
        self.aux_levels = nets[0].aux_levels
        self.heads = [(n.main_head.weight.detach(), n.main_head.bias.detach()) for n in nets]
        self.aux_heads = [[(h.weight.detach(), h.bias.detach()) for h in n.aux_heads] for n in nets]
        for p in self.parameters():
            p.requires_grad_(False)

    def to(self, *args, **kwargs):  # noqa: ANN002, ANN003 - heads are plain tensors: move (and cast) them too
        super().to(*args, **kwargs)
        device, dtype = self.stem[0].weight.device, self.stem[0].weight.dtype
        self.heads = [(w.to(device, dtype), b.to(device, dtype)) for w, b in self.heads]
        self.aux_heads = [[(w.to(device, dtype), b.to(device, dtype)) for w, b in heads] for heads in self.aux_heads]
        return self

    def forward(self, x: torch.Tensor, with_aux: bool = True, frozen: list[torch.Tensor] | None = None,
                steps: set[int] | None = None, with_maps: bool = True) -> dict[int, NetOutput]:
        """`frozen` and `steps` are accepted for the common interface; stacked teachers compute
        every stage of every teacher."""
        n = len(x)
        h = self.stem(x)
        pooled, maps = [], []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
            pooled.append(h.mean(dim=(2, 3)).view(n, self.k, -1))
        out = {}
        for i, step in enumerate(self.steps):
            features = pooled[-1][:, i]
            aux = []
            if with_aux:
                aux = [F.linear(pooled[lvl][:, i], w, b) for lvl, (w, b) in zip(self.aux_levels, self.aux_heads[i])]
            own_maps = [m.view(n, self.k, -1, *m.shape[2:])[:, i] for m in maps] if with_maps else []
            out[step] = NetOutput(F.linear(features, *self.heads[i]), aux, features, own_maps)
        return out


class SeparateTeachers(nn.Module):
    """The reference path: each teacher runs its own forward (same interface as stacked)."""

    def __init__(self, teachers: dict[int, IncrementalNet]) -> None:
        super().__init__()
        self.steps = sorted(teachers)
        self.nets = nn.ModuleList([teachers[k].eval() for k in self.steps])

    def forward(self, x: torch.Tensor, with_aux: bool = True, frozen: list[torch.Tensor] | None = None,
                steps: set[int] | None = None, with_maps: bool = True) -> dict[int, NetOutput]:
        """`frozen`: the outputs of the stages every teacher shares with the student, if known;
        `steps`: only these teachers (a random subset of the terms, losses.sample_terms);
        `with_maps`: keep each stage's map (IncrementalNet.forward)."""
        return {k: net(x, with_aux=with_aux, frozen=frozen, with_maps=with_maps) for k, net in zip(self.steps, self.nets)
                if steps is None or k in steps}


class FoldedTeachers(SeparateTeachers):
    """Each teacher folded (BatchNorm into its convolutions) but run on its own: no grouped
    convolution, which oneDNN runs slowly on one CPU thread (benchmarks/overhead.py). Works
    for every backbone (stacking needs ResNet blocks)."""

    def __init__(self, teachers: dict[int, IncrementalNet]) -> None:
        super().__init__({k: fold_batchnorm(net.eval()) for k, net in teachers.items()})


TEACHER_MODES = {"stacked": StackedTeachers, "folded": FoldedTeachers, "separate": SeparateTeachers}


def build_teachers(teachers: dict[int, IncrementalNet], mode: str) -> nn.Module | None:
    if not teachers:
        return None
    if mode not in TEACHER_MODES:
        raise ValueError(f"unknown teacher mode {mode!r}; choose one of {sorted(TEACHER_MODES)}")
    return TEACHER_MODES[mode](teachers)
