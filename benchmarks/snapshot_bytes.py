"""Bytes each snapshot policy writes, measured from real stores, against the number of snapshots S.

No training: a cheap driver calls the store's hooks in the learner's order for each step
(grow the heads, ``prepare``, perturb the weights training may move, ``consolidate`` with a
no-op fine-tune, ``commit`` with a small uint8 probe batch), then saves ``store.state()`` with
safetensors to a temporary file and counts the bytes written (file + JSON metadata). Byte
counts depend on shapes, the number of steps and the class counts, not on the weight values,
so perturbed weights measure the same as trained ones.

What is counted (everything ``store.state()`` holds):
- full: one fp32 copy of every tensor per step;
- sparse: per step a bitmap over the prunable weights, their kept values in fp16, and the
  step's extras (BatchNorm, biases, head rows);
- packed: the bit-packed owner map (shared by all steps) and the extras of each step. The
  owned weights themselves are the student's and are saved with it, so they are not counted;
- every policy: the verification probe (uint8 images) and each step's probe logits, and the
  safetensors header.

    python -m benchmarks.snapshot_bytes            # ResNet-32 and ResNet-18, S = 1..20
    python -m benchmarks.snapshot_bytes --quick    # S in {1, 5, 10}
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from benchmarks.common import (
    add_output_args,
    emit,
    format_table,
    human_bytes,
    log,
    output_dir,
    parse_int_list,
    parse_names,
    plot_lines,
    torch_threads,
    write_json,
)
from edge_m2kd.config import ModelConfig, SnapshotConfig
from edge_m2kd.models import IncrementalNet
from edge_m2kd.snapshots import (
    PackedSnapshots,
    SnapshotStore,
    build_model,
    make_store,
    state_bytes,
)

NAME = "snapshot_bytes"
POLICIES = ("full", "packed", "sparse")
QUICK_SNAPSHOTS = [1, 5, 10]
BACKBONE_LABELS = {"resnet20": "ResNet-20", "resnet32": "ResNet-32", "resnet18": "ResNet-18"}
PACKED_TARGET = ("resnet32", 10, 0.03)  # backbone, S, per-snapshot bytes / one full fp32 copy


def _no_finetune(model: IncrementalNet, masks: dict[str, torch.Tensor], epochs: int) -> None:
    """The bytes do not depend on how the kept weights were fine-tuned."""


def _perturb(model: IncrementalNet, masks: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Stand-in for a step's training: move every parameter a little, but only where the
    store lets training move it (packed: owned weights stay exactly as they are)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            noise = torch.randn(p.shape, generator=gen) * (0.05 * float(p.abs().mean()) + 1e-3)
            if name in masks:
                noise *= masks[name].to(noise.device)
            p.add_(noise)


class FullCopyBytes:
    """Bytes of one full fp32 copy of the model with n classes (memoised: building a ResNet-18
    per query is what makes ``store.full_copy_bytes`` slow)."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.model_cfg = model_cfg
        self._cache: dict[int, int] = {}

    def __call__(self, n_classes: int) -> int:
        if n_classes not in self._cache:
            self._cache[n_classes] = state_bytes(build_model(self.model_cfg, n_classes).state_dict())
        return self._cache[n_classes]


def _part(key: str) -> str:
    head = key.split(".", 1)[0]
    if head in ("probe", "probe_logits"):
        return "probe"
    return {"copy": "copies", "bitmap": "bitmaps", "values": "values_fp16"}.get(head, head)


def measure(store: SnapshotStore, full_copy: FullCopyBytes, verify: bool) -> dict[str, Any]:
    """Save the store's state as a workspace does and count the bytes written."""
    tensors, meta = store.state()
    with tempfile.TemporaryDirectory(prefix="snapshot-bytes-") as tmp:
        path = Path(tmp) / "snapshots.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        file_bytes = path.stat().st_size
    meta_bytes = len(json.dumps(meta, indent=2).encode())  # the workspace manifest keeps it as JSON
    parts: dict[str, int] = {}
    for key, t in tensors.items():
        parts[_part(key)] = parts.get(_part(key), 0) + t.numel() * t.element_size()
    parts["header"] = file_bytes - sum(parts.values())
    parts["meta_json"] = meta_bytes
    steps = store.steps
    s = len(steps)
    total = file_bytes + meta_bytes
    full_copy_mean = sum(full_copy(store.n_classes[k]) for k in steps) / s
    # The library's own accounting (it leaves out the probe and the file header), as a cross-check.
    store.full_copy_bytes = lambda step: full_copy(store.n_classes[step])  # type: ignore[method-assign]
    payload = sum(b.bytes for b in store.bytes_report()) / s
    row: dict[str, Any] = {
        "backbone": store.model_cfg.backbone,
        "policy": store.policy,
        "snapshots": s,
        "bytes_per_snapshot": total / s,
        "total_bytes": total,
        "full_copy_bytes": full_copy_mean,
        "ratio_to_full_copy": total / s / full_copy_mean,
        "owner_bits_per_weight": None,
        "owner_bits": None,
        "file_bytes": file_bytes,
        "parts": parts,
        # What store.bytes_report() counts: the snapshots' own tensors, without the probe,
        # the safetensors header and the metadata.
        "payload_bytes_per_snapshot": payload,
        "payload_ratio_to_full_copy": payload / full_copy_mean,
    }
    if isinstance(store, PackedSnapshots):
        weights = sum(o.numel() for o in store.owner.values())
        row["owner_bits_per_weight"] = round(tensors["owner_map"].numel() * 8 / weights, 4)
        row["owner_bits"] = store.owner_bits()
        row["prunable_weights"] = weights
        row["free_fraction"] = store.free_fraction()
    if verify:
        results = store.verify()
        row["verify_max_abs_diff"] = max(r.max_abs_diff for r in results)
        row["verify_ok"] = all(r.ok for r in results)
    return row


