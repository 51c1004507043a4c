"""The ClientApp called in-process with real Flower messages on a small generated site."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app import app as client_app
from fedlsc_common.settings import compose, to_run_config
from fedlsc_flwr.model import build_model
from fedlsc_flwr.similarity import layer_of
from fedlsc_flwr.strategy import STRATEGY_NAMES, build_strategy
from fedlsc_flwr.wire import array_from_numpy

pytestmark = pytest.mark.usefixtures("task_identity")
CLASSES = ["nv", "mel", "bkl", "bcc"]


@pytest.fixture
def site(tmp_path, write_tiny_ham):
    folder = write_tiny_ham(tmp_path / "data", 40, CLASSES)
    flat = to_run_config(compose(["model=small", "dataset.image_size=32", "training.batch_size=8",
                                  "training.max_batches_per_epoch=2"]))
    node = {"partition-id": 0, "num-partitions": 1, "site-name": "site-a",
            "data-dir": str(folder), "output-dir": str(tmp_path / "out")}
    return flat, node, tmp_path / "out"


def _global_arrays(skip_layers=()):
    torch.manual_seed(0)
    state = build_model("resnet10t_sa", num_classes=7).state_dict()
    return ArrayRecord({k: array_from_numpy(v.numpy()) for k, v in state.items()
                        if layer_of(k) not in skip_layers})


def _two_site_contexts(flat, node, out, site_2=None):
    """Contexts of nodes 1 and 2: ``node``'s site twice, each with its own name and output
    folder; ``site_2`` overrides entries of node 2's node config."""
    return {nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=flat,
                         node_config={**node, "site-name": f"site-{nid}",
                                      "output-dir": str(out / f"site-{nid}"),
                                      **((site_2 or {}) if nid == 2 else {})})
            for nid in (1, 2)}


def _train(flat, node, arrays, server_round, personalized=(), state=None):
    context = Context(run_id=1, node_id=1, node_config=node, state=state or RecordDict(),
                      run_config=flat)
    config = ConfigRecord({"server-round": server_round, "proximal-mu": 0.01,
                           "personalized-layers": sorted(personalized)})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    return client_app.train(msg, context), context


def test_same_round_gives_the_same_update_whatever_ran_before(site):
    flat, node, _ = site
    first, _ = _train(flat, node, _global_arrays(), 1)
    _train(flat, node, _global_arrays(), 2)  # advances the cached loader's generators
    again, _ = _train(flat, node, _global_arrays(), 1)
    a, b = first.content["arrays"], again.content["arrays"]
    assert set(a) == set(_global_arrays())
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    metrics = first.content["metrics"]
    assert metrics["num-examples"] == 2 * 8 and metrics["proximal-term"] > 0


def test_restarted_site_restores_personalized_layers_from_its_own_disk(site, flwr_logs):
    flat, node, out = site
    _train(flat, node, _global_arrays(), 1)
    saved = torch.load(out / "local_state.pt", weights_only=True)["state_dict"]
    personalized = {"classifier", "backbone.conv1.0"}
    arrays = _global_arrays(skip_layers=personalized)  # the server no longer sends them
    reply, context = _train(flat, node, arrays, 2, personalized)  # empty state = restart
    assert set(reply.content["arrays"]) == set(arrays)  # nothing personalized goes back
    assert "restored local weights of round 1" in flwr_logs.text
    after = torch.load(out / "local_state.pt", weights_only=True)["state_dict"]
    assert after["classifier.weight"].shape == saved["classifier.weight"].shape
    # round 2 started from the site's own round-1 head, not from a fresh one
    fresh = build_model("resnet10t_sa", num_classes=7).state_dict()["classifier.weight"]
    assert (after["classifier.weight"] - saved["classifier.weight"]).abs().max() < \
        (after["classifier.weight"] - fresh).abs().max()


