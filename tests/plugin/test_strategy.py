"""FedLSC and the personalized baselines, fed mocked Flower replies (no simulation)."""

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
from flwr.serverapp.strategy import FedAvg, FedProx

from fedlsc_flwr import FedLSC, PersonalizedFedAvg, build_strategy
from fedlsc_flwr.similarity import select_personalized
from fedlsc_flwr.strategy import SiteAwareFedAvg, SiteAwareFedProx
from fedlsc_flwr.wire import PERSONALIZED_LAYERS_KEY, PROXIMAL_MU_KEY, array_view

pytestmark = pytest.mark.usefixtures("task_identity")


# ----------------------------------------------------------------------------- fixtures
def small_model_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A state_dict shaped like conv -> bn -> conv -> bn -> linear, with buffers."""
    f32 = np.float32
    return {
        "stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(f32),
        "stem_bn.weight": rng.uniform(0.5, 1.5, size=8).astype(f32),
        "stem_bn.bias": rng.normal(size=8).astype(f32),
        "stem_bn.running_mean": rng.normal(size=8).astype(f32),
        "stem_bn.running_var": rng.uniform(0.5, 2, size=8).astype(f32),
        "stem_bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "block.conv.weight": rng.normal(size=(8, 8, 3, 3)).astype(f32),
        "block.bn.weight": rng.uniform(0.5, 1.5, size=8).astype(f32),
        "block.bn.bias": rng.normal(size=8).astype(f32),
        "block.bn.running_mean": rng.normal(size=8).astype(f32),
        "block.bn.running_var": rng.uniform(0.5, 2, size=8).astype(f32),
        "block.bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "attention.cweight": rng.normal(size=(1, 4, 1, 1)).astype(f32),
        "attention.sweight": rng.normal(size=(1, 4, 1, 1)).astype(f32),
        "classifier.weight": rng.normal(size=(7, 8)).astype(f32),
        "classifier.bias": rng.normal(size=7).astype(f32),
    }


def client_states(global_state, n, rng, shared_direction=0.5):
    """Clients whose updates share a common direction plus their own noise."""
    common = {k: rng.normal(size=v.shape) for k, v in global_state.items()}
    states = []
    for i in range(n):
        state = {}
        for k, v in global_state.items():
            if v.dtype.kind == "i":
                state[k] = v + 10 * (i + 1)
            else:
                noise = rng.normal(size=v.shape) * rng.uniform(0.2, 2.0)
                state[k] = (v + 0.01 * (shared_direction * common[k] + noise)).astype(v.dtype)
        states.append(state)
    return states


def to_record(state) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def reply(node_id: int, state, num_examples: int = 10, **metrics) -> Message:
    instruction = Message(content=RecordDict({}), dst_node_id=node_id,
                          message_type=MessageType.TRAIN)
    content = RecordDict({
        "arrays": to_record(state),
        "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
    })
    return Message(content=content, reply_to=instruction)


class FakeGrid:
    """Just enough of a Grid for configure_train: a fixed set of connected nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def configure(strategy, global_state, round_=1, nodes=(1, 2, 3)):
    return list(strategy.configure_train(round_, to_record(global_state), ConfigRecord(),
                                         FakeGrid(nodes)))


