"""The `edge-m2kd` command line: parse, call the library, print. Exit codes: 0 success,
2 bad input or a refused step, 1 an internal error."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from edge_m2kd.config import (
    BACKBONE_NAMES,
    CLASSIFIERS,
    DEFAULT_INPUT_SIZE,
    DEVICES,
    FROZEN_PRETRAINED_INPUT_SIZE,
    METHODS,
    PRETRAINED_DEFAULTS,
    SNAPSHOT_POLICIES,
    TEACHER_PRECISIONS,
    TrainConfig,
)
from edge_m2kd.errors import UserError

# Set before torch loads (every command imports it lazily, below), since OpenMP reads it once.
# By default torch's threads spin at every barrier waiting for the slowest one; where another
# process is busy (the camera service, an inference loop: always, on a board) the slowest one
# is descheduled and the step crawls. benchmarks/threads.py, 2 cores, a ResNet-32 step beside a
# busy inference loop: 126.7 s with the default, 20.3 s passive, 23.8 s on one thread. Passive,
# not one thread, so a step (or `predict`) that has a board's cores to itself still uses them.
# A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Choices come from the library's own tables (config.py imports no torch: --help stays fast).
METHOD = click.Choice(list(METHODS))
POLICY = click.Choice(SNAPSHOT_POLICIES)
DEVICE = click.Choice(DEVICES)


class Group(click.Group):
    """Turn a UserError into one line on stderr and exit code 2; warnings print as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        warnings.showwarning = lambda message, *a, **k: click.echo(f"warning: {message}", err=True)
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="edge-m2kd")
def main() -> None:
    """On-device class-incremental learning with M2KD."""


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=float))


@main.command()
@click.option("--method", default="m2kd", show_default=True, type=METHOD)
@click.option("--snapshots", "policy", default=None, type=POLICY, help="snapshot policy (default: the method's own)")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="where the run's results are written")
@click.option("--epochs", type=int, default=None, help="epochs per step (default: the demo's schedule)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def demo(method: str, policy: str | None, workdir: Path, epochs: int | None, as_json: bool) -> None:
    """Learn scikit-learn's bundled digits in 5 steps of 2 classes (no download)."""
    from edge_m2kd.demo import demo_config, run_demo

    cfg = demo_config(method, policy, epochs)

    def print_row(step: dict[str, Any]) -> None:
        if not as_json:
            nme = "   -  " if step["nme_accuracy"] is None else f"{100 * step['nme_accuracy']:5.1f}%"
            groups = " ".join(f"{100 * a:5.1f}" for a in step["accuracy_per_group"])
            click.echo(f"step {step['step']}  classes {','.join(step['classes']):<5} "
                       f"acc {100 * step['accuracy']:5.1f}%  nme {nme}  per group [{groups}]  "
                       f"{step['seconds']:5.1f}s")

    result = run_demo(cfg, workdir, print_row)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{method}: final accuracy {100 * result['final_accuracy']:.1f}%, average incremental "
                   f"{100 * result['average_incremental_accuracy']:.1f}%, forgetting "
                   f"{100 * result['forgetting']:.1f} points, {result['seconds']:.0f}s; results in {workdir}")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:8.2f} MiB"


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:9.1f} KiB"


WS = click.Path(path_type=Path)
# init, add-classes and export write the workspace: one at a time (edge_m2kd/locking.py)
wait_option = click.option("--wait", is_flag=True,
                           help="if another command is writing the workspace, wait for it instead of stopping")


@main.command()
@click.argument("ws", type=WS)
@click.option("--backbone", default="resnet32", show_default=True, type=click.Choice(BACKBONE_NAMES))
@click.option("--pretrained", default=None, metavar="imagenet|PATH",
              help="start the backbone from torchvision's published ImageNet weights (downloaded once into "
                   "torch's hub cache) or from a local .pth/.safetensors file")
@click.option("--frozen-stages", default=None, type=click.IntRange(-1),
              help=f"keep the first N backbone stages fixed (-1: all); default {PRETRAINED_DEFAULTS['model']['frozen_stages']} "
                   "when pretrained, else 0")
@click.option("--backbone-lr-scale", default=None, type=click.FloatRange(0, min_open=True),
              help="backbone learning rate as a fraction of the heads' (default "
                   f"{PRETRAINED_DEFAULTS['train']['backbone_lr_scale']} when pretrained, else 1)")
@click.option("--lr", default=None, type=click.FloatRange(0, min_open=True),
              help=f"learning rate of the heads (default {PRETRAINED_DEFAULTS['train']['lr']} when pretrained, else 0.1)")