def test_kept_optimizer_state_lives_on_the_site_s_disk_across_a_restart(site, flwr_logs):
    """training.keep-optimizer-state: round 2 continues round 1's Adam from the site's own
    file, also in a fresh process (empty context); off, no file is written."""
    flat, node, out = site
    _train(flat, node, _global_arrays(), 1)
    assert not (out / "optimizer_state.pt").exists()
    flat = {**flat, "training.keep-optimizer-state": True}
    _train(flat, node, _global_arrays(), 1)
    saved = torch.load(out / "optimizer_state.pt", weights_only=True)
    assert saved["round"] == 1 and saved["optimizer"] == "adam"
    assert {s["step"].item() for s in saved["state_dict"]["state"].values()} == {2.0}
    _train(flat, node, _global_arrays(), 2)  # a new context: as after a restart
    assert "continuing the local optimizer of round 1" in flwr_logs.text
    again = torch.load(out / "optimizer_state.pt", weights_only=True)
    assert again["round"] == 2
    assert {s["step"].item() for s in again["state_dict"]["state"].values()} == {4.0}


def test_first_round_with_a_local_head_starts_it_from_the_initial_model(site, flwr_logs):
    """FedAvg-FC: the classifier is never sent, not even in round 1."""
    flat, node, out = site
    arrays = _global_arrays(skip_layers={"classifier"})
    reply, _ = _train(flat, node, arrays, 1, {"classifier"})
    assert set(reply.content["arrays"]) == set(arrays)
    assert "round 1: no local weights" in flwr_logs.text
    assert not [r for r in flwr_logs.records if r.levelno >= logging.WARNING]
    head = torch.load(out / "local_state.pt", weights_only=True)["state_dict"]
    assert head["classifier.weight"].shape == (7, 512)


def test_no_local_weights_in_a_later_round_is_a_loud_warning(site, flwr_logs):
    flat, node, _ = site
    _train(flat, node, _global_arrays(skip_layers={"classifier"}), 4, {"classifier"})
    warnings = [r.getMessage() for r in flwr_logs.records if r.levelno == logging.WARNING]
    assert any("round 4: no local weights" in w and "output folder was lost" in w
               for w in warnings), warnings


def test_local_weights_lacking_a_personalized_key_are_an_error(site):
    flat, node, out = site
    _train(flat, node, _global_arrays(), 1)
    blob = torch.load(out / "local_state.pt", weights_only=True)
    del blob["state_dict"]["classifier.bias"]
    torch.save(blob, out / "local_state.pt")
    arrays = _global_arrays(skip_layers={"classifier"})
    with pytest.raises(client_app.SiteFailure,
                       match=r"site 'site-a': RuntimeError: .*\['classifier.bias'\] are not in"):
        _train(flat, node, arrays, 2, {"classifier"})


class _TwoNodes:
    def get_node_ids(self):
        return [1, 2]


@pytest.mark.parametrize("name", [n for n in STRATEGY_NAMES if n != "bulyan"])
def test_every_method_trains_two_rounds_with_the_real_client_app(site, name):
    """Server strategy and ClientApp agree on what is sent and returned, for every method:
    two rounds, two sites, no reply dropped. (Bulyan needs at least 3 sites even with
    f = 0; test_robust.py feeds it 7.)"""
    flat, node, out = site
    strategy = build_strategy(name, min_available_nodes=2, min_train_nodes=2,
                              min_train_replies=2, head_layer="classifier")
    contexts = _two_site_contexts(flat, node, out)
    arrays = _global_arrays()
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                 _TwoNodes()))
        replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        assert not any(r.has_error() for r in replies)
        new, metrics = strategy.aggregate_train(server_round, replies)
        assert new is not None, (name, server_round)
        assert set(new) == set(arrays)
        if "num-replies-accepted" in metrics:
            assert metrics["num-replies-accepted"] == 2
        assert strategy.failures["train"] == []
        arrays = new


