"""ONNX export, the parity gate, the TensorRT preflight, export metadata, and the
workspace-level export (TensorRT itself: tests/test_tensorrt_sim.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import trt_sim
from onnx import TensorProto, helper
from PIL import Image

from edge_m2kd.config import IMAGE_MEAN, IMAGE_STD
from edge_m2kd.errors import UserError
from edge_m2kd.models import DeployedClassifier, build_backbone
from edge_m2kd.preprocess import to_unit
from exporters import (
    check_parity,
    enforce_parity,
    export_model,
    export_workspace,
    model_hash,
    preflight,
    read_metadata,
    select_probe,
)
from exporters.artifacts import metadata_path
from exporters.onnx_export import export_onnx_bytes
from exporters.preflight import errors as preflight_errors


def realistic(backbone: str, size: int, nme: bool = False, classes: int = 10, small_stem: bool = False,
              seed: int = 0) -> DeployedClassifier:
    """A deployed classifier at a trained model's scale: BatchNorm statistics measured on data
    (random init with unit running stats lets activations grow layer after layer, to logits in
    the hundreds that no trained model has), head at a trained head's scale; NME as the learner
    builds it (unit class means, bias -|m|^2/2)."""
    torch.manual_seed(seed)
    bb = build_backbone(backbone, small_stem)
    dim = bb.stage_channels[-1]
    if nme:
        w = F.normalize(torch.randn(classes, dim), dim=1)
        b = -0.5 * (w * w).sum(dim=1)
    else:
        w, b = torch.randn(classes, dim) * 0.1, torch.randn(classes) * 0.1
    model = DeployedClassifier(bb, w, b, nme, IMAGE_MEAN, IMAGE_STD)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, size, size))
    return model.eval()


def probe_images(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def class_names(n: int = 10) -> list[str]:
    return [f"class_{i}" for i in range(n)]


@pytest.fixture(scope="module")
def resnet32_export(tmp_path_factory) -> tuple[DeployedClassifier, Path, object]:
    model = realistic("resnet32", 32)
    path = tmp_path_factory.mktemp("r32") / "model.onnx"
    result = export_model(model, class_names(), 32, path, probe_images=probe_images(10, 32))
    return model, path, result


# -- ONNX export + parity ---------------------------------------------------------------------------
# (backbone, input size, NME, small stem, probe images, batch sizes). ResNet-18 at 224 (7x7 stem
# and max-pool) runs at small batches only: 32 images at 224 cost seconds on two cores, and batch
# 32 is covered by the same ResNet-18 at 32x32.
CASES = {
    "resnet32-cnn": ("resnet32", 32, False, False, 10, (1, 7, 32)),
    "resnet32-nme": ("resnet32", 32, True, False, 6, (1, 7, 32)),
    "resnet18-small-stem-32": ("resnet18", 32, False, True, 4, (1, 7, 32)),
    "resnet18-224": ("resnet18", 224, False, False, 2, (1, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_pytorch_at_batch_1_7_32(case, tmp_path, resnet32_export):
    backbone, size, nme, small_stem, n_probe, batch_sizes = CASES[case]
    if case == "resnet32-cnn":
        model, path, result = resnet32_export
    else:
        model = realistic(backbone, size, nme=nme, small_stem=small_stem)
        path = tmp_path / "model.onnx"
        result = export_model(model, class_names(), size, path, probe_images=probe_images(n_probe, size),
                              batch_sizes=batch_sizes)
    rep = result.parity
    assert rep.max_abs_diff <= 1e-4 and rep.top1_agreement == 1.0, rep
    assert rep.batch_sizes == batch_sizes and rep.samples == n_probe and result.parity_passed

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp)) == ("images", ["batch", 3, size, size])
    assert (out.name, dims(out)) == ("logits", ["batch", 10])
    # Independently of the gate: a fresh batch of pixels through the written file.
    batch = 7 if size <= 32 else 2
    x = to_unit(probe_images(batch, size, seed=5)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 10) and np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    assert result.preflight == {"8.6": [], "10.3": []}  # plain ops TensorRT parses
    meta = read_metadata(path)
    assert meta["classifier"] == ("nme" if nme else "cnn")


def test_metadata_beside_the_onnx_file(resnet32_export):
    model, path, result = resnet32_export
    meta = json.loads(metadata_path(path).read_text())
    assert metadata_path(path) == path.with_name("model.onnx.json") == result.metadata_path
    assert meta["format"] == "edge-m2kd-export" and meta["artifact"] == "model.onnx" and meta["kind"] == "onnx"
    assert meta["class_names"] == class_names() and meta["num_classes"] == 10
    assert meta["model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest() == model_hash(path) == result.model_hash
    assert meta["input"]["name"] == "images" and meta["input"]["shape"] == [-1, 3, 32, 32]
    assert (meta["input"]["dtype"], meta["input"]["layout"], meta["input"]["range"]) == ("float32", "NCHW", [0.0, 1.0])
    norm = meta["input"]["normalization"]
    assert norm["folded"] is True
    np.testing.assert_allclose(norm["mean"], IMAGE_MEAN, rtol=1e-6)
    np.testing.assert_allclose(norm["std"], IMAGE_STD, rtol=1e-6)
    assert meta["output"] == {**meta["output"], "name": "logits", "shape": [-1, 10], "dtype": "float32"}
    assert meta["classifier"] == "cnn" and meta["precision"] == "fp32" and meta["opset"] == 17
    assert meta["parity"]["passed"] is True and meta["parity"]["forced"] is False
    assert meta["parity"]["samples"] == 10 and meta["parity"]["max_abs_diff"] <= 1e-4
    tools = meta["tools"]
    assert tools["torch"] == str(torch.__version__) and tools["onnx"] == onnx.__version__
    assert tools["onnxruntime"] == ort.__version__ and tools["tensorrt"] is None
    assert meta["created"].endswith("+00:00")


def test_export_is_deterministic_so_the_hash_identifies_the_model():
    model = realistic("resnet20", 16)
    a, b = export_onnx_bytes(model, 16), export_onnx_bytes(model, 16)
    assert a.model_hash == b.model_hash == model_hash(a.data)
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert export_onnx_bytes(model, 16).model_hash != a.model_hash


def _tamper_bias(data: bytes) -> bytes:
    """Shift the head's bias for class 0: a plausible, silent corruption of the weights."""
    proto = onnx.load_from_string(data)
    init = next(t for t in proto.graph.initializer if t.name.endswith("head.bias"))
    bias = onnx.numpy_helper.to_array(init).copy()
    bias[0] += 5.0
    init.CopyFrom(onnx.numpy_helper.from_array(bias, init.name))
    return proto.SerializeToString()