# ---------------------------------------------------------------------------- reference
def reference_fedlsc(global_state, states, temperature, ratio):
    """Eq. 1-6 written out loop by loop: new global state and personalized layer names."""
    layers: dict[str, list[str]] = {}
    for key in global_state:
        layers.setdefault(key.rsplit(".", 1)[0], []).append(key)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n = len(states)
    new, layer_means = {}, {}
    for name, keys in layers.items():
        params = [k for k in keys if not k.endswith(buffers)]
        deltas = [np.concatenate([(s[k].astype(np.float64) - global_state[k]).ravel()
                                  for k in params]) for s in states]
        sims = np.zeros(n)
        for i in range(n):
            for j in range(n):
                if i != j:
                    a, b = deltas[i], deltas[j]
                    sims[i] += a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) / (n - 1)
        weights = np.exp(sims / temperature) / np.exp(sims / temperature).sum()
        layer_means[name] = sims.mean()
        for k in keys:
            if k.endswith("num_batches_tracked"):
                new[k] = max(s[k] for s in states)
            else:
                new[k] = sum(w * s[k].astype(np.float64) for w, s in zip(weights, states))
    threshold = np.quantile(list(layer_means.values()), ratio)
    personalized = {name for name, m in layer_means.items() if m < threshold}
    return new, personalized


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [2, 3, 7])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 2.5])
def test_stage1_matches_reference(n, temperature):
    rng = np.random.default_rng(n * 100 + int(temperature * 100))
    g = small_model_state(rng)
    states = client_states(g, n, rng)
    strategy = FedLSC(temperature=temperature, personalized_ratio=0.3)
    configure(strategy, g, nodes=range(1, n + 1))
    arrays, metrics = strategy.aggregate_train(1, [reply(i + 1, s) for i, s in enumerate(states)])

    expected, personalized = reference_fedlsc(g, states, temperature, 0.3)
    assert set(arrays) == set(g)
    for key, value in expected.items():
        got = arrays[key].numpy()
        assert got.dtype == g[key].dtype, key
        np.testing.assert_allclose(got, value, rtol=2e-5, atol=2e-6, err_msg=key)
    assert strategy.personalized_layers == personalized
    assert personalized, "ratio 0.3 over 7 layers must select some"
    assert metrics["num-replies-accepted"] == n
    assert 0 < metrics["lsc-weight-min"] <= 1 / n <= metrics["lsc-weight-max"] < 1
    report = strategy.last_report
    assert report.node_ids == list(range(1, n + 1))
    assert set(report.layers) == {"stem", "stem_bn", "block.conv", "block.bn",
                                  "attention", "classifier"}


def test_stage1_ranks_only_the_layers_the_sites_trained():
    """A layer every site left unchanged (frozen on the sites, training.frozen-layers) has
    similarity 0 by convention; ranked with the others it would be the least similar and
    take the place of the layer Eq. 6 is after. Stage 1 leaves it out."""
    rng = np.random.default_rng(11)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    for state in states:
        state["stem.weight"] = g["stem.weight"].copy()
    strategy = FedLSC(temperature=0.2, personalized_ratio=0.3)
    configure(strategy, g)
    strategy.aggregate_train(1, [reply(i + 1, s) for i, s in enumerate(states)])

    trained = {k: v for k, v in g.items() if not k.startswith("stem.")}
    _, expected = reference_fedlsc(trained, [{k: s[k] for k in trained} for s in states],
                                   0.2, 0.3)
    assert strategy.personalized_layers == expected
    assert "stem" not in strategy.personalized_layers
    # Counted with its convention 0, the frozen layer would have been picked.
    report = strategy.last_report.layers
    means = {name: float(r.mean_similarity.mean()) for name, r in report.items()}
    assert means["stem"] == 0.0 and min(v for k, v in means.items() if k != "stem") > 0
    assert "stem" in select_personalized(means, 0.3)


def test_local_only_hands_out_the_initial_model_once_and_every_layer_stays_private():
    rng = np.random.default_rng(0)
    g = small_model_state(rng)
    strategy = build_strategy("local-only")
    messages = configure(strategy, g)
    layers = {k.rsplit(".", 1)[0] for k in g}
    # Round 1: the whole initial model goes out, and the sites already keep every layer
    # (so round 1's training is their personalized model from round 1 on).
    assert set(messages[0].content["arrays"]) == set(g)
    assert set(messages[0].content["config"][PERSONALIZED_LAYERS_KEY]) == layers
    assert strategy.personalized_layers == strategy.never_shared == layers
    # Later rounds: nothing goes out, every layer is named private.
    later = configure(strategy, g, round_=2)
    assert set(later[0].content["arrays"]) == set()
    assert set(later[0].content["config"][PERSONALIZED_LAYERS_KEY]) == layers


