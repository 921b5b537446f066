"""The TensorRT engine build, run against the TensorRT simulator (tests/trt_sim) for each
TensorRT version edge-m2kd supports (8.6, 10.x) and the one it must refuse FP16/INT8 on (11.x).

The simulator raises AttributeError for any API name the simulated version does not have, so
every build here also proves the code calls nothing that version lacks."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import trt_sim
from onnx import TensorProto, helper
from test_export import class_names, probe_images, realistic
from trt_sim.runner import run_engine

from edge_m2kd.errors import UserError
from edge_m2kd.preprocess import to_unit
from exporters import build_engine, export_model, read_metadata
from exporters import tensorrt_build as tb
from exporters.artifacts import metadata_path

SIZE = 16
SUPPORTED = ("8.6.1", "10.3.0")  # FP16 / INT8 builds; 11.x builds FP32 only
# Deprecated (not removed) in 10.1+ with no replacement before explicit quantization: INT8
# calibration on 10.x necessarily uses them. Anything else deprecated must not be used.
INT8_ON_10 = {"IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile"}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_model(realistic("resnet20", SIZE), class_names(), SIZE, path, probe_images=probe_images(6, SIZE))
    return path


@pytest.fixture
def exemplars() -> np.ndarray:
    return probe_images(40, SIZE, seed=3)


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def build(onnx_model: Path, tmp_path: Path, **kw) -> tb.EngineBuild:
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("gpu", "Orin (sim)")
    return build_engine(onnx_model, tmp_path / "model.plan", **kw)


@pytest.mark.parametrize("version", trt_sim.VERSIONS)
def test_fp32_engine_gives_the_onnx_answers(version, onnx_model, tmp_path, monkeypatch):
    sim = trt_sim.install(monkeypatch, version)
    result = build(onnx_model, tmp_path, max_batch=32)
    assert result.tensorrt_version == version and not result.cache_hit
    assert sim.state.builds == 1 and sim.state.errors() == []
    cfg = sim.state.last_config
    assert cfg["fp16"] is False and cfg["int8"] is False and cfg["workspace"] == 256 * 2**20
    assert cfg["profiles"] == [{"images": [[1, 3, SIZE, SIZE], [16, 3, SIZE, SIZE], [32, 3, SIZE, SIZE]]}]
    plan = result.plan_path.read_bytes()
    for batch in (1, 7, 32):
        x = to_unit(probe_images(batch, SIZE, seed=batch)).numpy()
        got = run_engine(sim.trt, plan, x)
        np.testing.assert_allclose(got, onnx_logits(onnx_model, x), rtol=0, atol=1e-6)
    assert sim.state.executions == 3 and sim.memory.live == 0
    assert sim.state.deprecated_calls == [], "the build and the runner must use no deprecated TensorRT API"


@pytest.mark.parametrize("version", trt_sim.VERSIONS)
def test_fp16(version, onnx_model, tmp_path, monkeypatch):
    sim = trt_sim.install(monkeypatch, version)
    if version.startswith("11."):
        with pytest.raises(UserError) as err:
            build(onnx_model, tmp_path, precision="fp16")
        msg = str(err.value)
        assert "TensorRT 11" in msg and "BuilderFlag.FP16" in msg and "--precision fp32" in msg and "\n" not in msg
        assert sim.state.builders_created == 0 and not (tmp_path / "model.plan").exists()
        return
    result = build(onnx_model, tmp_path, precision="fp16", max_batch=8)
    assert sim.state.last_config["fp16"] is True and sim.state.last_config["int8"] is False
    x = to_unit(probe_images(7, SIZE)).numpy()
    got = run_engine(sim.trt, result.plan_path.read_bytes(), x)
    want = onnx_logits(onnx_model, x)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert sim.state.deprecated_calls == []


@pytest.mark.parametrize("version", trt_sim.VERSIONS)
def test_int8_calibrates_on_the_exemplars(version, onnx_model, tmp_path, monkeypatch, exemplars):
    sim = trt_sim.install(monkeypatch, version)
    if version.startswith("11."):
        with pytest.raises(UserError, match="TensorRT 11 removed BuilderFlag.FP16/INT8 and the INT8 calibrators"):
            build(onnx_model, tmp_path, precision="int8", calibration_images=exemplars)
        assert sim.state.builders_created == 0
        return
    result = build(onnx_model, tmp_path, precision="int8", max_batch=8, calibration_images=exemplars)
    state = sim.state
    assert state.last_config["int8"] is True and state.last_config["fp16"] is True and state.last_config["calibrated"]
    # Batches of 8 (min(16, max_batch, images)), at the calibration profile's fixed shape, 40 images -> 5 batches.
    assert state.calibration_shape == (8, 3, SIZE, SIZE) and state.calibration_batches == 5
    assert sim.pycuda.copies_htod == 5 and sim.memory.live == 0, "the calibration buffer must be freed"
    allowed = INT8_ON_10 if version.startswith("10.") else set()
    assert set(state.deprecated_calls) <= allowed, state.deprecated_calls
    meta = read_metadata(result.plan_path)
    assert meta["precision"] == "int8" and meta["engine"]["calibration"]["samples"] == 40
    calib = list((tmp_path / "cache").glob("*.calib"))
    assert len(calib) == 1 and calib[0].read_bytes().startswith(b"TRT-")

    # Another build of the same model and images (other batch range): the calibration cache is reused.
    build_engine(onnx_model, tmp_path / "other.plan", precision="int8", max_batch=4, calibration_images=exemplars,
                 cache_dir=tmp_path / "cache", gpu="Orin (sim)")
    assert state.builds == 2 and state.calibration_cache_read and state.calibration_batches == 5


def test_int8_needs_pycuda_and_images(onnx_model, tmp_path, monkeypatch, exemplars):
    trt_sim.install(monkeypatch, "10.3.0", with_pycuda=False)
    with pytest.raises(UserError, match="through pycuda, which is not installed.*edge-m2kd\\[jetson\\]"):
        build(onnx_model, tmp_path, precision="int8", calibration_images=exemplars)
    with pytest.raises(UserError, match="exemplar store is empty"):
        build(onnx_model, tmp_path, precision="int8", calibration_images=exemplars[:0])
    with pytest.raises(UserError, match="calibration images are uint8 \\(40, 32, 32, 3\\)"):
        build(onnx_model, tmp_path, precision="int8", calibration_images=probe_images(40, 32))


def test_engine_cache_reuses_the_plan(onnx_model, tmp_path, monkeypatch):
    sim = trt_sim.install(monkeypatch, "10.3.0")
    first = build(onnx_model, tmp_path, precision="fp16")
    plan = first.plan_path.read_bytes()
    first.plan_path.unlink()
    second = build(onnx_model, tmp_path, precision="fp16")
    assert second.cache_hit and second.cache_key == first.cache_key
    assert sim.state.builders_created == 1 and sim.state.builds == 1, "a cache hit must not start the builder"
    assert second.plan_path.read_bytes() == plan

    # Any part of the key changes the key: precision, GPU, TensorRT version.
    build(onnx_model, tmp_path, precision="fp32")
    build(onnx_model, tmp_path, precision="fp16", gpu="AGX Orin (sim)")
    assert sim.state.builds == 3
    trt_sim.install(monkeypatch, "8.6.1")
    third = build(onnx_model, tmp_path, precision="fp16")
    assert not third.cache_hit

    # A damaged cache entry is a miss (and rebuilt), never a broken engine.
    sim = trt_sim.install(monkeypatch, "10.3.0")
    for p in (tmp_path / "cache").glob("*.plan"):
        p.write_bytes(p.read_bytes()[:-10])
    again = build(onnx_model, tmp_path, precision="fp16")
    assert not again.cache_hit and sim.state.builds == 1
    assert again.plan_path.read_bytes() == plan


def test_engine_metadata(onnx_model, tmp_path, monkeypatch):
    trt_sim.install(monkeypatch, "8.6.1")
    result = build(onnx_model, tmp_path, precision="fp16", max_batch=16, workspace_mib=128)
    assert result.metadata_path == metadata_path(result.plan_path) == tmp_path / "model.plan.json"
    meta = json.loads(result.metadata_path.read_text())
    onnx_meta = read_metadata(onnx_model)
    assert meta["kind"] == "tensorrt" and meta["artifact"] == "model.plan" and meta["onnx"] == "model.onnx"
    assert meta["class_names"] == onnx_meta["class_names"] == class_names()
    assert meta["input"] == onnx_meta["input"] and meta["output"] == onnx_meta["output"]
    assert meta["model_hash"] == onnx_meta["model_hash"] == result.model_hash
    assert meta["classifier"] == "cnn" and meta["precision"] == "fp16"
    assert meta["onnx_parity"]["passed"] is True and "parity" not in meta
    assert meta["engine"]["batch"] == {"min": 1, "opt": 8, "max": 16} and meta["engine"]["workspace_mib"] == 128
    assert meta["engine"]["gpu"] == "Orin (sim)" and meta["engine"]["calibration"] is None
    assert meta["tools"]["tensorrt"] == "8.6.1" and meta["tools"]["onnx"] == onnx.__version__
    assert meta["created"]


def test_missing_tensorrt_says_where_to_build(onnx_model, tmp_path, monkeypatch):
    trt_sim.hide_modules(monkeypatch, "tensorrt")
    with pytest.raises(UserError) as err:
        build(onnx_model, tmp_path)
    msg = str(err.value)
    assert msg.startswith("TensorRT is not installed here") and "\n" not in msg
    assert "Jetson" in msg and "JetPack" in msg and "Dockerfile.jetson" in msg
    # A tensorrt directory with type stubs only (what pip install tensorrt-stubs leaves) is not TensorRT.
    stub = types.ModuleType("tensorrt")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", stub)
    with pytest.raises(UserError, match="no API: type stubs only"):
        tb.require_tensorrt()


def test_old_tensorrt_is_refused(monkeypatch):
    sim_mod = types.ModuleType("tensorrt")
    sim_mod.__version__ = "8.5.3.1"  # type: ignore[attr-defined]
    sim_mod.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", sim_mod)
    with pytest.raises(UserError, match="too old.*8.6.*10.x"):
        tb.require_tensorrt()


def test_corrupt_or_unbuildable_onnx(onnx_model, tmp_path, monkeypatch):
    trt_sim.install(monkeypatch, "10.3.0")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(UserError) as err:
        build_engine(corrupt, tmp_path / "x.plan", metadata={}, cache_dir=tmp_path)
    assert "is not a valid ONNX model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="cannot read the ONNX model"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.plan", metadata={}, cache_dir=tmp_path)

    det = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["images"], ["r"], name="relu"), helper.make_node("Det", ["r"], ["d"], name="det"),
         helper.make_node("Unsqueeze", ["d", "axes"], ["logits"], name="unsq")], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2])]), opset_imports=[helper.make_opsetid("", 17)])
    det_path = tmp_path / "det.onnx"
    onnx.save(det, str(det_path))
    with pytest.raises(UserError, match=r"would not build with TensorRT 10.3.0: error: node 'det' \(Det\)"):
        build_engine(det_path, tmp_path / "x.plan", metadata={}, cache_dir=tmp_path)
    # Past the preflight, TensorRT's own parser errors are reported with the node they name.
    monkeypatch.setattr(tb._preflight, "preflight", lambda proto, version: [])
    with pytest.raises(UserError, match=r"ONNX parser rejected the model: node 'det' \(Det\): No importer"):
        build_engine(det_path, tmp_path / "x.plan", metadata={}, cache_dir=tmp_path)

    # An ONNX file edited after export no longer matches its metadata.
    edited = tmp_path / "edited.onnx"
    edited.write_bytes(onnx_model.read_bytes())
    metadata_path(edited).write_text(metadata_path(onnx_model).read_text().replace('"model_hash": "', '"model_hash": "0'))
    with pytest.raises(UserError, match="does not match its metadata"):
        build_engine(edited, tmp_path / "x.plan", cache_dir=tmp_path)


def test_build_arguments_are_checked(onnx_model, tmp_path, monkeypatch):
    trt_sim.install(monkeypatch, "10.3.0")
    with pytest.raises(UserError, match="unknown precision"):
        build(onnx_model, tmp_path, precision="bf16")
    with pytest.raises(UserError, match="--max-batch must be at least 1"):
        build(onnx_model, tmp_path, max_batch=0)
    with pytest.raises(UserError, match="is a directory"):
        build_engine(onnx_model, tmp_path, cache_dir=tmp_path / "c")


# -- the simulator enforces the contract (so the tests above mean something) --------------------------
def _built(version: str, onnx_model: Path, monkeypatch) -> tuple[trt_sim.Sim, object]:
    sim = trt_sim.install(monkeypatch, version)
    trt = sim.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
                                     if version.startswith("8.") else 0)
    assert trt.OnnxParser(network, logger).parse(onnx_model.read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE), (4, 3, SIZE, SIZE))
    assert config.add_optimization_profile(profile) == 0
    plan = builder.build_serialized_network(network, config)
    return sim, trt.Runtime(logger).deserialize_cuda_engine(plan)


def test_simulator_has_only_the_names_of_each_version(onnx_model, monkeypatch):
    sim, engine = _built("10.3.0", onnx_model, monkeypatch)
    context = engine.create_execution_context()
    for obj, name in [(engine, "num_bindings"), (engine, "get_binding_index"), (engine, "binding_is_input"),
                      (context, "execute_async_v2"), (context, "set_binding_shape")]:
        with pytest.raises(AttributeError):
            getattr(obj, name)
    builder = sim.trt.Builder(sim.trt.Logger())
    with pytest.raises(AttributeError):
        builder.build_engine  # noqa: B018
    with pytest.raises(AttributeError):
        builder.create_builder_config().max_workspace_size = 1 << 20
    with pytest.raises(AttributeError):
        context.no_such_setting = 1

    sim, engine = _built("8.6.1", onnx_model, monkeypatch)
    assert engine.num_bindings == 2 and sim.state.deprecated_calls == ["ICudaEngine.num_bindings"]

    sim = trt_sim.install(monkeypatch, "11.0.0")
    for name in ("FP16", "INT8"):
        assert not hasattr(sim.trt.BuilderFlag, name)
    assert not hasattr(sim.trt, "IInt8EntropyCalibrator2")
    assert not hasattr(sim.trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    with pytest.raises(AttributeError):
        sim.trt.Builder(sim.trt.Logger()).platform_has_fast_fp16  # noqa: B018


def test_simulator_enforces_the_runtime_contract(onnx_model, monkeypatch):
    sim, engine = _built("10.3.0", onnx_model, monkeypatch)
    mem = sim.memory
    ctx = engine.create_execution_context()
    x = to_unit(probe_images(3, SIZE)).numpy()
    d_in, d_out = mem.alloc(x.nbytes), mem.alloc(3 * 10 * 4)
    mem.write(d_in, x)
    ctx.set_tensor_address("images", d_in)
    ctx.set_tensor_address("logits", d_out)
    assert not ctx.execute_async_v3(0)  # input shape never set
    assert "dimensions are not specified" in sim.state.errors()[-1]
    assert not ctx.set_input_shape("images", (5, 3, SIZE, SIZE))  # beyond the profile's max of 4
    assert not ctx.set_input_shape("images", (3, 3, SIZE + 1, SIZE))  # static dims are fixed
    assert ctx.set_input_shape("images", (3, 3, SIZE, SIZE))
    assert tuple(ctx.get_tensor_shape("logits")) == (3, 10)
    assert not ctx.execute_async_v3(12345)  # not a stream
    assert ctx.execute_async_v3(mem.new_stream())
    np.testing.assert_allclose(mem.view(d_out, np.float32, (3, 10)), onnx_logits(onnx_model, x), atol=1e-6)

    small = mem.alloc(4)  # an output buffer too small is caught, not written past
    ctx.set_tensor_address("logits", small)
    with pytest.raises(trt_sim.InvalidAddress):
        ctx.execute_async_v3(0)
    fresh = engine.create_execution_context()
    fresh.set_input_shape("images", (3, 3, SIZE, SIZE))
    fresh.set_tensor_address("images", d_in)
    assert not fresh.execute_async_v3(0)  # output address never set
    assert "Neither address or allocator is set for output tensor logits" in sim.state.errors()[-1]


def test_simulator_enforces_the_build_contract(onnx_model, monkeypatch):
    sim = trt_sim.install(monkeypatch, "8.6.1")
    trt = sim.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    implicit = builder.create_network(0)
    parser = trt.OnnxParser(implicit, logger)
    assert not parser.parse(onnx_model.read_bytes()) and "EXPLICIT_BATCH" in parser.get_error(0).desc()

    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    assert trt.OnnxParser(network, logger).parse(onnx_model.read_bytes())
    config = builder.create_builder_config()
    assert builder.build_serialized_network(network, config) is None  # dynamic batch, no profile
    bad = builder.create_optimization_profile()
    bad.set_shape("images", (4, 3, SIZE, SIZE), (2, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))  # min > opt
    assert config.add_optimization_profile(bad) == -1
    good = builder.create_optimization_profile()
    good.set_shape("images", (1, 3, SIZE, SIZE), (1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE))
    config.add_optimization_profile(good)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None

    # Plans do not cross TensorRT versions.
    other = trt_sim.install(monkeypatch, "10.3.0").trt
    assert other.Runtime(other.Logger()).deserialize_cuda_engine(bytes(plan)) is None
