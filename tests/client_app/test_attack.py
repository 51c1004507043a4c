"""Simulated bad sites: each kind changes exactly what it says, on the named site only,
and nothing when it is off. Two generated sites split as ``partition=site``."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app import app as client_app
from client_app.attack import label_permutation, poison_update, shuffle_labels
from client_app.data import Record
from client_app.site import Site
from fedlsc_common.settings import ConfigError, Settings, compose, to_run_config
from fedlsc_flwr.model import build_model
from fedlsc_flwr.similarity import is_buffer
from fedlsc_flwr.wire import array_from_numpy

pytestmark = pytest.mark.usefixtures("task_identity")
CLASSES = ["nv", "mel", "bkl", "bcc", "akiec", "df", "vasc"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, write_tiny_ham):
    """Two contributing sites of 60 images each, all 7 classes at both."""
    return write_tiny_ham(tmp_path_factory.mktemp("attack") / "data", 120, CLASSES,
                          lambda i: "site-a" if i < 60 else "site-b")


def _run_config(data_dir, *attack):
    return to_run_config(compose([
        "model=small", "partition=site", "partition.num_partitions=2", "min_available_nodes=2",
        "min_train_nodes=2", f"dataset.data_dir={data_dir}", "dataset.image_size=32",
        "dataset.cache=false", "training.batch_size=8", "training.max_batches_per_epoch=2",
        *attack]))


def _site(run_config, pid, tmp_path) -> Site:
    node = {"partition-id": pid, "num-partitions": 2, "site-name": f"site-{pid}"}
    settings_dir = {**run_config, "site-output-dir": str(tmp_path / "out")}
    return Site.for_run(settings_dir, node, run_id=1)


def _labels(site: Site, split: str) -> list[int]:
    return [r.label for r in site.loader(split).dataset.records]


# -------------------------------------------------------------------- pure functions
def _records(labels):
    return [Record(f"/x/{i}.jpg", f"img{i}", f"les{i}", label, "s") for i, label in
            enumerate(labels)]


def test_shuffle_labels_touches_exactly_the_fraction_and_keeps_the_counts():
    records = _records([i % 7 for i in range(200)])
    noisy = shuffle_labels(records, 0.3, seed=4)
    assert [r.image_id for r in noisy] == [r.image_id for r in records]
    assert Counter(r.label for r in noisy) == Counter(r.label for r in records)
    changed = sum(a.label != b.label for a, b in zip(records, noisy))
    assert 40 <= changed <= 60  # 60 drawn; an image may draw its own class back
    assert noisy == shuffle_labels(records, 0.3, seed=4)  # seeded
    with pytest.raises(ValueError, match="fraction"):
        shuffle_labels(records, 0.0, seed=4)


def test_label_permutation_moves_every_class():
    for seed in range(20):
        perm = label_permutation(7, seed)
        assert sorted(perm) == list(range(7)) and all(p != c for c, p in enumerate(perm))


def test_poison_negates_and_scales_parameters_only():
    g = {"conv.weight": torch.ones(2, 2), "bn.running_var": torch.ones(2),
         "bn.num_batches_tracked": torch.tensor(3)}
    w = {"conv.weight": torch.full((2, 2), 1.5), "bn.running_var": torch.full((2,), 2.0),
         "bn.num_batches_tracked": torch.tensor(5), "private.weight": torch.zeros(1)}
    out = poison_update(w, g, scale=4.0)
    assert set(out) == set(g)  # only what the server sent
    torch.testing.assert_close(out["conv.weight"], torch.full((2, 2), 1 - 4 * 0.5))
    torch.testing.assert_close(out["bn.running_var"], w["bn.running_var"])
    assert int(out["bn.num_batches_tracked"]) == 5


# ------------------------------------------------------------------- through the site
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_label_noise_shuffles_that_fraction_at_the_named_site_only(data_dir, tmp_path,
                                                                   fraction):
    clean = _run_config(data_dir)
    noisy = _run_config(data_dir, "attack=label-noise", "attack.site=1",
                        f"attack.fraction={fraction}")
    for pid in (0, 1):
        before, after = _site(clean, pid, tmp_path), _site(noisy, pid, tmp_path)
        assert _labels(after, "test") == _labels(before, "test")  # held-out stays clean
        b, a = _labels(before, "train"), _labels(after, "train")
        if pid == 0:
            assert a == b
            continue
        assert Counter(a) == Counter(b)
        changed = sum(x != y for x, y in zip(a, b))
        drawn = round(fraction * len(b))
        assert drawn * 0.5 <= changed <= drawn, (changed, drawn, len(b))


def test_label_permutation_applies_the_map_at_the_named_site_only(data_dir, tmp_path):
    clean = _run_config(data_dir, "seed=3")
    wrong = _run_config(data_dir, "attack=label-permutation", "attack.site=0", "seed=3")
    perm = label_permutation(7, seed=3)
    b0, a0 = _site(clean, 0, tmp_path), _site(wrong, 0, tmp_path)
    assert _labels(a0, "train") == [perm[y] for y in _labels(b0, "train")]
    assert _labels(a0, "test") == _labels(b0, "test")
    assert _labels(_site(wrong, 1, tmp_path), "train") == _labels(_site(clean, 1, tmp_path),
                                                                  "train")


def test_a_site_reading_its_own_folder_never_applies_an_attack(data_dir, tmp_path):
    run_config = _run_config(data_dir, "attack=label-permutation", "attack.site=0")
    node = {"partition-id": 0, "num-partitions": 2, "data-dir": str(data_dir),
            "output-dir": str(tmp_path / "own")}
    assert Site.for_run(run_config, node, run_id=1).attack_kind() == "none"


def _train_reply(run_config, pid, tmp_path, arrays):
    node = {"partition-id": pid, "num-partitions": 2, "site-name": f"site-{pid}",
            "output-dir": str(tmp_path / f"out-{pid}")}
    context = Context(run_id=1, node_id=pid + 1, node_config=node, state=RecordDict(),
                      run_config=run_config)
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "proximal-mu": 0.0})}), dst_node_id=pid + 1,
        message_type=MessageType.TRAIN)
    return {k: v.numpy() for k, v in client_app.train(msg, context).content["arrays"].items()}


def test_poison_replies_the_negated_scaled_update_of_the_named_site_only(data_dir, tmp_path):
    torch.manual_seed(0)
    state = build_model("resnet10t_sa", num_classes=7).state_dict()
    arrays = ArrayRecord({k: array_from_numpy(v.numpy()) for k, v in state.items()})
    g = {k: v.numpy() for k, v in state.items()}
    clean = _run_config(data_dir)
    poisoned = _run_config(data_dir, "attack=poison", "attack.site=1", "attack.scale=3")
    honest = _train_reply(clean, 1, tmp_path / "a", arrays)
    bad = _train_reply(poisoned, 1, tmp_path / "b", arrays)
    params = [k for k in g if g[k].dtype.kind == "f" and not is_buffer(k)]
    assert len(params) > 20
    for key in g:
        if key in params:
            np.testing.assert_allclose(bad[key], g[key] - 3 * (honest[key] - g[key]),
                                       rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(bad[key], honest[key], err_msg=key)
    assert any(np.abs(honest[k] - g[k]).max() > 1e-4 for k in params)  # it did train
    # site 0 of the poisoned run is honest
    other = _train_reply(poisoned, 0, tmp_path / "c", arrays)
    same = _train_reply(clean, 0, tmp_path / "d", arrays)
    for key in g:
        np.testing.assert_array_equal(other[key], same[key], err_msg=key)


def test_off_by_default_and_bad_settings_name_the_key(data_dir):
    settings = Settings.from_run_config(_run_config(data_dir))
    assert settings.attack.kind == "none" and not settings.attack.active
    for override, key in (("attack.kind=flip", "attack.kind"),
                          ("attack.site=2", "attack.site"),
                          ("attack.fraction=1.5", "attack.fraction"),
                          ("attack.scale=0", "attack.scale")):
        kind = "poison" if "scale" in override else "label-noise"
        with pytest.raises(ConfigError, match=f"'{key}'"):
            Settings.from_run_config(_run_config(data_dir, f"attack={kind}", override))
