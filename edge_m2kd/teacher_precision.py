"""Teachers in a cheaper number format (TrainConfig.teacher_precision).

Teachers are frozen and the loss reads only their logits, so they can run in fewer bits than
the student trains in:

- ``int8`` (CPU): PyTorch's static quantization (``torch.ao.quantization.quantize_fx``, x86 /
  fbgemm kernels; qnnpack on ARM) of each BatchNorm-folded teacher, stage by stage, calibrated
  on a few batches of the step's own training images. Each stage takes and returns float
  tensors, so the stages a student shares with its teachers (``frozen``) and every NetOutput
  are computed exactly as for an fp32 teacher (IncrementalNet.forward builds them).
- ``fp16`` / ``bf16``: the teacher modules cast to that dtype, their outputs cast back to fp32
  (an Orin's tensor cores under CUDA; bf16 also runs on CPU, slowly without AVX-512 BF16).
- ``auto``: the fastest format for the device whose logits stay within ``tolerance`` of fp32
  (int8 on an x86/ARM CPU, then bf16 where the CPU has bf16 kernels; fp16 under CUDA), checked
  at the start of every step on batches the calibration did not see; fp32 when every one fails.

``prepare(...)`` returns the teachers to use and a ``PrecisionChoice`` saying what was asked,
what runs, and the measured error (max abs logit difference and KL at the loss temperature,
over every teacher's main and, when read, auxiliary heads).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_m2kd.config import TEACHER_PRECISIONS
from edge_m2kd.errors import UserError
from edge_m2kd.models import IncrementalNet, NetOutput
from edge_m2kd.teachers import SeparateTeachers, fold_batchnorm

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ``auto`` quantizes to int8 only when each teacher reads at least this many images in the step:
# tracing, converting and checking an int8 ResNet-32 teacher took as long as about 27 fp32-minus-int8
# batches of 64 at 32 px save (benchmarks.step_profile, 2 shared cores), so a small step would lose.
INT8_MIN_IMAGES = 3000
# (x, frozen stage outputs of x): what a teacher reads for one batch
Batch = tuple[torch.Tensor, list[torch.Tensor]]


def check_precision(name: str) -> str:
    if name not in TEACHER_PRECISIONS:
        raise UserError(f"unknown teacher precision {name!r}; choose one of {', '.join(TEACHER_PRECISIONS)}")
    return name


def int8_engine() -> str | None:
    """The quantized kernels this torch has for int8 teachers, best first; None: no int8 here."""
    try:
        import torch.ao.quantization.quantize_fx  # noqa: F401 - present since torch 1.13
    except ImportError:  # pragma: no cover - a torch built without quantization
        return None
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)


def fast_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without oneDNN
        return False


def candidates(device: torch.device) -> list[str]:
    """What ``auto`` tries on this device, fastest first; fp32 is the fallback. On a CPU int8,
    then bf16 where oneDNN has bf16 kernels (measured here, one ResNet-32 teacher at batch 64:
    int8 4.1x, bf16 2.4x faster than fp32); fp16 under CUDA (an Orin's tensor cores)."""
    if device.type == "cuda":
        return ["fp16"]
    return (["int8"] if int8_engine() else []) + (["bf16"] if fast_cpu_bf16() else [])


@dataclass
class PrecisionChoice:
    requested: str
    used: str
    tolerance_kl: float | None = None
    # per tried format: {"max_abs": largest |logit - fp32 logit|, "kl": largest mean KL at T, "scale": max |fp32 logit|}
    errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def logit_error(reference: dict[int, NetOutput], got: dict[int, NetOutput], temperature: float) -> dict[str, float]:
    """Largest |difference| of the logits, and the largest batch-mean KL(softmax(ref/T) || softmax(got/T)),
    over every teacher and every head (main and auxiliary) present in both."""
    max_abs = kl = scale = 0.0
    for step, ref in reference.items():
        for a, b in zip([ref.logits, *ref.aux_logits], [got[step].logits, *got[step].aux_logits], strict=True):
            a, b = a.float(), b.float()
            if not a.numel():
                continue
            max_abs = max(max_abs, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
            kl = max(kl, F.kl_div(F.log_softmax(b / temperature, dim=1), F.log_softmax(a / temperature, dim=1),
                                  log_target=True, reduction="batchmean").item())
    return {"max_abs": max_abs, "kl": kl, "scale": scale}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class CastTeachers(nn.Module):
    """Any teachers module run in `dtype`: inputs cast in, every NetOutput field cast back to fp32."""

    def __init__(self, teachers: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = teachers.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, with_aux: bool = True, frozen: list[torch.Tensor] | None = None,
                steps: set[int] | None = None, with_maps: bool = True) -> dict[int, NetOutput]:
        outs = self.inner(x.to(self.dtype), with_aux=with_aux, frozen=_cast(frozen, self.dtype), steps=steps,
                          with_maps=with_maps)
        return {k: NetOutput(**{f.name: _cast(getattr(o, f.name), torch.float32) for f in dataclasses.fields(o)})
                for k, o in outs.items()}


def _qconfig(engine: str) -> Any:
    from torch.ao.quantization import (
        MinMaxObserver,
        QConfig,
        default_per_channel_weight_observer,
        get_default_qconfig_mapping,
    )

    class ChannelsLastMinMaxObserver(MinMaxObserver):
        """MinMaxObserver reading a channels_last tensor in its memory order: torch.aminmax over
        the NCHW view of one was 7x slower here than over the same bytes read as NHWC."""

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.ndim == 4 and x_orig.is_contiguous(memory_format=torch.channels_last):
                super().forward(x_orig.permute(0, 2, 3, 1))
                return x_orig
            return super().forward(x_orig)

    # Activations observed by their min and max, not the default histogram: its search took
    # most of a teacher's conversion time (seconds per teacher); the KL check says whether it holds.
    activation = ChannelsLastMinMaxObserver.with_args(reduce_range=engine in ("x86", "fbgemm"))
    return get_default_qconfig_mapping(engine).set_global(QConfig(activation, default_per_channel_weight_observer))


def _stage_modules(net: IncrementalNet) -> list[nn.Module]:
    """The stages `net` does not share with the student (those past its frozen ones), each one module."""
    return [nn.Sequential(*modules).eval() for modules in net._stages[net.n_frozen:]]


def _without_identities(stage: nn.Module) -> torch.fx.GraphModule:
    """`stage` traced, with the Identity modules that folding left where each BatchNorm was taken
    out: between a convolution and its ReLU they hide the pair from quantize_fx's conv+ReLU fusion,
    and every ReLU then ran as an int8 op of its own (6% of the int8 teachers' op time in a profile)."""
    graph = torch.fx.symbolic_trace(stage)
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and isinstance(graph.get_submodule(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


def _load_weights(observed: nn.Module, stage: nn.Module) -> nn.Module:
    """`observed` (a traced, uncalibrated stage of the same architecture) with `stage`'s weights.
    Tracing fuses conv+ReLU into one module at the conv's name, with the conv as its first child."""
    for name, module in stage.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            target = observed.get_submodule(name)
            if not isinstance(target, nn.Conv2d | nn.Linear):
                target = target[0]  # type: ignore[index]
            with torch.no_grad():
                target.weight.copy_(module.weight)
                if module.bias is not None:
                    target.bias.copy_(module.bias)
    return observed


class Int8Teachers(SeparateTeachers):
    """Each teacher folded and quantized to int8 (same interface as the others): every stage it
    does not share with the student becomes an int8 GraphModule that reads and returns floats,
    calibrated on `batches`. Stage graphs are traced once, on the first teacher, and the others
    load their weights into copies (tracing and inserting observers is most of the cost)."""

    def __init__(self, teachers: dict[int, IncrementalNet], batches: Sequence[Batch], engine: str) -> None:
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = engine
        nets = {k: fold_batchnorm(copy.deepcopy(net).eval()) for k, net in teachers.items()}
        inputs = [frozen[-1] if frozen else x for x, frozen in batches]
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            templates, h = [], inputs[0]
            for stage in _stage_modules(next(iter(nets.values()))):
                templates.append(prepare_fx(_without_identities(copy.deepcopy(stage)), _qconfig(engine), (h,)))
                with torch.no_grad():
                    h = stage(h)
            for net in nets.values():
                quantized, hs = [], inputs
                for template, stage in zip(templates, _stage_modules(net), strict=True):
                    observed = _load_weights(copy.deepcopy(template), stage)
                    with torch.no_grad():
                        hs = [observed(h) for h in hs]  # observers pass floats through unchanged
                    quantized.append(convert_fx(observed))
                net.int8_stages = nn.ModuleList(quantized)  # registered: part of the module tree
                net._stages = [*net._stages[: net.n_frozen], *([q] for q in quantized)]
        super().__init__(nets)


def build(teachers: nn.Module, precision: str, calibration: Sequence[Batch]) -> nn.Module:
    """`teachers` (a SeparateTeachers-like module holding IncrementalNets in .nets, or any
    teachers module for fp16/bf16) in `precision` (not auto)."""
    if precision == "fp32":
        return teachers
    if precision in DTYPES:
        return CastTeachers(copy.deepcopy(teachers), DTYPES[precision])
    assert precision == "int8", precision
    engine = int8_engine()
    if engine is None:
        raise UserError("int8 teachers need PyTorch's quantized CPU kernels, which this torch lacks; "
                        "use --teacher-precision fp32 or auto")
    if not isinstance(teachers, SeparateTeachers):
        raise UserError("int8 teachers run each teacher on its own; use teacher_mode folded (the default) or separate")
    device = next(teachers.parameters()).device
    if device.type != "cpu":
        raise UserError(f"int8 teachers run on the CPU only (PyTorch's quantized kernels), not on {device}; "
                        "use --teacher-precision fp16 or auto")
    return Int8Teachers(dict(zip(teachers.steps, teachers.nets)), calibration, engine)  # type: ignore[arg-type]


def prepare(teachers: nn.Module | None, precision: str, device: torch.device,
            batches: Callable[[int], list[Batch]], with_aux: bool, temperature: float,
            tolerance_kl: float, calibration_batches: int = 2, check_batches: int = 2,
            teacher_images: int | None = None) -> tuple[nn.Module | None, PrecisionChoice]:
    """The step's teachers in the configured precision. `batches(n)`: n batches of the step's
    own (augmented) training images. int8 is calibrated on `calibration_batches` of them; with
    ``auto`` every candidate is compared with fp32 on `check_batches` others and used only if
    its KL stays below `tolerance_kl`; `teacher_images` (what each teacher will read in the step)
    below INT8_MIN_IMAGES leaves int8 out of ``auto``: its set-up would cost more than it saves."""
    check_precision(precision)
    if teachers is None or precision == "fp32":
        return teachers, PrecisionChoice(precision, "fp32")
    tried = [precision] if precision != "auto" else candidates(device)
    if precision == "auto" and (not isinstance(teachers, SeparateTeachers)  # stacked: no int8 path
                                or (teacher_images is not None and teacher_images < INT8_MIN_IMAGES)):
        tried = [name for name in tried if name != "int8"]
    if not tried:
        return teachers, PrecisionChoice(precision, "fp32")
    data = batches(calibration_batches + check_batches)
    cut = min(calibration_batches, max(1, len(data) - 1))  # a tiny step: check on what calibrated
    calibration, check = data[:cut], data[cut:] or data[:cut]
    choice = PrecisionChoice(precision, "fp32", tolerance_kl if precision == "auto" else None)

    def outputs(net: nn.Module) -> list[dict[int, NetOutput]]:
        # The check compares logits only: stage maps would be built (and cast) for nothing.
        with torch.inference_mode():
            return [net(x, with_aux=with_aux, frozen=frozen, with_maps=False) for x, frozen in check]

    reference = outputs(teachers)
    for name in tried:
        lowered = build(teachers, name, calibration)
        errors = [logit_error(ref, got, temperature) for ref, got in zip(reference, outputs(lowered))]
        choice.errors[name] = {key: max(e[key] for e in errors) for key in errors[0]} if errors else {}
        if precision != "auto" or choice.errors[name].get("kl", 0.0) < tolerance_kl:
            choice.used = name
            return lowered, choice
    return teachers, choice
