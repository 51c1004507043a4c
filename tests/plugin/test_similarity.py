"""The FedLSC math (Eq. 1-6) against a plain loop-by-loop reference written here."""

from __future__ import annotations

import numpy as np
import pytest

from fedlsc_flwr.similarity import (
    class_weighted_rows,
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


def _states(n, rng):
    shapes = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "bn.weight": (8,),
              "bn.bias": (8,), "bn.running_mean": (8,), "head.weight": (4, 8)}
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    g["bn.num_batches_tracked"] = np.array(5, np.int64)
    clients = []
    for i in range(n):
        c = {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32)
             for k, v in g.items() if v.dtype == np.float32}
        c["bn.num_batches_tracked"] = np.array(5 + i, np.int64)
        clients.append(c)
    clients[0]["head.weight"] = g["head.weight"].copy()  # a zero update in one layer
    return g, clients


@pytest.mark.parametrize("n", [1, 2, 5])
def test_streamed_aggregation_equals_the_whole_matrix(n, monkeypatch):
    """Layers larger than one block are streamed through a small workspace: same weights,
    similarities and new tensors as from the whole (N, P) matrix."""
    from fedlsc_flwr import similarity
    from fedlsc_flwr.similarity import aggregate_layers, average_layers

    g, clients = _states(n, np.random.default_rng(n))
    layers = group_layers(g)
    whole, whole_reports = aggregate_layers(g, clients, layers, 0.3)
    averaged = average_layers(g, clients, layers, np.full(n, 1.0 / n))
    blocks = []
    real_blocks = similarity.update_blocks

    def counting(*args):
        for item in real_blocks(*args):
            blocks.append(item[:3])
            yield item

    monkeypatch.setattr(similarity, "MATRIX_ELEMENTS", 10)
    monkeypatch.setattr(similarity, "FEW_CLIENTS", 0)
    monkeypatch.setattr(similarity, "BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(similarity, "MIN_BLOCK_COLUMNS", 7)
    monkeypatch.setattr(similarity, "update_blocks", counting)
    streamed, streamed_reports = aggregate_layers(g, clients, layers, 0.3)
    assert len(blocks) > len(g)  # tensors were cut into blocks of columns
    for key in whole:
        np.testing.assert_allclose(streamed[key], whole[key], rtol=1e-6, atol=1e-7, err_msg=key)
        assert streamed[key].dtype == g[key].dtype
    for name, report in whole_reports.items():
        np.testing.assert_allclose(streamed_reports[name].mean_similarity,
                                   report.mean_similarity, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(streamed_reports[name].weights, report.weights, atol=1e-6)
    if n > 1:  # and both are Eq. 3 by the loop
        conv = np.stack([np.concatenate([c["conv.weight"].ravel() - g["conv.weight"].ravel(),
                                         c["conv.bias"] - g["conv.bias"]]) for c in clients])
        np.testing.assert_allclose(streamed_reports["conv"].mean_similarity,
                                   reference_mean_similarity(conv.astype(np.float64)), atol=1e-5)
    assert streamed_reports["head"].mean_similarity[0] == 0.0  # the zero update
    streamed_average = average_layers(g, clients, layers, np.full(n, 1.0 / n))
    for key in averaged:
        np.testing.assert_allclose(streamed_average[key], averaged[key], rtol=1e-6, atol=1e-7)


def test_given_update_norms_replace_the_norm_pass(monkeypatch):
    from fedlsc_flwr import similarity
    from fedlsc_flwr.similarity import aggregate_layers

    g, clients = _states(4, np.random.default_rng(7))
    layers = group_layers(g)
    monkeypatch.setattr(similarity, "MATRIX_ELEMENTS", 10)
    monkeypatch.setattr(similarity, "FEW_CLIENTS", 0)
    monkeypatch.setattr(similarity, "BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(similarity, "MIN_BLOCK_COLUMNS", 7)
    measured, measured_reports = aggregate_layers(g, clients, layers, 0.3)
    squared = [{k: float(np.sum((c[k].astype(np.float64) - g[k]) ** 2))
                for k in c if k in g and not k.endswith(("running_mean", "tracked"))}
               for c in clients]
    given, given_reports = aggregate_layers(g, clients, layers, 0.3,
                                            squared_distances=squared)
    for key in measured:
        np.testing.assert_allclose(given[key], measured[key], rtol=1e-6, atol=1e-7)
    for name in measured_reports:
        np.testing.assert_allclose(given_reports[name].weights,
                                   measured_reports[name].weights, atol=1e-6)


def test_class_weighted_rows_average_each_class_by_its_counts():
    a = {"w": np.array([[1., 1.], [2., 2.], [3., 3.]], np.float32),
         "b": np.array([1., 2., 3.], np.float32)}
    b = {"w": np.array([[5., 5.], [6., 6.], [7., 7.]], np.float32),
         "b": np.array([5., 6., 7.], np.float32)}
    fallback = {"w": np.full((3, 2), 9., np.float32), "b": np.full(3, 9., np.float32)}
    out = class_weighted_rows([a, b], ["w", "b"], np.array([[3, 0, 0], [1, 4, 0]]), fallback)
    np.testing.assert_allclose(out["w"], [[2., 2.], [6., 6.], [9., 9.]])  # (3·1 + 1·5) / 4
    np.testing.assert_allclose(out["b"], [2., 6., 9.])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match="'w' has 3 rows, expected one per class \\(4\\)"):
        class_weighted_rows([a, b], ["w"], np.ones((2, 4)), fallback)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_layer_no_client_changed_is_reported_as_not_trained(streamed, monkeypatch):
    """Frozen on every site, a layer's updates are all zero: its similarities are the
    convention 0, and the report says it did not train. One zero update among others
    (the head of client 0) is still a trained layer."""
    from fedlsc_flwr import similarity
    from fedlsc_flwr.similarity import aggregate_layers

    g, clients = _states(3, np.random.default_rng(4))
    for c in clients:
        c["conv.weight"], c["conv.bias"] = g["conv.weight"].copy(), g["conv.bias"].copy()
    if streamed:
        monkeypatch.setattr(similarity, "MATRIX_ELEMENTS", 10)
        monkeypatch.setattr(similarity, "FEW_CLIENTS", 0)
        monkeypatch.setattr(similarity, "BLOCK_ELEMENTS", 10)
        monkeypatch.setattr(similarity, "MIN_BLOCK_COLUMNS", 7)
    new, reports = aggregate_layers(g, clients, group_layers(g), 0.3)
    assert reports["conv"].trained is False
    np.testing.assert_array_equal(reports["conv"].mean_similarity, np.zeros(3))
    np.testing.assert_array_equal(new["conv.weight"], g["conv.weight"])
    assert reports["bn"].trained is True and reports["head"].trained is True
