"""The device predictors (device/predictor.py) and the latency benchmark (device/bench.py).

TensorRT runs through the TensorRT and pycuda simulators (tests/trt_sim): the engine is the
simulator's plan of the real ONNX export, its arithmetic done by onnxruntime, and the pycuda
simulator enforces the host/device contract (allocation sizes, page-locked buffers, copies on a
stream, no read of a host buffer before the stream is synchronised)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import trt_sim
from test_export import _image_folder

from device import bench as dbench
from device.predictor import (
    OnnxRuntimePredictor,
    Predictor,
    TensorRTPredictor,
    TorchPredictor,
    format_predictions,
    open_predictor,
    predict_images,
    preprocess,
    read_images,
    softmax,
    top_k,
)
from edge_m2kd.errors import UserError
from edge_m2kd.preprocess import normalize, to_unit
from exporters import build_engine, export_workspace
from exporters.artifacts import metadata_path

SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: torch with two threads is pathologically slow when the other is busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from edge_m2kd.commands import add_classes, init_workspace

    root = tmp_path_factory.mktemp("pred")
    _image_folder(root / "data")
    path = root / "ws"
    init_workspace(path, backbone="resnet20", input_size=SIZE, exemplars=24, epochs=1, batch_size=16,
                   planned_steps=2, device="cpu")
    add_classes(path, root / "data")
    export_workspace(path)
    return path


@pytest.fixture(scope="module")
def probe(ws) -> np.ndarray:
    """The shared probe set: the workspace's exemplars and some random pixels (33 images)."""
    from edge_m2kd.workspace import Workspace

    exemplars, _ = Workspace.open(ws).load_learner().memory.arrays()
    noise = np.random.default_rng(7).integers(0, 256, (9, SIZE, SIZE, 3), dtype=np.uint8)
    return np.concatenate([exemplars, noise])


@pytest.fixture(scope="module")
def reference(ws, probe) -> np.ndarray:
    with TorchPredictor.from_workspace(ws, device="cpu") as p:
        return p.predict(probe)


def engine_for(ws: Path, tmp_path: Path, version: str, monkeypatch, max_batch: int = 8) -> tuple[trt_sim.Sim, Path]:
    sim = trt_sim.install(monkeypatch, version)
    plan = tmp_path / f"model-{version}.plan"
    build_engine(ws / "exports" / "model.onnx", plan, max_batch=max_batch, cache_dir=tmp_path / "cache",
                 gpu="Orin (sim)")
    return sim, plan


# -- preprocessing and results --------------------------------------------------------------------------
def test_preprocess_is_the_training_transform_bit_for_bit(probe):
    from edge_m2kd.config import IMAGE_MEAN, IMAGE_STD

    np.testing.assert_array_equal(preprocess(probe, SIZE), to_unit(probe).numpy())
    # An export whose graph does not fold the normalisation: applied here, as training applies it.
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (IMAGE_MEAN, IMAGE_STD))
    np.testing.assert_array_equal(preprocess(probe, SIZE, (mean, std)), normalize(to_unit(probe)).numpy())
    with pytest.raises(UserError, match=r"uint8 RGB of shape \(N, 16, 16, 3\), got float32"):
        preprocess(probe.astype(np.float32), SIZE)
    with pytest.raises(UserError, match=r"got uint8 \(33, 16, 16, 3\)"):
        preprocess(probe, 32)


def test_read_images_decodes_as_training_does(ws, tmp_path):
    from edge_m2kd.data import load_image_folder

    data = ws.parent / "data"
    paths = sorted(str(p) for p in data.glob("*/*.png"))
    got = read_images(paths, SIZE)
    np.testing.assert_array_equal(got, load_image_folder(data, SIZE).images)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for bad, message in [(tmp_path / "broken.png", "cannot read image"), (tmp_path / "nope.jpg", "does not exist")]:
        with pytest.raises(UserError, match=message) as err:
            read_images([bad], SIZE)
        assert "\n" not in str(err.value)


