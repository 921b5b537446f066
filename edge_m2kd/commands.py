"""The library behind each CLI command: open the workspace, do the work, return a
JSON-serialisable dict. The CLI only parses arguments and prints these dicts."""

from __future__ import annotations

import sys
import time
import unicodedata
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np

from device.probes import board_memory
from edge_m2kd import distributed, faults
from edge_m2kd.classnames import check_new_class_name
from edge_m2kd.config import (
    DEFAULT_INPUT_SIZE,
    FROZEN_PRETRAINED_INPUT_SIZE,
    METHODS,
    PRETRAINED_DEFAULTS,
    LearnerConfig,
    method_config,
)
from edge_m2kd.data.sources import ImageSet, load_source, source_classes
from edge_m2kd.errors import UserError
from edge_m2kd.evaluation import evaluate
from edge_m2kd.files import EXPORTS
from edge_m2kd.heads import solve_analytic
from edge_m2kd.learner import Learner, Progress
from edge_m2kd.memory import (
    PREDICTION_MARGIN,
    PeakMemorySampler,
    activation_profile,
    largest_batch_that_fits,
    parse_budget,
    predict_training_peak,
    process_rss_bytes,
    tensor_bytes,
)
from edge_m2kd.models.pretrained import check_fits, fetch_pretrained
from edge_m2kd.phases import PhaseTimer
from edge_m2kd.protocol import HOLDOUT_FRACTION, hold_out, holdout_arrays, kept_holdout
from edge_m2kd.snapshots import build_model
from edge_m2kd.teacher_precision import check_precision
from edge_m2kd.workspace import Workspace


