"""The paper-table driver's statistics, table and plot helpers, on synthetic result files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedlsc_common.settings import Settings

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_table.py"
_spec = importlib.util.spec_from_file_location("paper_table", _PATH)
pt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pt)


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764),
                                          (10, 2.2281), (30, 2.0423)])
def test_paired_ci_half_width_is_the_tabled_t_quantile(df, expected):
    # n = df + 1 differences with sample sd exactly 1: half width = t(0.975, df) / sqrt(n)
    n = df + 1
    diffs = np.random.default_rng(df).normal(size=n)
    diffs = (diffs - diffs.mean()) / diffs.std(ddof=1) + 0.3
    ci = pt.paired_ci(diffs, np.zeros(n))
    assert ci["mean"] == pytest.approx(0.3)
    assert (ci["high"] - ci["mean"]) * math.sqrt(n) == pytest.approx(expected, abs=2e-3)
    assert (ci["mean"] - ci["low"]) * math.sqrt(n) == pytest.approx(expected, abs=2e-3)


def test_paired_p_value_closed_form_for_two_degrees_of_freedom():
    # 3 pairs (2 df): two-sided p = 1 − |t| / sqrt(2 + t²) for the paired t statistic
    for diffs in ([0.1, 0.5, 0.3], [-1.0, 0.2, -0.4], [2.0, 2.5, 1.0]):
        d = np.asarray(diffs)
        t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
        assert pt.paired_ci(d, np.zeros(3))["p"] == pytest.approx(
            1 - abs(t) / math.sqrt(2 + t * t), abs=1e-9)


def test_paired_ci_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1; half width t(0.975, 2)/sqrt(3) = 2.4841;
    # t = 2·sqrt(3) = 3.4641 on 2 df gives p = 1 − 2·3.4641/(2·sqrt(14)) = 0.0742.
    ci = pt.paired_ci([1.5, 2.0, 3.5], [0.5, 0.0, 0.5])
    assert ci["mean"] == pytest.approx(2.0)
    assert ci["low"] == pytest.approx(2 - 2.4841, abs=1e-3)
    assert ci["high"] == pytest.approx(2 + 2.4841, abs=1e-3)
    assert ci["p"] == pytest.approx(0.0742, abs=1e-3)
    assert ci["n"] == 3
    same = pt.paired_ci([0.5, 0.6], [0.5, 0.6])
    assert same["mean"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        pt.paired_ci([1.0], [0.0])


def test_cells():
    assert pt.mean_std([0.5, 0.7]) == "60.00 ± 14.14"
    assert pt.mean_std([0.5, None]) == "50.00 ± 0.00"
    assert pt.mean_std([None]) == "–"
    assert pt.rounds_cell([2, None, 4]) == "3.0 (2/3)"
    assert pt.rounds_cell([None, None]) == "– (0/2)"


def test_plan_runs_the_paired_methods_first_seed_major():
    runs = pt.plan(pt.METHODS, pt.SPLITS, [0, 1, 2])
    assert len(runs) == 8 * 2 * 3 and len(set(runs)) == len(runs)
    assert runs[:4] == [("dirichlet", "fedavg", 0), ("dirichlet", "fedlsc", 0),
                        ("site", "fedavg", 0), ("site", "fedlsc", 0)]
    assert {m for _, m, _ in runs[:12]} == {"fedavg", "fedlsc"}


@pytest.mark.parametrize("preset", sorted(pt.PRESETS))
def test_presets_compose_into_valid_settings(preset):
    settings = Settings.from_hydra(pt.overrides_for(preset, "site", "fedprox-fc", 2))
    assert settings.strategy.name == "fedprox-fc" and settings.seed == 2
    assert settings.partition.name == "site"
    assert settings.min_available_nodes == settings.partition.num_partitions == 4
    expected = {  # (backbone, image size, rounds, batches per local epoch; 0 = all)
        "paper": ("res2net50_sa", 224, 50, 0),
        "cpu": ("resnet10t_sa", 32, 4, 10),
        "recipe": ("efficientnet_lite0_sa", 128, 8, 40),
        "recipe-4x1": ("efficientnet_lite0_sa", 96, 4, 0),
        "recipe-lite": ("efficientnet_lite0_sa", 64, 3, 30),
    }
    assert (settings.model.backbone, settings.dataset.image_size, settings.num_server_rounds,
            settings.training.max_batches_per_epoch) == expected[preset]
    # the presets that reports were made with keep the schedule they ran with
    if preset in ("recipe-4x1", "recipe-lite"):
        assert settings.training.lr_decay == "none" and not settings.training.equal_local_steps
        assert settings.training.frozen_layers == ""  # every layer trained then


def _fake_run(out: Path, split: str, method: str, seed: int, accs: list[float]) -> None:
    results = pt.run_dir(out, split, method, seed) / "results"
    results.mkdir(parents=True)
    rows = [{"round": i + 1, "global": {"accuracy": a, "balanced-accuracy": a / 2},
             "personalized": {"site-mean-balanced-accuracy": a / 3},
             "bytes": {"train-sent": 2**20 * (2 if i == 0 else 1), "train-received": 2**20}}
            for i, a in enumerate(accs)]
    (results / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"global": {"accuracy": accs[-1], "balanced-accuracy": accs[-1] / 2,
                        "precision": 0.3, "recall": 0.3, "f1": 0.3},
             "personalized": {"site-mean-accuracy": accs[-1], "site-mean-f1": 0.2,
                              "site-mean-balanced-accuracy": accs[-1] / 3}}
    reached = next((r["round"] for r in rows if r["global"]["accuracy"] >= 0.6), None)
    (results / "summary.json").write_text(json.dumps({
        "strategy": method, "rounds": len(rows), "final": final,
        "rounds_to_reach_accuracy": {"0.6": reached},
        "bytes_per_round": {"train-sent": 1.25 * 2**20, "train-received": 2**20}}))


def test_report_from_result_files(tmp_path):
    for seed, (avg, lsc) in enumerate([(0.50, 0.55), (0.60, 0.62), (0.55, 0.61)]):
        _fake_run(tmp_path, "dirichlet", "fedavg", seed, [0.4, 0.5, avg])
        _fake_run(tmp_path, "dirichlet", "fedlsc", seed, [0.4, 0.6, lsc])
    (tmp_path / "dirichlet" / "fedlsc" / "seed9").mkdir()  # unfinished: no summary.json
    report = pt.build_report(tmp_path, "python benchmarks/paper_table.py --test")
    assert "`python benchmarks/paper_table.py --test`" in report
    assert "## partition=site" not in report
    # accuracy: fedavg 50/60/55 -> 55.00 ± 5.00; fedlsc − fedavg = 5, 2, 6 -> mean 4.33
    assert "| fedavg | 0,1,2 | 55.00 ± 5.00 |" in report
    line = next(x for x in report.splitlines() if x.startswith("| global accuracy |"))
    ci = pt.paired_ci([0.55, 0.62, 0.61], [0.50, 0.60, 0.55])
    assert line.startswith(f"| global accuracy | +4.33 | [{100 * ci['low']:+.2f}, ")
    assert "| fedlsc | 2.0 (3/3) | 3 |" in report and "| fedavg | 3.0 (1/3) | 3 |" in report
    # bytes (MiB): summary's means, then round 1 (2 + 1) apart from later rounds (1 + 1)
    assert "| fedavg | 1.250 | 1.000 | 2.250 | 0.000 | 3.000 | 2.000 |" in report
    assert (tmp_path / "accuracy_dirichlet.png").read_bytes()[:4] == b"\x89PNG"


def test_publish_writes_report_plots_and_per_run_scores(tmp_path):
    out = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_run(out, "dirichlet", "fedavg", seed, [0.4, 0.5 + seed / 10])
    preface = tmp_path / "preface.md"
    preface.write_text("# What was run\n\n")
    prefix = tmp_path / "reports" / "cpu-x"
    assert pt.main(["--out", str(out), "--table-only", "--publish", str(prefix),
                    "--preface", str(preface)]) == 0
    report = (tmp_path / "reports" / "cpu-x.md").read_text()
    assert report.startswith("# What was run\n\n# FedLSC paper table")
    assert "](cpu-x_accuracy_dirichlet.png)" in report
    assert (tmp_path / "reports" / "cpu-x_accuracy_dirichlet.png").read_bytes()[:4] == b"\x89PNG"
    runs = [json.loads(line) for line in
            (tmp_path / "reports" / "cpu-x_runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in runs] == [("fedavg", 0), ("fedavg", 1)]
    assert runs[1]["global-accuracy-per-round"] == [0.4, 0.6]
    assert runs[1]["final"]["global"]["balanced-accuracy"] == 0.3


def test_fp16_variant_is_fedlsc_with_float16_updates():
    flat = pt.overrides_for("cpu", "dirichlet", "fedlsc-fp16", 1)
    settings = Settings.from_hydra(flat)
    assert settings.strategy.name == "fedlsc" and settings.strategy.update_dtype == "float16"
    assert Settings.from_hydra(pt.overrides_for("cpu", "site", "fedprox", 0)).strategy.name \
        == "fedprox"


def test_a_run_whose_sites_all_failed_does_not_count(tmp_path):
    _fake_run(tmp_path, "site", "fedavg", 0, [0.5, 0.6])
    results = pt.run_dir(tmp_path, "site", "fedavg", 0) / "results"
    assert pt.usable(results)
    summary = json.loads((results / "summary.json").read_text())
    summary["final"] = {"global": {}, "personalized": {}}  # every reply was an error
    (results / "summary.json").write_text(json.dumps(summary))
    assert not pt.usable(results)
    assert pt.load_runs(tmp_path) == {}


def test_a_run_in_which_a_site_failed_a_round_does_not_count(tmp_path):
    _fake_run(tmp_path, "site", "fedavg-fc", 1, [0.5, 0.6])
    results = pt.run_dir(tmp_path, "site", "fedavg-fc", 1) / "results"
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    rows[0]["failures"] = {"train": [], "evaluate": []}
    (results / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pt.usable(results)
    rows[1]["failures"] = {"train": [{"site": "site-0", "node": 7, "reason": "error"}]}
    (results / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not pt.usable(results)
