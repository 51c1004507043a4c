"""A real loopback deployment: SuperLink + 3 SuperNodes, TLS and SuperNode authentication.

Every hospital's key is made by ``fedlsc_tools.certs.make_key_pair`` in that hospital's own
folder (what ``fedlsc keys`` does at a hospital); the coordinator registers its ``.pub``.
"""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import pytest

from fedlsc_common.settings import compose, to_run_config
from fedlsc_common.storage import read_model_file
from fedlsc_tools.loopback import Hospital, LoopbackFederation, hospital_folders

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ham10000"
pytestmark = [
    pytest.mark.deployment,
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason="real HAM10000 data not found"),
]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    sites = hospital_folders(DATA, work, "dirichlet", 3,
                             min_partition_size=compose()["partition"]["min_partition_size"])
    config = to_run_config(compose([
        "model=small", "num_server_rounds=2", "evaluate_every=1", "dataset.image_size=32",
        "training.batch_size=16",
        "training.max_batches_per_epoch=2", "strategy.personalized_ratio=0.1"]))
    config["results-dir"] = str(work / "results")
    with LoopbackFederation(work, sites, tls=True, auth=True) as federation:
        outcome = federation.run(config, timeout=1500)
        intruder = federation.start_site(3, Hospital("intruder", sites[0].data_dir,
                                                 work / "sites" / "intruder"), register=False)
        deadline = time.monotonic() + 90
        while intruder.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        listed = federation.flwr("supernode", "ls", federation.federation, "--format", "json")
        yield {"work": work, "sites": sites, "outcome": outcome, "intruder": intruder,
               "federation": federation, "nodes": json.loads(listed.stdout)}


def test_run_completes_and_every_site_writes_its_personalized_model(deployment):
    assert deployment["outcome"]["status"] == "finished:completed"
    results = deployment["work"] / "results"
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sites-evaluated"] == 3 for r in rows)
    for name in ("summary.json", "global_model.pt", "checkpoint.pt", "accuracy.png"):
        assert (results / name).is_file(), name
    # the head calibration's query messages went through the real SuperLink and SuperNodes
    final = rows[-1]["final-model"]
    assert final["calibration"]["sites"] == ["hospital-0", "hospital-1", "hospital-2"]
    assert final["sites-evaluated"] == 3
    for site in deployment["sites"]:
        blob = read_model_file(site.output_dir / "personalized_model.pt")
        assert blob["info"]["site"] == site.name and blob["info"]["kind"] == "personalized"
    # per-round wall time and overhead beyond the slowest site's local training
    for row in rows:
        trained = [float(m) for site in deployment["sites"] for m in re.findall(
            rf"{site.name} round {row['round']}: trained .* in ([0-9.]+) s",
            deployment["federation"].log_tail(site.name, 400))]
        assert len(trained) == 3
        assert row["train-seconds-max"] == pytest.approx(max(trained), abs=0.06)
        assert row["round-seconds"] > row["train-seconds-max"]
        print(f"round {row['round']}: {row['round-seconds']:.1f} s wall, slowest site trained "
              f"{max(trained):.1f} s, overhead {row['round-seconds'] - max(trained):.1f} s")


def test_each_site_reads_only_its_own_folder(deployment):
    folders = [site.data_dir for site in deployment["sites"]]
    assert len(set(folders)) == 3
    for index, site in enumerate(deployment["sites"]):
        log = deployment["federation"].log_tail(site.name, 400)
        assert f"Site {index} (folder)" in log  # partition mode "folder": its own data only
        images = {p.name for p in (site.data_dir).rglob("*.jpg")}
        others = {p.name for other in folders if other != site.data_dir
                  for p in other.rglob("*.jpg")}
        assert images and not images & others


def test_server_receives_arrays_and_metrics_only_and_no_personalized_layers(deployment):
    results = deployment["work"] / "results"
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["personalized_layers"]
    first, second = rows
    # a reply with any key the server did not send (a personalized layer) would be dropped
    assert second["train"]["num-replies-accepted"] == 3
    assert second["train"]["num-replies-dropped"] == 0
    # what came back in round 2 is exactly what was sent: the shared layers
    assert second["bytes"]["train-received"] == second["bytes"]["train-sent"]
    assert second["bytes"]["train-received"] < first["bytes"]["train-received"]
    assert second["bytes"]["evaluate-received"] == 0  # evaluation replies carry metrics only
    server_log = next((deployment["work"] / "logs").glob("serverapp-*.log")).read_text()
    assert "dropped the reply" not in server_log


def test_unregistered_supernode_is_refused(deployment):
    intruder = deployment["intruder"]
    assert intruder.returncode not in (None, 0)
    log = deployment["federation"].log_tail("intruder", 200)
    assert "Failed to activate SuperNode" in log
    assert '/v1/fleet/activate-node HTTP/1.1" 412' in deployment["federation"].log_tail(
        "superlink", 2000)
    names = [n.get("name", "") for n in deployment["nodes"].get("nodes", [])]
    assert "intruder" not in names


def test_a_key_made_at_the_hospital_registers_and_authenticates(tmp_path):
    """``fedlsc keys``' key pair: only its .pub is registered, and the SuperNode that holds
    the private key is let in (status online); the coordinator's folder holds no
    hospital key."""
    site = Hospital("hospital-9", tmp_path / "unused-data", tmp_path / "out")
    with LoopbackFederation(tmp_path / "work", [site], tls=True, auth=True) as federation:
        key = federation.key_folder("hospital-9") / "hospital-9"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        deadline, nodes = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            listed = federation.flwr("supernode", "ls", federation.federation, "--format",
                                     "json")
            nodes = json.loads(listed.stdout).get("nodes", []) if listed.returncode == 0 else []
            if any(n["status"] == "online" for n in nodes):
                break
            time.sleep(2)
        assert [n["status"] for n in nodes] == ["online"], nodes
        assert federation.processes["hospital-9"].poll() is None
        certs = tmp_path / "work" / "certs"
        private = sorted(p.name for p in certs.iterdir() if b"PRIVATE KEY" in p.read_bytes())
        assert private == ["ca.key", "server.key"]