def test_stage2_sends_and_aggregates_only_shared_layers():
    rng = np.random.default_rng(0)
    g = small_model_state(rng)
    strategy = FedLSC(temperature=0.2, personalized_ratio=0.3)
    configure(strategy, g)
    round1, _ = strategy.aggregate_train(
        1, [reply(i + 1, s) for i, s in enumerate(client_states(g, 3, rng))])
    personalized = strategy.personalized_layers
    assert personalized

    g2 = {k: round1[k].numpy() for k in round1}
    messages = configure(strategy, g2, round_=2)
    sent = set(messages[0].content["arrays"])
    config = messages[0].content["config"]
    private_keys = {k for k in g2 if k.rsplit(".", 1)[0] in personalized}
    assert sent == set(g2) - private_keys
    assert sorted(config[PERSONALIZED_LAYERS_KEY]) == sorted(personalized)
    assert config[PROXIMAL_MU_KEY] == pytest.approx(0.001)
    assert config["server-round"] == 2

    shared_states = [{k: v for k, v in s.items() if k in sent}
                     for s in client_states(g2, 3, rng)]
    arrays, metrics = strategy.aggregate_train(
        2, [reply(i + 1, s) for i, s in enumerate(shared_states)])
    assert set(arrays) == set(g2)
    for key in private_keys:  # kept at their last global value
        np.testing.assert_array_equal(arrays[key].numpy(), g2[key])
    shared_only = {k: v for k, v in g2.items() if k in sent}
    expected, _ = reference_fedlsc(shared_only, shared_states, 0.2, 0.0)
    for key, value in expected.items():
        np.testing.assert_allclose(arrays[key].numpy(), value, rtol=2e-5, atol=2e-6)
    assert strategy.personalized_layers == personalized  # fixed after stage 1
    assert metrics["num-personalized-layers"] == len(personalized)


def test_stage2_reply_carrying_a_personalized_layer_is_dropped(flwr_logs):
    rng = np.random.default_rng(1)
    g = small_model_state(rng)
    strategy = FedLSC(personalized_ratio=0.3)
    configure(strategy, g)
    strategy.aggregate_train(1, [reply(i + 1, s) for i, s in enumerate(client_states(g, 3, rng))])
    configure(strategy, g, round_=2)
    sent = set(strategy._sent_keys)
    states = client_states(g, 3, rng)
    replies = [reply(1, states[0])]  # full state: leaks personalized layers
    replies += [reply(i + 2, {k: v for k, v in s.items() if k in sent})
                for i, s in enumerate(states[1:])]
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and metrics["num-replies-dropped"] == 1
    assert "node 1" in flwr_logs.text and "unexpected keys" in flwr_logs.text


@pytest.mark.parametrize("corrupt, words", [
    (lambda s: s.__setitem__("block.conv.weight", np.full_like(s["block.conv.weight"], np.nan)),
     "block.conv.weight' holds NaN or Inf"),
    (lambda s: s["classifier.bias"].__setitem__(3, np.inf), "classifier.bias' holds NaN or Inf"),
    (lambda s: s.__setitem__("stem.weight", s["stem.weight"][:4]), "stem.weight' has shape"),
    (lambda s: s.pop("stem_bn.bias"), "missing keys ['stem_bn.bias']"),
    (lambda s: s.__setitem__("extra.weight", np.zeros(2, np.float32)), "unexpected keys"),
    (lambda s: s.__setitem__("stem.weight", s["stem.weight"].astype(np.float64)), "float64"),
])
def test_bad_reply_is_dropped_and_named(corrupt, words, flwr_logs):
    rng = np.random.default_rng(2)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    corrupt(states[1])
    strategy = FedLSC(temperature=0.2, personalized_ratio=0.0)
    configure(strategy, g)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(i + 1, s) for i, s in enumerate(states)])
    warnings = [r.getMessage() for r in flwr_logs.records if r.levelno == logging.WARNING]
    assert any("node 2" in w and words in w for w in warnings), warnings
    assert metrics["num-replies-accepted"] == 2 and metrics["num-replies-dropped"] == 1
    expected, _ = reference_fedlsc(g, [states[0], states[2]], 0.2, 0.0)
    np.testing.assert_allclose(arrays["stem.weight"].numpy(), expected["stem.weight"], rtol=2e-5)


def test_error_reply_and_missing_example_count_are_dropped(flwr_logs):
    rng = np.random.default_rng(3)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    strategy = FedLSC()
    configure(strategy, g)
    from flwr.app import Error

    instruction = Message(RecordDict({}), dst_node_id=1, message_type=MessageType.TRAIN)
    failed = Message(Error(code=0, reason="site crashed"), reply_to=instruction)
    replies = [failed, reply(2, states[1], num_examples=0), reply(3, states[2])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-replies-accepted"] == 1
    assert "site crashed" in flwr_logs.text and "num-examples" in flwr_logs.text
    # one client: weight 1, the new global is that client's model
    np.testing.assert_allclose(arrays["stem.weight"].numpy(), states[2]["stem.weight"], rtol=1e-6)


def test_no_valid_reply_keeps_previous_model():
    rng = np.random.default_rng(4)
    g = small_model_state(rng)
    bad = client_states(g, 2, rng)
    for s in bad:
        s["stem.weight"][0, 0, 0, 0] = np.nan
    strategy = FedLSC()
    configure(strategy, g)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, bad[0]), reply(2, bad[1])])
    assert arrays is None  # Flower keeps the previous global model
    assert (metrics["num-replies-accepted"], metrics["num-replies-dropped"]) == (0, 2)
    assert strategy.personalized_layers == frozenset()
    assert strategy.stage1_round is None  # stage 1 is the first round that aggregates


