"""The in-process transport runs the real ServerApp and ClientApp and reports failures as
a SuperNode would."""

from __future__ import annotations

import json

import pytest

from fedlsc_common.settings import compose, to_run_config
from fedlsc_tools.inprocess import run_in_process

pytestmark = pytest.mark.slow
CLASSES = ["nv", "mel", "bkl", "bcc"]


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


def test_two_sites_two_rounds_write_the_results_of_a_run(tmp_path, write_tiny_ham):
    flat = _config(tmp_path, write_tiny_ham(tmp_path / "data", 48, CLASSES))
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_aggregated"] == 2
    rows = [json.loads(line) for line in
            (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites-evaluated"] for r in rows] == [2, 2]
    assert all(r["failures"] == {"train": [], "evaluate": []} for r in rows)
    for site in ("site-0", "site-1"):
        assert (tmp_path / "results" / "sites" / site / "personalized_model.pt").is_file()


def test_a_failing_site_is_an_error_reply_named_in_the_results(tmp_path, write_tiny_ham):
    data = write_tiny_ham(tmp_path / "data", 48, CLASSES)
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
