"""The in-process transport runs the real ServerApp and ClientApp and reports failures as
a SuperNode would."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlsc_common.settings import compose, to_run_config
from fedlsc_common.storage import load_checkpoint, read_model_file
from fedlsc_tools.inprocess import run_in_process

pytestmark = pytest.mark.slow
CLASSES = ["nv", "mel", "bkl", "bcc"]


def _config(tmp_path, data):
    flat = to_run_config(compose([
        "num_server_rounds=2", "evaluate_every=1", "dataset.image_size=32", "training.batch_size=8",
        "training.max_batches_per_epoch=1", "model.backbone=resnet10t_sa",
        "model.pretrained='false'", "partition.num_partitions=2",
        "partition.min_partition_size=5", "min_available_nodes=2", "min_train_nodes=2",
        "min_train_replies=1", "wait_for_sites_seconds=5"]))
    flat["dataset.data-dir"] = str(data)
    flat["results-dir"] = str(tmp_path / "results")
    return flat


def test_two_sites_two_rounds_write_the_results_of_a_run(tmp_path, write_tiny_ham):
    flat = _config(tmp_path, write_tiny_ham(tmp_path / "data", 48, CLASSES))
    flat["calibration.enabled"] = False
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_aggregated"] == 2
    rows = [json.loads(line) for line in
            (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites-evaluated"] for r in rows] == [2, 2]
    assert all(r["failures"] == {"train": [], "evaluate": []} for r in rows)
    for site in ("site-0", "site-1"):
        assert (tmp_path / "results" / "sites" / site / "personalized_model.pt").is_file()
    assert "final-model" not in rows[-1] and summary["final_model"] is None


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


def test_head_calibration_after_the_last_round_is_evaluated_saved_and_reported(
        tmp_path, write_tiny_ham):
    flat = _config(tmp_path, write_tiny_ham(tmp_path / "data", 48, CLASSES))
    flat["calibration.min-class-count"] = 1
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    results = tmp_path / "results"
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]["final-model"]
    calibration = final["calibration"]
    assert "final-model" not in rows[0] and "averaged-rounds" not in final
    assert calibration["sites"] == ["site-0", "site-1"] and calibration["failures"] == []
    assert final["sites-evaluated"] == 2
    # the 7 classes of the model, of which the data has 4: each site's training images
    counts = calibration["class-counts"]
    assert len(counts) == 7 and sum(c > 0 for c in counts) == 4
    held_out = int(np.sum(rows[-1]["confusion"]["global"]["pooled"]))
    assert sum(counts) == 48 - held_out
    assert final["bytes"]["query-sent"] > 0 and final["bytes"]["evaluate-sent"] > 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_model"]["head_calibrated"] is True
    assert summary["final"]["global"] == final["global"]
    assert summary["final_model"]["before"]["global"] == rows[-1]["global"]
    model = read_model_file(results / "global_model.pt")
    trained = load_checkpoint(results / "checkpoint.pt")["arrays"]
    assert model["info"]["head_calibrated"] is True and model["info"]["averaged_rounds"] == []
    changed = [k for k, v in model["state_dict"].items()
               if not np.array_equal(v.numpy(), np.asarray(trained[k]))]
    assert changed == ["classifier.weight", "classifier.bias"]


def test_final_model_averages_the_last_rounds_when_asked(tmp_path, write_tiny_ham):
    flat = _config(tmp_path, write_tiny_ham(tmp_path / "data", 48, CLASSES))
    flat["calibration.enabled"] = False
    flat["average-last-rounds"] = 5  # more than the run's 2 rounds: both are averaged
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    results = tmp_path / "results"
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]["final-model"]
    assert final["averaged-rounds"] == [1, 2] and "calibration" not in final
    assert final["sites-evaluated"] == 2
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_model"]["averaged_rounds"] == [1, 2]
    assert summary["final"]["global"] == final["global"]
    model = read_model_file(results / "global_model.pt")
    assert model["info"]["averaged_rounds"] == [1, 2]
    trained = load_checkpoint(results / "checkpoint.pt")["arrays"]
    assert not np.array_equal(model["state_dict"]["classifier.weight"].numpy(),
                              np.asarray(trained["classifier.weight"]))


def test_head_calibration_is_skipped_when_the_global_model_is_not_scored(
        tmp_path, write_tiny_ham):
    flat = _config(tmp_path, write_tiny_ham(tmp_path / "data", 48, CLASSES))
    flat["strategy.name"] = "fedavg-fc"
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    rows = [json.loads(line) for line in
            (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
    assert "no round trained" in rows[-1]["final-model"]["calibration"]["skipped"]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["final_model"]["head_calibrated"] is False
    assert summary["final_model"]["evaluated"] is False
    assert read_model_file(tmp_path / "results" / "global_model.pt")["info"][
        "head_calibrated"] is False


@pytest.mark.parametrize("failing, applied", [({"site-1"}, True), ({"site-0", "site-1"}, False)])
def test_a_site_failing_the_calibration_query_is_named_and_nothing_is_lost(
        tmp_path, write_tiny_ham, monkeypatch, failing, applied):
    from client_app.site import Site

    real = Site.feature_statistics

    def fails_at_some_sites(self, model, min_count):
        if self.identity.name in failing:
            raise RuntimeError("feature extraction ran out of memory")
        return real(self, model, min_count)

    monkeypatch.setattr(Site, "feature_statistics", fails_at_some_sites)
    flat = _config(tmp_path, write_tiny_ham(tmp_path / "data", 48, CLASSES))
    flat["num-server-rounds"] = 1
    flat["calibration.min-class-count"] = 1
    run_in_process(flat, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    results = tmp_path / "results"
    final = json.loads((results / "metrics.jsonl").read_text())["final-model"]
    calibration = final["calibration"]
    assert sorted(f["site"] for f in calibration["failures"]) == sorted(failing)
    assert all("out of memory" in f["reason"] for f in calibration["failures"])
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_model"]["head_calibrated"] is applied
    assert ("global" in final) is applied
    if not applied:
        assert "no site sent usable" in calibration["skipped"]
    assert summary["rounds"] == 1 and summary["final"]["global"]
    assert read_model_file(results / "global_model.pt")["info"]["head_calibrated"] is applied