def test_identical_clients_give_uniform_weights_and_their_model():
    rng = np.random.default_rng(5)
    g = small_model_state(rng)
    same = client_states(g, 1, rng)[0]
    strategy = FedLSC(temperature=0.2, personalized_ratio=0.0)
    configure(strategy, g)
    arrays, metrics = strategy.aggregate_train(1, [reply(i, same) for i in (1, 2, 3)])
    assert metrics["lsc-weight-min"] == pytest.approx(1 / 3)
    assert metrics["lsc-weight-max"] == pytest.approx(1 / 3)
    assert metrics["lsc-mean-similarity"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(arrays["block.conv.weight"].numpy(), same["block.conv.weight"],
                               rtol=1e-6)


def test_weights_ignore_example_counts():
    """Eq. 4 weights depend on similarity only, unlike FedAvg."""
    rng = np.random.default_rng(6)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    a, b = FedLSC(personalized_ratio=0.0), FedLSC(personalized_ratio=0.0)
    configure(a, g)
    configure(b, g)
    ra, _ = a.aggregate_train(1, [reply(i + 1, s, 10) for i, s in enumerate(states)])
    rb, _ = b.aggregate_train(1, [reply(i + 1, s, 10 ** i) for i, s in enumerate(states)])
    np.testing.assert_array_equal(ra["stem.weight"].numpy(), rb["stem.weight"].numpy())


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"personalized_ratio": 1.0}, "personalized_ratio"),
    ({"personalized_ratio": -0.01}, "personalized_ratio"),
    ({"proximal_mu": -0.1}, "proximal_mu"),
    ({"granularity": "block"}, "granularity"),
])
def test_invalid_hyper_parameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FedLSC(**kwargs)


def test_fedlsc_is_a_flower_fedavg_with_defaults():
    strategy = FedLSC()
    assert isinstance(strategy, FedAvg)
    assert (strategy.temperature, strategy.personalized_ratio, strategy.proximal_mu) == (
        0.2, 0.01, 0.001)
    assert strategy.personalized_layers == frozenset()


def test_state_dict_round_trip():
    rng = np.random.default_rng(7)
    g = small_model_state(rng)
    strategy = FedLSC(personalized_ratio=0.3)
    configure(strategy, g)
    strategy.aggregate_train(4, [reply(i + 1, s) for i, s in enumerate(client_states(g, 3, rng))])
    restored = FedLSC(personalized_ratio=0.3)
    restored.load_state_dict(strategy.state_dict())
    assert restored.personalized_layers == strategy.personalized_layers
    assert restored.stage1_round == 4
    configure(restored, g, round_=5)  # resumed: stage 1 is not run again
    restored.aggregate_train(5, [reply(i + 1, {k: v for k, v in s.items()
                                               if k in restored._sent_keys})
                                 for i, s in enumerate(client_states(g, 3, rng))])
    assert restored.personalized_layers == strategy.personalized_layers


def test_summary_prints_settings_tree(flwr_logs):
    FedLSC(temperature=2.5, personalized_ratio=0.05).summary()
    text = flwr_logs.text
    assert "Temperature τ: 2.5" in text and "Personalized ratio (Per): 0.05" in text
    assert "Minimum available nodes" in text  # FedAvg's own part follows


def test_array_view_reads_what_flower_serializes():
    for value in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(
            np.arange(6, dtype=np.float16).reshape(2, 3)), np.array(5, dtype=np.int64)):
        view = array_view(Array(value))
        np.testing.assert_array_equal(view, value)
        assert view.dtype == value.dtype