@click.option("--input-size", default=None, type=click.IntRange(8, 1024),
              help=f"pixels a side (default {DEFAULT_INPUT_SIZE}; {FROZEN_PRETRAINED_INPUT_SIZE} for a pretrained "
                   "backbone that stays frozen: a forward pass is all it costs)")
@click.option("--snapshots", "policy", default=None, type=POLICY,
              help="snapshot policy (default: the method's own; packed for m2kd)")
@click.option("--exemplars", default=2000, show_default=True, type=click.IntRange(0), help="exemplar images kept in all")
@click.option("--method", default="m2kd", show_default=True, type=METHOD)
@click.option("--memory-budget", default=None, help="a size (2GiB, 512MB) or a board: orin-nano-4gb, orin-nano-8gb, "
              "orin-nx-16gb, agx-orin-32gb, agx-orin-64gb")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--epochs", default=None, type=click.IntRange(1), help=f"epochs per step (default {PRETRAINED_DEFAULTS['train']['epochs']} when pretrained, else 30)")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--planned-steps", default=10, show_default=True, type=click.IntRange(1),
              help="packed snapshots: how many steps the free weights must last")
@click.option("--classifier", default=None, type=click.Choice(CLASSIFIERS),
              help="what the device runs: the corrected head (cnn), nearest mean of exemplars (nme), or auto: "
                   f"the better of the two on each step's held-out images (default {TrainConfig.classifier}; "
                   f"{PRETRAINED_DEFAULTS['train']['classifier']} when pretrained)")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="mirror images in training; turn off where a mirror image is another class (text, digits, signs)")
@click.option("--teacher-precision", default="auto", show_default=True, type=click.Choice(TEACHER_PRECISIONS),
              help="number format the frozen teachers run in; auto: int8 on a CPU, fp16 under CUDA, each only "
                   "while its logits stay within a KL of 0.01 of fp32 (checked at every step)")
@click.option("--teacher-subset", default=None, type=click.IntRange(0), metavar="K",
              help="snapshots asked per batch: a random K of them, weighted so that the loss's expectation is "
                   "that of all of them (a step's cost stops growing with the groups learned); 0: all "
                   f"(default {TrainConfig.teacher_subset})")
@wait_option
@click.option("--json", "as_json", is_flag=True)
def init(ws: Path, backbone, pretrained, frozen_stages, backbone_lr_scale, lr, input_size, policy, exemplars, method,
         memory_budget, device, epochs, batch_size, planned_steps, classifier, flip, teacher_precision, teacher_subset,
         wait, as_json) -> None:
    """Create a workspace WS."""
    from edge_m2kd.commands import init_workspace

    out = init_workspace(ws, backbone, input_size, policy, exemplars, method, memory_budget, device, epochs,
                         batch_size, planned_steps, flip, pretrained, frozen_stages, backbone_lr_scale, lr,
                         classifier=classifier, wait=wait, teacher_precision=teacher_precision,
                         teacher_subset=teacher_subset)
    if as_json:
        emit_json(out)
    else:
        budget = out["memory_budget_bytes"]
        start = f", from {out['pretrained']['source']}" if pretrained else ""
        policy = out["config"]["snapshots"]["policy"]
        input_size = out["config"]["model"]["input_size"]
        click.echo(f"created workspace {ws}: {method}, {backbone} at {input_size}px{start}, {policy} snapshots, "
                   f"{exemplars} exemplars" + (f", budget {_mib(budget).strip()}" if budget else ""))


@main.command("add-classes")
@click.argument("ws", type=WS)
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--classes", default=None, help="comma-separated class names to learn (default: every new one)")
@click.option("--epochs", default=None, type=click.IntRange(1))
@click.option("--batch-size", default=None, type=click.IntRange(1))
@click.option("--on-corrupt", default="skip", show_default=True, type=click.Choice(["skip", "error"]),
              help="an unreadable image among good ones: skip it with a warning, or refuse the step")
@click.option("--sync-bn", is_flag=True, help="under torchrun on GPUs: BatchNorm statistics over the global batch")
@click.option("--progress", "progress_format", default="bar", show_default=True, type=click.Choice(["bar", "jsonl"]),
              help="progress on stderr: bars, or one JSON object per line for a program to read (`serve`)")
