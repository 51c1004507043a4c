"""Classification metrics from confusion matrices (numpy only), checked against
scikit-learn's definitions."""

from __future__ import annotations

import warnings

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


def test_a_class_predicted_but_absent_from_the_labels_counts_in_macro_scores():
    # class c is never true but predicted twice: scikit-learn's macro scores count it
    cm = np.array([[8, 1, 1], [1, 3, 1], [0, 0, 0]])
    m = classification_metrics(cm, ["a", "b", "c"])
    p_a, p_b, r_a, r_b = 8 / 9, 3 / 4, 0.8, 0.6
    assert m["precision"] == pytest.approx((p_a + p_b + 0) / 3)
    assert m["recall"] == pytest.approx((r_a + r_b + 0) / 3)
    f1 = [2 * p * r / (p + r) for p, r in ((p_a, r_a), (p_b, r_b))]
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["balanced-accuracy"] == pytest.approx((r_a + r_b) / 2)  # over true classes only
    assert "recall-c" not in m


@pytest.mark.parametrize("seed", range(40))
def test_metrics_match_scikit_learn_on_random_confusion_matrices(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    cm = rng.integers(0, 6, (k, k)) * (rng.random((k, k)) < 0.6)
    cm[rng.random(k) < 0.3] = 0  # some classes absent from the labels ...
    cm[:, rng.random(k) < 0.2] = 0  # ... or never predicted
    if cm.sum() == 0:
        cm[0, 0] = 1
    y_true = np.repeat(np.repeat(np.arange(k), k), cm.reshape(-1))
    y_pred = np.repeat(np.tile(np.arange(k), k), cm.reshape(-1))
    ours = classification_metrics(cm, [str(i) for i in range(k)])
    p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0)
    assert ours["precision"] == pytest.approx(p, abs=1e-12)
    assert ours["recall"] == pytest.approx(r, abs=1e-12)
    assert ours["f1"] == pytest.approx(f, abs=1e-12)
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        balanced = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    assert ours["balanced-accuracy"] == pytest.approx(balanced, abs=1e-12)
