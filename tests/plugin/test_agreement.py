"""FedLSC's site-agreement report: the math by hand, the rule over rounds, and the
strategy fed real Flower replies in which one site's update is negated."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedlsc_flwr import FedLSC
from fedlsc_flwr.agreement import (
    MAD_TO_SIGMA,
    AgreementMonitor,
    SiteAgreement,
    below_threshold,
    site_agreement,
)
from fedlsc_flwr.similarity import HyperParameterError
from fedlsc_flwr.wire import SITE_RECORD_KEY, site_record


# --------------------------------------------------------------------------- the math
def test_agreement_is_the_mean_over_layers_and_least_share_counts_lowest_sites():
    layers = [np.array([0.5, 0.4, -0.2]),
              np.array([0.3, 0.1, 0.2]),
              np.array([0.0, 0.6, 0.0])]  # a tie for lowest: half a layer each
    found = site_agreement(layers)
    np.testing.assert_allclose(found.agreement, [0.8 / 3, 1.1 / 3, 0.0])
    np.testing.assert_allclose(found.least_share, [0.5 / 3, 1 / 3, 1.5 / 3])
    assert found.least_share.sum() == pytest.approx(1.0)
    assert found.num_layers == 3


def test_agreement_of_no_layer_and_of_one_site():
    assert site_agreement([]).agreement.size == 0
    one = site_agreement([np.array([0.0]), np.array([0.0])])
    assert one.agreement.tolist() == [0.0] and one.least_share.tolist() == [0.0]


def test_threshold_is_median_minus_k_robust_sigmas_or_the_minimum_gap():
    values = np.array([0.30, 0.20, 0.25, 0.28, -0.40])
    median, mad = 0.25, 0.05  # deviations 0.05, 0.05, 0, 0.03, 0.65
    assert below_threshold(values, 3.0, 0.0) == pytest.approx(median - 3 * MAD_TO_SIGMA * mad)
    assert below_threshold(values, 3.0, 0.5) == pytest.approx(median - 0.5)
    assert below_threshold(values[:2], 3.0, 0.0) == float("-inf")  # no majority with 2


def test_rule_flags_after_consecutive_rounds_only():
    monitor = AgreementMonitor(k=3.0, min_gap=0.05, rounds=2)
    bad = SiteAgreement(np.array([0.30, 0.31, -0.20]), np.zeros(3), 4)
    good = SiteAgreement(np.array([0.30, 0.31, 0.29]), np.zeros(3), 4)
    names = ["a", "b", "c"]
    first = monitor.update(names, bad)
    assert first["below"] == ["c"] and first["flagged"] == []
    assert monitor.update(names, bad)["flagged"] == ["c"]
    assert monitor.update(names, good) == {"threshold": pytest.approx(0.25), "below": [],
                                           "flagged": []}
    assert monitor.update(names, bad)["flagged"] == []  # the streak started again
    # a round without "c" (it failed) neither breaks nor extends its streak
    monitor.update(["a", "b"], SiteAgreement(np.array([0.3, 0.3]), np.zeros(2), 4))
    assert monitor.update(names, bad)["flagged"] == ["c"]


def test_rule_switched_off_still_reports_who_is_below():
    monitor = AgreementMonitor(rounds=0)
    bad = SiteAgreement(np.array([0.30, 0.31, -0.20]), np.zeros(3), 4)
    for _ in range(3):
        verdict = monitor.update(["a", "b", "c"], bad)
    assert verdict["below"] == ["c"] and verdict["flagged"] == []


@pytest.mark.parametrize("kwargs, name", [({"k": -1}, "agreement_k"),
                                          ({"min_gap": -0.1}, "agreement_min_gap"),
                                          ({"rounds": 1.5}, "agreement_rounds"),
                                          ({"rounds": -1}, "agreement_rounds")])
def test_bad_rule_settings_name_the_setting(kwargs, name):
    with pytest.raises(HyperParameterError) as err:
        AgreementMonitor(**kwargs)
    assert err.value.name == name


# ---------------------------------------------------------------- the strategy, for real
def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    f32 = np.float32
    return {
        "stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(f32),
        "bn.weight": np.ones(8, f32), "bn.bias": np.zeros(8, f32),
        "bn.running_mean": np.zeros(8, f32), "bn.running_var": np.ones(8, f32),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
        "block.conv.weight": rng.normal(size=(8, 8, 3, 3)).astype(f32),
        "classifier.weight": rng.normal(size=(7, 8)).astype(f32),
        "classifier.bias": np.zeros(7, f32),
    }


def _honest_updates(global_state, n, rng, shared=1.0):
    """Each site: a direction common to all sites plus noise of the same size."""
    common = {k: rng.normal(size=v.shape) for k, v in global_state.items()}
    states = []
    for _ in range(n):
        state = {}
        for key, value in global_state.items():
            if value.dtype.kind != "f":
                state[key] = np.asarray(value + 5)
                continue
            step = 0.01 * (shared * common[key] + rng.normal(size=value.shape))
            state[key] = (value + step).astype(value.dtype)
        states.append(state)
    return states


def _negate(global_state, state, scale):
    return {k: (g - scale * (state[k] - g)).astype(g.dtype) if g.dtype.kind == "f"
            and not k.endswith(("running_mean", "running_var")) else state[k]
            for k, g in global_state.items()}


def _reply(node_id: int, state, name: str) -> Message:
    instruction = Message(content=RecordDict({}), dst_node_id=node_id,
                          message_type=MessageType.TRAIN)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": 100}),
        SITE_RECORD_KEY: site_record(name)})
    return Message(content=content, reply_to=instruction)


class _Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _run_rounds(strategy, n, rounds, bad=None, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    global_state = _state(rng)
    nodes = [100 + i for i in range(n)]
    for server_round in range(1, rounds + 1):
        record = ArrayRecord({k: Array(v) for k, v in global_state.items()})
        list(strategy.configure_train(server_round, record, ConfigRecord(), _Grid(nodes)))
        states = _honest_updates(global_state, n, rng)
        if bad is not None:
            states[bad] = _negate(global_state, states[bad], scale)
        replies = [_reply(node, s, f"hospital-{i}") for i, (node, s)
                   in enumerate(zip(nodes, states))]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        global_state = {k: arrays[k].numpy() for k in arrays}
    return strategy.last_report.agreement


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("n", [3, 5])
def test_report_names_the_site_whose_update_is_negated(n, flwr_logs):
    strategy = FedLSC(personalized_ratio=0.0, agreement_rounds=2)
    report = _run_rounds(strategy, n, rounds=3, bad=1)
    assert report["flagged"] == ["hospital-1"]
    sites = report["sites"]
    assert sites["hospital-1"]["below"] and sites["hospital-1"]["streak"] == 3
    # with 3 sites the honest two also drop to about 0: half their partners is the bad one
    assert sites["hospital-1"]["agreement"] < -0.3 + min(
        v["agreement"] for name, v in sites.items() if name != "hospital-1")
    assert sites["hospital-1"]["least-share"] > 0.9
    warnings = sorted({r.getMessage() for r in flwr_logs.records
                       if r.levelno == logging.WARNING and "disagrees" in r.getMessage()})
    assert len(warnings) == 2  # rounds 2 and 3
    assert all("site 'hospital-1'" in w for w in warnings)
    assert "Round 2:" in warnings[0]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_names_no_site_when_all_are_honest(n, seed, flwr_logs):
    strategy = FedLSC(personalized_ratio=0.0, agreement_rounds=2)
    report = _run_rounds(strategy, n, rounds=3, seed=seed)
    assert report["flagged"] == []
    assert set(report["sites"]) == {f"hospital-{i}" for i in range(n)}
    assert all(v["agreement"] > 0.2 for v in report["sites"].values())
    assert not any("disagrees" in r.getMessage() for r in flwr_logs.records)


@pytest.mark.usefixtures("task_identity")
def test_warning_off_keeps_the_numbers_and_the_streaks_survive_a_checkpoint(flwr_logs):
    quiet = FedLSC(personalized_ratio=0.0, agreement_rounds=0)
    report = _run_rounds(quiet, 3, rounds=2, bad=2)
    assert report["flagged"] == [] and report["sites"]["hospital-2"]["below"]
    assert not any("disagrees" in r.getMessage() for r in flwr_logs.records)
    restored = FedLSC(personalized_ratio=0.0)
    restored.load_state_dict(quiet.state_dict())
    assert restored.agreement_monitor.streaks == {"hospital-0": 0, "hospital-1": 0,
                                                  "hospital-2": 2}


# ------------------------------------------------------- the option beyond the paper
def _one_round(strategy, n=5, bad=None, seed=3):
    rng = np.random.default_rng(seed)
    g = _state(rng)
    nodes = [100 + i for i in range(n)]
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in g.items()}),
                                  ConfigRecord(), _Grid(nodes)))
    states = _honest_updates(g, n, rng)
    if bad is not None:
        states[bad] = _negate(g, states[bad], 3.0)
    arrays, _ = strategy.aggregate_train(1, [_reply(node, s, f"hospital-{i}") for i, (node, s)
                                             in enumerate(zip(nodes, states))])
    return g, states, {k: arrays[k].numpy() for k in arrays}


@pytest.mark.usefixtures("task_identity")
def test_disagreeing_weight_zero_leaves_the_site_below_out_of_the_average(flwr_logs):
    strategy = FedLSC(personalized_ratio=0.0, disagreeing_weight=0.0)
    g, states, new = _one_round(strategy, bad=2)
    report = strategy.last_report
    assert report.agreement["below"] == ["hospital-2"]
    for layer in ("stem", "block.conv", "classifier"):
        weights = report.layers[layer].weights
        assert weights[2] == 0.0 and weights.sum() == pytest.approx(1.0)
        key = f"{layer}.weight"
        expected = sum(w * s[key].astype(np.float64) for w, s in zip(weights, states))
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)
    assert "weights of hospital-2 times 0 in this round's aggregation" in flwr_logs.text


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("bad", [None, 2])
def test_disagreeing_weight_one_or_no_site_below_is_the_papers_aggregation(bad):
    paper = _one_round(FedLSC(personalized_ratio=0.0), bad=bad)[2]
    if bad is None:
        option = _one_round(FedLSC(personalized_ratio=0.0, disagreeing_weight=0.0))[2]
    else:
        option = _one_round(FedLSC(personalized_ratio=0.0, disagreeing_weight=1.0), bad=bad)[2]
    for key in paper:
        np.testing.assert_array_equal(paper[key], option[key], err_msg=key)


def test_disagreeing_weight_must_be_a_share():
    with pytest.raises(HyperParameterError) as err:
        FedLSC(disagreeing_weight=1.5)
    assert err.value.name == "disagreeing_weight"