# ------------------------------------------------------------------------------ baselines
def test_fedavg_fc_keeps_head_local_and_averages_the_rest_like_fedavg():
    rng = np.random.default_rng(8)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    fc = build_strategy("fedavg-fc")
    assert isinstance(fc, PersonalizedFedAvg) and fc.personalized_layers == {"classifier"}
    messages = configure(fc, g)
    assert not any(k.startswith("classifier.") for k in messages[0].content["arrays"])
    body = [{k: v for k, v in s.items() if not k.startswith("classifier.")} for s in states]
    counts = [10, 30, 60]
    arrays, _ = fc.aggregate_train(1, [reply(i + 1, s, c) for i, (s, c) in
                                       enumerate(zip(body, counts))])
    flower, _ = FedAvg().aggregate_train(1, [reply(i + 1, s, c) for i, (s, c) in
                                             enumerate(zip(body, counts))])
    for key in body[0]:
        if key.endswith("num_batches_tracked"):
            continue
        np.testing.assert_allclose(arrays[key].numpy(), flower[key].numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(arrays["classifier.weight"].numpy(), g["classifier.weight"])


@pytest.mark.parametrize("name, cls, mu", [
    ("fedavg", SiteAwareFedAvg, None), ("fedprox", SiteAwareFedProx, 0.01),
    ("fedprox-fc", PersonalizedFedAvg, 0.01),
    ("fedavg-fc", PersonalizedFedAvg, 0.0), ("fedlsc", FedLSC, 0.01),
])
def test_build_strategy_by_name(name, cls, mu):
    strategy = build_strategy(name, proximal_mu=0.01)
    assert type(strategy) is cls
    if name in ("fedavg", "fedprox"):  # Flower's own aggregation, not a re-implementation
        flower = FedAvg if name == "fedavg" else FedProx
        assert isinstance(strategy, flower) and "aggregate_train" not in vars(cls)
    if mu is not None:
        assert strategy.proximal_mu == mu


def test_build_strategy_per0_and_unknown_name():
    assert build_strategy("fedlsc-per0", personalized_ratio=0.5).personalized_ratio == 0.0
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'.*fedlsc"):
        build_strategy("fedsgd")


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.array(3, dtype=np.int64),
    np.zeros((0, 5), np.float16), np.asfortranarray(np.ones((4, 3), np.float64)),
    np.arange(7, dtype=">f4"),
])
def test_array_from_numpy_is_what_flower_reads(value):
    from fedlsc_flwr.wire import array_from_numpy

    ours = array_from_numpy(value)
    np.testing.assert_array_equal(ours.numpy(), value)  # Flower's own reader
    assert ours.numpy().dtype == value.dtype
    assert (ours.dtype, ours.shape) == (Array(value).dtype, Array(value).shape)
    np.testing.assert_array_equal(array_view(ours), value)


def test_update_far_larger_than_the_median_is_dropped(flwr_logs):
    rng = np.random.default_rng(9)
    g = small_model_state(rng)
    states = client_states(g, 4, rng)
    for key, value in states[3].items():  # node 4 sends an update ~100x the others
        if value.dtype == np.float32 and not key.endswith(("running_mean", "running_var")):
            states[3][key] = g[key] + 100 * (value - g[key])
    strategy = FedLSC(personalized_ratio=0.0, max_update_norm_ratio=10.0)
    configure(strategy, g, nodes=(1, 2, 3, 4))
    arrays, metrics = strategy.aggregate_train(1, [reply(i + 1, s) for i, s in enumerate(states)])
    assert metrics["num-replies-accepted"] == 3 and metrics["num-replies-dropped"] == 1
    warning = next(r.getMessage() for r in flwr_logs.records if r.levelno == logging.WARNING)
    assert "node 4" in warning and "x the median (limit 10 x)" in warning
    expected, _ = reference_fedlsc(g, states[:3], 0.2, 0.0)
    np.testing.assert_allclose(arrays["stem.weight"].numpy(), expected["stem.weight"], rtol=2e-5)

    off = FedLSC(personalized_ratio=0.0)  # 0 = no norm filter (the default)
    configure(off, g, nodes=(1, 2, 3, 4))
    _, kept = off.aggregate_train(1, [reply(i + 1, s) for i, s in enumerate(states)])
    assert kept["num-replies-accepted"] == 4
    with pytest.raises(ValueError, match="max_update_norm_ratio"):
        FedLSC(max_update_norm_ratio=-1.0)