def test_parity_gate_refuses_a_tampered_model_unless_forced(tmp_path):
    model = realistic("resnet20", 16)
    path = tmp_path / "exports" / "model.onnx"
    good = export_model(model, class_names(), 16, path, probe_images=probe_images(5, 16))
    before = path.read_bytes()

    with pytest.raises(UserError) as err:
        export_model(model, class_names(), 16, path, probe_images=probe_images(5, 16), tamper=_tamper_bias)
    msg = str(err.value)
    assert "\n" not in msg and "--force" in msg and "max abs logit difference" in msg and "top-1 agreement" in msg
    assert "batch sizes 1, 7, 32" in msg and "5 exemplars samples" in msg
    assert path.read_bytes() == before, "a refused export must leave the previous one untouched"
    assert read_metadata(path)["model_hash"] == good.model_hash
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.json"]  # no temp files

    forced = export_model(model, class_names(), 16, path, probe_images=probe_images(5, 16), tamper=_tamper_bias,
                          force=True)
    assert not forced.parity_passed and forced.parity.max_abs_diff > 1.0
    meta = read_metadata(path)
    assert meta["parity"]["passed"] is False and meta["parity"]["forced"] is True
    assert meta["model_hash"] == model_hash(path) != good.model_hash


def test_parity_report_and_gate_directly(resnet32_export):
    model, path, _ = resnet32_export
    images = probe_images(5, 32)
    ok = check_parity(model, path, images, batch_sizes=(1, 3))
    assert ok.samples == 5 and ok.batch_sizes == (1, 3) and enforce_parity(ok)
    bad = check_parity(model, _tamper_bias(path.read_bytes()), images)
    assert bad.max_abs_diff > 1.0
    assert enforce_parity(bad, force=True) is False
    with pytest.raises(UserError, match="parity check failed"):
        enforce_parity(bad)
    assert bad.as_dict().keys() >= {"max_abs_diff", "top1_agreement", "samples"}


def test_probe_selection():
    many = probe_images(200, 16)
    picked, source = select_probe(many, 16, max_samples=64)
    assert source == "exemplars" and len(picked) == 64 and (picked[0] == many[0]).all() and (picked[-1] == many[-1]).all()
    rand, source = select_probe(None, 16)
    assert source == "random" and rand.shape == (32, 16, 16, 3) and rand.dtype == np.uint8
    with pytest.raises(UserError, match="expected uint8"):
        select_probe(probe_images(4, 32), 16)


