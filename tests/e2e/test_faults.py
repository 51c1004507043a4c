"""Bad configuration and bad site data fail early, with one line that says what to change."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from PIL import Image

from client_app.data import DataError
from fedlsc_common.settings import ConfigError, Settings, compose, resolve_data_dir, to_run_config
from server_app.app import wait_for_sites


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(self.n))


def test_too_few_sites_fails_with_what_to_change():
    with pytest.raises(ConfigError, match=r"only 2 site\(s\) connected .* min-available-nodes = 3"
                                          r".*num-supernodes >= 3"):
        wait_for_sites(_Grid(2), 3, timeout_s=0)
    wait_for_sites(_Grid(3), 3, timeout_s=0)  # enough: returns


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.data-dir = '.*nowhere': no such folder"):
        resolve_data_dir(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("key, value, words", [
    ("model.backbone", "vgg16", "'model.backbone' = 'vgg16': must be one of"),
    ("strategy.name", "fedsgd", "'strategy.name' = 'fedsgd'"),
    ("strategy.temperature", -1.0, "'strategy.temperature' = -1.0"),
    ("strategy.personalized-ratio", 1.5, "'strategy.personalized-ratio' = 1.5"),
    ("min-train-replies", 4, "'min-train-replies' = 4: must be between 1 and min-train-nodes (3)"),
    ("min-train-replies", 0, "'min-train-replies' = 0: must be between 1"),
    ("round-timeout", 0, "'round-timeout' = 0: must be at least 1 (seconds)"),
])
def test_bad_settings_fail_at_start_up(key, value, words):
    flat = to_run_config(compose())
    flat[key] = value
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_run_config(flat)


def _site_folder(root, rows):
    (root / "images").mkdir(parents=True)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                         "localization", "dataset"])
        for i, (dx, good) in enumerate(rows):
            image_id = f"ISIC_{i:07d}"
            writer.writerow([f"HAM_{i:07d}", image_id, dx, "histo", 50, "male", "back", "site"])
            path = root / "images" / f"{image_id}.jpg"
            if good:
                Image.fromarray(np.full((20, 20, 3), 100 + i, np.uint8)).save(path)
            else:
                path.write_bytes(b"not a jpeg")


@pytest.mark.usefixtures("task_identity")
def test_bad_site_data_raises_a_clear_error_in_the_client_app(tmp_path):
    """The ClientApp raises; Flower turns that into an error reply (the strategy drops it
    and the round goes on: see test_strategy) and the SuperNode's log shows the reason."""
    from client_app import app as client_app

    folder = tmp_path / "site-a"
    _site_folder(folder, [("nv", True), ("mel", True), ("bkl", False), ("nv", True)])
    flat = to_run_config(compose(["model=small", "dataset.image_size=16",
                                          "training.max_batches_per_epoch=1"]))
    context = Context(run_id=1, node_id=1, node_config={
        "partition-id": 0, "num-partitions": 1, "site-name": "site-a",
        "data-dir": str(folder), "output-dir": str(tmp_path / "out")},
        state=RecordDict(), run_config=flat)
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(
        {"server-round": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(client_app.SiteFailure,
                       match=r"^site 'site-a': DataError: .*ISIC_0000002") as raised:
        client_app.train(msg, context)
    assert isinstance(raised.value.__cause__, DataError)  # the traceback keeps the cause
