"""The ServerApp's record of FedLSC's site-agreement report and of a simulated bad site."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedlsc_flwr.similarity import LayerReport
from fedlsc_flwr.strategy import RoundReport, SiteAwareFedAvg
from server_app.recorder import MeteredGrid, RecordedStrategy, RunRecorder

pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


class _Reporting(SiteAwareFedAvg):
    """Aggregates nothing; leaves a FedLSC-like report whose site 'c' is below in rounds
    2 and 3 and flagged in round 3."""

    def aggregate_train(self, server_round, replies):
        below = server_round >= 2
        layers = {"conv": LayerReport(np.array([0.3, 0.2, -0.2 if below else 0.25]),
                                      np.full(3, 1 / 3))}
        agreement = {"round": server_round, "threshold": 0.1, "flagged":
                     ["c"] if server_round == 3 else [],
                     "sites": {n: {"node": i + 1, "agreement": float(a), "least-share": 0.0,
                                   "below": n == "c" and below, "streak": 0}
                               for i, (n, a) in enumerate(zip("abc", layers["conv"]
                                                              .mean_similarity))}}
        self.last_report = RoundReport(server_round, [1, 2, 3], layers, [], agreement)
        return ArrayRecord({"w": Array(np.zeros(3, np.float32))}), None


def test_rows_plot_and_summary_carry_the_report_and_the_bad_site(tmp_path):
    strategy = RecordedStrategy(_Reporting())
    attack = {"kind": "poison", "partition_id": 2, "fraction": 0.5, "scale": 10.0,
              "description": "poison at partition 2"}
    recorder = RunRecorder(tmp_path, strategy=strategy, grid=MeteredGrid(_Grid()),
                           run_config={}, strategy_name="fedlsc", round_offset=0,
                           model_info={"backbone": "resnet10t_sa", "image_size": 32,
                                       "mean": [0.5] * 3, "std": [0.5] * 3},
                           class_names=["a", "b"], targets=[0.5], simulated_attack=attack)
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    for server_round in (1, 2, 3):
        strategy.aggregate_train(server_round, [])
        recorder(server_round, arrays)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["agreement"]["sites"]["c"]["below"] for r in rows] == [False, True, True]
    assert rows[2]["agreement"]["flagged"] == ["c"] and rows[2]["agreement"]["round"] == 3
    assert (tmp_path / "agreement.png").stat().st_size > 1000
    summary = recorder.finish()
    assert summary["flagged_sites"] == {"c": 3}
    assert summary["attack"] == attack
    assert json.loads((tmp_path / "summary.json").read_text())["attack"]["kind"] == "poison"


def test_strategies_without_similarities_record_no_agreement(tmp_path):
    class _Plain(SiteAwareFedAvg):
        def aggregate_train(self, server_round, replies):
            return ArrayRecord({"w": Array(np.zeros(3, np.float32))}), None

    strategy = RecordedStrategy(_Plain())
    recorder = RunRecorder(tmp_path, strategy=strategy, grid=MeteredGrid(_Grid()),
                           run_config={}, strategy_name="fedavg", round_offset=0,
                           model_info={"backbone": "resnet10t_sa", "image_size": 32,
                                       "mean": [0.5] * 3, "std": [0.5] * 3},
                           class_names=["a", "b"], targets=[0.5])
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    strategy.aggregate_train(1, [])
    recorder(1, arrays)
    assert recorder.rows[0]["agreement"] is None
    assert not (tmp_path / "agreement.png").exists()
    summary = recorder.finish()
    assert summary["attack"] is None and summary["flagged_sites"] == {}