def test_unwritable_output_path_is_a_one_line_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError) as err:
        export_model(realistic("resnet20", 16), class_names(), 16, blocker / "model.onnx")
    assert "cannot write the ONNX model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="is a directory"):
        export_model(realistic("resnet20", 16), class_names(), 16, tmp_path)


# -- TensorRT preflight ----------------------------------------------------------------------------
def _tiny_model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(graph, opset_imports=imports)


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_preflight_passes_the_exported_classifiers(resnet32_export):
    _, path, _ = resnet32_export
    for version in ("8.6", "8.6.1", "10.0", "10.3.0", "11.0"):
        assert preflight(path, version) == [], version


def test_preflight_names_a_node_tensorrt_cannot_parse():
    model = _tiny_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu_0"), helper.make_node("Det", ["r"], ["y"], name="det_1")],
        [_float("x", ["batch", 3, 3])], [_float("y", ["batch"])])
    onnx.checker.check_model(model)
    for version in ("8.6", "10.3"):
        (problem,) = preflight(model, version)
        assert (problem.severity, problem.node, problem.op_type) == ("error", "det_1", "Det")
        assert "node 'det_1' (Det)" in str(problem) and "does not support Det" in str(problem)


def test_preflight_catches_custom_domain_ops_and_unnamed_nodes():
    model = _tiny_model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("FusedConv", ["r"], ["y"], domain="com.microsoft")],
        [_float("x", ["batch", 3, 8, 8])], [_float("y", ["batch", 3, 8, 8])], domains=["com.microsoft"])
    problems = preflight(model, "10.3")
    assert [(p.node, p.op_type) for p in preflight_errors(problems)] == [("#1", "FusedConv")]
    assert "com.microsoft::FusedConv" in problems[0].message and "plugin" in problems[0].message