def drive(backbone: str, policy: str, steps: int, measure_at: list[int], classes_per_step: int,
          probe: np.ndarray, seed: int, verify: bool) -> list[dict[str, Any]]:
    """Commit `steps` steps to a fresh store the way the learner does; measure after each step in
    `measure_at`. Packed plans exactly `steps` steps (its share per step depends on the plan)."""
    model_cfg = ModelConfig(backbone=backbone)
    store = make_store(SnapshotConfig(policy=policy, planned_steps=steps), model_cfg)  # type: ignore[arg-type]
    full_copy = FullCopyBytes(model_cfg)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(model_cfg, 0)
    rows = []
    for t in range(1, steps + 1):
        model.add_classes(classes_per_step)
        store.prepare(model, t)
        _perturb(model, store.grad_masks(model), gen)
        store.consolidate(model, t, _no_finetune)
        store.commit(t, model, probe)
        if t in measure_at:
            rows.append(measure(store, full_copy, verify))
    return rows


def run(backbones: list[str], snapshots: list[int], policies: list[str], classes_per_step: int,
        probe_size: int, seed: int, verify: bool) -> list[dict[str, Any]]:
    probe = np.random.default_rng(seed).integers(0, 256, (8, probe_size, probe_size, 3), dtype=np.uint8)
    rows = []
    for backbone in backbones:
        for policy in policies:
            start = time.perf_counter()
            if policy == "packed":  # one run per S, so that planned_steps = S
                found = [r for s in snapshots
                         for r in drive(backbone, policy, s, [s], classes_per_step, probe, seed, verify)]
            else:  # a store after step S does not depend on later steps: one run, measured along the way
                found = drive(backbone, policy, max(snapshots), snapshots, classes_per_step, probe, seed, verify)
            log(f"{backbone} {policy}: S = {snapshots[0]}..{snapshots[-1]} in {time.perf_counter() - start:.1f} s")
            rows += found
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    backbone, s, limit = PACKED_TARGET
    hit = [r for r in rows if r["backbone"] == backbone and r["policy"] == "packed" and r["snapshots"] == s]
    for key, what in (("ratio_to_full_copy", "file bytes"), ("payload_ratio_to_full_copy", "payload")):
        out.append({
            "name": f"packed {BACKBONE_LABELS[backbone]} at S = {s}: {what} per snapshot <= {limit:.0%} of one full fp32 copy",
            "measured": hit[0][key] if hit else None,
            "threshold": limit,
            "unit": "fraction of a full copy",
            "met": hit[0][key] <= limit if hit else None,
        })
    packed = [r for r in rows if r["policy"] == "packed"]
    worst = max((r["owner_bits_per_weight"] - math.ceil(math.log2(r["snapshots"] + 1)) for r in packed), default=None)
    out.append({
        "name": "packed owner map <= ceil(log2(S+1)) bits per weight, every S",
        "measured": worst,  # largest excess over the bound, in bits per weight
        "threshold": 0.0,
        "unit": "bits per weight over the bound",
        "met": worst <= 1e-3 if worst is not None else None,
    })
    return out


def _parts_text(parts: dict[str, int]) -> str:
    order = ["owner_map", "copies", "bitmaps", "values_fp16", "extras", "probe", "header", "meta_json"]
    return ", ".join(f"{k} {human_bytes(parts[k])}" for k in order if parts.get(k))


