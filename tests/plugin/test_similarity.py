"""The FedLSC math (Eq. 1-6) against a plain loop-by-loop reference written here."""

from __future__ import annotations

import numpy as np
import pytest

from fedlsc_flwr.similarity import (
    group_layers,
    mean_similarity,
    select_personalized,
    similarity_matrix,
    softmax_weights,
)


def reference_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def reference_mean_similarity(updates: np.ndarray) -> np.ndarray:
    n = len(updates)
    if n == 1:
        return np.zeros(1)
    return np.array([
        sum(reference_cosine(updates[i], updates[j]) for j in range(n) if j != i) / (n - 1)
        for i in range(n)
    ])


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_mean_similarity_matches_pairwise_loop(n):
    rng = np.random.default_rng(n)
    base = rng.normal(size=300)
    updates = (base + rng.normal(scale=1.5, size=(n, 300))).astype(np.float32)
    np.testing.assert_allclose(
        mean_similarity(updates), reference_mean_similarity(updates.astype(np.float64)),
        atol=1e-5,
    )


def test_similarity_matrix_matches_loop_and_is_symmetric():
    rng = np.random.default_rng(1)
    updates = rng.normal(size=(4, 50)).astype(np.float32)
    sim = similarity_matrix(updates)
    for i in range(4):
        for j in range(4):
            expected = 1.0 if i == j else reference_cosine(updates[i], updates[j])
            assert sim[i, j] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(sim, sim.T)
    # the mean of the off-diagonal row is Eq. 3
    np.testing.assert_allclose((sim.sum(1) - 1) / 3, mean_similarity(updates), atol=1e-5)


def test_zero_update_has_zero_similarity_to_everyone():
    rng = np.random.default_rng(2)
    updates = rng.normal(size=(3, 40)).astype(np.float32)
    updates[1] = 0.0
    got = mean_similarity(updates)
    assert got[1] == 0.0
    # the others average their similarity to each other with a 0 for the zero client
    assert got[0] == pytest.approx(reference_cosine(updates[0], updates[2]) / 2, abs=1e-6)
    assert similarity_matrix(updates)[1].tolist() == [0.0, 0.0, 0.0]


def test_single_client_gets_weight_one():
    assert mean_similarity(np.ones((1, 5), np.float32)).tolist() == [0.0]
    assert softmax_weights(np.zeros(1), 0.2).tolist() == [1.0]


def test_identical_updates_give_uniform_weights():
    updates = np.tile(np.arange(1, 11, dtype=np.float32), (4, 1))
    sims = mean_similarity(updates)
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)
    np.testing.assert_allclose(softmax_weights(sims, 0.2), 0.25)


def test_temperature_extremes():
    sims = np.array([0.9, 0.1, -0.3])
    assert np.ptp(softmax_weights(sims, 1e4)) < 1e-4  # large τ: FedAvg-like uniform
    small = softmax_weights(sims, 0.01)  # small τ: the most aligned client dominates
    assert small.argmax() == 0 and small[0] > 0.999


def test_softmax_is_stable_and_matches_formula():
    sims = np.array([0.5, -0.2, 0.3])
    expected = np.exp(sims / 0.2) / np.exp(sims / 0.2).sum()
    np.testing.assert_allclose(softmax_weights(sims, 0.2), expected)
    huge = softmax_weights(np.array([1.0, 0.999]), 1e-6)  # exp(1e6) would overflow naively
    assert np.isfinite(huge).all() and huge.sum() == pytest.approx(1.0)


def test_softmax_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        softmax_weights(np.zeros(2), 0.0)


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.1, 0.3, 0.5])
def test_select_personalized_is_strict_quantile(ratio):
    rng = np.random.default_rng(3)
    means = {f"layer{i}": float(v) for i, v in enumerate(rng.uniform(-1, 1, size=57))}
    threshold = np.quantile(list(means.values()), ratio)
    expected = {k for k, v in means.items() if v < threshold}
    assert select_personalized(means, ratio) == expected
    if ratio == 0.0:
        assert expected == set()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_select_personalized_rejects_ratio_outside_range(ratio):
    with pytest.raises(ValueError, match="personalized_ratio"):
        select_personalized({"a": 0.0}, ratio)


def test_group_layers_separates_params_buffers_and_counters():
    state = {
        "conv.weight": np.zeros((2, 3), np.float32),
        "bn.weight": np.zeros(2, np.float32),
        "bn.bias": np.zeros(2, np.float32),
        "bn.running_mean": np.zeros(2, np.float32),
        "bn.running_var": np.zeros(2, np.float32),
        "bn.num_batches_tracked": np.zeros((), np.int64),
        "head.weight": np.zeros((1, 2), np.float32),
    }
    layers = {layer.name: layer for layer in group_layers(state)}
    assert list(layers) == ["conv", "bn", "head"]
    assert layers["bn"].params == ("bn.weight", "bn.bias")
    assert layers["bn"].buffers == ("bn.running_mean", "bn.running_var")
    assert layers["bn"].counters == ("bn.num_batches_tracked",)
    assert layers["conv"].size == 6
    per_tensor = [layer.name for layer in group_layers(state, "tensor")]
    assert per_tensor == ["conv.weight", "bn.weight", "bn.bias", "head.weight"]
    with pytest.raises(ValueError, match="granularity"):
        group_layers(state, "block")


def test_math_and_model_import_without_flower():
    import subprocess
    import sys

    code = ("import sys, fedlsc_flwr.similarity, fedlsc_flwr.model, client_app.data, "
            "client_app.partition, client_app.training; "
            "print(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import fedlsc_flwr

    assert fedlsc_flwr.res2net50_sa.__module__ == "fedlsc_flwr.model"
    assert fedlsc_flwr.FedLSC.__name__ == "FedLSC"
