"""Pretrained backbones: torchvision's published MobileNetV2 weights really in effect, the
ResNet-18 name mapping, bad weight files refused in one line, frozen stages, and the whole
chain (init, add-classes, snapshots, export) on a pretrained MobileNetV2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edge_m2kd.data import load_image_folder
from edge_m2kd.errors import UserError
from edge_m2kd.models import IncrementalNet
from edge_m2kd.models import pretrained as pretrained_mod
from edge_m2kd.models.pretrained import fetch_pretrained, load_pretrained
from edge_m2kd.preprocess import model_input
from edge_m2kd.teachers import FoldedTeachers


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: torch with two threads is pathologically slow when the other is busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ncm_accuracy(net: IncrementalNet, root: Path, size: int = 96) -> float:
    """Frozen features, nearest class mean over L2-normalised pooled features."""
    train, test = load_image_folder(root / "train", size), load_image_folder(root / "test", size)
    net.eval()

    def features(images: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return F.normalize(torch.cat([net(model_input(images[i : i + 100]), with_aux=False).features
                                          for i in range(0, len(images), 100)]), dim=1)

    f_train, f_test = features(train.images), features(test.images)
    means = torch.stack([f_train[torch.from_numpy(train.labels == c)].mean(0) for c in range(len(train.class_names))])
    predicted = (f_test @ F.normalize(means, dim=1).T).argmax(1).numpy()
    return float((predicted == test.labels).mean())


def test_published_mobilenetv2_weights_are_in_effect(imagenet_hub, cifar_mini):
    torch.manual_seed(0)
    net = IncrementalNet("mobilenetv2")
    random_acc = ncm_accuracy(net, cifar_mini)
    weights = fetch_pretrained("mobilenetv2", "imagenet")
    assert weights.source.endswith("mobilenet_v2-b0353104.pth")
    assert weights.sha256.startswith("b0353104")
    load_pretrained(net.backbone, weights, "mobilenetv2")
    pretrained_acc = ncm_accuracy(net, cifar_mini)
    # 10 classes x 50 training images, 30 test images each, at 96 px (measured: 62.7 vs 19.3)
    assert pretrained_acc >= 0.55, pretrained_acc
    assert random_acc < 0.30, random_acc


def test_one_wrong_key_mapping_is_refused_not_skipped(imagenet_hub, monkeypatch):
    """A mapping that misnames one tensor must fail the load (strict, every name checked)."""
    real = pretrained_mod.to_backbone_names

    def one_wrong(backbone, state):
        out = real(backbone, state)
        out["features.3.conv.1.1.weight_typo"] = out.pop("features.3.conv.1.1.weight")
        return out

    monkeypatch.setattr(pretrained_mod, "to_backbone_names", one_wrong)
    weights = fetch_pretrained("mobilenetv2", "imagenet")
    net = IncrementalNet("mobilenetv2")
    with pytest.raises(UserError, match="features.3.conv.1.1.weight"):
        load_pretrained(net.backbone, weights, "mobilenetv2")
    # and the strict load itself refuses what the check would let through
    with pytest.raises(RuntimeError):
        net.backbone.load_state_dict(weights.state, strict=True)


def test_damaged_hub_cache_file_is_refused(imagenet_hub):
    data = imagenet_hub.read_bytes()
    imagenet_hub.write_bytes(data[:-10] + b"0123456789")  # same size, other content
    with pytest.raises(UserError, match="damaged"):
        fetch_pretrained("mobilenetv2", "imagenet")


def torchvision_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's resnet18 names and shapes, written out by hand."""
    g = torch.Generator().manual_seed(seed)

    def bn(prefix: str, ch: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.rand(ch, generator=g) + 0.5, f"{prefix}.bias": torch.randn(ch, generator=g),
                f"{prefix}.running_mean": torch.randn(ch, generator=g), f"{prefix}.running_var": torch.rand(ch, generator=g) + 0.5,
                f"{prefix}.num_batches_tracked": torch.tensor(100)}

    state = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g), **bn("bn1", 64)}
    in_ch = 64
    for layer, ch in enumerate([64, 128, 256, 512], 1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            c_in = in_ch if block == 0 else ch
            state[f"{p}.conv1.weight"] = torch.randn(ch, c_in, 3, 3, generator=g)
            state.update(bn(f"{p}.bn1", ch))
            state[f"{p}.conv2.weight"] = torch.randn(ch, ch, 3, 3, generator=g)
            state.update(bn(f"{p}.bn2", ch))
            if block == 0 and layer > 1:
                state[f"{p}.downsample.0.weight"] = torch.randn(ch, c_in, 1, 1, generator=g)
                state.update(bn(f"{p}.downsample.1", ch))
        in_ch = ch
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512, generator=g), torch.randn(1000, generator=g)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_loads_torchvision_names(tmp_path, suffix):
    state = torchvision_resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    net = IncrementalNet("resnet18")
    load_pretrained(net.backbone, fetch_pretrained("resnet18", str(path)), "resnet18")
    bb = net.backbone
    assert torch.equal(bb.stem[0][0].weight, state["conv1.weight"])
    assert torch.equal(bb.stem[0][1].running_var, state["bn1.running_var"])
    assert torch.equal(bb.stages[1][0].shortcut[0].weight, state["layer2.0.downsample.0.weight"])
    assert torch.equal(bb.stages[3][1].bn2.bias, state["layer4.1.bn2.bias"])


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "edge_m2kd", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def bad_files(tmp_path: Path, real_pth: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(real_pth.read_bytes()[: 3_000_000])
    state = torch.load(real_pth, weights_only=True)
    state["features.0.0.weight"] = state["features.0.0.weight"][:16]  # 16 output channels, not 32
    shape = tmp_path / "shape.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, shape)
    return {"wrong file": (text, "cannot read"), "truncated file": (truncated, "cannot read"),
            "mismatched shape": (shape, "'features.0.0.weight' has shape (16, 3, 3, 3)")}


def test_bad_weight_files_are_refused_in_one_line_and_write_nothing(tmp_path, mobilenet_v2_pth):
    for what, (path, needle) in bad_files(tmp_path, mobilenet_v2_pth).items():
        ws = tmp_path / f"ws-{path.stem}"
        r = run_cli("init", str(ws), "--backbone", "mobilenetv2", "--pretrained", str(path))
        assert r.returncode == 2, (what, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (what, r.stderr)
        assert not ws.exists(), what


def test_frozen_outputs_feed_the_rest_of_the_network_exactly():
    """The student and a (folded) teacher fed the shared frozen outputs give their own outputs."""
    import copy

    torch.manual_seed(0)
    for backbone, size in [("mobilenetv2", 64), ("resnet20", 16)]:
        net = IncrementalNet(backbone, frozen_stages=1)
        net.add_classes(3)
        net.eval()
        teacher = copy.deepcopy(net)
        with torch.no_grad():
            for p in teacher.parameters():
                if p.requires_grad:  # the teacher differs from the student outside the frozen stages
                    p.mul_(0.9)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            plain, own = net(x), teacher(x)
            frozen = net.frozen_outputs(x)
            shared = net(x, frozen=frozen)
            folded = FoldedTeachers({1: teacher})(x, frozen=frozen)[1]
        assert len(frozen) == 1
        assert torch.allclose(plain.logits, shared.logits, atol=1e-6)
        for a, b in zip(plain.aux_logits, shared.aux_logits, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
        assert torch.allclose(own.logits, folded.logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(own.logits, plain.logits, atol=1e-3)


def test_frozen_stages_stay_fixed_and_cost_no_snapshot_bytes(blob_data):
    from helpers import quick_config

    from edge_m2kd.learner import Learner

    cfg = quick_config("m2kd", "packed", model={"frozen_stages": 1})
    learner = Learner(cfg)
    frozen = learner.model.frozen_names()
    assert frozen and all(k.startswith("backbone.stem") or k.startswith("backbone.stages.0") for k in frozen)
    before = {k: v.clone() for k, v in learner.model.state_dict().items() if k in frozen}
    learner.step(blob_data, ["c0", "c1"])
    learner.step(blob_data, ["c2", "c3"])
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BatchNorm statistics
    assert all(r.ok for r in learner.store.verify())
    owner_map = learner.store.owner
    assert not set(owner_map) & frozen and owner_map  # no owner bits for frozen weights
    tensors, _ = learner.store.state()
    assert not any(k.split(".", 1)[-1] in frozen for k in tensors)
    # the peak prediction counts no gradients or momentum for frozen parameters
    trainable = sum(p.numel() * 4 for p in learner.model.parameters() if p.requires_grad)
    from edge_m2kd.memory import predict_training_peak

    peak = predict_training_peak(learner.model, 16, 16, 10, 0, 0, 0, 0)
    assert peak.parts["gradients"] == peak.parts["optimizer_state"] == trainable


def test_pretrained_mobilenetv2_workspace_end_to_end(tmp_path, imagenet_hub, cifar_mini):
    """init --pretrained imagenet, two steps, verified snapshots, ncm-frozen-level accuracy,
    export with ReLU6 as Clip through the parity gate, and predict."""
    import onnx

    ws = tmp_path / "ws"
    data = tmp_path / "data"
    data.mkdir()
    for c in ["airplane", "automobile", "frog"]:
        (data / c).symlink_to(cifar_mini / "train" / c)
    r = run_cli("init", str(ws), "--backbone", "mobilenetv2", "--pretrained", "imagenet", "--input-size", "64",
                "--exemplars", "30", "--planned-steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["pretrained"]["sha256"].startswith("b0353104")
    assert out["config"]["model"]["frozen_stages"] >= 1
    for classes in ["airplane,automobile", "frog"]:
        r = run_cli("add-classes", str(ws), str(data), "--classes", classes, "--epochs", "1", "--json")
        assert r.returncode == 0, r.stderr
    r = run_cli("snapshots", str(ws), "--verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["all_verified"], r.stdout + r.stderr
    r = run_cli("export", str(ws), "--json")
    assert r.returncode == 0, r.stderr
    exported = json.loads(r.stdout)
    assert exported["parity"]["passed"]
    assert exported["preflight"] and all(problems == [] for problems in exported["preflight"].values())
    ops = {n.op_type for n in onnx.load(exported["onnx"]).graph.node}
    assert "Clip" in ops and "Conv" in ops
    image = str(next((cifar_mini / "test" / "frog").iterdir()))
    r = run_cli("predict", str(ws), image, "--backend", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["predictions"][0]["class"] in ("airplane", "automobile", "frog")


def test_defaults_then_the_method_then_explicit_choices():
    from edge_m2kd.config import PRETRAINED_DEFAULTS, method_config

    ncm = method_config("ncm-frozen", defaults=PRETRAINED_DEFAULTS)
    assert (ncm.train.epochs, ncm.model.frozen_stages, ncm.train.classifier) == (0, -1, "nme")
    m2kd = method_config("m2kd", defaults=PRETRAINED_DEFAULTS, train={"epochs": 3})
    assert m2kd.train.epochs == 3  # the caller's explicit choice wins over the defaults
    assert m2kd.model.frozen_stages == PRETRAINED_DEFAULTS["model"]["frozen_stages"]
    assert m2kd.snapshots.free_restart == "pretrained"
    assert method_config("m2kd").model.frozen_stages == 0  # no pretrained defaults without a pretrained start


def test_ncm_frozen_keeps_the_backbone_and_deploys_the_class_means(blob_data):
    from helpers import quick_config

    from edge_m2kd.learner import Learner

    learner = Learner(quick_config("ncm-frozen"))
    before = {k: v.clone() for k, v in learner.model.backbone.state_dict().items()}
    learner.step(blob_data, ["c0", "c1"])
    learner.step(blob_data, ["c2", "c3"])
    assert all(torch.equal(before[k], v) for k, v in learner.model.backbone.state_dict().items())
    deployed = learner.deployed()
    assert deployed.normalize_features and torch.allclose(deployed.head.weight, learner.class_means)