@wait_option
@click.option("--json", "as_json", is_flag=True)
def add_classes(ws: Path, data: Path, classes, epochs, batch_size, on_corrupt, sync_bn, progress_format, wait,
                as_json) -> None:
    """Learn the new classes in DATA and commit the step. DATA is an image folder (DATA/<class>/*.jpg),
    the CIFAR-100 python release (cifar-100-python/, its train split) or an .npz (x, y, optional classes)."""
    import time

    from tqdm import tqdm

    from edge_m2kd.commands import add_classes as run

    bars: dict[str, Any] = {}
    started = time.monotonic()

    def progress(phase: str, epoch: int, epochs_total: int, loss: float, ips: float) -> None:
        if progress_format == "jsonl":
            # One line per epoch, flushed: the reader (edge_m2kd/server/jobs.py) shows it as it comes.
            click.echo(json.dumps({"event": "epoch", "phase": phase, "epoch": epoch, "epochs": epochs_total,
                                   "loss": loss, "images_per_second": ips,
                                   "seconds": time.monotonic() - started}), err=True)
            sys.stderr.flush()
            return
        if phase not in bars:
            for other in bars.values():
                other.close()
            quiet = as_json or os.environ.get("RANK", "0") != "0"  # one bar, from rank 0, under torchrun
            bars[phase] = tqdm(total=epochs_total, desc=phase, unit="epoch", disable=quiet, file=sys.stderr)
        bars[phase].update(1)
        bars[phase].set_postfix(loss=f"{loss:.3f}", img_s=f"{ips:.0f}")

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    try:
        entry = run(ws, data, names, epochs, batch_size, on_corrupt, progress, sync_bn, wait)
    finally:
        for bar in bars.values():
            bar.close()
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    if as_json:
        emit_json(entry)
        return
    h = entry["holdout"]
    groups = " ".join(f"{100 * a:.1f}" for a in h.get("accuracy_per_group", []))
    mem = entry["memory"]
    trained = f" ({entry['images_per_second']:.0f} img/s)" if entry["epochs"] else ", no training"
    click.echo(f"step {entry['step']}: learned {', '.join(entry['classes'])} from {entry['train_images']} images "
               f"in {entry['seconds']:.1f}s{trained}")
    click.echo(f"  held-out accuracy {100 * h.get('deployed_accuracy', float('nan')):.1f}% "
               f"(per group: {groups}), deployed {entry['deployed_classifier']}; bytes added {entry['bytes_added']:,}")
    click.echo(f"  forward pass {entry['forward_images_per_second']:.0f} img/s over the new images; "
               f"analytic head solved in {entry['solve_seconds']:.2f}s")
    # Per term, so a user can see that every distillation term is at work (a one-class group's too).
    terms = ", ".join(f"{k} {v:.4f}" for k, v in entry["losses"].items())
    click.echo(f"  loss per term, mean over the last epoch: {terms or 'no training'}")
    click.echo(f"  peak memory: measured {_mib(mem['measured_peak_rss']).strip()} resident, predicted "
               f"{_mib(mem['predicted_peak']['total']).strip()}")


@main.command("eval")
@click.argument("ws", type=WS)
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def eval_(ws: Path, data: Path, as_json: bool) -> None:
    """Accuracy (CNN and NME) per class group and overall on DATA: a test image folder, the
    CIFAR-100 python release (its test split) or an .npz."""
    from edge_m2kd.commands import evaluate_folder

    out = evaluate_folder(ws, data)
    if as_json:
        emit_json(out)
        return
    nme = "-" if out["nme_accuracy"] is None else f"{100 * out['nme_accuracy']:.1f}%"
    click.echo(f"{out['samples']} images: deployed {100 * out['deployed_accuracy']:.1f}%, CNN "
               f"{100 * out['accuracy']:.1f}%, NME {nme}")
    for k, (group, acc) in enumerate(zip(out["groups"], out["accuracy_per_group"]), 1):
        click.echo(f"  step {k} ({', '.join(group)}): {100 * acc:.1f}%")


BACKEND = click.Choice(["torch", "onnxruntime", "tensorrt"])


@main.command()
@click.argument("ws", type=WS)
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1))
@click.option("--backend", default="torch", show_default=True, type=BACKEND)
@click.option("--engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT engine (default WS/exports/model.plan)")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model (default WS/exports/model.onnx)")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--json", "as_json", is_flag=True)
def predict(ws: Path, images: tuple[str, ...], top_k: int, backend: str, engine, onnx_path, device, as_json) -> None:
    """Class names and scores for each IMAGE, best first."""
    from device.predictor import predict_images

    out = predict_images(ws, list(images), backend, top_k, engine=engine, onnx=onnx_path, device=device)
    if as_json:
        emit_json(out)
        return
    for r in out["results"]:
        preds = ", ".join(f"{p['class']} {p['score']:.3f}" for p in r["predictions"])
        click.echo(f"{r['image']}: {preds}")


