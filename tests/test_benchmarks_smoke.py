"""Smoke runs of the benchmark scripts (benchmarks/), in-process and tiny: the JSON they print
has the documented shape and its numbers are sane. Not a measurement."""

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))
snapshot_bytes = importlib.import_module("benchmarks.snapshot_bytes")
cil = importlib.import_module("benchmarks.cil")
overhead = importlib.import_module("benchmarks.overhead")
step_profile = importlib.import_module("benchmarks.step_profile")
throughput = importlib.import_module("benchmarks.throughput")

SNAPSHOT_ROW_KEYS = {"backbone", "policy", "snapshots", "bytes_per_snapshot", "total_bytes", "full_copy_bytes",
                     "owner_bits_per_weight"}
CIL_ROW_KEYS = {"method", "final_accuracy", "average_incremental_accuracy", "forgetting", "nme_final_accuracy",
                "bytes_per_snapshot", "seconds", "cpu"}


def _stdout_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_snapshot_bytes_measures_every_policy(tmp_path, capsys):
    snapshot_bytes.main(["--backbones", "resnet20", "--snapshots", "1,2", "--out", str(tmp_path), "--json"])
    out = _stdout_json(capsys)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == out["rows"]
    assert (tmp_path / "snapshot_bytes.png").stat().st_size > 0
    rows = {(r["policy"], r["snapshots"]): r for r in out["rows"]}
    assert set(rows) == {(p, s) for p in ("full", "packed", "sparse") for s in (1, 2)}
    for (policy, s), r in rows.items():
        assert SNAPSHOT_ROW_KEYS <= set(r)
        assert r["backbone"] == "resnet20"
        assert r["total_bytes"] > 0 and math.isclose(r["bytes_per_snapshot"], r["total_bytes"] / s)
        if policy == "packed":
            assert r["owner_bits_per_weight"] == math.ceil(math.log2(s + 1)) == r["owner_bits"]
            assert r["bytes_per_snapshot"] < rows["sparse", s]["bytes_per_snapshot"]
        else:
            assert r["owner_bits_per_weight"] is None
        assert r["bytes_per_snapshot"] <= rows["full", s]["bytes_per_snapshot"]
    # A full copy per step costs about one full fp32 copy (plus the probe and the file header).
    assert 1.0 <= rows["full", 2]["bytes_per_snapshot"] / rows["full", 2]["full_copy_bytes"] < 1.2
    assert rows["full", 2]["total_bytes"] > 1.9 * rows["full", 1]["total_bytes"]


