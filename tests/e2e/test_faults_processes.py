"""Faults with real processes: a writer killed mid-write, a SuperLink killed mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlsc_common.storage import load_checkpoint
from fedlsc_tools.cli import flower_env

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ham10000"
pytestmark = [pytest.mark.faults, pytest.mark.slow]

WRITER = """
import sys, numpy as np
from fedlsc_common.storage import save_checkpoint
arrays = {"w": np.random.default_rng(0).standard_normal(12_000_000).astype(np.float32)}
for r in range(1, 10_000):
    save_checkpoint(sys.argv[1], server_round=r, arrays=arrays,
                    strategy_state={"personalized_layers": ["a"]}, run_config={})
    print(r, flush=True)
"""


def test_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "1"  # one good checkpoint on disk
    time.sleep(0.15)  # now somewhere inside a later 48 MB write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    blob = load_checkpoint(path)
    assert blob["round"] >= 1 and blob["arrays"]["w"].numel() == 12_000_000
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert all(name.endswith(".tmp") for name in leftovers)  # never mistaken for a checkpoint


@pytest.mark.skipif(not DATA.is_dir(), reason="real HAM10000 data not found")
@pytest.mark.usefixtures("own_local_superlink")
def test_superlink_killed_mid_run_resumes_at_the_next_round(tmp_path, stop_processes):
    home = tmp_path / "flwr-home"
    env = {**flower_env(), "FLWR_HOME": str(home), "FEDLSC_CACHE_DIR": str(tmp_path / "cache")}
    results = tmp_path / "results"
    config = (f"num-server-rounds=4 evaluate-every=1 dataset.image-size=32 training.batch-size=16 "
              f"training.max-batches-per-epoch=2 strategy.personalized-ratio=0.1 "
              f"dataset.data-dir='{DATA}' results-dir='{results}' "
              f"model.backbone='resnet10t_sa' model.pretrained='false'")
    flwr = str(Path(sys.executable).parent / "flwr")
    command = [flwr, "run", str(ROOT), "--federation-config",
               "num-supernodes=3 client-resources-num-cpus=1", "--stream", "--run-config"]
    first = subprocess.Popen([*command, config], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (results / "checkpoint.pt").is_file():
                if load_checkpoint(results / "checkpoint.pt")["round"] >= 1:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint after 10 minutes")
        # the SuperLink, the simulation running the ServerApp, and everything they started
        stop_processes(str(home), signal.SIGKILL)
        first.kill()
        first.wait()
        killed_at = load_checkpoint(results / "checkpoint.pt")
        assert killed_at["round"] < 4, "the run finished before it could be killed"

        resumed = subprocess.run(
            [*command, f"{config} resume-from='{results}'"], env=env, capture_output=True,
            text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3, 4]  # no round twice, none missing
        summary = json.loads((results / "summary.json").read_text())
        assert summary["personalized_layers"] == \
            killed_at["strategy_state"]["personalized_layers"]
        assert load_checkpoint(results / "checkpoint.pt")["round"] == 4
        similarity = [json.loads(line)["round"] for line in
                      (results / "similarity.jsonl").read_text().splitlines()]
        assert similarity == [1, 2, 3, 4]
    finally:
        first.kill()
        stop_processes(str(home))


@pytest.mark.skipif(not DATA.is_dir(), reason="real HAM10000 data not found")
def test_supernode_killed_mid_round_round_goes_on_and_site_rejoins_from_its_disk(tmp_path):
    """A hospital's SuperNode is SIGKILLed while it trains round 2 (TLS + node auth, real
    processes). Round 2 is aggregated from the two others and the server names the dead
    site; the site is restarted with the same key, rejoins, restores its personalized
    layers from its own disk and trains round 3."""
    from fedlsc_common.settings import compose, to_run_config
    from fedlsc_common.storage import read_model_file
    from fedlsc_tools.loopback import LoopbackFederation, hospital_folders

    sites = hospital_folders(DATA, tmp_path, "dirichlet", 3,
                             min_partition_size=compose()["partition"]["min_partition_size"])
    victim_index, victim = 2, sites[2]
    config = to_run_config(compose([
        "model=small", "num_server_rounds=3", "evaluate_every=1", "dataset.image_size=32",
        "training.batch_size=16",
        # enough local work (~200 images) that the kill lands inside training
        "training.max_batches_per_epoch=12", "strategy.personalized_ratio=0.1",
        # rounds wait for all 3 sites to be connected, and aggregate from 2 or more
        "min_available_nodes=3", "min_train_nodes=2", "min_train_replies=2",
        "round_timeout=900"]))
    config["results-dir"] = str(tmp_path / "results")
    metrics = tmp_path / "results" / "metrics.jsonl"
    with LoopbackFederation(tmp_path, sites, tls=True, auth=True) as federation:
        run_id = federation.submit(config)
        marker = f"{victim.name} round 2: training on"
        deadline = time.monotonic() + 900
        while marker not in federation.log_tail(victim.name, 400):
            assert time.monotonic() < deadline, "round 2 never started at the victim site"
            time.sleep(0.1)
        federation.stop(victim.name, signal.SIGKILL)  # the SuperNode and its ClientApp
        killed_after = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]

        # the SuperLink misses the node's heartbeats (Flower: 2 x 30 s), answers for it
        # with an error, and the ServerApp names the site in its log
        deadline = time.monotonic() + 300
        named = f"site '{victim.name}'"
        while named not in (server_log := federation.server_log(run_id)):
            assert time.monotonic() < deadline, server_log[-3000:]
            time.sleep(5)
        federation.restart_site(victim_index, log_name=f"{victim.name}-restarted")
        outcome = federation.wait(run_id, timeout=1500)
        restarted_log = federation.log_tail(f"{victim.name}-restarted", 2000)
        server_log = federation.server_log(run_id)

    assert killed_after == [1], "the kill did not land in round 2"
    assert outcome["status"] == "finished:completed", outcome
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    first, second, third = rows
    assert first["train"]["num-replies-accepted"] == 3
    # round 2 went on with the two others; the failure is recorded with the site's name
    assert second["train"]["num-replies-accepted"] == 2
    assert [f["site"] for f in second["failures"]["train"]] == [victim.name]
    assert any(f"Round 2 (train): site '{victim.name}' (node " in line and "failed" in line
               for line in server_log.splitlines()), server_log[-3000:]
    # it came back (round 2's evaluation waited for 3 connected sites), trained and
    # evaluated in round 3
    assert second["failures"]["evaluate"] == []
    assert third["train"]["num-replies-accepted"] == 3 and third["failures"]["train"] == []
    assert third["sites-evaluated"] == 3
    assert f"{victim.name} round 3: held-out accuracy" in restarted_log
    # with nothing in memory, it took its personalized layers from its own disk (the
    # server never sends them after stage 1: round 3's replies hold what was sent)
    own_file = victim.output_dir.resolve() / "local_state.pt"
    assert f"{victim.name}: restored local weights of round 1 from {own_file}" in restarted_log
    assert f"{victim.name} round 3: training on" in restarted_log
    assert third["bytes"]["train-received"] == third["bytes"]["train-sent"]
    assert third["bytes"]["train-sent"] < first["bytes"]["train-sent"]
    assert read_model_file(victim.output_dir / "personalized_model.pt")["info"]["round"] == 3
