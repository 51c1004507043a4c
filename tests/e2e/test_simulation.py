"""Real `flwr run` simulations on real HAM10000 images (3 virtual SuperNodes, small model)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlsc_common.storage import load_checkpoint, load_model, read_model_file
from fedlsc_flwr.similarity import layer_of
from fedlsc_tools.cli import flower_env

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ham10000"
pytestmark = [
    pytest.mark.simulation,
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason="real HAM10000 data not found"),
]
COMMON = {
    "num-server-rounds": "2", "evaluate-every": "1", "dataset.image-size": "32",
    "training.batch-size": "16",
    "training.max-batches-per-epoch": "3", "strategy.personalized-ratio": "0.1",
    "dataset.data-dir": f"'{DATA}'",
    # the small model, as before the main job moved to a pretrained EfficientNet
    "model.backbone": "'resnet10t_sa'", "model.pretrained": "'false'",
}


@pytest.fixture(scope="module")
def flower(tmp_path_factory, stop_processes, own_local_superlink):
    home = tmp_path_factory.mktemp("flwr-home")
    env = {**flower_env(), "FLWR_HOME": str(home),
           "FEDLSC_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}

    def run(results: Path, **overrides: str) -> subprocess.CompletedProcess:
        """A 3-site simulation; ``overrides`` use run-config keys with '-'/'.' as '_'/'__'."""
        merged = {**COMMON, "results-dir": f"'{results}'",
                  **{k.replace("__", ".").replace("_", "-"): v for k, v in overrides.items()}}
        config = " ".join(f"{k}={v}" for k, v in merged.items())
        proc = subprocess.run(
            [str(Path(env["PATH"].split(os.pathsep)[0]) / "flwr"), "run", str(ROOT),
             "--run-config", config,
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--stream"],
            env=env, capture_output=True, text=True, timeout=900)
        (results.parent / f"{results.name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (results / "summary.json").is_file(), proc.stdout[-3000:]
        return proc

    yield run
    stop_processes(str(home))


@pytest.fixture(scope="module")
def runs(flower, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    flower(base / "prox", strategy__proximal_mu="1.0")
    flower(base / "noprox", strategy__proximal_mu="0.0", tensorboard="true")
    return base


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_every_results_file_is_written(runs):
    out = runs / "prox"
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [1, 2]
    for row in metrics:
        assert row["strategy"] == "fedlsc" and row["sites-evaluated"] == 3
        assert 0 <= row["global"]["balanced-accuracy"] <= 1
        assert 0 <= row["personalized"]["balanced-accuracy"] <= 1
        assert row["bytes"]["train-sent"] > 0 and row["bytes"]["train-received"] > 0
        assert row["similarity"]["lsc-weight-min"] <= row["similarity"]["lsc-weight-max"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "fedlsc"
    assert set(summary["rounds_to_reach_accuracy"]) == {"0.6", "0.7", "0.75"}
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["round"] == 2
    assert checkpoint["strategy_state"]["personalized_layers"] == summary["personalized_layers"]
    for png in ("accuracy.png", "confusion_matrix.png", "similarity_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = metrics[-1]["confusion"]  # what confusion_matrix.png draws
    assert sorted(confusion["global"]["sites"]) == ["site-0", "site-1", "site-2"]
    pooled = np.array(confusion["global"]["pooled"])
    assert pooled.shape == (7, 7) and pooled.sum() == sum(
        np.sum(m) for m in confusion["global"]["sites"].values())
    assert np.trace(pooled) / pooled.sum() == pytest.approx(metrics[-1]["global"]["accuracy"])
    # the head calibration's query messages went through Flower's simulation too
    final = metrics[-1]["final-model"]
    assert final["calibration"]["sites"] == ["site-0", "site-1", "site-2"]
    assert final["sites-evaluated"] == 3 and summary["final_model"]["head_calibrated"] is True
    assert summary["final"]["global"] == final["global"]
    similarity = [json.loads(line) for line in (out / "similarity.jsonl").read_text().splitlines()]
    assert [s["round"] for s in similarity] == [1, 2]
    assert len(similarity[0]["node_ids"]) == 3

    model, info = load_model(out / "global_model.pt")  # the file alone is enough
    assert info["image_size"] == 32 and len(info["class_names"]) == 7
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    sites = sorted((out / "sites").iterdir())
    assert [s.name for s in sites] == ["site-0", "site-1", "site-2"]
    for site in sites:
        blob = read_model_file(site / "personalized_model.pt")
        assert blob["info"]["kind"] == "personalized" and blob["info"]["site"] == site.name


def test_personalized_layers_stay_on_the_sites(runs):
    out = runs / "prox"
    summary = json.loads((out / "summary.json").read_text())
    personalized = set(summary["personalized_layers"])
    assert personalized, "Per = 10 % must personalize some layers"
    first, second = rows(out)
    # A reply carrying a personalized layer is dropped by the server: all 3 were accepted.
    assert second["train"]["num-replies-accepted"] == 3
    assert second["train"]["num-replies-dropped"] == 0
    global_state = read_model_file(out / "global_model.pt")["state_dict"]
    private = [k for k in global_state if layer_of(k) in personalized]
    private_bytes = sum(global_state[k].numel() * global_state[k].element_size() for k in private)
    # Round 2 traffic lacks exactly the personalized tensors, both ways, for 3 sites.
    for direction in ("train-sent", "train-received"):
        missing = first["bytes"][direction] - second["bytes"][direction]
        assert abs(missing - 3 * private_bytes) <= 3 * 128 * len(private), direction
    # Each site's personalized model = the global shared layers + its own private ones.
    site_states = [read_model_file(p / "personalized_model.pt")["state_dict"]
                   for p in sorted((out / "sites").iterdir())]
    for state in site_states:
        for key, value in global_state.items():
            if key not in private:
                torch.testing.assert_close(state[key], value)
    key = next(k for k in private if k.endswith("weight"))
    assert not torch.equal(site_states[0][key], site_states[1][key])
    assert not torch.equal(site_states[0][key], global_state[key])


def test_proximal_term_changes_training(runs):
    prox, noprox = rows(runs / "prox"), rows(runs / "noprox")
    assert prox[0]["train"]["proximal-term"] > 0
    assert noprox[0]["train"]["proximal-term"] == 0
    a = read_model_file(runs / "prox" / "global_model.pt")["state_dict"]
    b = read_model_file(runs / "noprox" / "global_model.pt")["state_dict"]
    diff = np.mean([float((a[k].float() - b[k].float()).abs().mean()) for k in a
                    if a[k].is_floating_point()])
    assert diff > 1e-5


def test_resume_continues_at_the_next_round(flower, runs, tmp_path):
    source = runs / "prox"
    before = json.loads((source / "summary.json").read_text())
    out = tmp_path / "resumed"
    flower(out, strategy__proximal_mu="1.0", num_server_rounds="3", resume_from=f"'{source}'")
    resumed = rows(out)
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == rows(source)  # earlier rounds carried over, not recomputed
    after = json.loads((out / "summary.json").read_text())
    assert after["personalized_layers"] == before["personalized_layers"]
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 3
    assert resumed[2]["similarity"]["num-personalized-layers"] == len(before["personalized_layers"])


def test_tensorboard_logs_the_rounds_when_asked(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert not (runs / "prox" / "tensorboard").exists()  # off by default
    events = EventAccumulator(str(runs / "noprox" / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("global/accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == pytest.approx(
        [r["global"]["accuracy"] for r in rows(runs / "noprox")])