def test_softmax_top_k_and_the_report():
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], np.float32)
    np.testing.assert_allclose(softmax(logits), torch.softmax(torch.from_numpy(logits), 1).numpy(), rtol=1e-6)
    best = top_k(logits, ["a", "b", "c"], 2)
    assert [[p["class"] for p in row] for row in best] == [["b", "c"], ["c", "a"]]
    assert best[0][0]["score"] > best[0][1]["score"]
    assert len(top_k(logits, ["a", "b", "c"], 10)[0]) == 3
    report = format_predictions(["x.png", "y.png"], logits, ["a", "b", "c"], 1, "onnxruntime")
    assert report == {"backend": "onnxruntime", "results": [
        {"image": "x.png", "predictions": [{"class": "b", "score": pytest.approx(0.6652, abs=1e-4)}]},
        {"image": "y.png", "predictions": [{"class": "c", "score": pytest.approx(0.9867, abs=1e-4)}]}]}
    json.dumps(report)


# -- the three backends agree --------------------------------------------------------------------------
@pytest.mark.parametrize("version", trt_sim.VERSIONS)
def test_three_backends_agree_on_the_probe_set(version, ws, probe, reference, tmp_path, monkeypatch):
    with open_predictor(ws, "onnxruntime", device="cpu") as ort_p:
        assert isinstance(ort_p, Predictor) and ort_p.device == "cpu"
        ort_logits = ort_p.predict(probe)
    assert ort_logits.dtype == np.float32 and ort_logits.shape == (len(probe), 3)
    assert np.abs(ort_logits - reference).max() <= 1e-4
    np.testing.assert_array_equal(ort_logits.argmax(1), reference.argmax(1))

    sim, plan = engine_for(ws, tmp_path, version, monkeypatch)
    with open_predictor(ws, "tensorrt", engine=plan) as trt_p:
        assert isinstance(trt_p, TensorRTPredictor) and trt_p.max_batch == 8 and trt_p.tensorrt_version == version
        trt_logits = trt_p.predict(probe)  # 33 images: 5 chunks of at most 8
        assert trt_p.class_names == ["c0", "c1", "c2"] and trt_p.runs == 5
    assert np.abs(trt_logits - ort_logits).max() <= 1e-6  # the simulator computes with onnxruntime
    assert np.abs(trt_logits - reference).max() <= 1e-4
    np.testing.assert_array_equal(trt_logits.argmax(1), reference.argmax(1))
    # The runtime contract: primary context, page-locked buffers only, nothing deprecated, nothing leaked.
    assert sim.pycuda.context_kind == "primary" and sim.pycuda.pageable_async_copies == 0
    assert sim.state.deprecated_calls == [] and sim.state.errors() == []
    assert sim.memory.live == 0 and sim.pycuda.pagelocked_frees == 2


def test_predict_images_same_answer_on_every_backend(ws, tmp_path, monkeypatch):
    import torch

    from edge_m2kd.preprocess import to_unit
    from edge_m2kd.workspace import Workspace

    paths = sorted(str(p) for p in (ws.parent / "data").glob("c*/0[0-3].png"))
    # The reference: the workspace's deployed classifier called directly, softmax, top 2.
    learner = Workspace.open(ws).load_learner()
    with torch.inference_mode():
        scores = torch.softmax(learner.deployed()(to_unit(read_images(paths, SIZE))), 1)
    top = scores.topk(2)
    want = [{"predictions": [{"class": learner.class_names[i], "score": float(v)} for v, i in zip(vals, idx.tolist())]}
            for vals, idx in zip(top.values, top.indices)]
    _, plan = engine_for(ws, tmp_path, "10.3.0", monkeypatch)
    for backend in ("torch", "onnxruntime", "tensorrt"):
        report = predict_images(ws, paths, backend, top_k=2, engine=plan, device="cpu")
        assert report["backend"] == backend and [r["image"] for r in report["results"]] == paths
        for got, ref in zip(report["results"], want):
            assert [p["class"] for p in got["predictions"]] == [p["class"] for p in ref["predictions"]]
            np.testing.assert_allclose([p["score"] for p in got["predictions"]],
                                       [p["score"] for p in ref["predictions"]], atol=1e-5)


