"""The in-process transport runs the real ServerApp and ClientApp and reports failures as
a SuperNode would."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from fedlsc_common.settings import compose, to_run_config
from fedlsc_tools.inprocess import run_in_process

pytestmark = pytest.mark.slow
CLASSES = ["nv", "mel", "bkl", "bcc"]


def _ham(folder, n=48):
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                         "localization", "dataset"])
        for i in range(n):
            writer.writerow([f"HAM_{i:07d}", f"ISIC_{i:07d}", CLASSES[i % 4], "histo", 40,
                             "male", "back", "site-a"])
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                folder / "images" / f"ISIC_{i:07d}.jpg")
    return folder


def _config(tmp_path, data):
    flat = to_run_config(compose([
        "num_server_rounds=2", "dataset.image_size=32", "training.batch_size=8",
        "training.max_batches_per_epoch=1", "model.backbone=resnet10t_sa",
        "model.pretrained='false'", "partition.num_partitions=2",
        "partition.min_partition_size=5", "min_available_nodes=2", "min_train_nodes=2",
        "min_train_replies=1", "wait_for_sites_seconds=5"]))
    flat["dataset.data-dir"] = str(data)
    flat["results-dir"] = str(tmp_path / "results")
    return flat


def test_two_sites_two_rounds_write_the_results_of_a_run(tmp_path):
    flat = _config(tmp_path, _ham(tmp_path / "data"))
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_aggregated"] == 2
    rows = [json.loads(line) for line in
            (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites-evaluated"] for r in rows] == [2, 2]
    assert all(r["failures"] == {"train": [], "evaluate": []} for r in rows)
    for site in ("site-0", "site-1"):
        assert (tmp_path / "results" / "sites" / site / "personalized_model.pt").is_file()


def test_a_failing_site_is_an_error_reply_named_in_the_results(tmp_path):
    data = _ham(tmp_path / "data")
    flat = _config(tmp_path, data)
    nodes = [{"partition-id": 0, "num-partitions": 2},
             {"partition-id": 1, "num-partitions": 2, "site-name": "broken",
              "data-dir": str(tmp_path / "no-such-folder")}]
    run_in_process(flat, nodes)
    rows = [json.loads(line) for line in
            (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
    failed = rows[0]["failures"]["train"]
    assert len(failed) == 1 and "site 'broken'" in failed[0]["reason"]
    assert "no-such-folder" in failed[0]["reason"]
    assert rows[0]["aggregated"] is True  # min-train-replies = 1: the other site counts
