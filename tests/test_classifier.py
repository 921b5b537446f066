"""What the device deploys: the head's new-class bias correction after a step, and the choice
between the corrected head and NME (classifier "auto")."""

import numpy as np
import pytest
import torch
from helpers import quick_config

from edge_m2kd.learner import Learner
from edge_m2kd.protocol import run_protocol


def learner_with_head(weight, bias, **train):
    learner = Learner(quick_config("icarl", train=train))
    learner.groups = [[0, 1], [2]]
    learner.model.add_classes(3)
    with torch.no_grad():
        learner.model.main_head.weight.copy_(weight)
        learner.model.main_head.bias.copy_(bias)
    return learner


@pytest.mark.parametrize("align_biases", [False, True])
def test_weight_aligning_matches_norms_and_can_align_biases(align_biases):
    torch.manual_seed(0)
    weight = torch.randn(3, 64)
    weight[2] *= 4  # the new class's row grew during its step
    bias = torch.tensor([-1.0, -0.8, 1.6])  # ... and so did its bias (measured: a one-class step)
    learner = learner_with_head(weight, bias, align_biases=align_biases)
    learner._correct_bias([2])
    head = learner.model.main_head
    norms = head.weight.detach().norm(dim=1)
    assert norms[2].item() == pytest.approx(norms[:2].mean().item(), rel=1e-5)
    assert torch.equal(head.weight.detach()[:2], weight[:2])  # old rows untouched
    if align_biases:
        assert torch.allclose(head.bias.detach(), torch.full((3,), float(head.bias.detach().mean())))
    else:
        gamma = norms[:2].mean() / weight[2].norm()
        assert torch.allclose(head.bias.detach(), torch.tensor([-1.0, -0.8, 1.6 * float(gamma)]))


def test_auto_deploys_the_head_only_where_it_scores_clearly_higher_on_held_out_images(blob_data, monkeypatch):
    learner = Learner(quick_config("icarl", epochs=1, train={"classifier": "auto"}))
    learner.step(blob_data, ["c0", "c1"])
    images, labels = blob_data.images[:6], np.zeros(6, np.int64)
    right, wrong = torch.zeros(6, 2), torch.zeros(6, 2)
    right[:, 0], wrong[:, 1] = 1.0, 1.0
    # Right on 4 of 6 against 2 of 6 (each right where the other is wrong): 4 - 2 is less than
    # twice sqrt(4 + 2), inside the noise of six images, so NME stays.
    mostly_right = torch.cat([right[:4], wrong[4:]])
    mostly_wrong = torch.cat([wrong[:4], right[4:]])
    for cnn, nme, chosen in [(right, wrong, "cnn"), (wrong, right, "nme"), (right, right, "nme"),
                             (mostly_right, mostly_wrong, "nme")]:
        monkeypatch.setattr(learner, "scores", lambda _images, cnn=cnn, nme=nme: {"cnn": cnn, "nme": nme})
        learner.choose_classifier(images, labels)
        assert learner.chosen_classifier == chosen and learner.deployed_head == chosen
    monkeypatch.undo()
    # The deployed network is the chosen one: NME as a linear layer over normalised features.
    assert learner.deployed().normalize_features
    # A configured classifier is never overridden.
    fixed = Learner(quick_config("icarl", epochs=1, train={"classifier": "cnn"}))
    fixed.step(blob_data, ["c0", "c1"])
    fixed.choose_classifier(images, labels)
    assert fixed.chosen_classifier is None and fixed.deployed_head == "cnn"


def test_auto_chooses_among_every_head_and_the_corrected_head_only_where_clearly_better(blob_data, monkeypatch):
    learner = Learner(quick_config("icarl", epochs=1, train={"classifier": "auto"}))
    learner.step(blob_data, ["c0", "c1"])
    assert set(learner.heads()) == {"cnn", "nme", "analytic"}
    labels = np.zeros(40, np.int64)
    right, wrong = torch.zeros(40, 2), torch.zeros(40, 2)
    right[:, 0], wrong[:, 1] = 1.0, 1.0

    def first(k: int, start: int = 0) -> torch.Tensor:  # right on images start .. start + k - 1 of the 40
        return torch.cat([wrong[:start], right[start : start + k], wrong[start + k :]])

    # (cnn, nme, analytic) -> chosen: NME against the analytic head by a plain majority, a tie
    # to the analytic head; the corrected head only past the sign test against the better of them.
    for cnn, nme, analytic, chosen in [(wrong, first(21), first(20), "nme"), (wrong, first(20), first(20), "analytic"),
                                       (wrong, first(20), first(21), "analytic"), (first(26, 10), first(20), first(20), "analytic"),
                                       (right, first(20), first(20), "cnn")]:
        monkeypatch.setattr(learner, "scores", lambda _i, c=cnn, n=nme, a=analytic: {"cnn": c, "nme": n, "analytic": a})
        learner.choose_classifier(blob_data.images[:40], labels)
        assert learner.chosen_classifier == chosen, (chosen, learner.chosen_classifier)


def test_protocol_under_auto_holds_out_images_and_records_the_choice(blob_data):
    cfg = quick_config("icarl", epochs=1, train={"classifier": "auto"})
    result = run_protocol(blob_data, blob_data, [["c0", "c1"], ["c2", "c3"]], cfg)
    assert result["chosen_classifier"] in ("cnn", "nme", "analytic")
    # 10% of each new class's 24 images stay out of training.
    assert result["steps"][0]["train_images"] == 2 * (24 - 2)
