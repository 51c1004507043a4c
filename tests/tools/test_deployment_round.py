"""The deployment-round benchmark's reading and report, on synthetic metrics.jsonl rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "deployment_round.py"
_spec = importlib.util.spec_from_file_location("deployment_round", _PATH)
dr = importlib.util.module_from_spec(_spec)
sys.modules["deployment_round"] = dr  # its dataclasses look their module up there
_spec.loader.exec_module(dr)


def _site(t0, train_seconds, first=True):
    marks = {"process-start": t0 + 1.0, "app-import-start": t0 + 2.0, "imported": t0 + 5.0}
    marks = marks if first else {}
    start = t0 + 6.0
    return {**marks, "handler-start": t0 + 5.0, "data-ready": t0 + 5.5, "model-ready": t0 + 5.8,
            "train-start": start, "train-end": start + train_seconds,
            "state-saved": start + train_seconds + 0.2, "reply-ready": start + train_seconds + 0.3}


def _row(number, t0, trained=(10.0, 20.0), images=(300, 500)):
    sites = {f"site-{i}": {"train": _site(t0, s)} for i, s in enumerate(trained)}
    last_reply = t0 + 6.0 + max(trained) + 0.3
    server = {"round-start": t0, "train-sent": t0 + 0.5, "train-replied": last_reply + 1.0,
              "aggregate-start": last_reply + 1.1, "aggregate-end": last_reply + 1.6,
              "record-start": last_reply + 1.7, "recorded": last_reply + 2.2}
    wall = server["recorded"] - t0
    return {"round": number, "round-seconds": round(wall, 2), "train-seconds-max": max(trained),
            "train-images": sum(images), "train-span-seconds": max(trained),
            "timing": {"server": server, "sites": sites}}


def test_critical_path_follows_the_last_site_and_adds_up_to_the_round(tmp_path):
    row = _row(1, 1000.0)
    steps = dr.critical_path(row)
    assert steps["train: local training"] == pytest.approx(20.0)
    assert steps["train: ServerApp -> SuperNode -> ClientApp started"] == pytest.approx(0.5)
    assert steps["train: the app's imports (torch, timm, ...)"] == pytest.approx(3.0)
    assert steps["train: reply -> SuperNode -> ServerApp"] == pytest.approx(1.0)
    assert steps["aggregation (ServerApp)"] == pytest.approx(0.5)
    assert sum(steps.values()) == pytest.approx(row["round-seconds"])
    assert steps["other"] == pytest.approx(0.2, abs=0.02)  # between the ServerApp steps


def test_report_compares_deployment_and_simulation_and_ends_with_the_overhead(tmp_path):
    deployed, simulated = tmp_path / "d.jsonl", tmp_path / "s.jsonl"
    slow = {**_row(2, 2000.0), "round-seconds": 32.5}  # 4 s more than round 1
    deployed.write_text("".join(json.dumps(r) + "\n" for r in (_row(1, 1000.0), slow)))
    unfinished = {**_row(3, 3000.0), "round-seconds": None}  # killed before it was written
    with deployed.open("a") as f:
        f.write(json.dumps(unfinished) + "\n")
    sim_rows = [_row(r, 100.0 * r, trained=(5.0, 8.0)) for r in (1, 2)]
    simulated.write_text("".join(json.dumps(r) + "\n" for r in sim_rows))
    d, s = dr.read_costs(deployed), dr.read_costs(simulated)
    assert [c.round for c in d] == [1, 2]
    assert d[0].overhead == pytest.approx(d[0].wall - 20.0)
    assert d[0].throughput == pytest.approx(800 / 20.0)
    text = dr.report(d, s)
    # wall = 6 s to the start of training + 20 s + 0.3 s reply + 2.2 s on the ServerApp
    assert "| 1 | 28.5 | 20.0 | 8.5 | 40.0 | 16.5 | 8.0 | 8.5 | 100.0 |" in text
    assert "deployment / simulation training throughput: 0.40" in text
    assert text.splitlines()[-1] == "deployment overhead per round: max 12.5 s, mean 10.5 s"


def test_report_needs_a_deployed_round():
    with pytest.raises(ValueError, match="no deployed round"):
        dr.report([], [])