# -- init -------------------------------------------------------------------------------------
def init_workspace(
    path: str | Path,
    backbone: str = "resnet32",
    input_size: int | None = None,
    policy: str | None = None,
    exemplars: int = 2000,
    method: str = "m2kd",
    budget: str | None = None,
    device: str = "auto",
    epochs: int | None = None,
    batch_size: int = 64,
    planned_steps: int = 10,
    flip: bool = True,
    pretrained: str | None = None,
    frozen_stages: int | None = None,
    backbone_lr_scale: float | None = None,
    lr: float | None = None,
    classifier: str | None = None,
    wait: bool = False,
    teacher_precision: str = "auto",
    teacher_subset: int | None = None,
) -> dict[str, Any]:
    """A new workspace. On a pretrained start the defaults are those of PRETRAINED_DEFAULTS
    (fewer epochs, a smaller learning rate, the early stages frozen, NME deployed)."""
    given = {"epochs": epochs, "frozen_stages": frozen_stages, "backbone_lr_scale": backbone_lr_scale, "lr": lr,
             "classifier": classifier, "teacher_subset": teacher_subset}
    given = {k: v for k, v in given.items() if v is not None}  # what the user chose; the rest are defaults
    if input_size is None:
        frozen = METHODS[method].get("model", {}).get("frozen_stages") == -1
        input_size = FROZEN_PRETRAINED_INPUT_SIZE if pretrained and frozen else DEFAULT_INPUT_SIZE
    cfg = method_config(
        method,
        defaults=PRETRAINED_DEFAULTS if pretrained else None,
        # The ImageNet stem is what pretrained ResNet-18 weights were trained with; keep it.
        model={"backbone": backbone, "input_size": input_size,
               "small_input_stem": backbone == "resnet18" and input_size < 64 and not pretrained,
               "pretrained": pretrained, **{k: v for k, v in given.items() if k == "frozen_stages"}},
        train={"device": device, "batch_size": batch_size, "flip": flip, "crop_pad": max(1, input_size // 8),
               "teacher_precision": check_precision(teacher_precision),
               **{k: v for k, v in given.items() if k != "frozen_stages"}},
        # No policy given: the method's own (METHODS), packed where it names none.
        snapshots={"planned_steps": planned_steps, **({"policy": policy} if policy else {})},
    )
    if cfg.memory.total:
        cfg.memory.total = exemplars
    extra: dict[str, Any] = {}
    if pretrained:
        extra["pretrained"] = record_pretrained(cfg)
    budget_bytes = parse_budget(budget) if budget else None
    ws = Workspace.create(path, cfg, {"memory_budget": budget, "memory_budget_bytes": budget_bytes, **extra}, wait)
    return {"workspace": str(ws.path), "config": cfg.to_dict(), "memory_budget_bytes": budget_bytes, **extra}


def record_pretrained(cfg: LearnerConfig) -> dict[str, str]:
    """Read the pretrained weights once, refuse them unless they fit the backbone exactly, and
    pin the config to that file (its sha256, an absolute path for a local file)."""
    spec = cfg.model
    assert spec.pretrained is not None
    if spec.pretrained != "imagenet":
        spec.pretrained = str(Path(spec.pretrained).resolve())
    weights = fetch_pretrained(spec.backbone, spec.pretrained)
    check_fits(build_model(spec, 0).backbone, weights, spec.backbone)
    spec.pretrained_sha256 = weights.sha256
    return {"source": weights.source, "sha256": weights.sha256}


# -- reading a workspace (eval, memory, snapshots, export, predict, bench) -----------------------
def _absent_device(device: str) -> bool:
    """True where a config's device is a CUDA device this machine does not have."""
    if not device.startswith("cuda"):
        return False
    import torch

    if not torch.cuda.is_available():
        return True
    index = device.partition(":")[2]
    return index.isdigit() and int(index) >= torch.cuda.device_count()


_NOTED: set[str] = set()


def load_for_reading(ws: Workspace) -> Learner:
    """The learner of a workspace a command reads (or exports). Where the device its config names
    is not on this machine (a workspace made on a board, read on a laptop), it is read on the CPU,
    with one line on stderr saying so. Only training (`add-classes`) refuses an absent device."""
    configured = ws.config.train.device
    if not _absent_device(configured):
        return ws.load_learner()
    if (key := f"{Path(ws.path).resolve()} {configured}") not in _NOTED:  # once a process (bench opens it twice)
        _NOTED.add(key)
        print(f"note: {ws.path} is set up for device {configured}, which this machine does not have; "
              "reading it on the CPU", file=sys.stderr, flush=True)
    return ws.load_learner(device="cpu")


def open_for_reading(path: str | Path) -> tuple[Workspace, Learner]:
    ws = Workspace.open(path)
    return ws, load_for_reading(ws)


_open = open_for_reading


# -- add-classes ------------------------------------------------------------------------------
def _teacher_count(cfg: LearnerConfig, t: int) -> int:
    steps = set(range(1, t)) if cfg.loss.multi_model else set()
    if cfg.loss.last_model_all_old and t > 1:
        steps.add(t - 1)
    return len(steps)


class _PeakModel:
    """What a step's prediction measures once, whatever the batch size asked: the runtime
    baseline (read first, before the activation probe's own allocations) and the activations."""

    def __init__(self, learner: Learner, n_images: int, held_out: int = 0, loaded_bytes: int = 0) -> None:
        # Training imports torch's compiler stack (the optimizers pull in torch._dynamo, about
        # 60 MiB here); import it first so the measured runtime baseline already holds it.
        import torch._dynamo  # noqa: F401

        self.learner, self.n_images, self.held_out = learner, n_images, held_out
        # The resident size holds the learner's weights, its exemplars and the images the caller
        # has decoded for the step (`loaded_bytes`); the prediction counts each of them as a
        # part, so they are taken out of the baseline: nothing is counted twice.
        model = learner.model
        resident = tensor_bytes([*model.parameters(), *model.buffers()]) + learner.memory.nbytes + loaded_bytes
        self.runtime = max(0, process_rss_bytes() - resident)
        cfg = learner.cfg
        self.with_aux = cfg.loss.aux_heads or cfg.loss.multi_level
        self.activations = activation_profile(model, cfg.model.input_size, self.with_aux)

    def at(self, batch_size: int) -> dict[str, int]:
        learner, cfg = self.learner, self.learner.cfg
        return predict_training_peak(
            learner.model, cfg.model.input_size, batch_size, self.n_images,
            teachers=_teacher_count(cfg, learner.steps_done + 1),
            snapshot_model_bytes=tensor_bytes(learner.model.state_dict().values()),
            exemplar_bytes=learner.memory.nbytes,
            runtime_bytes=self.runtime,
            with_aux=self.with_aux,
            held_out_images=self.held_out,
            activations=self.activations,
        ).to_dict()


def _check_budget(budget: int | None, learner: Learner, train: ImageSet, held_out: ImageSet,
                  batch_size: int) -> dict[str, int]:
    """Refuse, before any training, a step whose predicted peak exceeds the budget."""
    model = _PeakModel(learner, len(train), len(held_out), train.images.nbytes + held_out.images.nbytes)
    peak = model.at(batch_size)
    if budget is not None and peak["with_margin"] > budget:
        fit = largest_batch_that_fits(lambda b: model.at(b)["with_margin"], budget)
        hint = f"try --batch-size {fit}" if fit else "even batch size 1 does not fit: raise the budget or use a smaller backbone"
        raise UserError(f"step refused: predicted peak {peak['total'] / 2**20:.0f} MiB, "
                        f"{peak['with_margin'] / 2**20:.0f} MiB with the {PREDICTION_MARGIN:.0%} margin, exceeds the budget "
                        f"{budget / 2**20:.0f} MiB at batch size {batch_size}; {hint}")
    return peak


def add_classes(
    path: str | Path,
    data: str | Path,
    classes: list[str] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    on_corrupt: Literal["skip", "error"] = "skip",
    progress: Progress | None = None,
    sync_batchnorm: bool = False,
    wait: bool = False,
) -> dict[str, Any]:
    distributed.init_from_env(Workspace.open(path).config.train.device)
    with _step_workspace(path, wait) as ws:
        return _add_classes(ws, Path(data), classes, epochs, batch_size, on_corrupt, progress, sync_batchnorm)


def _step_workspace(path: str | Path, wait: bool) -> AbstractContextManager[Workspace]:
    # Under torchrun only rank 0 writes the workspace, so only rank 0 holds the writer lock;
    # if it is refused it exits, and torchrun stops the other ranks.
    if distributed.world()[0] == 0:
        return Workspace.writing(path, "add-classes", wait)
    return nullcontext(Workspace.open(path))


def _add_classes(ws: Workspace, data: Path, classes: list[str] | None, epochs: int | None, batch_size: int | None,
                 on_corrupt: Literal["skip", "error"], progress: Progress | None,
                 sync_batchnorm: bool) -> dict[str, Any]:
    timer, start = PhaseTimer(), time.perf_counter()
    with timer("load"):  # the workspace's learner: weights, snapshots, exemplars
        learner = ws.load_learner()
    available = source_classes(data)
    if classes is None:
        classes = [c for c in available if unicodedata.normalize("NFC", c) not in learner.class_names]
        if not classes:
            raise UserError(f"every class in {str(data)!r} is already known ({', '.join(available)}); add folders of new classes")
    # The rule `serve` applies to a typed name, for folder names too: stored in NFC (a folder may
    # be named in NFD, as macOS writes them), refused next to a look-alike of a known class.
    nfc: dict[str, str] = {}
    for name in classes:
        nfc[name] = check_new_class_name(name, [*learner.class_names, *nfc.values()])
    learner.refuse_known_or_repeated(list(nfc.values()))  # before reading a single image
    learner.memory.refuse_too_small(len(learner.class_names) + len(classes))
    cfg = learner.cfg
    if epochs is not None:
        cfg.train.epochs = epochs
    if batch_size is not None:
        cfg.train.batch_size = batch_size
    if sync_batchnorm and learner.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on NCCL); drop it on CPU")
    cfg.train.sync_batchnorm = sync_batchnorm
    with timer("decode"):  # read, decode and resize the images
        images = load_source(data, cfg.model.input_size, classes, "train", on_corrupt)
        images = ImageSet(images.images, images.labels, [nfc.get(n, n) for n in images.class_names])
        classes = [nfc[n] for n in classes]
        train, held_out = hold_out(images, cfg.train.seed)
        del images  # the split holds every image; keep one copy, not two, through the step
    t = learner.steps_done + 1
    with timer("budget_check"):
        predicted = _check_budget(ws.manifest.get("memory_budget_bytes"), learner, train, held_out, cfg.train.batch_size)
    faults.checkpoint("before-train")
    with PeakMemorySampler() as sampler:
        report = learner.step(train, classes, progress)
    with timer("evaluation"):
        holdout = _holdout(ws, learner, held_out)
        ev = _holdout_eval(learner, holdout)
    bytes_before = sum(ws.disk_bytes().values())
    entry = {
        "step": t,
        "classes": classes,
        "train_images": report.train_images,  # the new classes' images and the exemplars
        "new_images": len(train),
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "seconds": report.seconds,
        "images_per_second": report.images_per_second,
        "train_images_per_second": report.train_images_per_second,
        "losses": report.losses,
        "teachers": report.teachers,
        "teacher_precision": report.teacher_precision,
        "holdout": ev,
        "memory": {"predicted_peak": predicted, "measured_peak_rss": sampler.peak_rss_bytes,
                   "measured_peak_cuda": sampler.peak_cuda_bytes},
        "free_fraction": getattr(learner.store, "free_fraction", lambda: None)(),
        # What learning without backprop costs: the one forward pass over the new images (shared by
        # herding and the analytic head's sums), and solving the head.
        "forward_images_per_second": len(train) / max(report.phase_seconds.get("features", 0.0), 1e-9),
        "solve_seconds": report.phase_seconds.get("solve", 0.0),
        "deployed_classifier": learner.deployed_head,
        "analytic": _analytic_summary(learner),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    rank, world_size = distributed.world()
    digests = distributed.parameter_digests(learner.model)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the student's parameters after the step ({digests}); nothing committed")
    entry["distributed"] = {"world_size": world_size, "parameter_digests": digests, "global_batch_size": cfg.train.batch_size,
                            "per_rank_batch_size": cfg.train.batch_size // world_size, "lr": cfg.train.lr,
                            "sync_batchnorm": sync_batchnorm,
                            "lr_scaling": "none: the global batch size and lr are the configured ones"}
    # Seconds per phase of the whole command: the learner's step phases ("step." + StepReport's),
    # and around them reading the images, the budget check, the hold-out evaluation, the commit.
    entry["phase_seconds"] = {**timer.seconds, **{f"step.{k}": v for k, v in report.phase_seconds.items()}}
    if rank == 0:
        with timer("workspace_commit"):
            ws.commit(learner, entry, holdout)
        entry["bytes_added"] = sum(ws.disk_bytes().values()) - bytes_before
    entry["phase_seconds"]["workspace_commit"] = timer.seconds.get("workspace_commit", 0.0)
    entry["phase_seconds"]["other"] = max(0.0, time.perf_counter() - start - sum(entry["phase_seconds"].values()))
    distributed.barrier()  # no rank goes on (or exits) before the commit is whole
    return entry


def _analytic_summary(learner: Learner) -> dict[str, Any] | None:
    fit = learner.analytic
    return None if fit is None else {"solver": fit.solver, "regularisation": fit.regularisation,
                                     "held_out_accuracy": fit.held_out_accuracy}


def _holdout(ws: Workspace, learner: Learner, held_out: ImageSet) -> dict[int, np.ndarray]:
    return {**ws.load_holdout(), **kept_holdout(held_out, learner.class_names)}


def _holdout_eval(learner: Learner, holdout: dict[int, np.ndarray]) -> dict[str, Any]:
    """Choose the deployed classifier (under "auto") on the held-out images, then score it there:
    the figure is the one the choice was made on, so it flatters "auto" slightly."""
    if not holdout:
        return {}
    images, labels = holdout_arrays(holdout)
    learner.choose_classifier(images, labels)
    return evaluate(learner, ImageSet(images, labels, learner.class_names)).to_dict()


# -- eval / predict -----------------------------------------------------------------------------
def evaluate_folder(path: str | Path, data: str | Path) -> dict[str, Any]:
    ws, learner = _open(path)
    if learner.steps_done == 0:
        raise UserError(f"{path} has learned no classes yet; run `edge-m2kd add-classes` first")
    names = source_classes(data)
    known = [n for n in names if n in learner.class_names]
    if not known:
        raise UserError(f"none of the test classes ({', '.join(names[:5])}) is known to the workspace (it knows "
                        f"{', '.join(learner.class_names)}); the folder names must match the learned classes")
    if len(known) < len(names):
        warnings.warn(f"skipped test classes the workspace has not learned: {', '.join(n for n in names if n not in known)}",
                      stacklevel=2)
    test = load_source(data, learner.cfg.model.input_size, known, "test")
    ev = evaluate(learner, test)
    return {"classes": learner.class_names, "groups": [[learner.class_names[c] for c in g] for g in learner.groups],
            **ev.to_dict()}


# -- reports ------------------------------------------------------------------------------------------
def snapshot_report(path: str | Path, verify: bool = False) -> dict[str, Any]:
    ws, learner = _open(path)
    checks = {r.step: r for r in learner.store.verify()} if verify else {}
    rows = []
    for b in learner.store.bytes_report():
        group = learner.groups[b.step - 1]
        rows.append({
            "step": b.step,
            "classes": [learner.class_names[c] for c in group],
            "bytes": b.bytes,
            "full_copy_bytes": b.full_copy_bytes,
            "parts": b.parts,
            "verified": (checks[b.step].ok if verify else None),
            "max_abs_diff": (checks[b.step].max_abs_diff if verify else None),
        })
    free = learner.store.free_fraction() if hasattr(learner.store, "free_fraction") else None
    stats = statistics_report(ws, learner, verify)
    verified = [r["verified"] for r in rows] + ([stats["verified"]] if stats else [])
    return {"policy": learner.store.policy, "snapshots": rows, "free_fraction": free, "statistics": stats,
            "all_verified": all(verified) if verify else None}


def statistics_report(ws: Workspace, learner: Learner, verify: bool = False) -> dict[str, Any] | None:
    """The analytic head's statistics: their bytes and, with `verify`, whether they match the
    checksum recorded at commit and, where the head is a function of them alone (the old classes'
    sums kept as summed, the default), whether solving them again gives the stored head."""
    stats = learner.stats
    if stats is None:
        return None  # a workspace saved before the statistics, until its next step
    out: dict[str, Any] = {"bytes": stats.nbytes, "classes": stats.num_classes, "images": int(stats.counts.sum()),
                           "verified": None, "max_abs_diff": None}
    if not verify:
        return out
    recorded = ws.manifest.get("heads", {}).get("statistics_sha256")
    out["verified"] = recorded == stats.checksum()
    fit = learner.analytic
    if out["verified"] and fit is not None and learner.cfg.train.analytic_old_statistics == "keep":
        again = solve_analytic(stats, fit.solver, grid=(fit.regularisation,))
        assert again is not None
        out["max_abs_diff"] = float((again.weight - fit.weight).abs().max().item())
        out["verified"] = out["max_abs_diff"] <= 1e-5 * max(1.0, float(fit.weight.abs().max()))
    return out


def snapshot_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What `snapshots --json` prints (and `serve` answers): the report less each snapshot's parts."""
    return {k: report[k] for k in ("policy", "free_fraction", "all_verified", "statistics")} | {
        "snapshots": [{k: r[k] for k in ("step", "classes", "bytes", "full_copy_bytes", "verified", "max_abs_diff")}
                      for r in report["snapshots"]]}


def memory_report(path: str | Path, budget: str | None = None, new_images: int | None = None) -> dict[str, Any]:
    ws, learner = _open(path)
    cfg = learner.cfg
    budget_bytes = parse_budget(budget) if budget else ws.manifest.get("memory_budget_bytes")
    history = ws.manifest["history"]
    n_new = new_images or (history[-1]["train_images"] if history else 5000)
    snapshots = learner.store.bytes_report()
    weights = tensor_bytes(learner.model.state_dict().values())
    held = round(n_new * HOLDOUT_FRACTION)  # what add-classes would hold out of n_new images
    model = _PeakModel(learner, n_new - held, held)
    peak = model.at(cfg.train.batch_size)
    report: dict[str, Any] = {
        "weights": weights,
        "snapshots": [{"step": s.step, "bytes": s.bytes, **s.parts} for s in snapshots],
        "snapshots_total": sum(s.bytes for s in snapshots),
        "exemplars": learner.memory.nbytes,
        # The analytic head's sums (float64) and its solved layer, a part of every generation.
        "statistics": (learner.stats.nbytes if learner.stats is not None else 0)
        + (tensor_bytes([learner.analytic.weight, learner.analytic.bias]) if learner.analytic is not None else 0),
        "optimizer_state": peak["optimizer_state"],
        "activations": peak["activations"],
        "exported_engine": _export_bytes(ws.path),
        "next_step": {"new_images": n_new, "batch_size": cfg.train.batch_size, "predicted_peak": peak},
        "budget": budget_bytes,
        "board": board_memory(),  # None off a Jetson
    }
    report["stored_total"] = (weights + report["snapshots_total"] + report["exemplars"] + report["statistics"]
                              + (report["exported_engine"] or 0))
    if budget_bytes is not None:
        report["fits"] = peak["with_margin"] <= budget_bytes
        report["next_step"]["largest_batch_size"] = largest_batch_that_fits(
            lambda b: model.at(b)["with_margin"], budget_bytes)
        # an exemplar is held twice at the peak: in the memory and in the training set
        image_bytes = 2 * cfg.model.input_size**2 * 3
        report["next_step"]["largest_exemplar_count"] = max(
            0, int(budget_bytes / (1 + PREDICTION_MARGIN) - peak["total"] + 2 * peak["exemplars"]) // image_bytes)
    if history and history[-1].get("memory"):
        report["last_step_measured_peak_rss"] = history[-1]["memory"]["measured_peak_rss"]
        report["last_step_predicted_peak"] = history[-1]["memory"]["predicted_peak"]["total"]
    return report


def _export_bytes(ws_path: Path) -> int | None:
    exports = ws_path / EXPORTS
    files = [p for p in exports.glob("*") if p.is_file()] if exports.is_dir() else []
    return sum(p.stat().st_size for p in files) or None


def history_report(path: str | Path) -> dict[str, Any]:
    ws = Workspace.open(path)
    steps = ws.manifest["history"]
    return {"steps": [{"step": h["step"], "classes": h["classes"], "accuracy": h["holdout"].get("deployed_accuracy"),
                       "nme_accuracy": h["holdout"].get("nme_accuracy"),
                       "accuracy_per_group": h["holdout"].get("accuracy_per_group", []),
                       "seconds": h["seconds"]} for h in steps]}


def plot_history(report: dict[str, Any], png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    if not steps:
        raise UserError("the workspace has no steps yet; nothing to plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [s["step"] for s in steps]
    ax1.plot(xs, [100 * s["accuracy"] for s in steps], "o-", label="deployed classifier")
    if all(s["nme_accuracy"] is not None for s in steps):
        ax1.plot(xs, [100 * s["nme_accuracy"] for s in steps], "s--", label="NME")
    ax1.set(xlabel="step", ylabel="held-out accuracy (%)", title="Accuracy over steps", ylim=(0, 100), xticks=xs)
    ax1.grid(alpha=0.3)
    ax1.legend()
    n = len(steps)
    matrix = np.full((n, n), np.nan)
    for i, s in enumerate(steps):
        matrix[i, : len(s["accuracy_per_group"])] = 100 * np.array(s["accuracy_per_group"], dtype=float)
    im = ax2.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            if not np.isnan(matrix[i, j]):
                # dark text on the light (high) end of viridis, light text on the dark end
                color = "black" if matrix[i, j] > 60 else "white"
                ax2.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", color=color, fontsize=9)
    ax2.set(xlabel="class group (step learned)", ylabel="after step", title="Accuracy matrix (%)",
            xticks=range(n), yticks=range(n), xticklabels=xs, yticklabels=xs)
    fig.colorbar(im, ax=ax2, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