@main.command()
@click.argument("ws", type=WS)
@click.option("--backend", default=None, type=BACKEND,
              help="one backend; without it, PyTorch and onnxruntime side by side at batch 1 and 32")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1))
@click.option("--iterations", default=30, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--json", "as_json", is_flag=True)
def bench(ws: Path, backend: str | None, batch_size: int, iterations: int, device: str, as_json: bool) -> None:
    """Latency percentiles (p50/p90/p99), images/s after warm-up, and the memory a backend takes."""
    from device.bench import bench as run_bench
    from device.bench import compare_backends, format_comparison, format_rows

    if backend is None:
        rows = compare_backends(ws, iterations=iterations, device="cpu" if device == "auto" else device)
        text = format_comparison(rows)
    else:
        rows = [run_bench(ws, backend, batch_size, iterations=iterations, device=device)]
        text = format_rows(rows)
    if as_json:
        emit_json({"rows": rows})
    else:
        click.echo(text)


@main.command()
@click.argument("ws", type=WS)
@click.option("--budget", default=None, help="a size or a board profile (default: the workspace's)")
@click.option("--new-images", default=None, type=click.IntRange(1), help="images the next step will train on")
@click.option("--json", "as_json", is_flag=True)
def memory(ws: Path, budget: str | None, new_images: int | None, as_json: bool) -> None:
    """Bytes held by weights, each snapshot, exemplars, optimizer and activations, against the budget."""
    from edge_m2kd.commands import memory_report

    out = memory_report(ws, budget, new_images)
    if as_json:
        emit_json(out)
        return
    click.echo(f"{'weights (student)':<34}{_kib(out['weights'])}")
    for s in out["snapshots"]:
        parts = ", ".join(f"{k} {v:,}" for k, v in s.items() if k not in ("step", "bytes"))
        click.echo(f"{'snapshot ' + str(s['step']):<34}{_kib(s['bytes'])}   ({parts})")
    click.echo(f"{'snapshots, all':<34}{_kib(out['snapshots_total'])}")
    click.echo(f"{'exemplars (uint8)':<34}{_kib(out['exemplars'])}")
    click.echo(f"{'statistics (analytic head)':<34}{_kib(out['statistics'])}")
    click.echo(f"{'exported engine / ONNX':<34}{_kib(out['exported_engine'])}")
    click.echo(f"{'stored, total':<34}{_kib(out['stored_total'])}")
    nxt = out["next_step"]
    click.echo(f"next step ({nxt['new_images']} new images, batch {nxt['batch_size']}), predicted peak:")
    for k, v in nxt["predicted_peak"].items():
        click.echo(f"  {k:<32}{_mib(v)}")
    if out["budget"] is not None:
        verdict = "fits" if out["fits"] else "DOES NOT FIT"
        click.echo(f"budget {_mib(out['budget']).strip()}: {verdict}; largest batch size "
                   f"{nxt['largest_batch_size']}, largest exemplar count {nxt['largest_exemplar_count']}")
    if out["board"] is not None:
        b = out["board"]
        click.echo(f"board memory {_mib(b['total_bytes']).strip()}, available {_mib(b['available_bytes']).strip()}, "
                   f"NvMap (GPU buffers) {_mib(b['nvmap_used_bytes']).strip()}")
    if "last_step_measured_peak_rss" in out:
        click.echo(f"last step: predicted {_mib(out['last_step_predicted_peak']).strip()}, measured "
                   f"{_mib(out['last_step_measured_peak_rss']).strip()} resident")


@main.command()
@click.argument("ws", type=WS)
@click.option("--verify", is_flag=True, help="rebuild every snapshot and compare its probe logits")
@click.option("--json", "as_json", is_flag=True)
def snapshots(ws: Path, verify: bool, as_json: bool) -> None:
    """One line per step: classes, bytes, verified or not."""
    from edge_m2kd.commands import snapshot_report, snapshot_summary

    out = snapshot_report(ws, verify)
    if as_json:
        emit_json(snapshot_summary(out))
    else:
        for r in out["snapshots"]:
            state = {True: "verified", False: "FAILED", None: "not checked"}[r["verified"]]
            click.echo(f"step {r['step']}  {','.join(r['classes']):<24} {r['bytes']:>10,} bytes "
                       f"({100 * r['bytes'] / r['full_copy_bytes']:.1f}% of a full copy)  {state}")
        if out["free_fraction"] is not None:
            click.echo(f"free weights left for later steps: {100 * out['free_fraction']:.1f}%")
        st = out["statistics"]
        if st is not None:
            state = {True: "verified", False: "FAILED", None: "not checked"}[st["verified"]]
            click.echo(f"statistics: {st['classes']} classes, {st['images']:,} images, {st['bytes']:>10,} bytes  {state}")
    st = out["statistics"]
    if verify and st is not None and st["verified"] is False:
        raise UserError("the analytic head's statistics do not match the checksum recorded at commit, or no longer "
                        "give the stored head: they are damaged; restore the workspace from a backup")
    failed = [r for r in out["snapshots"] if verify and not r["verified"]]
    if failed:
        worst = max(r["max_abs_diff"] for r in failed)
        raise UserError(f"the snapshot of step {', '.join(str(r['step']) for r in failed)} does not reproduce the "
                        f"logits recorded when it was committed (max abs difference {worst:.2e}): the stored "
                        "snapshot is damaged; restore the workspace from a backup")


@main.command()
@click.argument("ws", type=WS)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write a PNG")
@click.option("--json", "as_json", is_flag=True)
def history(ws: Path, plot: Path | None, as_json: bool) -> None:
    """Held-out accuracy per step and per class group."""
    from edge_m2kd.commands import history_report, plot_history

    out = history_report(ws)
    if plot:
        plot_history(out, plot)
    if as_json:
        emit_json(out)
        return
    for s in out["steps"]:
        groups = " ".join(f"{100 * a:5.1f}" for a in s["accuracy_per_group"])
        click.echo(f"step {s['step']}  {','.join(s['classes']):<24} acc {100 * s['accuracy']:5.1f}%  [{groups}]")
    if plot:
        click.echo(f"plot written to {plot}")


@main.command()
@click.argument("ws", type=WS)
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="where to write the ONNX model (default: WS/exports/model.onnx)")
@click.option("--tensorrt", "tensorrt_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also build a TensorRT engine here (on the board, or in the Jetson image)")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1))
@click.option("--force", is_flag=True, help="write the export even if the parity gate fails")
@wait_option
@click.option("--json", "as_json", is_flag=True)
def export(ws: Path, onnx_path, tensorrt_path, precision, max_batch, force, wait, as_json) -> None:
    """Export the current classifier: ONNX with a parity gate, and optionally a TensorRT engine."""
    from exporters import export_workspace

    out = export_workspace(ws, onnx_path, tensorrt_path, precision, max_batch, force, wait=wait,
                           on_build=lambda: click.echo("building the TensorRT engine (minutes on a Jetson)...", err=True))
    if as_json:
        emit_json(out)
        return
    p = out["parity"]
    click.echo(f"ONNX: {out['onnx']}")
    click.echo(f"  parity vs PyTorch on {p['samples']} images: max abs logit diff {p['max_abs_diff']:.2e}, "
               f"top-1 agreement {100 * p['top1_agreement']:.1f}%" + ("" if p["passed"] else "  (FAILED, forced)"))
    if out["tensorrt"]:
        click.echo(f"TensorRT engine ({out['precision']}): {out['tensorrt']}"
                   + ("  (from the engine cache)" if out.get("engine_cache_hit") else ""))


