"""Failed sites are named, and a round aggregates only with enough usable replies."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from test_strategy import FakeGrid, client_states, small_model_state, to_record

from fedlsc_flwr import FedLSC, build_strategy
from fedlsc_flwr.strategy import SiteAwareFedAvg
from fedlsc_flwr.wire import SITE_RECORD_KEY, site_record

pytestmark = pytest.mark.usefixtures("task_identity")
SUPERLINK_NODE_ID = 1  # Flower's own id for messages the SuperLink makes up


def configure(strategy, g, nodes=(11, 12, 13)):
    """configure_train, then give each message an id as the Grid does when it sends."""
    messages = list(strategy.configure_train(1, to_record(g), ConfigRecord(), FakeGrid(nodes)))
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"msg-{i}"
    return messages


def named_reply(instruction, state, name, num_examples=10):
    sent = set(instruction.content["arrays"].keys())  # reply with what was sent
    content = RecordDict({"arrays": to_record({k: v for k, v in state.items() if k in sent}),
                          "metrics": MetricRecord({"num-examples": num_examples}),
                          SITE_RECORD_KEY: site_record(name)})
    return Message(content=content, reply_to=instruction)


def node_unavailable(instruction):
    """The reply the SuperLink makes for a node that stopped sending heartbeats: it comes
    from the SuperLink, not from the node."""
    reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply


def warnings_of(logs):
    return [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("make_strategy", [lambda: FedLSC(personalized_ratio=0.0),
                                           lambda: build_strategy("fedavg")])
def test_dead_site_is_named_in_the_log_and_the_round_goes_on(make_strategy, flwr_logs):
    rng = np.random.default_rng(0)
    g = small_model_state(rng)
    strategy = make_strategy()
    names = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c"}
    sent = configure(strategy, g)
    states = client_states(g, 3, rng)
    arrays, _ = strategy.aggregate_train(1, [named_reply(m, s, names[m.metadata.dst_node_id])
                                             for m, s in zip(sent, states)])
    assert arrays is not None and strategy.failures["train"] == []

    sent = configure(strategy, g)  # round 2: hospital-b's SuperNode (node 12) dies mid-round
    states = client_states(g, 3, rng)
    replies = [node_unavailable(m) if m.metadata.dst_node_id == 12 else
               named_reply(m, s, names[m.metadata.dst_node_id]) for m, s in zip(sent, states)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    assert [(f["site"], f["node"]) for f in strategy.failures["train"]] == [("hospital-b", 12)]
    assert any("site 'hospital-b' (node 12) failed: error reply: Node Unavailable" in w
               for w in warnings_of(flwr_logs)), warnings_of(flwr_logs)


def test_silent_site_is_named_as_timed_out(flwr_logs):
    rng = np.random.default_rng(1)
    g = small_model_state(rng)
    strategy = FedLSC(personalized_ratio=0.0)
    sent = configure(strategy, g)
    states = client_states(g, 3, rng)
    silent = sent[1].metadata.dst_node_id
    arrays, metrics = strategy.aggregate_train(
        1, [named_reply(sent[0], states[0], "a"), named_reply(sent[2], states[2], "c")])
    assert arrays is not None and metrics["num-replies-accepted"] == 2
    assert [f["node"] for f in strategy.failures["train"]] == [silent]
    assert f"node {silent} (site name not known yet) failed: no reply before the round " \
        "timeout" in flwr_logs.text


@pytest.mark.parametrize("name", ["fedlsc", "fedavg-fc", "fedavg"])
def test_fewer_usable_replies_than_the_minimum_keeps_the_global_model(name, flwr_logs):
    rng = np.random.default_rng(2)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    for minimum, expect_aggregate in ((3, False), (2, True)):
        strategy = build_strategy(name, min_train_replies=minimum)
        sent = configure(strategy, g)
        replies = [named_reply(sent[0], states[0], "a"), node_unavailable(sent[1]),
                   named_reply(sent[2], states[2], "c")]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert (arrays is not None) == expect_aggregate, (name, minimum)
    assert "2 usable training replies, fewer than min-train-replies = 3" in flwr_logs.text


def test_site_aware_fedavg_aggregates_exactly_as_flowers_fedavg():
    rng = np.random.default_rng(3)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    ours = SiteAwareFedAvg()
    sent = configure(ours, g)
    replies = [named_reply(m, s, f"s{i}", 10 * (i + 1)) for i, (m, s) in
               enumerate(zip(sent, states))]
    mine, _ = ours.aggregate_train(1, replies)
    flower, _ = FedAvg().aggregate_train(1, replies)
    for key in g:
        np.testing.assert_array_equal(mine[key].numpy(), flower[key].numpy(), err_msg=key)


def test_evaluation_failures_are_named_too(flwr_logs):
    strategy = build_strategy("fedlsc")
    strategy.site_names[21] = "hospital-x"
    instruction = Message(RecordDict({}), dst_node_id=21, message_type=MessageType.EVALUATE)
    strategy._sent["evaluate"] = [instruction]
    strategy.aggregate_evaluate(3, [Message(Error(code=0, reason="disk full"),
                                            reply_to=instruction)])
    assert strategy.failures["evaluate"][0]["site"] == "hospital-x"
    assert "Round 3 (evaluate): site 'hospital-x' (node 21) failed: error reply: disk full" \
        in flwr_logs.text


def test_a_round_without_evaluation_awaits_no_earlier_evaluate_message(flwr_logs):
    """evaluate-every > 1: the recorder sends no evaluate message in a skipped round, and
    Flower still calls aggregate_evaluate with no replies: no site has failed then."""
    strategy = build_strategy("fedlsc")
    g = small_model_state(np.random.default_rng(3))
    configure(strategy, g)
    instruction = Message(RecordDict({}), dst_node_id=11, message_type=MessageType.EVALUATE)
    strategy._sent["evaluate"] = [instruction]  # round 1 was evaluated
    strategy.aggregate_evaluate(1, [])
    assert len(strategy.failures["evaluate"]) == 1  # a real silence is still named
    configure(strategy, g)  # round 2: train only
    strategy.aggregate_evaluate(2, [])
    assert strategy.failures["evaluate"] == []
    assert "Round 2 (evaluate)" not in flwr_logs.text


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_min_train_replies_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"min_train_replies must be an integer >= 1, got {bad}"):
        build_strategy("fedlsc", min_train_replies=bad)