def test_float16_deltas_halve_the_upload_and_aggregate_like_float32():
    from fedlsc_flwr.wire import message_bytes

    rng = np.random.default_rng(10)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    full = FedLSC(personalized_ratio=0.0)
    half = FedLSC(personalized_ratio=0.0, update_dtype="float16")
    configure(full, g)
    messages = configure(half, g)
    assert messages[0].content["config"]["update-dtype"] == "float16"
    deltas = [{k: (v - g[k]).astype(np.float16) if v.dtype.kind == "f" else v
               for k, v in s.items()} for s in states]
    replies32 = [reply(i + 1, s) for i, s in enumerate(states)]
    replies16 = [reply(i + 1, d) for i, d in enumerate(deltas)]
    ratio = sum(map(message_bytes, replies16)) / sum(map(message_bytes, replies32))
    assert ratio < 0.7  # headers (~128 B per tensor) weigh a lot on this tiny model
    big = [len(r.content["arrays"]["block.conv.weight"].data) for r in (replies16[0], replies32[0])]
    assert 0.5 <= big[0] / big[1] < 0.55
    a32, _ = full.aggregate_train(1, replies32)
    a16, _ = half.aggregate_train(1, replies16)
    for key, value in g.items():
        got = a16[key].numpy()
        assert got.dtype == value.dtype
        if value.dtype.kind == "f":
            step = np.abs(a32[key].numpy() - value).max()
            assert np.abs(got - a32[key].numpy()).max() <= 2e-3 * step + 1e-7, key
    # a float32 reply where float16 deltas are expected is dropped, not misread
    _, metrics = half.aggregate_train(1, [replies32[0], *replies16[1:]])
    assert metrics["num-replies-dropped"] == 1


def test_float16_needs_a_strategy_of_this_project():
    with pytest.raises(ValueError, match="update_dtype 'float16' needs"):
        build_strategy("fedavg", update_dtype="float16")
    with pytest.raises(ValueError, match="update_dtype"):
        FedLSC(update_dtype="bfloat16")