# -- TensorRT: buffers, chunks, the stream contract ------------------------------------------------------
def test_tensorrt_buffers_are_allocated_once_and_reused(ws, probe, tmp_path, monkeypatch):
    sim, plan = engine_for(ws, tmp_path, "10.3.0", monkeypatch)
    calls = []
    original = sim.trt.IExecutionContext.set_input_shape
    monkeypatch.setattr(sim.trt.IExecutionContext, "set_input_shape",
                        lambda self, name, shape: calls.append(tuple(shape)) or original(self, name, shape))
    p = TensorRTPredictor(plan, workspace=ws)
    assert sim.memory.allocations == 2 and sim.pycuda.pagelocked_allocations == 2
    assert sim.memory.bytes_in_use == p.device_bytes == 8 * 3 * SIZE * SIZE * 4 + 8 * 3 * 4
    with OnnxRuntimePredictor(ws / "exports" / "model.onnx", device="cpu") as ort_p:
        for n in (1, 5, 8, 8, 3, 20, 33):  # 20 and 33: more than the engine's max batch of 8
            got = p.predict(probe[:n])
            assert got.shape == (n, 3)
            np.testing.assert_allclose(got, ort_p.predict(probe[:n]), atol=1e-6)
    assert sim.memory.allocations == 2 and sim.pycuda.pagelocked_allocations == 2 and sim.pycuda.streams_created == 1
    assert sim.state.executions == 1 + 1 + 1 + 1 + 1 + 3 + 5
    # The shape is set only when the batch changes; 20 = 8 + 8 + 4 and 33 = 4 x 8 + 1.
    assert [c[0] for c in calls] == [1, 5, 8, 3, 8, 4, 8, 1] and all(c[1:] == (3, SIZE, SIZE) for c in calls)
    first = p.predict(probe[:2])
    p.predict(probe[2:4])
    np.testing.assert_array_equal(first, p.predict(probe[:2]))  # results are copies, not the reused buffer
    assert p.predict(probe[:0]).shape == (0, 3)
    p.close()
    p.close()  # idempotent
    assert sim.memory.live == 0 and sim.memory.frees == 2 and sim.pycuda.pagelocked_frees == 2
    with pytest.raises(RuntimeError, match="closed"):
        p.predict(probe[:1])


def test_the_pycuda_simulator_catches_a_read_before_synchronize(ws, probe, tmp_path, monkeypatch):
    sim, plan = engine_for(ws, tmp_path, "8.6.1", monkeypatch)
    p = TensorRTPredictor(plan, workspace=ws)
    try:
        p._stream.synchronize = lambda: None  # the bug: read the host buffer without waiting for the copy
        with pytest.raises(trt_sim.PendingCopyError, match="synchronize"):
            p.predict(probe[:4])
    finally:
        p.close()

    # The rules themselves, on the simulated driver.
    import pycuda.driver as cuda

    host = cuda.pagelocked_empty((2, 3), np.float32)
    host[:] = 1.5
    device = cuda.mem_alloc(host.nbytes)
    stream = cuda.Stream()
    cuda.memcpy_htod_async(device, host, stream)
    with pytest.raises(trt_sim.PendingCopyError, match="host-to-device copy still reads"):
        host[0, 0] = 2.0
    out = cuda.pagelocked_empty((2, 3), np.float32)
    cuda.memcpy_dtoh_async(out, device, stream)
    for read in (lambda: out.copy(), lambda: out[0], lambda: out.max(), lambda: np.argmax(out), lambda: out + 1,
                 lambda: float(out[0, 0]), lambda: out.tolist()):
        with pytest.raises(trt_sim.PendingCopyError, match="call stream.synchronize"):
            read()
    assert np.isnan(np.asarray(out)).all()  # a read that slips past the checks sees garbage
    stream.synchronize()
    np.testing.assert_array_equal(out, np.full((2, 3), 1.5, np.float32))
    host[0, 0] = 2.0  # allowed once synchronised
    with pytest.raises(trt_sim.InvalidAddress, match="past the end"):
        cuda.memcpy_htod(device, np.zeros((3, 3), np.float32))  # larger than the allocation
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda.memcpy_dtoh(out[:, :2], device)
    device.free()


def test_torch_and_onnxruntime_chunk_at_max_batch(ws, probe, reference):
    for p in (TorchPredictor.from_workspace(ws, max_batch=4, device="cpu"),
              open_predictor(ws, "onnxruntime", max_batch=4, device="cpu")):
        with p:
            got = p.predict(probe[:10])
            assert p.runs == 3 and p.max_batch == 4  # 4 + 4 + 2
            np.testing.assert_allclose(got, reference[:10], atol=1e-4)


