"""Flower's robust strategies in the registry: same aggregation as Flower's own, plus the
site tracking the ServerApp's recorder needs, and their settings checked."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from test_site_tracking import configure, named_reply, node_unavailable
from test_strategy import client_states, small_model_state

from fedlsc_flwr.similarity import HyperParameterError
from fedlsc_flwr.strategy import ROBUST_NAMES, SiteTracking, build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")
FLOWER = {"fedmedian": lambda: FedMedian(), "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.2),
          "krum": lambda: Krum(num_malicious_nodes=1),
          "multikrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=6),
          "bulyan": lambda: Bulyan(num_malicious_nodes=1)}


@pytest.mark.parametrize("name", ROBUST_NAMES)
def test_site_aware_variant_aggregates_exactly_as_flowers_own(name):
    rng = np.random.default_rng(5)
    g = small_model_state(rng)
    # same batch counters everywhere (Krum's distances would count them, not the weights)
    states = [{k: (g[k] + 1 if v.dtype.kind == "i" else v) for k, v in s.items()}
              for s in client_states(g, 7, rng)]
    states[3] = {k: (g[k] - 10 * (v - g[k])).astype(v.dtype) if v.dtype.kind == "f" else v
                 for k, v in states[3].items()}  # one poisoned update among 7
    nodes = tuple(range(11, 18))
    ours = build_strategy(name, min_train_nodes=7, min_available_nodes=7)
    assert isinstance(ours, SiteTracking) and isinstance(ours, type(FLOWER[name]()))

    def replies(strategy):  # FedMedian & co. pop the arrays: fresh replies for each
        sent = configure(strategy, g, nodes)
        return [named_reply(m, s, f"s{i}", 10) for i, (m, s) in
                enumerate(zip(sent, states))]

    mine, _ = ours.aggregate_train(1, replies(ours))
    flower, _ = FLOWER[name]().aggregate_train(1, replies(build_strategy("fedavg")))
    for key in g:
        np.testing.assert_array_equal(mine[key].numpy(), flower[key].numpy(), err_msg=key)
    # and they resist it: closer to the honest sites' mean than FedAvg is
    key = "block.conv.weight"
    honest = np.mean([s[key] for i, s in enumerate(states) if i != 3], axis=0)
    plain, _ = build_strategy("fedavg").aggregate_train(1, replies(build_strategy("fedavg")))
    assert np.linalg.norm(mine[key].numpy() - honest) < \
        0.5 * np.linalg.norm(plain[key].numpy() - honest)


@pytest.mark.parametrize("name", ["fedmedian", "multikrum"])
def test_robust_strategies_name_a_dead_site(name, flwr_logs):
    rng = np.random.default_rng(6)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    strategy = build_strategy(name, min_train_nodes=3)
    sent = configure(strategy, g)  # round 1: every site replies, names are learnt
    strategy.aggregate_train(1, [named_reply(m, s, f"h{m.metadata.dst_node_id}")
                                 for m, s in zip(sent, states)])
    sent = configure(strategy, g)
    replies = [named_reply(sent[0], states[0], f"h{sent[0].metadata.dst_node_id}"),
               node_unavailable(sent[1]),
               named_reply(sent[2], states[2], f"h{sent[2].metadata.dst_node_id}")]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    assert strategy.failures["train"][0]["site"] == f"h{sent[1].metadata.dst_node_id}"


def test_robust_settings():
    assert build_strategy("multikrum", min_train_nodes=5).num_nodes_to_select == 4  # N − f
    assert build_strategy("multikrum", min_train_nodes=5,
                          num_nodes_to_select=2).num_nodes_to_select == 2
    assert build_strategy("fedtrimmedavg", trim_beta=0.34).beta == 0.34
    for kwargs, name in (({"num_malicious_nodes": 1, "min_train_nodes": 6}, "num_malicious_nodes"),
                         ({"num_malicious_nodes": -1, "min_train_nodes": 7},
                          "num_malicious_nodes")):
        with pytest.raises(HyperParameterError) as err:
            build_strategy("bulyan", **kwargs)
        assert err.value.name == name
    with pytest.raises(HyperParameterError, match="trim_beta"):
        build_strategy("fedtrimmedavg", trim_beta=0.5)
    with pytest.raises(HyperParameterError, match="num_nodes_to_select"):
        build_strategy("multikrum", min_train_nodes=3, num_nodes_to_select=4)
    with pytest.raises(HyperParameterError, match="update_dtype"):
        build_strategy("krum", update_dtype="float16")


def test_krum_with_too_few_sites_says_so_once(flwr_logs):
    build_strategy("krum", min_train_nodes=3).summary()
    assert "assumes at least 2f + 3 = 5 sites for f = 1 malicious, but min-train-nodes = 3" \
        in flwr_logs.text
