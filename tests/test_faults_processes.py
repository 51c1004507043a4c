"""Faults with real processes: a writer killed mid-write, a SuperLink killed mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlsc_flwr.cli import flower_env
from fedlsc_flwr.storage import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ham10000"
pytestmark = [pytest.mark.faults, pytest.mark.slow]

WRITER = """
import sys, numpy as np
from fedlsc_flwr.storage import save_checkpoint
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
def test_superlink_killed_mid_run_resumes_at_the_next_round(tmp_path, stop_processes):
    home = tmp_path / "flwr-home"
    env = {**flower_env(), "FLWR_HOME": str(home), "FEDLSC_CACHE_DIR": str(tmp_path / "cache")}
    results = tmp_path / "results"
    config = (f"num-server-rounds=4 dataset.image-size=32 training.batch-size=16 "
              f"training.max-batches-per-epoch=2 strategy.personalized-ratio=0.1 "
              f"dataset.data-dir='{DATA}' results-dir='{results}'")
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
