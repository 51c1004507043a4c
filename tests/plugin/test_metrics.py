"""Classification metrics from confusion matrices (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlsc_flwr.metrics import classification_metrics


def test_metrics_from_a_known_confusion_matrix():
    # rows: true a, b, c; columns: predicted
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    m = classification_metrics(cm, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(11 / 14)
    assert m["balanced-accuracy"] == pytest.approx((0.8 + 0.75) / 2)  # class c absent
    assert m["precision"] == pytest.approx((8 / 9 + 3 / 5) / 2)
    f1_a = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8)
    f1_b = 2 * 0.6 * 0.75 / (0.6 + 0.75)
    assert m["f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert m["recall-b"] == pytest.approx(0.75) and "recall-c" not in m