# -- one-line errors ------------------------------------------------------------------------------------
def test_an_engine_from_another_tensorrt_is_refused_before_deserialising(ws, tmp_path, monkeypatch):
    _, plan = engine_for(ws, tmp_path, "8.6.1", monkeypatch)
    sim = trt_sim.install(monkeypatch, "10.3.0")
    deserialised = []
    monkeypatch.setattr(sim.trt.Runtime, "deserialize_cuda_engine", lambda self, data: deserialised.append(1))
    with pytest.raises(UserError) as err:
        open_predictor(ws, "tensorrt", engine=plan)
    msg = str(err.value)
    assert "built by TensorRT 8.6.1 and this is TensorRT 10.3.0" in msg and "\n" not in msg
    assert f"`edge-m2kd export {ws} --tensorrt {plan}`" in msg
    assert deserialised == [] and sim.memory.allocations == 0

    # A plan edited after the build (its sha256 is in the metadata) is caught before deserialising too.
    _, plan = engine_for(ws, tmp_path, "10.3.0", monkeypatch)
    plan.write_bytes(plan.read_bytes() + b"x")
    with pytest.raises(UserError, match="does not match its metadata"):
        open_predictor(ws, "tensorrt", engine=plan)


def test_tensorrt_without_tensorrt_pycuda_or_a_gpu(ws, tmp_path, monkeypatch):
    _, plan = engine_for(ws, tmp_path, "10.3.0", monkeypatch)
    trt_sim.hide_modules(monkeypatch, "tensorrt")
    with pytest.raises(UserError) as err:
        open_predictor(ws, "tensorrt", engine=plan)
    msg = str(err.value)
    assert msg.startswith("--backend tensorrt needs TensorRT, which is not installed here") and "\n" not in msg
    assert "Jetson" in msg and "--backend onnxruntime" in msg
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs leaves
    with pytest.raises(UserError, match="type stubs only"):
        open_predictor(ws, "tensorrt", engine=plan)

    trt_sim.install(monkeypatch, "10.3.0", with_pycuda=False)
    with pytest.raises(UserError) as err:
        open_predictor(ws, "tensorrt", engine=plan)
    assert "through pycuda, which cannot be imported" in str(err.value) and "edge-m2kd[jetson]" in str(err.value)

    sim = trt_sim.install(monkeypatch, "10.3.0")
    sim.pycuda.devices = 0  # pycuda installed, no GPU
    with pytest.raises(UserError) as err:
        open_predictor(ws, "tensorrt", engine=plan)
    msg = str(err.value)
    assert "needs a CUDA GPU" in msg and "no CUDA-capable device" in msg and "\n" not in msg

    trt_sim.install(monkeypatch, "10.3.0")
    with pytest.raises(UserError, match=rf"no TensorRT engine at {tmp_path / 'none.plan'}; build it on the board "
                                         rf"with `edge-m2kd export {ws} --tensorrt {tmp_path / 'none.plan'}`"):
        open_predictor(ws, "tensorrt", engine=tmp_path / "none.plan")


def test_onnxruntime_without_an_export_or_with_an_old_one(ws, tmp_path):
    with pytest.raises(UserError) as err:
        open_predictor(ws, "onnxruntime", onnx=tmp_path / "m.onnx")
    msg = str(err.value)
    assert msg == f"no ONNX export at {tmp_path / 'm.onnx'}; export it first: `edge-m2kd export {ws} --onnx " \
                  f"{tmp_path / 'm.onnx'}`"

    old = tmp_path / "old.onnx"
    shutil.copy(ws / "exports" / "model.onnx", old)
    meta = json.loads(metadata_path(ws / "exports" / "model.onnx").read_text())
    meta["workspace"]["steps_done"] = 0
    meta["class_names"] = ["c0", "c1"]
    metadata_path(old).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"exported at step 0 with 2 classes, but .* is at step 1 with 3; export it again"):
        open_predictor(ws, "onnxruntime", onnx=old)
    with pytest.raises(UserError, match="unknown backend 'tflite'"):
        open_predictor(ws, "tflite")


