import numpy as np
import pytest

from edge_m2kd.evaluation import group_accuracy, summary


def test_group_accuracy_on_a_hand_made_prediction_table():
    groups = [[0, 1], [2, 3]]
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 0])  # group 1: 3 of 4 right; group 2: 1 of 4
    assert group_accuracy(pred, labels, groups) == [0.75, 0.25]


def test_summary_metrics_from_an_accuracy_matrix():
    # after step t, accuracy on group g (g <= t); overall accuracy after each step
    matrix = [[0.9], [0.7, 0.8], [0.5, 0.6, 0.95]]
    overall = [0.9, 0.75, 0.68]
    s = summary(matrix, overall)
    assert s["final_accuracy"] == 0.68
    assert s["average_incremental_accuracy"] == pytest.approx((0.9 + 0.75 + 0.68) / 3)
    # forgetting: group 1 best 0.9 -> 0.5, group 2 best 0.8 -> 0.6; mean of 0.4 and 0.2
    assert s["forgetting"] == pytest.approx(0.3)
    assert summary([[0.9]], [0.9])["forgetting"] == 0.0