def test_preflight_operator_support_depends_on_the_version():
    hard = _tiny_model([helper.make_node("Hardmax", ["x"], ["y"], name="hm")],
                       [_float("x", ["batch", 10])], [_float("y", ["batch", 10])])
    assert [p.node for p in preflight(hard, "8.6")] == ["hm"]  # Hardmax: parser 9.2 and later
    assert preflight(hard, "10.3") == []
    ln = _tiny_model([helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln", axis=-1)],
                     [_float("x", ["batch", 10]), _float("g", [10])], [_float("y", ["batch", 10])])
    assert preflight(ln, "8.6") == []  # added in 8.6
    with pytest.raises(ValueError, match="8.6 and 10.x"):
        preflight(ln, "8.5")


def test_preflight_checks_opset_types_and_dynamic_dims():
    relu = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    newer = _tiny_model(relu, [_float("x", ["batch", 4])], [_float("y", ["batch", 4])], opset=18)
    assert "opset 18" in str(preflight(newer, "8.6")[0]) and preflight(newer, "10.3") == []

    dyn = _tiny_model(relu, [_float("x", ["batch", 3, "h", 32])], [_float("y", ["batch", 3, "h", 32])])
    (problem,) = preflight(dyn, "10.3")
    assert problem.tensor == "x" and "axis 2 is dynamic ('h')" in problem.message

    cast = _tiny_model([helper.make_node("Cast", ["x"], ["d"], name="to_double", to=TensorProto.DOUBLE),
                        helper.make_node("Cast", ["d"], ["y"], name="back", to=TensorProto.FLOAT)],
                       [_float("x", ["batch", 4])], [_float("y", ["batch", 4])])
    (problem,) = preflight(cast, "8.6")
    assert (problem.severity, problem.node, problem.op_type) == ("warning", "to_double", "Cast")
    assert preflight_errors([problem]) == []

    strings = _tiny_model([helper.make_node("Identity", ["s"], ["t"], name="ident")],
                          [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
                          [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"])])
    found = preflight_errors(preflight(strings, "10.3"))
    assert found and all("STRING" in p.message for p in found)

    bf16 = _tiny_model([helper.make_node("Cast", ["x"], ["h"], name="to_bf16", to=TensorProto.BFLOAT16),
                        helper.make_node("Cast", ["h"], ["y"], name="back", to=TensorProto.FLOAT)],
                       [_float("x", ["batch", 4])], [_float("y", ["batch", 4])])
    assert [p.node for p in preflight_errors(preflight(bf16, "8.6"))] == ["to_bf16"]  # BF16: TensorRT 9+
    assert preflight(bf16, "10.3") == []

    int64_weights = _tiny_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        [_float("x", ["batch", 2, 2])], [_float("y", ["batch", 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])])
    assert preflight(int64_weights, "8.6") == []  # INT64 weights are fine


# -- the workspace-level export ----------------------------------------------------------------------
def _image_folder(root: Path, classes: int = 3, per_class: int = 10, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[c * 4 : c * 4 + 6, :, c % 3] = 230
            Image.fromarray(img).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from edge_m2kd.commands import add_classes, init_workspace

    root = tmp_path_factory.mktemp("wsx")
    data = _image_folder(root / "data")
    ws = root / "ws"
    init_workspace(ws, backbone="resnet20", input_size=16, exemplars=24, epochs=1, batch_size=16,
                   planned_steps=2, device="cpu")
    add_classes(ws, data)
    return ws


def test_export_workspace_writes_onnx_and_metadata(workspace):
    from edge_m2kd.workspace import Workspace

    learner = Workspace.open(workspace).load_learner()
    result = export_workspace(workspace)
    assert set(result) >= {"onnx", "parity", "tensorrt", "metadata"}
    assert result["onnx"] == str(workspace / "exports" / "model.onnx") and result["tensorrt"] is None
    assert result["metadata"] == str(workspace / "exports" / "model.onnx.json")
    assert result["parity"]["max_abs_diff"] <= 1e-4 and result["parity"]["top1_agreement"] == 1.0
    assert result["parity"]["samples"] == len(learner.memory.arrays()[0]) == 24
    json.dumps(result)  # the CLI prints it with --json
    meta = read_metadata(result["onnx"])
    assert meta["class_names"] == learner.class_names == ["c0", "c1", "c2"]
    # The step's choice under classifier "auto" survives the workspace's reload (it used to be lost,
    # and the corrected head exported whatever the step had chosen).
    assert learner.chosen_classifier is not None
    assert meta["input"]["shape"] == [-1, 3, 16, 16] and meta["classifier"] == learner.deployed_head
    assert meta["workspace"]["steps_done"] == 1 and meta["parity"]["probe"] == "exemplars"
    # The exported file computes what the learner's own deployed model computes on its exemplars.
    images, _ = learner.memory.arrays()
    x = to_unit(images).numpy()
    got = ort.InferenceSession(result["onnx"], providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, learner.deployed()(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_export_workspace_errors(workspace, tmp_path, monkeypatch):
    from edge_m2kd.commands import init_workspace

    empty = tmp_path / "empty"
    init_workspace(empty, backbone="resnet20", input_size=16, device="cpu")
    with pytest.raises(UserError, match="learned no classes yet.*add-classes"):
        export_workspace(empty)

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the ONNX model"):
        export_workspace(workspace, onnx_path=blocker / "model.onnx")

    with pytest.raises(UserError, match="applies to the TensorRT engine"):
        export_workspace(workspace, tmp_path / "m.onnx", precision="fp16")
    with pytest.raises(UserError, match="unknown precision"):
        export_workspace(workspace, tmp_path / "m.onnx", precision="int4")

    trt_sim.hide_modules(monkeypatch, "tensorrt")
    with pytest.raises(UserError) as err:
        export_workspace(workspace, tmp_path / "m.onnx", tensorrt_path=tmp_path / "m.plan")
    msg = str(err.value)
    assert "TensorRT is not installed" in msg and "Jetson" in msg and "Dockerfile.jetson" in msg and "\n" not in msg
    assert not (tmp_path / "m.onnx").exists(), "without TensorRT nothing is exported (fail before the work)"


def test_export_workspace_with_tensorrt_through_the_simulator(workspace, tmp_path, monkeypatch):
    sim = trt_sim.install(monkeypatch, "10.3.0")
    first = export_workspace(workspace, tmp_path / "model.onnx", tmp_path / "model.plan", precision="int8",
                             max_batch=8)
    assert first["tensorrt"] == str(tmp_path / "model.plan") and first["engine_cache_hit"] is False
    assert sim.state.builds == 1 and sim.state.calibration_batches > 0 and sim.memory.live == 0
    meta = read_metadata(first["tensorrt"])
    assert meta["kind"] == "tensorrt" and meta["precision"] == "int8" and meta["class_names"] == ["c0", "c1", "c2"]
    assert meta["model_hash"] == read_metadata(first["onnx"])["model_hash"]
    assert meta["engine"]["calibration"]["samples"] == 24
    assert (workspace / "exports" / "engine-cache").is_dir()

    again = export_workspace(workspace, tmp_path / "model.onnx", tmp_path / "model.plan", precision="int8",
                             max_batch=8)
    assert again["engine_cache_hit"] is True and sim.state.builds == 1 and sim.state.builders_created == 1
