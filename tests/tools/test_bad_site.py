"""The bad-site benchmark driver: its plan composes into valid settings, and its report
reads scores, detections and failures back from (synthetic) result files."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest

from fedlsc_common.settings import Settings

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bad_site.py"
_spec = importlib.util.spec_from_file_location("bad_site", _PATH)
bs = importlib.util.module_from_spec(_spec)
sys.modules["bad_site"] = bs  # dataclasses look their module up while the file runs
_spec.loader.exec_module(bs)


def test_plan_is_seed_major_without_duplicates():
    jobs = bs.plan([0, 1, 2])
    assert len(jobs) == len(set(jobs)) == 3 * (3 * 5 + 2 * 4)
    first_block = jobs[:3 * 2 * 4]
    assert {j.kind for j in first_block} == {"none", "poison"}
    assert [j.seed for j in first_block] == sorted(j.seed for j in first_block)
    assert jobs[0] == bs.Job(3, "none", "fedavg", 0)
    assert {j.sites for j in jobs[-24:]} == {5}


@pytest.mark.parametrize("job", sorted({bs.Job(n, k, m, 1) for n, kinds, methods
                                        in bs.SWEEP + bs.EXTENDED for k in kinds
                                        for m in methods}, key=str))
def test_every_cell_composes_into_valid_settings(job):
    settings = Settings.from_hydra(job.overrides())
    assert settings.partition.num_partitions == settings.min_train_nodes == job.sites
    assert settings.partition.name == "dirichlet" and settings.partition.beta == 0.5
    assert settings.attack.site == bs.BAD_SITE and settings.seed == 1
    expected_kind = {"poison-50": "poison"}.get(job.kind, job.kind)
    assert settings.attack.kind == expected_kind
    assert settings.strategy.name == bs.METHODS[job.method][0].split("=")[1]
    if job.method == "fedlsc-exclude":
        assert settings.strategy.disagreeing_weight == 0.0
    if job.method == "fedlsc-nofilter":
        assert settings.strategy.max_update_norm_ratio == 0.0
    settings.build_strategy()


def test_port_owner_sees_a_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        address = server.getsockname()
        assert bs.port_owner(address) is None
        server.listen()
        assert bs.port_owner(address) == "an unknown process"


def _fake(out: Path, job, score, flagged=None, failures=()):
    folder = job.folder(out)
    (folder / "results").mkdir(parents=True)
    (folder / "results" / "global_model.pt").write_bytes(b"x")
    rows = [{"round": r, "global": {"accuracy": 0.5}, "failures": {
        "train": [{"site": "site-1", "reason": reason} for reason in failures if r == 2],
        "evaluate": []}, "agreement": {"sites": {
            "site-0": {"agreement": 0.1}, "site-1": {"agreement": -0.1 if job.kind != "none"
                                                     else 0.1},
            "site-2": {"agreement": 0.12}}, "threshold": 0.0, "flagged": []}}
            for r in (1, 2, 3)]
    (folder / "results" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                              for r in rows))
    (folder / "results" / "summary.json").write_text(json.dumps({
        "final": {"global": {"accuracy": 0.5, "balanced-accuracy": score}},
        "flagged_sites": flagged or {}}))
    (folder / "honest_eval.json").write_text(json.dumps({
        "honest": {"balanced-accuracy": score}, "all": {"balanced-accuracy": score},
        "run_all_balanced_accuracy": score}))


def test_report_reads_scores_detections_and_paired_differences(tmp_path):
    for seed, (clean, bad) in enumerate([(0.30, 0.20), (0.32, 0.21), (0.28, 0.19)]):
        _fake(tmp_path, bs.Job(3, "none", "fedlsc", seed), clean)
        _fake(tmp_path, bs.Job(3, "poison", "fedlsc", seed), bad,
              flagged={"site-1": 2} if seed < 2 else {"site-0": 3})
        _fake(tmp_path, bs.Job(3, "none", "fedavg", seed), clean - 0.01)
        _fake(tmp_path, bs.Job(3, "poison", "fedavg", seed), 0.14,
              failures=["update norm 9 is 30 x the median"] if seed == 0 else [])
    (tmp_path / "sites3" / "poison" / "multikrum" / "seed0" / "results").mkdir(parents=True)
    report = bs.build_report(tmp_path, "python benchmarks/bad_site.py --out X")
    assert "| fedlsc | 30.00 ± 2.00 | 20.00 ± 1.00 |" in report
    assert "| fedlsc | -10.0 [" in report  # damage, paired by seed
    assert "| fedlsc | poison | 3 | 2/3 | 2, 2, – | site-0 | 0 | 0 |" in report
    assert "| fedavg | poison | 3 | no report | – | – | 1 | 0 |" in report
    assert "- 3 sites, poison, multikrum, seed 0: 1 attempt(s)" in report
    assert (tmp_path / "bad_site_3sites.png").is_file()
    bs.publish(tmp_path, report, tmp_path / "reports" / "bad-site-x")
    published = (tmp_path / "reports" / "bad-site-x.md").read_text()
    assert "](bad-site-x_bad_site_3sites.png)" in published
    assert (tmp_path / "reports" / "bad-site-x_bad_site_3sites.png").stat().st_size > 1000
