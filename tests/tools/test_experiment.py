"""``fedlsc-experiment``: its help, and a sweep whose jobs fail exits non-zero (no Flower:
``simulate`` is replaced by a stand-in)."""

from __future__ import annotations

import json
import sys

import pytest

import fedlsc_tools.experiment as experiment


def _sweep(monkeypatch, tmp_path, outcome):
    """Run ``fedlsc-experiment -m seed=0,1`` with jobs that exit ``outcome(seed)``."""
    seen = []

    def fake_simulate(project, run_config, *, num_supernodes, log_file):
        results = log_file.parent / "results"
        seed = int(log_file.parent.name.split("seed=")[1])
        seen.append((seed, num_supernodes))
        if outcome(seed) == 0:
            results.mkdir()
            (results / "summary.json").write_text(json.dumps({
                "strategy": "fedlsc", "config": {"partition.name": "dirichlet"},
                "final": {"global": {"accuracy": 0.5}, "personalized": {}}}))
        return outcome(seed)

    monkeypatch.setattr(experiment, "simulate", fake_simulate)
    monkeypatch.setattr(sys, "argv", ["fedlsc-experiment", "-m", "seed=0,1",
                                      f"hydra.sweep.dir={tmp_path}"])
    experiment.main()
    return seen


def test_a_sweep_with_a_failed_job_exits_1_after_running_them_all(monkeypatch, tmp_path,
                                                                   capsys):
    with pytest.raises(SystemExit) as done:
        _sweep(monkeypatch, tmp_path, lambda seed: 1 if seed == 0 else 0)
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert "1 job(s) failed" in err and "seed=0" in err
    assert (tmp_path / "table.md").is_file()  # the finished job is still tabulated


def test_a_sweep_whose_jobs_all_succeed_exits_normally(monkeypatch, tmp_path):
    seen = _sweep(monkeypatch, tmp_path, lambda seed: 0)
    assert sorted(seen) == [(0, 3), (1, 3)]
    assert "| fedlsc | dirichlet | 2 |" in (tmp_path / "table.md").read_text()


def test_help_says_what_it_does(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fedlsc-experiment", "--help"])
    with pytest.raises(SystemExit) as done:
        experiment.main()
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("fedlsc-experiment: Flower simulations")
    assert "fedlsc-experiment -m strategy=fedavg,fedlsc seed=0,1,2" in text
    assert "partition: dirichlet, folder, site" in text and "is powered by Hydra" not in text
