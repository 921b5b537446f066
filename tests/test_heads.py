"""The closed-form (analytic) head: exact sums, order-free, exported as one linear layer, and its
statistics stored, verified and refused when damaged like the rest of a workspace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import blobs, quick_config
from PIL import Image

from edge_m2kd.cli import main
from edge_m2kd.heads import FeatureStats, old_class_statistics, solve_analytic
from edge_m2kd.learner import Learner
from edge_m2kd.protocol import hold_out, holdout_arrays, kept_holdout
from edge_m2kd.workspace import Workspace

FROZEN_INIT = ["--method", "analytic-frozen", "--backbone", "resnet20", "--input-size", "16", "--exemplars", "24",
               "--device", "cpu", "--no-flip"]


def features(n_classes: int = 5, per_class: int = 30, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised features of classes around fixed centres; `seed` draws the images."""
    centres = np.random.default_rng(0).normal(size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    x = np.concatenate([centres[c] + 0.8 * rng.normal(size=(per_class, dim)) for c in range(n_classes)])
    return F.normalize(torch.tensor(x, dtype=torch.float32), dim=1), np.repeat(np.arange(n_classes), per_class)


def stats_of(x: torch.Tensor, y: np.ndarray, steps: list[list[int]]) -> FeatureStats:
    stats = FeatureStats.empty(x.shape[1])
    for step in steps:
        for c in step:
            stats.add(c, x[y == c])
    return stats


@pytest.mark.parametrize("solver", ["ridge", "lda"])
def test_head_after_five_steps_equals_the_head_of_all_images_at_once(solver):
    x, y = features()
    held = features(seed=1)
    at_once = solve_analytic(stats_of(x, y, [[0, 1, 2, 3, 4]]), solver, held)
    stepwise = solve_analytic(stats_of(x, y, [[c] for c in range(5)]), solver, held)
    assert at_once is not None and stepwise is not None
    assert stepwise.regularisation == at_once.regularisation
    assert torch.allclose(stepwise.weight, at_once.weight, atol=1e-6)
    assert torch.allclose(stepwise.bias, at_once.bias, atol=1e-6)


def test_ridge_is_the_regularised_least_squares_solution_and_lda_the_shrunk_discriminant():
    x, y = features()
    stats = stats_of(x, y, [[0, 1, 2, 3, 4]])
    fit = solve_analytic(stats, "ridge", grid=(0.1,))
    assert fit is not None
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    lam = 0.1 * float((x.double() ** 2).sum()) / x.shape[1]
    direct = torch.linalg.solve(xa.T @ xa + lam * torch.eye(xa.shape[1], dtype=torch.float64),
                                xa.T @ torch.eye(5, dtype=torch.float64)[y])
    assert torch.allclose(fit.weight, direct[:-1].T.float(), atol=1e-5)
    assert torch.allclose(fit.bias, direct[-1].float(), atol=1e-5)
    lda = solve_analytic(stats, "lda", grid=(0.3,))
    assert lda is not None
    means = torch.stack([x[y == c].double().mean(0) for c in range(5)])
    centred = x.double() - means[torch.as_tensor(y)]
    cov = centred.T @ centred / (len(x) - 5)
    shrunk = 0.7 * cov + 0.3 * torch.trace(cov) / x.shape[1] * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(shrunk, means.T).T
    scale = w.norm(dim=1).mean()  # the head is stored at a mean row norm of 1: the same decisions
    assert torch.allclose(lda.weight, (w / scale).float(), atol=1e-5)
    assert torch.allclose(lda.bias, (-0.5 * (w * means).sum(1) / scale).float(), atol=1e-5)


def test_the_regularisation_is_chosen_on_held_out_images_and_a_one_image_class_still_gets_a_head():
    x, y = features(per_class=40)
    stats = stats_of(x, y, [[0, 1, 2, 3, 4]])
    stats.add(5, x[:1] * -1)  # a sixth class of one image: the regularisation covers its spread
    hx, hy = features(per_class=10, seed=3)
    for solver in ("ridge", "lda"):
        fit = solve_analytic(stats, solver, (hx, hy))
        assert fit is not None and fit.weight.shape == (6, x.shape[1]) and torch.isfinite(fit.weight).all()
        assert fit.held_out_accuracy is not None and fit.held_out_accuracy > 0.5
    stats.grow(7)  # a class with no image at all (an old workspace's, without exemplars): no head yet
    assert solve_analytic(stats, "ridge") is None


def test_old_classes_can_be_kept_recomputed_from_exemplars_or_blended():
    x, y = features(n_classes=3)
    stats = stats_of(x, y, [[0, 1], [2]])
    step = stats_of(x, y, [[2]])
    moved = {c: F.normalize(x[y == c][:5] + 0.3, dim=1) for c in (0, 1)}  # today's backbone moved them
    assert old_class_statistics(stats, "keep", [0, 1], moved, step) is stats
    recomputed = old_class_statistics(stats, "recompute", [0, 1], moved, step)
    assert recomputed.counts.tolist() == [5, 5, 30]
    blend = old_class_statistics(stats, "blend", [0, 1], moved, step)
    assert blend.counts.tolist() == stats.counts.tolist()
    assert torch.allclose(blend.sums[0] / 30, moved[0].double().mean(0))
    # the spread around each class mean is the summed one
    def within(s: FeatureStats) -> torch.Tensor:
        return s.gram - s.sums.T @ (s.sums / s.counts[:, None])
    assert torch.allclose(within(blend), within(stats), atol=1e-9)


def test_frozen_learner_is_independent_of_the_class_order(blob_data):
    """Five steps against one, and two orders: the same statistics, the same regularisation and
    the same head, row for row by class name."""
    names = blob_data.class_names
    heads = []
    for steps in ([names], [[n] for n in names], [[n] for n in reversed(names)]):
        learner = Learner(quick_config("analytic-frozen"))
        holdout: dict[int, np.ndarray] = {}
        for classes in steps:
            data, held = hold_out(blob_data.only_classes(classes), seed=7)
            learner.step(data, classes)
            holdout.update(kept_holdout(held, learner.class_names))
            learner.choose_classifier(*holdout_arrays(holdout))
        order = [learner.class_names.index(n) for n in names]
        assert learner.analytic is not None
        heads.append((learner.analytic.regularisation, learner.analytic.weight[order], learner.analytic.bias[order],
                      learner.stats.gram))
    for reg, w, b, gram in heads[1:]:
        assert reg == heads[0][0]
        assert torch.allclose(w, heads[0][1], atol=1e-6) and torch.allclose(b, heads[0][2], atol=1e-6)
        assert torch.allclose(gram, heads[0][3], atol=1e-9)


# -- through the CLI -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blob_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blobs")
    data = blobs(30, 4, seed=1)
    for c, name in enumerate(data.class_names):
        for split, images in (("train", data.images[data.labels == c][:24]), ("test", data.images[data.labels == c][24:])):
            (root / split / name).mkdir(parents=True)
            for i, img in enumerate(images):
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
    return {"train": root / "train", "test": root / "test"}


def cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def frozen_workspace(path: Path, train: Path, steps: list[str], *init: str) -> Path:
    assert cli("init", path, *FROZEN_INIT, *init)[0] == 0
    for classes in steps:
        code, out, err = cli("add-classes", path, train, "--classes", classes)
        assert code == 0, err
    return path


def test_add_classes_in_any_order_or_all_at_once_gives_the_same_predictions(tmp_path, blob_folders):
    images = sorted(str(p) for p in blob_folders["test"].glob("*/*.png"))
    predictions = []
    for name, steps in (("ab", ["c0,c1", "c2,c3"]), ("ba", ["c2,c3", "c0,c1"]), ("all", ["c0,c1,c2,c3"])):
        ws = frozen_workspace(tmp_path / name, blob_folders["train"], steps, "--classifier", "analytic")
        code, out, err = cli("predict", ws, *images, "--json", "--backend", "torch")
        assert code == 0, err
        predictions.append([[p["class"] for p in r["predictions"]] for r in json.loads(out)["results"]])
    assert predictions[0] == predictions[1] == predictions[2]
    truth = [Path(p).parent.name for p in images]
    assert np.mean([p[0] == t for p, t in zip(predictions[0], truth)]) > 0.9


def test_the_step_reports_the_forward_pass_and_the_solve_and_memory_shows_the_statistics(tmp_path, blob_folders):
    ws = frozen_workspace(tmp_path / "ws", blob_folders["train"], [])
    code, out, err = cli("add-classes", ws, blob_folders["train"], "--classes", "c0,c1", "--json")
    assert code == 0, err
    entry = json.loads(out)
    assert entry["forward_images_per_second"] > 0 and entry["solve_seconds"] > 0 and entry["losses"] == {}
    assert entry["analytic"]["solver"] == "ridge"
    code, out, _ = cli("memory", ws, "--json")
    report = json.loads(out)
    dim = 64  # resnet20's pooled features
    assert report["statistics"] >= 8 * (dim * dim + 2 * dim + 2) and report["stored_total"] > report["statistics"]
    code, out, _ = cli("snapshots", ws, "--verify", "--json")
    snap = json.loads(out)
    assert code == 0 and snap["statistics"]["verified"] is True and snap["statistics"]["images"] == 2 * 22


@pytest.mark.parametrize("solver", ["ridge", "lda"])
def test_the_analytic_head_exports_through_the_parity_gate(tmp_path, blob_folders, solver):
    ws = frozen_workspace(tmp_path / "ws", blob_folders["train"], ["c0,c1,c2"], "--classifier", "analytic")
    manifest = json.loads((ws / "workspace.json").read_text())
    if solver == "lda":  # the solver is a configuration field; set it as a user's init override would
        manifest["config"]["train"]["analytic_solver"] = "lda"
        (ws / "workspace.json").write_text(json.dumps(manifest))
        assert cli("add-classes", ws, blob_folders["train"], "--classes", "c3")[0] == 0
    code, out, err = cli("export", ws, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["parity"]["passed"] and not result["forced"]
    meta = json.loads(Path(result["metadata"]).read_text())
    assert meta["classifier"] == "analytic" and meta["workspace"]["deployed_classifier"] == "analytic"
    assert Workspace.open(ws).load_learner().analytic.solver == solver


def test_damaged_statistics_are_refused_in_one_line(tmp_path, blob_folders):
    ws = frozen_workspace(tmp_path / "ws", blob_folders["train"], ["c0,c1"])
    gen = Workspace.open(ws).generation_dir
    path = gen / "statistics.safetensors"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = cli("memory", ws)
    assert code == 2 and "statistics.safetensors is missing or damaged" in err and len(err.strip().splitlines()) == 1


def test_a_workspace_saved_before_the_statistics_opens_and_gets_them_at_its_next_step(tmp_path, blob_folders):
    ws = frozen_workspace(tmp_path / "ws", blob_folders["train"], ["c0,c1"])
    manifest = json.loads((ws / "workspace.json").read_text())
    gen = ws / "generations" / manifest["generation"]
    (gen / "statistics.safetensors").unlink()  # as written before this part existed
    del manifest["files"]["statistics.safetensors"], manifest["heads"]
    (ws / "workspace.json").write_text(json.dumps(manifest))
    learner = Workspace.open(ws).load_learner()
    assert learner.stats is None and learner.deployed_head == "nme"
    assert cli("eval", ws, blob_folders["test"])[0] == 0
    assert cli("add-classes", ws, blob_folders["train"], "--classes", "c2,c3")[0] == 0
    learner = Workspace.open(ws).load_learner()
    # the old classes start from their exemplars (6 each of 24), the new ones from every training image
    assert learner.stats.counts.tolist() == [6, 6, 22, 22] and learner.analytic is not None