def test_class_weighted_head_gets_the_site_s_class_counts_through_the_real_client_app(
        site, tmp_path, write_tiny_ham):
    """The strategy asks for class counts; the ClientApp answers with its training images
    per class (only when asked), and the head's rows follow them: a class only site 1
    holds takes site 1's row."""
    flat, node, out = site
    strategy = build_strategy("fedlsc", class_weighted_head=True, min_available_nodes=2,
                              min_train_nodes=2, min_train_replies=2)
    # site 2 holds other classes than site 1 (CLASSES) and some of the same
    other = write_tiny_ham(tmp_path / "data-2", 40, ["df", "vasc", "nv"])
    contexts = _two_site_contexts(flat, node, out, site_2={"data-dir": str(other)})
    messages = list(strategy.configure_train(1, _global_arrays(), ConfigRecord(), _TwoNodes()))
    replies = {m.metadata.dst_node_id: client_app.train(m, contexts[m.metadata.dst_node_id])
               for m in messages}
    counts = {nid: r.content["metrics"]["train-class-counts"] for nid, r in replies.items()}
    assert sum(counts[1]) == len(client_app._site(contexts[1]).loader("train").dataset)
    assert counts[1] != counts[2]
    new, metrics = strategy.aggregate_train(1, list(replies.values()))
    assert metrics["num-replies-accepted"] == 2
    only_1 = [c for c in range(7) if counts[1][c] > 0 and counts[2][c] == 0]
    assert only_1
    sent_1 = replies[1].content["arrays"]["classifier.bias"].numpy()
    np.testing.assert_allclose(new["classifier.bias"].numpy()[only_1], sent_1[only_1])
    plain, _ = _train(flat, node, _global_arrays(), 1)
    assert "train-class-counts" not in plain.content["metrics"]


def test_class_totals_from_the_server_set_what_the_site_draws(site):
    """balance-over=federation: the round's class totals from the server weigh each image
    by 1/total(its class); a round without totals (round 1) balances over the site."""
    from client_app.data import balanced_record_weights

    flat, node, _ = site
    flat = {**flat, "training.balance-over": "federation"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    records = client_app._site(context).loader("train").dataset.records
    totals = [1000, 0, 500, 40, 30, 7, 2]
    for config_totals, expected in ((totals, totals), ([], None)):
        config = ConfigRecord({"server-round": 2, "proximal-mu": 0.0, "personalized-layers": [],
                               "class-totals": config_totals})
        msg = Message(RecordDict({"arrays": _global_arrays(), "config": config}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        assert not client_app.train(msg, context).has_error()
        drawn = client_app._site(context).loader("train").sampler.weights
        torch.testing.assert_close(drawn, balanced_record_weights(records, totals=expected))
    assert not torch.equal(balanced_record_weights(records, totals=totals),
                           balanced_record_weights(records))


def test_local_only_round_one_training_is_the_personalized_model_and_stays_home(site):
    """Local-only hands out the initial model in round 1 with every layer named the site's
    own: the site sends nothing back, and its personalized model of round 1 is the model
    it trained (not the untrained initial one)."""
    from fedlsc_common.storage import read_model_file

    flat, node, out = site
    strategy = build_strategy("local-only", min_available_nodes=2, min_train_nodes=2,
                              min_train_replies=2)
    contexts = _two_site_contexts(flat, node, out)
    initial = _global_arrays()
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), _TwoNodes()))
    assert set(messages[0].content["arrays"]) == set(initial)
    replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
    assert [len(r.content["arrays"]) for r in replies] == [0, 0]
    new, _ = strategy.aggregate_train(1, replies)
    assert strategy.failures["train"] == []
    msg = Message(RecordDict({"arrays": new, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=MessageType.EVALUATE)
    assert not client_app.evaluate(msg, contexts[1]).has_error()
    local = torch.load(out / "site-1" / "local_state.pt", weights_only=True)["state_dict"]
    personal = read_model_file(out / "site-1" / "personalized_model.pt")["state_dict"]
    key = "classifier.weight"
    np.testing.assert_array_equal(np.asarray(personal[key]), local[key].numpy())
    assert not np.allclose(local[key].numpy(), initial[key].numpy())


def test_tensor_granularity_personalized_model_keeps_its_own_running_statistics(site):
    """A personalized norm weight (granularity 'tensor') brings its running statistics
    with it: the site's personalized model must not pair them with the global ones."""
    from flwr.app import MetricRecord  # noqa: F401  (message content types)

    from fedlsc_common.storage import read_model_file
    from fedlsc_flwr.strategy import PersonalizedFedAvg

    flat, node, out = site
    unit = "backbone.bn1.weight"
    strategy = PersonalizedFedAvg([unit], granularity="tensor", min_available_nodes=2,
                                  min_train_nodes=2, min_train_replies=2)
    contexts = _two_site_contexts(flat, node, out)
    arrays = _global_arrays()
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                 _TwoNodes()))
        assert "backbone.bn1.running_mean" not in messages[0].content["arrays"]
        replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2})}),
                  dst_node_id=1, message_type=MessageType.EVALUATE)
    assert not client_app.evaluate(msg, contexts[1]).has_error()
    local = torch.load(out / "site-1" / "local_state.pt", weights_only=True)["state_dict"]
    personal = read_model_file(out / "site-1" / "personalized_model.pt")["state_dict"]
    global_mean = arrays["backbone.bn1.running_mean"].numpy()
    for key in (unit, "backbone.bn1.running_mean", "backbone.bn1.running_var"):
        np.testing.assert_array_equal(np.asarray(personal[key]), local[key].numpy(), err_msg=key)
    assert not np.allclose(local["backbone.bn1.running_mean"].numpy(), global_mean)
    # the unit's bias is shared at tensor granularity: the global value is used
    np.testing.assert_array_equal(np.asarray(personal["backbone.bn1.bias"]),
                                  arrays["backbone.bn1.bias"].numpy())


