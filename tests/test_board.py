"""The board check (benchmarks.board): its smoke mode end to end on the CPU, the deadline that cuts
what is late, and the accuracy plan that fits the deadline."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

board = importlib.import_module("benchmarks.board")


def test_the_smoke_runs_every_part_and_writes_their_figures(tmp_path, capsys, mobilenet_v2_pth):
    result = board.main(["--smoke", "--parallel", "2", "--weights", str(mobilenet_v2_pth), "--out", str(tmp_path),
                         "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "board.json").read_text()) and out["complete"] is True
    parts = result["parts"]
    assert list(parts) == board.all_parts(smoke=True) and all(p["status"] == "done" for p in parts.values())
    assert all(p["wall_seconds"] > 0 and Path(p["log"]).is_file() for p in parts.values())

    facts = parts["facts"]["facts"]
    for key in ("torch", "cuda_build", "cuda_available", "gpus", "tf32_matmul", "tf32_cudnn", "cudnn_benchmark",
                "jetson", "board_model", "tegrastats", "runtimes"):
        assert key in facts
    assert facts["cuda_available"] is False and facts["gpus"] == [] and facts["runtimes"]["onnxruntime"]

    for name in board.THROUGHPUT:
        rows = {r["loop"]: r for r in parts[name]["result"]["rows"]}
        assert set(rows) == {"bare", "icarl", "m2kd"} and all(r["images_per_second"] > 0 for r in rows.values())
        assert parts[name]["result"]["device"]["used"] == "cpu"
    assert parts["throughput-mobilenetv2"]["result"]["backbone"] == "mobilenetv2"

    overhead = parts["overhead"]
    assert overhead["result"]["rows"][0]["step"] == 10 and overhead["summary"]["m2kd_over_icarl"] > 0
    assert overhead["summary"]["teacher_precision"] in ("int8", "fp32")  # on a CPU; fp16/bf16 under CUDA
    assert overhead["summary"]["auto_picked_half"] is None  # only asked under CUDA

    memory = parts["memory"]["result"]
    assert memory["measured_peak_cuda_bytes"] is None and memory["gpu_ratio"] is None and memory["note"]
    assert memory["predicted_gpu_bytes"] > 0 and memory["total_over_rss"] > 0

    for name in board.CLI_WALKS:
        commands = parts[name]["commands"]
        verbs = [c["command"].split()[1] for c in commands]
        assert verbs == ["init", "add-classes", "add-classes", "add-classes", "eval", "snapshots", "memory", "export",
                         "predict", "predict", "bench"]
        assert all(c["exit_code"] == 0 and c["seconds"] >= 0 for c in commands)
        checks = parts[name]["checks"]
        assert checks["all_exit_0"] and checks["snapshots_verified"] and checks["export_parity_passed"]
        assert "tensorrt" in parts[name]  # not installed here: said so
    assert "--pretrained" in parts["cli-pretrained"]["commands"][0]["command"]

    for name in board.accuracy_jobs(smoke=True):
        acc = parts[name]
        assert acc["plan"]["epochs"] == 1 and acc["summary"]
        assert all(0 <= s["final_accuracy"] <= 1 for s in acc["summary"])
    assert [s["method"] for s in parts["accuracy-scratch"]["summary"]] == list(board.ACCURACY_METHODS)
    assert parts["accuracy-pretrained"]["result"]["settings"]["pretrained"] == str(mobilenet_v2_pth)


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def test_the_deadline_cuts_what_runs_and_skips_what_is_left(tmp_path):
    jobs = [board.Job("fast", timed=True), board.Job("a", timed=False), board.Job("slow", timed=False),
            board.Job("late", timed=False)]
    seconds = {"fast": 0.1, "a": 0.2, "slow": 60, "late": 0.1}
    ended: dict[str, str] = {}
    start = time.monotonic()
    board.schedule_jobs(jobs, lambda job, n: sleeper(seconds[job.name]), start + 3, parallel=2, overlap=False,
                        logs=tmp_path, on_end=lambda job, status: ended.setdefault(job.name, status), poll=0.05)
    assert time.monotonic() - start < 15  # the slow one was stopped, not waited for
    assert ended == {"fast": "done", "a": "done", "slow": "cut", "late": "done"}
    by = {j.name: j for j in jobs}
    assert by["fast"].beside == set()  # timed: alone
    assert by["slow"].beside >= {"a"} and by["slow"].proc.poll() is not None

    jobs = [board.Job("slow", timed=False), board.Job("never", timed=False)]
    ended.clear()
    board.schedule_jobs(jobs, lambda job, n: sleeper(60), time.monotonic() + 1, parallel=1, overlap=False,
                        logs=tmp_path, on_end=lambda job, status: ended.setdefault(job.name, status), poll=0.05)
    assert ended == {"slow": "cut", "never": "skipped"}


def test_a_part_cut_at_the_deadline_keeps_what_it_wrote(tmp_path):
    result = board.main(["--smoke", "--parts", "cli-scratch", "--deadline-s", "5", "--out", str(tmp_path), "--json"])
    part = result["parts"]["cli-scratch"]
    assert result["complete"] is False and part["status"] == "cut" and "deadline" in part["note"]
    assert all(c["exit_code"] == 0 for c in part.get("commands", []))  # the commands that finished, kept


def test_the_accuracy_plan_fits_the_time_left_with_every_image(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()

    def plan(ips: float, seconds: float, concurrent: int = 1, methods=("icarl",)) -> dict:
        (parts / "throughput-resnet32.json").write_text(json.dumps(
            {"result": {"rows": [{"loop": "m2kd", "images_per_second": ips}]}}))
        ctx = board.Context(False, "cuda", tmp_path, None, time.time() + seconds, tmp_path, None, "subprocess", parts)
        return board.plan_accuracy(ctx, "full", list(methods), concurrent)

    fast = plan(ips=1e6, seconds=300)
    assert fast["epochs"] == 50 and fast["per_class"] == board.CIFAR_PER_CLASS  # the whole schedule fits
    some = plan(ips=3000, seconds=300)
    assert 1 <= some["epochs"] < 50 and some["per_class"] == board.CIFAR_PER_CLASS
    assert some["epochs"] <= 300 * board.SAFETY * 3000 / (10 * 5000)
    assert plan(ips=3000, seconds=300, concurrent=3)["epochs"] < some["epochs"]  # sharing the GPU
    assert plan(ips=3000, seconds=300, methods=("m2kd-packed",))["epochs"] < some["epochs"]  # plus its fine-tuning
    slow = plan(ips=100, seconds=60)
    assert slow["epochs"] == 1 and 100 <= slow["per_class"] < board.CIFAR_PER_CLASS
    (parts / "throughput-resnet32.json").unlink()
    ctx = board.Context(False, "cuda", tmp_path, None, time.time() + 60, tmp_path, None, "subprocess", parts)
    assert "no throughput measured" in board.plan_accuracy(ctx, "full", ["icarl"], 1)["why"]