@main.command()
@click.argument("ws", type=WS)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (every API call needs the token, on loopback too)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="read the access token from this file (mode 0600, at least 128 bits; default: a new "
                   "random token, printed once in the URL)")
@click.option("--max-upload-mib", default=512, show_default=True, type=click.IntRange(1),
              help="largest request (all the images of one step) the server accepts")
def serve(ws: Path, host: str, port: int, token_file: Path | None, max_upload_mib: int) -> None:
    """A web page for WS: teach classes by uploading images, watch the step, see the memory budget,
    try the model, export it. See the README's `serve` section for the security model."""
    import secrets

    import uvicorn

    from edge_m2kd.server import ServerSettings, create_app
    from edge_m2kd.server.connections import uvicorn_config
    from edge_m2kd.server.security import read_token_file
    from edge_m2kd.server.uploads import UploadLimits

    token = read_token_file(token_file) if token_file else secrets.token_urlsafe(32)
    settings = ServerSettings(workspace=ws, host=host, port=port, token=token,
                              limits=UploadLimits(max_request_bytes=max_upload_mib * 2**20))
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    where = "this machine only" if settings.loopback else "on the network"
    address = shown if settings.loopback else "<this device>"
    # The token goes in the URL's #fragment, which a browser never sends to the server; printed
    # once, like Jupyter's. A --token-file's token is the user's own, so it is not printed.
    fragment = f"#token=<the token in {token_file}>" if token_file else f"#token={token}"
    click.echo(f"serving {ws} on {shown}:{port} ({where}); open http://{address}:{port}/{fragment}")
    sys.stdout.flush()
    uvicorn.Server(uvicorn_config(app, settings)).run()
