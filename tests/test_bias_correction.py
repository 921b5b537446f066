"""The head's new-class bias correction after a step (learner._correct_bias)."""

import pytest
import torch
from helpers import quick_config

from edge_m2kd.learner import Learner


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