# -- the benchmark ----------------------------------------------------------------------------------------
def test_compare_backends_reports_percentiles_throughput_and_memory(ws):
    rows = dbench.compare_backends(ws, batch_sizes=(1, 4), iterations=4, warmup=1, threads=1)
    assert [(r["backend"], r["batch_size"]) for r in rows] == [("torch", 1), ("torch", 4), ("onnxruntime", 1),
                                                                ("onnxruntime", 4)]
    for r in rows:
        assert r["device"] == "cpu" and r["iterations"] == 4 and r["warmup"] == 1 and r["chunks_per_call"] == 1
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["mean_ms"])
        assert {"rss_load_delta_bytes", "peak_rss_delta_bytes", "cuda_allocated_delta_bytes"} <= set(r["memory"])
        assert r["memory"]["cuda_allocated_delta_bytes"] is None  # no CUDA here
    json.dumps(rows)
    table = dbench.format_comparison(rows)
    assert "torch images/s" in table and "onnxruntime images/s" in table and "onnxruntime/torch" in table
    assert len(table.splitlines()) == 5  # header, rule, batch 1, batch 4, footnote


def test_bench_reports_tegrastats_on_a_jetson(ws, tmp_path, monkeypatch):
    # A stand-in tegrastats on PATH, as on a board: its RAM figure is the whole shared DRAM. It
    # ignores SIGTERM, so it prints both lines however soon the benchmark ends.
    script = tmp_path / "tegrastats"
    script.write_text("#!/bin/sh\ntrap '' TERM\necho 'RAM 3150/7620MB (lfb 37x4MB) SWAP 0/3810MB GR3D_FREQ 37%'\n"
                      "echo 'RAM 3201/7620MB (lfb 37x4MB) SWAP 0/3810MB GR3D_FREQ 12%'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    row = dbench.bench(ws, "torch", 1, iterations=2, warmup=0, device="cpu")
    assert row["memory"]["tegrastats_ram_peak_bytes"] == 3201 * 2**20
    assert row["memory"]["gr3d_peak_percent"] == 37
    assert "board RAM peak MiB" in dbench.format_rows([row]).splitlines()[0]


def test_bench_tensorrt_through_the_simulator(ws, tmp_path, monkeypatch):
    sim, plan = engine_for(ws, tmp_path, "10.3.0", monkeypatch, max_batch=4)
    row = dbench.bench(ws, "tensorrt", 6, engine=plan, iterations=3, warmup=1)
    assert row["backend"] == "tensorrt" and row["device"] == "cuda" and row["chunks_per_call"] == 2
    assert row["memory"]["device_buffer_bytes"] == 4 * 3 * SIZE * SIZE * 4 + 4 * 3 * 4
    assert sim.state.executions == 2 * 4 and sim.memory.live == 0
    assert "tensorrt" in dbench.format_rows([row])
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        dbench.bench(ws, "torch", 0)


def test_inference_benchmark_smoke(tmp_path, monkeypatch, capsys):
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.syspath_prepend(root)  # benchmarks/ runs from the repository root, not installed
    from benchmarks import inference

    sim = trt_sim.install(monkeypatch, "10.3.0")
    inference.main(["--models", "resnet32", "--batch-sizes", "1,3", "--iterations", "2", "--warmup", "0",
                    "--threads", "1", "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == out["rows"] and out["skipped"] == {}
    rows = {(r["backend"], r["batch_size"]): r for r in out["rows"]}
    assert set(rows) == {(b, n) for b in ("torch", "onnxruntime", "tensorrt") for n in (1, 3)}
    for (_, n), r in rows.items():
        assert r["model"] == "resnet32" and r["input_size"] == 32 and r["iterations"] == 2
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
        assert r["speedup_vs_torch"] == pytest.approx(r["images_per_s"] / rows["torch", n]["images_per_s"])
    assert rows["tensorrt", 3]["device"] == "cuda" and sim.state.builds == 1 and sim.memory.live == 0

    trt_sim.hide_modules(monkeypatch, "tensorrt")
    inference.main(["--models", "resnet32", "--backends", "onnxruntime,tensorrt", "--batch-sizes", "1",
                    "--iterations", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "onnxruntime" in table and "tensorrt: skipped - --backend tensorrt needs TensorRT" in table