def table(rows: list[dict[str, Any]], tgts: list[dict[str, Any]]) -> str:
    body = [[
        BACKBONE_LABELS.get(r["backbone"], r["backbone"]), r["policy"], r["snapshots"],
        human_bytes(r["total_bytes"]), human_bytes(r["bytes_per_snapshot"]),
        f"{100 * r['ratio_to_full_copy']:.2f}%",
        human_bytes(r["payload_bytes_per_snapshot"]), f"{100 * r['payload_ratio_to_full_copy']:.2f}%",
        "-" if r["owner_bits_per_weight"] is None else f"{r['owner_bits_per_weight']:.3f} ({r['owner_bits']})",
        _parts_text(r["parts"]),
    ] for r in rows]
    fulls = {r["backbone"]: r["full_copy_bytes"] for r in rows if r["snapshots"] == min(x["snapshots"] for x in rows)}
    footer = [
        "",
        "file: store.state() saved with safetensors (file size) + its JSON metadata; file/snap = file total / S.",
        "payload/snap: what store.bytes_report() counts, the snapshot tensors alone (no probe, header, metadata).",
        "of full: per snapshot / one full fp32 copy of the model (mean over the S steps' class counts).",
        "Counted - full: a copy per step; sparse: bitmap + fp16 values + extras per step; packed: the owner map",
        "(shared) + extras per step, NOT the owned weights (they live in the student and are saved with it);",
        "all: the verification probe (8 uint8 images) and per-step probe logits, the safetensors header.",
        "extras = BatchNorm statistics and affine parameters, biases, main and auxiliary head rows.",
        "owner bits: measured bits per prunable weight of the packed owner map (nominal ceil(log2(S+1))).",
        "One full fp32 copy: " + ", ".join(f"{BACKBONE_LABELS.get(b, b)} {human_bytes(v)}" for b, v in fulls.items()),
        "",
        "Targets (reported, not asserted):",
    ]
    for t in tgts:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        if t["measured"] is None:
            measured = "-"
        elif t["unit"] == "fraction of a full copy":
            measured = f"{100 * t['measured']:.2f}% of a full copy"
        else:
            measured = f"{t['measured']:+.3f} bits per weight over the bound"
        footer.append(f"  {t['name']}: {measured} -> {met}")
    header = ["backbone", "policy", "S", "file total", "file/snap", "of full", "payload/snap", "of full",
              "owner bits/w", "in the file (total)"]
    return format_table(header, body, title="Snapshot bytes per policy (measured)", footer=footer)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    series: dict[str, tuple[list[float], list[float | None]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    for r in rows:  # colour: policy; line style: backbone
        label = f"{BACKBONE_LABELS.get(r['backbone'], r['backbone'])} {r['policy']}"
        styles[label] = {"color": f"C{POLICIES.index(r['policy'])}",
                         "linestyle": ("-", "--", "-.", ":")[backbones.index(r["backbone"]) % 4]}
        xs, ys = series.setdefault(label, ([], []))
        xs.append(r["snapshots"])
        ys.append(r["total_bytes"])
    fulls = {f"1 full copy, {BACKBONE_LABELS.get(r['backbone'], r['backbone'])}": r["full_copy_bytes"]
             for r in rows if r["snapshots"] == 1}
    return plot_lines(path, series, xlabel="snapshots S", ylabel="bytes written (all S snapshots)",
                      title="Snapshot store size against the number of snapshots", logy=True, hlines=fulls,
                      styles=styles)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.snapshot_bytes", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"S in {QUICK_SNAPSHOTS} (under a minute on 2 cores)")
    p.add_argument("--snapshots", type=parse_int_list, default=None,
                   help="S values, e.g. 1-20 or 1,5,10 (default 1-20; --quick: 1,5,10)")
    p.add_argument("--backbones", type=parse_names, default=["resnet32", "resnet18"],
                   help="comma list (default resnet32,resnet18; resnet20 for tests)")
    p.add_argument("--policies", type=parse_names, default=list(POLICIES), help="comma list of full,packed,sparse")
    p.add_argument("--classes-per-step", type=int, default=2, help="classes the heads grow by per step (default 2)")
    p.add_argument("--probe-size", type=int, default=32,
                   help="side of the probe images (the probe's bytes scale with it; nothing else does)")
    p.add_argument("--seed", type=int, default=1993)
    p.add_argument("--verify", action="store_true", help="also rebuild every snapshot and compare its probe logits")
    add_output_args(p, NAME)
    args = p.parse_args(argv)
    if args.snapshots is None:
        args.snapshots = QUICK_SNAPSHOTS if args.quick else list(range(1, 21))
    if any(s < 1 for s in args.snapshots):
        p.error("S must be at least 1")
    bad = [x for x in args.policies if x not in POLICIES]
    if bad:
        p.error(f"unknown policy {bad[0]!r}; choose from {', '.join(POLICIES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Bytes do not depend on speed; one thread avoids thread contention on a shared machine.
    with torch_threads(args.threads or 1):
        rows = run(args.backbones, args.snapshots, args.policies, args.classes_per_step,
                   args.probe_size, args.seed, args.verify)
    tgts = targets(rows)
    out = output_dir(args.out)
    result = {
        "benchmark": NAME,
        "settings": {"backbones": args.backbones, "snapshots": args.snapshots, "policies": args.policies,
                     "classes_per_step": args.classes_per_step, "probe_size": args.probe_size, "seed": args.seed},
        "rows": rows,
        "targets": tgts,
    }
    write_json(out / "results.json", result)
    if not args.no_plot:
        result["plot"] = str(plot(rows, out / "snapshot_bytes.png"))
    emit(result, table(rows, tgts) + f"\n\nJSON: {out / 'results.json'}"
         + (f"\nPNG:  {result['plot']}" if "plot" in result else ""), args.json)
    return result


if __name__ == "__main__":
    main()