def test_scaled_float16_deltas_keep_tiny_updates():
    """Updates of |Δ| ≈ 1e-6 (late rounds, small lr): float16 replies with the site's
    power-of-two scales aggregate like float32 ones; without the scales they would not."""
    from fedlsc_flwr.wire import UPDATE_SCALE_KEY, encode_update

    rng = np.random.default_rng(11)
    g = small_model_state(rng)
    states = [{k: (v + 1e-6 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f"
               else v for k, v in g.items()} for _ in range(3)]
    full = FedLSC(personalized_ratio=0.0)
    half = FedLSC(personalized_ratio=0.0, update_dtype="float16")
    configure(full, g)
    configure(half, g)
    replies16 = []
    for i, s in enumerate(states):
        encoded = {k: encode_update(v, g[k], "float16") for k, v in s.items()}
        message = reply(i + 1, {k: value for k, (value, _) in encoded.items()})
        message.content[UPDATE_SCALE_KEY] = ConfigRecord({k: e for k, (_, e) in encoded.items()})
        replies16.append(message)
    a32, _ = full.aggregate_train(1, [reply(i + 1, s) for i, s in enumerate(states)])
    a16, _ = half.aggregate_train(1, replies16)
    for key, value in g.items():
        if value.dtype.kind == "f":
            step = a32[key].numpy().astype(np.float64) - value
            got = a16[key].numpy().astype(np.float64) - value
            assert np.linalg.norm(got - step) <= 0.01 * np.linalg.norm(step) + 1e-7, key



@pytest.mark.parametrize("n", [3, 7])
def test_fedlsc_measures_update_norms_only_for_the_layers_it_streams(n, monkeypatch):
    """The reply check measures ||Δw||² (one more subtraction per value) only for the
    layers the aggregation streams, which take their norms from it; streamed or whole,
    the result is Eq. 1-5 (the loop-by-loop reference)."""
    from fedlsc_flwr import similarity

    rng = np.random.default_rng(n)
    g = small_model_state(rng)
    states = client_states(g, n, rng)
    replies = [reply(i + 1, s) for i, s in enumerate(states)]
    expected, _ = reference_fedlsc(g, states, 0.2, 0.0)
    results = {}
    default = similarity.MATRIX_ELEMENTS
    for matrix_elements in (default, 10):  # whole matrices; streamed
        monkeypatch.setattr(similarity, "MATRIX_ELEMENTS", matrix_elements)
        monkeypatch.setattr(similarity, "FEW_CLIENTS", 0)
        monkeypatch.setattr(similarity, "BLOCK_ELEMENTS", 16)
        monkeypatch.setattr(similarity, "MIN_BLOCK_COLUMNS", 5)
        strategy = FedLSC(temperature=0.2, personalized_ratio=0.0)
        configure(strategy, g, nodes=range(1, n + 1))
        results[matrix_elements] = strategy._measured_keys(n)
        arrays, _ = strategy.aggregate_train(1, replies)
        for key, value in expected.items():
            np.testing.assert_allclose(arrays[key].numpy(), value, rtol=2e-5, atol=2e-6,
                                       err_msg=f"{key} (MATRIX_ELEMENTS={matrix_elements})")
    assert results[default] == frozenset()
    assert {"stem.weight", "block.conv.weight"} <= results[10]
    assert "stem_bn.running_mean" not in results[10]  # buffers are never compared


# ------------------------------------------------------------------ class-weighted head
@pytest.mark.parametrize("name", ["fedlsc", "fedavg-fc", "fedprox-fc"])
def test_class_weighted_head_rows_follow_the_sites_class_counts(name, flwr_logs):
    # Site 1 holds only class 0, site 2 class 0 and 1, site 3 nothing of classes 0-1 and
    # all of 2-5; class 6 nobody: its row keeps the strategy's usual aggregate.
    rng = np.random.default_rng(21)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    counts = [[30, 0, 0, 0, 0, 0, 0], [10, 5, 0, 0, 0, 0, 0], [0, 0, 4, 4, 4, 4, 0]]
    plain = build_strategy(name)
    weighted = build_strategy(name, class_weighted_head=True)
    asked = configure(weighted, g)
    assert all(m.content["config"]["report-class-counts"] for m in asked)
    assert "report-class-counts" not in configure(plain, g)[0].content["config"]
    sent = set(weighted._sent_keys)  # the -FC baselines do not send the head
    replies = [reply(i + 1, {k: v for k, v in s.items() if k in sent}, 10 * (i + 1),
                     **{"train-class-counts": c}) for i, (s, c) in enumerate(zip(states, counts))]
    usual, _ = plain.aggregate_train(1, replies)
    arrays, metrics = weighted.aggregate_train(1, replies)
    assert metrics["num-replies-dropped"] == 0 and "train-class-counts" not in metrics
    for key in ("classifier.weight", "classifier.bias"):
        got, base = arrays[key].numpy(), usual[key].numpy()
        if name != "fedlsc":  # the -FC baselines keep the head on the sites: untouched
            np.testing.assert_array_equal(got, g[key])
            continue
        np.testing.assert_allclose(got[0], 0.75 * states[0][key][0] + 0.25 * states[1][key][0],
                                   rtol=1e-6)
        np.testing.assert_allclose(got[1], states[1][key][1], rtol=1e-6)
        for c in range(2, 6):
            np.testing.assert_allclose(got[c], states[2][key][c], rtol=1e-6)
        np.testing.assert_array_equal(got[6], base[6])
        assert not np.allclose(got[0], base[0])
    for key in ("stem.weight", "block.bn.running_mean"):  # the other layers as without it
        np.testing.assert_array_equal(arrays[key].numpy(), usual[key].numpy())


@pytest.mark.parametrize("counts, words", [
    (None, "got None"), ([1, 2, 3], "must list 7 training-image counts"),
    ([1, 2, 3, 4, 5, 6, -1], "got [1, 2, 3, 4, 5, 6, -1]"),
])
def test_class_weighted_head_drops_a_reply_without_usable_counts(counts, words, flwr_logs):
    rng = np.random.default_rng(22)
    g = small_model_state(rng)
    strategy = build_strategy("fedlsc", class_weighted_head=True)
    configure(strategy, g)
    states = client_states(g, 3, rng)
    good = [1, 1, 1, 1, 1, 1, 1]
    bad = {} if counts is None else {"train-class-counts": counts}
    replies = [reply(1, states[0], **bad)] + [
        reply(i + 2, s, **{"train-class-counts": good}) for i, s in enumerate(states[1:])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-replies-dropped"] == 1
    assert "node 1" in flwr_logs.text and words in flwr_logs.text


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "krum"])
@pytest.mark.parametrize("option", ["class_weighted_head", "share_class_totals"])
def test_class_counts_need_a_strategy_of_this_project(name, option):
    with pytest.raises(ValueError, match=f"{option} needs one of this project's "
                                         f"strategies, not '{name}'"):
        build_strategy(name, **{option: True})


