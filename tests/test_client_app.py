"""The ClientApp called in-process with real Flower messages on a small generated site."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from PIL import Image

from fedlsc_flwr import client_app
from fedlsc_flwr.config import compose, to_run_config
from fedlsc_flwr.model import build_model
from fedlsc_flwr.similarity import layer_of
from fedlsc_flwr.strategy import array_from_numpy

pytestmark = pytest.mark.usefixtures("task_identity")
CLASSES = ["nv", "mel", "bkl", "bcc"]


@pytest.fixture
def site(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                         "localization", "dataset"])
        for i in range(40):
            writer.writerow([f"HAM_{i:07d}", f"ISIC_{i:07d}", CLASSES[i % 4], "histo", 40,
                             "male", "back", "site-a"])
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                folder / "images" / f"ISIC_{i:07d}.jpg")
    flat = to_run_config(compose(["dataset.image_size=32", "training.batch_size=8",
                                  "training.max_batches_per_epoch=2"]))
    node = {"partition-id": 0, "num-partitions": 1, "site-name": "site-a",
            "data-dir": str(folder), "output-dir": str(tmp_path / "out")}
    return flat, node, tmp_path / "out"


def _global_arrays(skip_layers=()):
    torch.manual_seed(0)
    state = build_model("resnet10t_sa", num_classes=7).state_dict()
    return ArrayRecord({k: array_from_numpy(v.numpy()) for k, v in state.items()
                        if layer_of(k) not in skip_layers})


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


def test_missing_personalized_weights_are_an_error_not_a_silent_reset(site):
    flat, node, _ = site
    arrays = _global_arrays(skip_layers={"classifier"})
    with pytest.raises(RuntimeError, match=r"personalized weights for \['classifier.weight'"):
        _train(flat, node, arrays, 2, {"classifier"})
