"""Starting from published ImageNet weights (torchvision's files), or from a local file.

``--pretrained imagenet`` fetches torchvision's own file through ``torch.hub``'s cache, so a
board with a network downloads it once (hash-checked) and never again; ``--pretrained PATH``
reads a local ``.safetensors`` or ``.pth``. Nothing is ever fully unpickled: ``.pth`` files go
through ``torch.load(weights_only=True)``.

The files carry torchvision's parameter names. MobileNetV2 here has exactly those names;
ResNet-18's modules are named by this project's staged layout, so its keys are mapped
(``layer1.0.conv1`` -> ``stages.0.0.conv1``, ``downsample`` -> ``shortcut``). The ImageNet
classifier (``classifier.*``, ``fc.*``) is dropped: the incremental heads replace it. Every
other tensor must match the backbone by name and shape, or the file is refused, naming the
first mismatch; then the weights load with ``strict=True``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_m2kd.errors import UserError
from edge_m2kd.hashing import sha256

State = dict[str, torch.Tensor]

# torchvision's published files; the part after the dash is the start of the file's sha256.
PUBLISHED: dict[str, str] = {
    "mobilenetv2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}
IMAGENET_HEAD = {"mobilenetv2": "classifier.", "resnet18": "fc."}
_RESNET_NAMES = [
    (re.compile(r"^conv1\."), "stem.0.0."),
    (re.compile(r"^bn1\."), "stem.0.1."),
    (re.compile(r"^layer(\d)\."), lambda m: f"stages.{int(m[1]) - 1}."),
    (re.compile(r"\.downsample\."), ".shortcut."),
]


@dataclass
class PretrainedWeights:
    source: str  # the URL, or the local path as given
    sha256: str
    state: State  # in the backbone's own names, the ImageNet head dropped


def to_backbone_names(backbone: str, state: State) -> State:
    """torchvision's names -> this project's, without the ImageNet classifier."""
    head = IMAGENET_HEAD.get(backbone)
    out = {}
    for key, value in state.items():
        if head and key.startswith(head):
            continue
        if backbone == "resnet18":
            for pattern, repl in _RESNET_NAMES:
                key = pattern.sub(repl, key)
        out[key] = value
    return out


def _read_file(path: Path) -> State:
    """A state dict from .safetensors or .pth (weights only); bad files are one-line refusals."""
    if not path.is_file():
        raise UserError(f"pretrained weights {str(path)!r} not found; give an existing .pth or .safetensors file, "
                        "or --pretrained imagenet")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault, said in one line
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read pretrained weights {str(path)!r} ({reason}); give an intact .pth "
                        "(a state dict, loadable with weights_only=True) or .safetensors file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint around the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{str(path)!r} holds no state dict of tensors; give the backbone's weights file")
    return state


def _fetch_published(backbone: str) -> Path:
    url = PUBLISHED.get(backbone)
    if url is None:
        raise UserError(f"no published ImageNet weights for {backbone}; choose one of {', '.join(PUBLISHED)} "
                        "or give --pretrained PATH")
    try:  # downloads only when torch's hub cache lacks the file, and then checks the hash
        torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - offline, a proxy, a bad download: one line
        raise UserError(f"cannot fetch {url} ({str(e).splitlines()[0][:100]}); connect the device once, or put the "
                        f"file in {Path(torch.hub.get_dir()) / 'checkpoints'}, or give --pretrained PATH") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def fetch_pretrained(backbone: str, spec: str) -> PretrainedWeights:
    """``spec``: "imagenet" (torchvision's published file for `backbone`) or a local path."""
    if spec == "imagenet":
        path, source = _fetch_published(backbone), PUBLISHED[backbone]
        digest = sha256(path)
        # torch.hub checks the hash only when it downloads; a file already in the cache is
        # checked here, against the hash prefix in its name (torchvision's convention).
        prefix = path.stem.rsplit("-", 1)[-1]
        if not digest.startswith(prefix):
            raise UserError(f"{path} is damaged (sha256 {digest[:8]}..., its name says {prefix}); delete it so it "
                            "downloads again")
    else:
        path, source = Path(spec), spec
        digest = sha256(path) if path.is_file() else ""
    return PretrainedWeights(source, digest, to_backbone_names(backbone, _read_file(path)))


def check_fits(backbone_module: nn.Module, weights: PretrainedWeights, backbone: str) -> None:
    """Refuse, naming the first mismatch, weights that do not fit the backbone exactly."""
    expected = backbone_module.state_dict()
    problem = None
    for key, ref in expected.items():
        if key not in weights.state:
            problem = f"it has no tensor {key!r}"
        elif tuple(weights.state[key].shape) != tuple(ref.shape):
            problem = f"{key!r} has shape {tuple(weights.state[key].shape)}, the backbone needs {tuple(ref.shape)}"
        if problem:
            break
    if problem is None:
        extra = [k for k in weights.state if k not in expected]
        problem = f"it has a tensor {extra[0]!r} the backbone does not" if extra else None
    if problem:
        raise UserError(f"pretrained weights {weights.source} do not fit the {backbone} backbone: {problem}; give "
                        f"torchvision's {backbone} weights (with torchvision's parameter names)")


def load_pretrained(backbone_module: nn.Module, weights: PretrainedWeights, backbone: str) -> None:
    check_fits(backbone_module, weights, backbone)
    backbone_module.load_state_dict(weights.state, strict=True)