def test_cil_smoke_schedule_runs_two_methods(tmp_path, capsys):
    cil.main(["--schedule", "smoke", "--methods", "finetune,m2kd-packed", "--epochs", "1",
              "--per-class", "20", "--test-per-class", "10", "--memory", "20", "--threads", "1",
              "--out", str(tmp_path), "--json"])
    out = _stdout_json(capsys)
    assert out["schedule"] == "smoke" and out["memory"] == 20
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] and saved["rows"] == out["rows"]
    assert (tmp_path / "accuracy_memory20.png").stat().st_size > 0
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["finetune", "m2kd-packed"]
    for r in rows.values():
        assert CIL_ROW_KEYS <= set(r)
        for key in ("final_accuracy", "average_incremental_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        assert -1.0 <= r["forgetting"] <= 1.0
        assert r["seconds"] > 0
        matrix = r["accuracy_matrix"]
        assert [len(row) for row in matrix] == [1, 2, 3, 4, 5]
        assert math.isclose(r["final_accuracy"], r["accuracy_per_step"][-1])
    assert rows["finetune"]["nme_final_accuracy"] is None  # no exemplars, no class means
    assert 0.0 <= rows["m2kd-packed"]["nme_final_accuracy"] <= 1.0
    assert rows["m2kd-packed"]["snapshots"] == "packed" and rows["finetune"]["snapshots"] == "full"
    assert 0 < rows["m2kd-packed"]["bytes_per_snapshot"] < rows["finetune"]["bytes_per_snapshot"]
    # The targets name methods this run left out: reported as not measured, never as met.
    assert out["targets"] and all(t["met"] is None and not t["applies"] for t in out["targets"])
    # A saved result renders again without training: same rows, same targets, a new plot.
    again = cil.main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again"), "--json"])
    assert _stdout_json(capsys)["rows"] == out["rows"] == again["rows"] and again["targets"] == out["targets"]
    assert (tmp_path / "again" / "accuracy_memory20.png").stat().st_size > 0
    (tmp_path / "other.json").write_text('{"benchmark": "overhead"}')
    with pytest.raises(SystemExit) as exit_info:
        cil.main(["--from-json", str(tmp_path / "other.json"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2


def test_overhead_times_and_counts_every_teacher_path(tmp_path, capsys):
    overhead.main(["--steps", "2,4", "--batches", "1", "--batch-size", "4", "--backbone", "resnet20",
                   "--input-size", "8", "--threads", "1", "--repeats", "1", "--teacher-subset", "1",
                   "--out", str(tmp_path), "--json", "--no-plot"])
    out = _stdout_json(capsys)
    assert json.loads((tmp_path / "overhead.json").read_text())["rows"] == out["rows"]
    rows = {r["step"]: r for r in out["rows"]}
    assert list(rows) == [2, 4]
    for t, r in rows.items():
        assert r["teachers"] == t - 1
        for key in ("icarl_seconds", "m2kd_seconds", "m2kd_stacked_seconds", "m2kd_naive_seconds",
                    "icarl_fp32_seconds", "m2kd_fp32_seconds", "m2kd_subset_seconds", "m2kd_all_seconds"):
            assert r[key] > 0
        assert math.isclose(r["ratio"], r["m2kd_seconds"] / r["icarl_seconds"])
        assert math.isclose(r["all_ratio"], r["m2kd_all_seconds"] / r["icarl_seconds"])
        assert r["m2kd_precision"] in ("fp32", "int8") and set(r["m2kd_precision_checked"]) <= {"int8"}
        assert math.isclose(r["flop_ratio"], r["m2kd_gflop_per_batch"] / r["icarl_gflop_per_batch"])
    # One teacher forward is about a third of a training step's arithmetic (forward plus backward), so
    # going from 1 to 3 teachers must add FLOPs; iCaRL reads one teacher whatever t is.
    assert math.isclose(rows[2]["icarl_gflop_per_batch"], rows[4]["icarl_gflop_per_batch"], rel_tol=0.05)
    assert rows[4]["flop_ratio"] > rows[2]["flop_ratio"] + 0.4


def test_cil_loss_overrides_reach_the_m2kd_rows_only(tmp_path, capsys):
    cil.main(["--schedule", "smoke", "--methods", "icarl,m2kd-full", "--epochs", "1", "--per-class", "10",
              "--test-per-class", "5", "--memory", "10", "--threads", "1", "--loss", "distill_reduction=sum",
              "--loss", "last_model_all_old=true", "--out", str(tmp_path), "--json", "--no-plot"])
    out = _stdout_json(capsys)
    assert [r["method"] for r in out["rows"]] == [
        "icarl", "m2kd-full [distill_reduction=sum, last_model_all_old=True]"]
    assert out["settings"]["loss_overrides"] == {"distill_reduction": "sum", "last_model_all_old": True}
    # The renamed row is not the default m2kd: the targets do not count it.
    assert all(t["measured"] is None for t in out["targets"] if "m2kd-full" in t["name"])


def test_cil_refuses_an_unknown_loss_option():
    with pytest.raises(SystemExit):
        cil.parse_args(["--loss", "distill_reduction"])


def test_cil_set_takes_a_field_that_defaults_to_none_as_the_type_it_holds():
    assert cil.parse_setting("snapshots.later_step_share=0.05") == ("snapshots", "later_step_share", 0.05)
    assert cil.parse_setting("model.pretrained=imagenet") == ("model", "pretrained", "imagenet")
    with pytest.raises(argparse.ArgumentTypeError, match="takes a float"):
        cil.parse_setting("snapshots.later_step_share=half")


def test_cil_resume_keeps_finished_methods_and_refuses_other_settings(tmp_path, capsys):
    common = ["--schedule", "smoke", "--epochs", "1", "--per-class", "10", "--test-per-class", "5",
              "--memory", "10", "--threads", "1", "--out", str(tmp_path), "--json", "--no-plot"]
    first = cil.main([*common, "--methods", "finetune"])
    capsys.readouterr()
    second = cil.main([*common, "--methods", "icarl", "--resume"])
    capsys.readouterr()
    assert [r["method"] for r in second["rows"]] == ["finetune", "icarl"]
    assert second["rows"][0] == first["rows"][0]  # kept, not trained again
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["finetune", "icarl"]
    assert saved["settings"]["methods"] == ["finetune", "icarl"]
    with pytest.raises(SystemExit) as exit_info:
        cil.main([*common[:2], "--epochs", "2", *common[4:], "--methods", "icarl", "--resume"])
    assert exit_info.value.code == 2
    assert "(epochs)" in capsys.readouterr().err  # the error names what differs
    assert json.loads((tmp_path / "results.json").read_text()) == saved  # nothing overwritten

    # A run saved before --loss existed has no loss_overrides; it ran with none, so it resumes.
    del saved["settings"]["loss_overrides"]
    (tmp_path / "results.json").write_text(json.dumps(saved))
    third = cil.main([*common, "--methods", "finetune,icarl", "--resume"])
    assert third["rows"] == second["rows"]


def test_cil_several_orders_on_the_one_class_protocol(tmp_path, capsys):
    common = ["--schedule", "smoke", "--epochs", "1", "--per-class", "8", "--test-per-class", "4", "--memory", "10",
              "--threads", "1", "--protocol", "2+8x1", "--out", str(tmp_path), "--json", "--no-plot",
              "--methods", "icarl,m2kd-full"]
    out = cil.main([*common, "--orders", "2"])
    capsys.readouterr()
    rows = out["rows"]
    assert [(r["method"], r["order_seed"]) for r in rows] == [
        ("icarl", 1993), ("m2kd-full", 1993), ("icarl", 1994), ("m2kd-full", 1994)]
    assert out["class_orders"]["1993"] != out["class_orders"]["1994"]
    for r in rows:
        assert [len(row) for row in r["accuracy_matrix"]] == list(range(1, 10))  # 2 classes, then 8 of one
    # Every one-class group is distilled against the rest (the default scope): the term is not zero.
    assert all(r["last_step_losses"]["mm"] > 0 for r in rows if r["method"] == "m2kd-full")
    diff = cil.paired_difference(rows, 10, "m2kd-full", "icarl")
    final = {(r["method"], r["order_seed"]): r["final_accuracy"] for r in rows}
    expected = [100 * (final["m2kd-full", o] - final["icarl", o]) for o in (1993, 1994)]
    assert diff["orders"] == [1993, 1994] and diff["differences"] == pytest.approx(expected)
    assert diff["mean"] == pytest.approx(np.mean(expected)) and diff["std"] == pytest.approx(np.std(expected, ddof=1))
    gap = next(t for t in out["targets"] if t["name"].startswith("m2kd-full beats icarl"))
    assert gap["measured"] == pytest.approx(diff["mean"]) and gap["met"] == (diff["mean"] >= 5)
    # A third order resumes: the first two are kept, not trained again.
    again = cil.main([*common, "--orders", "3", "--resume"])
    assert again["rows"][:4] == rows and [r["order_seed"] for r in again["rows"][4:]] == [1995, 1995]
    report = cil.report_text(again)
    assert "mean ± std over class orders" in report and "m2kd-full - icarl" in report
    assert (tmp_path / "x.png") == cil.plot(again, 10, tmp_path / "x.png")
    # An order run by another process merges into the study.
    other = tmp_path / "other"
    cil.main([*common[:-6], "--out", str(other), "--json", "--no-plot", "--methods", "icarl", "--order-seeds", "1996"])
    capsys.readouterr()
    merged = cil.main(["--from-json", f"{tmp_path / 'results.json'},{other / 'results.json'}", "--out",
                       str(tmp_path / "merged"), "--json", "--no-plot"])
    assert [(r["method"], r["order_seed"]) for r in merged["rows"]][-1] == ("icarl", 1996)
    assert len(merged["rows"]) == 7 and "1996" in merged["class_orders"]
    # A rerun of a (method, order) already read is skipped, not added twice: the first file's row stays.
    twice = cil.main(["--from-json", f"{other / 'results.json'},{tmp_path / 'merged' / 'results.json'}", "--out",
                      str(tmp_path / "twice"), "--json", "--no-plot"])
    assert len(twice["rows"]) == 7 and twice["rows"][0] == merged["rows"][-1]
    assert "skipped icarl (memory 10, order 1996)" in capsys.readouterr().err
    # Every row says which CPU it ran on: float rounding, so a rerun's figures, depend on it.
    assert {r["cpu"] for r in merged["rows"]} == {cil.cpu_name()}
    assert f"CPU of the runs: {cil.cpu_name()}" in cil.report_text(merged)


def test_cil_report_names_the_runs_of_each_cpu_when_they_differ():
    rows = [{"method": "icarl", "order_seed": 1993, "cpu": "A"}, {"method": "m2kd-full", "order_seed": 1993, "cpu": "B"},
            {"method": "icarl", "order_seed": 1994}]
    assert cil.cpu_line(rows) == "CPU of the runs: A (icarl 1993); B (m2kd-full 1993); not recorded (icarl 1994)"
    assert cil.cpu_line(rows[:1]) == "CPU of the runs: A"


@pytest.mark.parametrize("form", ["npz", "cifar-100-python"])
def test_cil_reads_an_npz_or_a_cifar100_release(tmp_path, capsys, form):
    """--data as add-classes takes it; classes the file names but holds no image of are left out."""
    from helpers import fake_cifar100

    if form == "npz":
        rng = np.random.default_rng(0)
        data = tmp_path / "d.npz"
        np.savez(data, x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y=np.arange(40) % 4,
                 classes=np.array(["cat", "dog", "owl", "eel", "unused"]))
        names = {"cat", "dog", "owl", "eel"}
    else:
        data = tmp_path / "cifar-100-python"
        fake_cifar100(data, n=40, classes=4)
        names = {f"class_{i}" for i in range(4)}
    cil.main(["--schedule", "cpu-short", "--data", str(data), "--backbone", "resnet20", "--input-size", "16",
              "--methods", "finetune", "--epochs", "1", "--memory", "8", "--threads", "1",
              "--out", str(tmp_path / "out"), "--json"])
    out = _stdout_json(capsys)
    assert set(out["class_order"]) == names
    (row,) = out["rows"]
    assert [len(r) for r in row["accuracy_matrix"]] == [1, 2]  # four classes: two steps of two


def test_cil_splits_an_npz_into_disjoint_train_and_test(tmp_path):
    x = np.zeros((30, 8, 8, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(30)  # every image its own
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    train, test = cil.load_arrays(tmp_path / "d.npz", 8)
    assert train.class_names == test.class_names == ["0", "1", "2"]
    assert np.bincount(test.labels).tolist() == [2, 2, 2] and len(train) == 24
    assert not set(train.images[:, 0, 0, 0]) & set(test.images[:, 0, 0, 0])


def test_step_profile_phases_cover_every_step(tmp_path, capsys):
    step_profile.main(["--smoke", "--steps", "3", "--per-class", "20", "--epochs", "1", "--threads", "1",
                       "--out", str(tmp_path), "--json"])
    out = _stdout_json(capsys)
    assert [r["step"] for r in out["rows"]] == [1, 2, 3]
    for r in out["rows"]:
        assert r["teachers"] == r["step"] - 1
        assert set(r["columns"]) == {label for label, _ in step_profile.COLUMNS}
        assert math.isclose(sum(r["columns"].values()), r["seconds"], rel_tol=1e-6)
        assert r["columns"]["student"] > 0 and r["columns"]["decode"] > 0 and r["columns"]["ws commit"] > 0
        assert r["columns"]["other"] < 0.2 * r["seconds"]
        assert (r["columns"]["teachers"] > 0) == (r["step"] > 1)


def test_throughput_compares_the_learner_with_a_bare_loop(tmp_path, capsys):
    throughput.main(["--smoke", "--per-class", "40", "--epochs", "1", "--rounds", "1", "--threads", "1",
                     "--out", str(tmp_path), "--json"])
    rows = {r["loop"]: r for r in _stdout_json(capsys)["rows"]}
    assert set(rows) == {"bare", "icarl", "m2kd"}
    assert rows["bare"]["ratio_to_bare"] == 1.0
    assert all(r["images_per_second"] > 0 for r in rows.values())


def test_analytic_step_times_a_frozen_step_beside_a_trained_one(tmp_path, capsys):
    analytic_step = importlib.import_module("benchmarks.analytic_step")
    analytic_step.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--json"])
    rows = {r["method"]: r for r in _stdout_json(capsys)["rows"]}
    frozen, trained = rows["analytic-frozen"], rows["icarl"]
    assert frozen["epochs"] == 0 and frozen["train_seconds"] == 0 and frozen["forward_images_per_second"] > 0
    assert trained["epochs"] > 0 and trained["train_seconds"] > 0
    assert frozen["images"] == trained["images"] == 2 * 36  # 40 each, 10% held out
    assert (tmp_path / "results.json").is_file()