@pytest.mark.parametrize("unit, expected", [("local-epoch", 1e-4), ("round", 1e-8)])
def test_paper_schedule_does_not_freeze_the_last_rounds(site, unit, expected):
    """The paper's StepLR(10, 0.1): read per local epoch (our default), round 41 still
    trains at 1e-4; read per server round it would train at 1e-8."""
    _, node, _ = site
    flat = to_run_config(compose(["+experiment=paper", "model=small", "dataset.image_size=32",
                                  "training.batch_size=8", "training.max_batches_per_epoch=1",
                                  "training.num_workers=0",
                                  f"training.lr_step_unit={unit}"]))
    reply, _ = _train(flat, node, _global_arrays(), 41)
    assert reply.content["metrics"]["lr"] == pytest.approx(expected)
def test_reply_carries_the_site_s_timing_and_the_log_says_where_time_went(site, flwr_logs):
    flat, node, _ = site
    reply, _ = _train(flat, node, _global_arrays(), 1)
    marks = reply.content.config_records["timing"]
    order = ["handler-start", "data-ready", "model-ready", "train-start", "train-end",
             "state-saved", "reply-ready"]
    assert all(marks[a] <= marks[b] for a, b in zip(order, order[1:])), dict(marks)
    seconds = reply.content["metrics"]["train-seconds"]
    assert marks["train-end"] - marks["train-start"] == pytest.approx(seconds, abs=1e-3)
    assert "site-a round 1 train timing {" in flwr_logs.text


def test_assembled_model_holds_exactly_what_was_sent_and_what_the_site_kept(site):
    """The model is assembled without initialising weights it overwrites; it must hold
    the server's values for shared layers and the site's own for personalized ones, and
    train like a normally built model."""
    from client_app.site import Site

    flat, node, _ = site
    s = Site.for_run(flat, node, run_id=1)
    torch.manual_seed(1)
    received = {k: v.clone() for k, v in build_model("resnet10t_sa", num_classes=7)
                .state_dict().items() if layer_of(k) != "classifier"}
    local = {k: torch.full_like(v, 0.5) for k, v in build_model("resnet10t_sa", num_classes=7)
             .state_dict().items()}
    model = s.assemble(received, {"classifier"}, local, server_round=2)
    state = model.state_dict()
    assert set(state) == set(received) | {"classifier.weight", "classifier.bias"}
    for key, value in received.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert (state["classifier.weight"] == 0.5).all()
    assert all(p.requires_grad for p in model.parameters())
    assert not any(t.is_meta for t in model.state_dict().values())
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert model.classifier.weight.grad is not None


@pytest.mark.parametrize("node_value, env, expected", [
    (None, None, None), (1, None, 1), (None, "2", 2), (3, "1", 3)])
def test_thread_setting_from_node_config_else_environment(node_value, env, expected,
                                                          monkeypatch):
    from client_app.site import NUM_THREADS_ENV, apply_thread_setting, thread_setting

    monkeypatch.delenv(NUM_THREADS_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(NUM_THREADS_ENV, env)
    node = {} if node_value is None else {"num-threads": node_value}
    before = torch.get_num_threads()
    try:
        assert thread_setting(node) == (expected or 0)
        assert apply_thread_setting(node) == (expected or before)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", [-1, "many", 1.5])
def test_bad_thread_setting_names_the_key_and_value(value):
    from client_app.site import thread_setting

    with pytest.raises(ValueError, match=r"node config 'num-threads' = .*: must be a whole"):
        thread_setting({"num-threads": value})