def test_share_class_totals_sends_the_sum_of_the_sites_last_counts():
    rng = np.random.default_rng(23)
    g = small_model_state(rng)
    strategy = build_strategy("fedlsc", share_class_totals=True)
    first = configure(strategy, g)
    assert first[0].content["config"]["report-class-counts"]
    assert "class-totals" not in first[0].content["config"]  # round 1: nothing known yet
    counts = [[3, 0, 1, 0, 0, 9, 0], [0, 5, 0, 0, 2, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    states = client_states(g, 3, rng)
    strategy.aggregate_train(1, [reply(i + 1, s, **{"train-class-counts": c})
                                 for i, (s, c) in enumerate(zip(states, counts))])
    second = configure(strategy, g, round_=2)
    assert list(second[0].content["config"]["class-totals"]) == [4, 6, 2, 1, 3, 11, 1]
    # A site missing from a round keeps its last report in the totals; a new report
    # replaces the old one.
    sent = set(strategy._sent_keys)
    states = client_states(g, 2, rng)
    strategy.aggregate_train(2, [reply(i + 1, {k: v for k, v in s.items() if k in sent},
                                       **{"train-class-counts": c})
                                 for i, (s, c) in enumerate(zip(states, [[0] * 6 + [5]] * 2))])
    assert strategy.class_totals() == [1, 1, 1, 1, 1, 1, 11]
    resumed = build_strategy("fedlsc", share_class_totals=True)
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.class_totals() == strategy.class_totals()
    without = build_strategy("fedlsc")
    assert "report-class-counts" not in configure(without, g)[0].content["config"]


def test_share_class_totals_drops_a_first_round_reply_whose_count_list_differs(flwr_logs):
    # Round 1 with totals only: no head rows and no earlier report fix the number of
    # classes, so the round's first list does; a reply with another length is dropped
    # instead of breaking the metrics' element-wise average.
    rng = np.random.default_rng(24)
    g = small_model_state(rng)
    strategy = build_strategy("fedlsc", share_class_totals=True)
    configure(strategy, g)
    states = client_states(g, 3, rng)
    lists = [[1, 2, 3], [4, 5, 6], [7, 8]]
    arrays, metrics = strategy.aggregate_train(1, [
        reply(i + 1, s, **{"train-class-counts": c}) for i, (s, c) in
        enumerate(zip(states, lists))])
    assert arrays is not None and metrics["num-replies-dropped"] == 1
    assert "node 3" in flwr_logs.text and "must list 3 training-image counts" in flwr_logs.text
    assert strategy.class_totals() == [5, 7, 9]


# ------------------------------------------------------------------ server learning rate
@pytest.mark.parametrize("name", ["fedlsc", "fedavg-fc"])
def test_server_learning_rate_scales_the_step_of_the_parameters_only(name):
    """η = 2: every shared parameter moves twice as far from the global model as the
    aggregate; running statistics, counters and layers kept on the sites as with η = 1."""
    rng = np.random.default_rng(31)
    g = small_model_state(rng)
    states = client_states(g, 3, rng)
    results = {}
    for eta in (1.0, 2.0):
        strategy = build_strategy(name, server_learning_rate=eta)
        configure(strategy, g)
        sent = set(strategy._sent_keys)
        replies = [reply(i + 1, {k: v for k, v in s.items() if k in sent}, 10 * (i + 1))
                   for i, s in enumerate(states)]
        arrays, _ = strategy.aggregate_train(1, replies)
        results[eta] = {k: arrays[k].numpy() for k in arrays}
    personalized = build_strategy(name).personalized_layers
    for key, plain in results[1.0].items():
        moved = results[2.0][key]
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")) or \
                key.rsplit(".", 1)[0] in personalized:
            np.testing.assert_array_equal(moved, plain, err_msg=key)
        else:
            np.testing.assert_allclose(moved - g[key], 2 * (plain - g[key]), rtol=1e-4,
                                       atol=1e-6, err_msg=key)
            assert moved.dtype == g[key].dtype
            assert not np.allclose(moved, plain), key


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan")])
def test_server_learning_rate_must_be_positive(eta):
    from fedlsc_flwr.strategy import HyperParameterError

    with pytest.raises(HyperParameterError, match="server_learning_rate"):
        build_strategy("fedlsc", server_learning_rate=eta)
    with pytest.raises(HyperParameterError, match="server_learning_rate") as refused:
        build_strategy("fedavg", server_learning_rate=2.0)
    assert refused.value.requirement.startswith("1 with Flower's own")
