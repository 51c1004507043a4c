"""What a deployed federated round costs beyond local training, beside the simulation.

Runs the loopback deployment (``fedlsc_tools.loopback``: a SuperLink and one SuperNode
per hospital as real processes on 127.0.0.1, TLS and SuperNode authentication on) and
then the same configuration as a ``flwr run`` simulation (``client-resources-num-cpus=1``),
and reads both runs' own ``metrics.jsonl``. Per round it prints the wall time at the
ServerApp (``round-seconds``), the slowest site's own training time
(``train-seconds-max``) and their difference, the overhead; the aggregate training
throughput (all sites' training images ÷ the span from the first site's start of
training to the last site's end); and where the deployed round's seconds went, from the
timestamps the apps record (``timing`` in each row). The last line is
``deployment overhead per round: max X s, mean Y s``.

    python benchmarks/deployment_round.py --rounds 3
    python benchmarks/deployment_round.py --rounds 3 training.max_batches_per_epoch=30
    python benchmarks/deployment_round.py --work DIR --report-only

The simulation starts its own local SuperLink on free ports (Flower's
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``, instead of the
127.0.0.1:39091 every checkout on a machine shares) and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------ reading results
@dataclass
class RoundCost:
    """One round as its ServerApp recorded it."""

    round: int
    wall: float  # round-seconds
    train_max: float  # train-seconds-max: the slowest site's own training time
    images: int  # all sites' training images
    span: float | None  # first site's start of training to the last site's end
    steps: dict[str, float] = field(default_factory=dict)  # the critical path, in order

    @property
    def overhead(self) -> float:
        return self.wall - self.train_max

    @property
    def throughput(self) -> float | None:
        return self.images / self.span if self.span else None


def _critical_site(sites: Mapping[str, Mapping[str, Mapping[str, float]]],
                   phase: str) -> Mapping[str, float] | None:
    """The marks of the site whose reply was ready last in ``phase``."""
    found = [s[phase] for s in sites.values() if phase in s and "reply-ready" in s[phase]]
    return max(found, key=lambda m: m["reply-ready"]) if found else None


#: Steps of a site's handling of a message: (label, from mark, to mark).
_SITE_STEPS = (
    ("Flower's ClientApp start-up (flwr, task, FAB)", "process-start", "app-import-start"),
    ("the app's imports (torch, timm, ...)", "app-import-start", "imported"),
    ("Flower hand-over: FAB, message pull", "imported", "handler-start"),
    ("data: index, split, decoded images", "handler-start", "data-ready"),
    ("model build and assembly", "data-ready", "model-ready"),
    ("training set-up", "model-ready", "train-start"),
    ("local training", "train-start", "train-end"),
    ("saving the site's state", "train-end", "state-saved"),
    ("global model evaluation", "model-ready", "global-evaluated"),
    ("personalized model evaluation", "global-evaluated", "personal-evaluated"),
    ("saving the personalized model", "personal-evaluated", "model-saved"),
)


def _phase_steps(phase: str, server: Mapping[str, float],
                 site: Mapping[str, float] | None) -> dict[str, float]:
    """``phase`` (train/evaluate) from the ServerApp sending to its last reply, split
    along the site that replied last."""
    sent, replied = server.get(f"{phase}-sent"), server.get(f"{phase}-replied")
    if sent is None or replied is None:
        return {}
    if site is None:
        return {f"{phase}: whole phase": replied - sent}
    steps: dict[str, float] = {}
    first = site.get("process-start", site.get("handler-start", sent))
    steps[f"{phase}: ServerApp -> SuperNode -> ClientApp started"] = first - sent
    for label, a, b in _SITE_STEPS:
        if a in site and b in site:
            steps[f"{phase}: {label}"] = site[b] - site[a]
    last = max(v for k, v in site.items() if k != "reply-ready")
    steps[f"{phase}: reply encoding"] = site["reply-ready"] - last
    steps[f"{phase}: reply -> SuperNode -> ServerApp"] = replied - site["reply-ready"]
    return steps


def critical_path(row: Mapping[str, Any]) -> dict[str, float]:
    """Where a round's wall time went, in order, following the last site to reply in
    each phase; ``other`` is what these steps leave of ``round-seconds``."""
    timing = row.get("timing") or {}
    server, sites = timing.get("server", {}), timing.get("sites", {})
    steps: dict[str, float] = {}
    if "round-start" in server and "train-sent" in server:
        steps["configure train (ServerApp)"] = server["train-sent"] - server["round-start"]
    steps.update(_phase_steps("train", server, _critical_site(sites, "train")))
    if "aggregate-start" in server and "aggregate-end" in server:
        steps["aggregation (ServerApp)"] = server["aggregate-end"] - server["aggregate-start"]
    steps.update(_phase_steps("evaluate", server, _critical_site(sites, "evaluate")))
    if "record-start" in server and "recorded" in server:
        steps["results writing (ServerApp)"] = server["recorded"] - server["record-start"]
    if row.get("round-seconds") is not None:
        steps["other"] = float(row["round-seconds"]) - sum(steps.values())
    return steps


def read_costs(metrics_file: Path) -> list[RoundCost]:
    """The rounds of a run's ``metrics.jsonl`` that carry their time."""
    costs = []
    for line in metrics_file.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("round-seconds") is None or row.get("train-seconds-max") is None:
            continue
        costs.append(RoundCost(int(row["round"]), float(row["round-seconds"]),
                               float(row["train-seconds-max"]), int(row.get("train-images", 0)),
                               row.get("train-span-seconds"), critical_path(row)))
    return costs


# ------------------------------------------------------------------ report
def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def round_table(deployed: Sequence[RoundCost], simulated: Sequence[RoundCost]) -> list[str]:
    """Per round, deployment beside simulation: wall, slowest training, overhead, throughput."""
    by_round = {c.round: c for c in simulated}
    lines = ["| round | deployed wall s | slowest training s | overhead s | images/s "
             "| simulated wall s | slowest training s | overhead s | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in deployed:
        s = by_round.get(d.round)
        lines.append(
            f"| {d.round} | {d.wall:.1f} | {d.train_max:.1f} | {d.overhead:.1f} | "
            f"{_fmt(d.throughput)} | {_fmt(s and s.wall)} | {_fmt(s and s.train_max)} | "
            f"{_fmt(s and s.overhead)} | {_fmt(s and s.throughput)} |")
    return lines


def breakdown_table(deployed: Sequence[RoundCost]) -> list[str]:
    """Mean seconds of each step of the deployed rounds' critical path."""
    labels: list[str] = []
    for cost in deployed:
        labels += [k for k in cost.steps if k not in labels]
    lines = ["| step (last site to reply) | mean s | max s |", "|---|---|---|"]
    for label in labels:
        values = [c.steps.get(label, 0.0) for c in deployed]
        lines.append(f"| {label} | {statistics.fmean(values):.2f} | {max(values):.2f} |")
    walls = [c.wall for c in deployed]
    lines.append(f"| **round wall** | {statistics.fmean(walls):.2f} | {max(walls):.2f} |")
    return lines


def throughput_line(name: str, costs: Sequence[RoundCost]) -> str:
    """Aggregate training throughput over the rounds: Σ images ÷ Σ spans."""
    spans = [c for c in costs if c.span]
    if not spans:
        return f"{name}: training throughput unknown (no train-span-seconds)"
    images, seconds = sum(c.images for c in spans), sum(c.span for c in spans)
    return (f"{name}: {images} training images in {seconds:.1f} s of training span = "
            f"{images / seconds:.1f} images/s")


def report(deployed: Sequence[RoundCost], simulated: Sequence[RoundCost]) -> str:
    """The whole printed report; its last line is the overhead summary."""
    if not deployed:
        raise ValueError("no deployed round carries round-seconds and train-seconds-max")
    lines = ["Per round (round wall time at the ServerApp; overhead = wall − slowest site's "
             "training):", "", *round_table(deployed, simulated), "",
             "Deployed round, critical path:", "", *breakdown_table(deployed), "",
             throughput_line("deployment", deployed)]
    if simulated:
        lines.append(throughput_line("simulation", simulated))
        d, s = (sum(c.images for c in x if c.span) / sum(c.span for c in x if c.span)
                if any(c.span for c in x) else None for x in (deployed, simulated))
        if d and s:
            lines.append(f"deployment / simulation training throughput: {d / s:.2f}")
    overheads = [c.overhead for c in deployed]
    lines.append(f"deployment overhead per round: max {max(overheads):.1f} s, "
                 f"mean {statistics.fmean(overheads):.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------ running
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def warm_image_caches(run_config: Mapping[str, Any],
                      node_configs: Sequence[Mapping[str, Any]], name: str) -> None:
    """Decode every site's images into the decode cache before the run, as the ClientApp
    would (same code, same cache keys): the deployment's site folders are new paths, so
    its first round would otherwise decode while the simulation's reads a warm cache.
    Both runs then start as a hospital that has trained before."""
    from client_app.site import Site

    start = time.monotonic()
    for node_config in node_configs:
        site = Site.for_run(run_config, node_config, run_id=0)
        site.loader("train")
        site.loader("test")
    print(f"{name}: image caches of {len(node_configs)} sites ready in "
          f"{time.monotonic() - start:.1f} s", flush=True)


def run_deployment(work: Path, cfg: dict[str, Any], sites: int) -> Path:
    from fedlsc_common.settings import resolve_data_dir, to_run_config
    from fedlsc_tools.loopback import LoopbackFederation, hospital_folders

    hospitals = hospital_folders(resolve_data_dir(cfg["dataset"]["data_dir"]), work,
                                 cfg["partition"]["name"], sites, seed=cfg["seed"],
                                 min_partition_size=cfg["partition"]["min_partition_size"])
    config = to_run_config(cfg)
    config["results-dir"] = str(work / "results")
    with LoopbackFederation(work, hospitals, tls=True, auth=True) as federation:
        warm_image_caches(config, [federation.node_config(i, h)
                                   for i, h in enumerate(hospitals)], "deployment")
        print(f"deployment: SuperLink on 127.0.0.1:{federation.port}, {sites} SuperNodes, "
              f"TLS and node auth; logs in {work / 'logs'}", flush=True)
        outcome = federation.run(config, timeout=7200)
    print(f"deployment: {json.dumps(outcome)}", flush=True)
    if outcome["status"] != "finished:completed":
        raise SystemExit(f"the deployed run ended {outcome['status']}")
    return work / "results" / "metrics.jsonl"


def run_simulation(work: Path, cfg: dict[str, Any], sites: int) -> Path:
    import subprocess

    from fedlsc_common.settings import project_root, run_config_toml, to_run_config
    from fedlsc_tools.cli import flower_env
    from fedlsc_tools.processes import stop_processes_naming

    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    config = to_run_config(cfg)
    config["results-dir"] = str(work / "results")
    config["site-output-dir"] = str(work / "sites")
    (work / "run_config.toml").write_text(run_config_toml(config))
    warm_image_caches(config, [{"partition-id": i, "num-partitions": sites}
                               for i in range(sites)], "simulation")
    # Our own local SuperLink on free ports (Flower's variables), not the shared 39091:
    # a run sent there could be served by another checkout's SuperLink.
    env = {**flower_env(), "FLWR_HOME": str(home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    command = [str(Path(sys.executable).parent / "flwr"), "run",
               str(project_root() or Path.cwd()), "--run-config", str(work / "run_config.toml"),
               "--federation-config", f"num-supernodes={sites} client-resources-num-cpus=1",
               "--stream"]
    print(f"simulation: flwr run, {sites} virtual SuperNodes; log in {work / 'flwr.log'}",
          flush=True)
    try:
        with open(work / "flwr.log", "w") as log:
            code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=7200)
    finally:
        stop_processes_naming(str(home))
    if code != 0:
        raise SystemExit(f"the simulation failed (exit code {code}); see {work / 'flwr.log'}")
    return work / "results" / "metrics.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for both runs (default /tmp/fedlsc-deployment-round-<time>)")
    parser.add_argument("--no-simulation", action="store_true")
    parser.add_argument("--no-deployment", action="store_true",
                        help="keep the deployed run already in --work")
    parser.add_argument("--report-only", action="store_true",
                        help="only print the report of the runs already in --work")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for both runs, e.g. "
                        "training.max_batches_per_epoch=30")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like an error, so the deployment's processes are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = (args.work or Path(f"/tmp/fedlsc-deployment-round-{time.strftime('%Y%m%d-%H%M%S')}")
            ).resolve()
    deployed_file = work / "deployment" / "results" / "metrics.jsonl"
    simulated_file = work / "simulation" / "results" / "metrics.jsonl"
    if not args.report_only:
        from fedlsc_common.settings import compose

        # Every round evaluated, as the rounds of its reports were (a round's cost includes
        # the sites' evaluation); an override can still say otherwise.
        cfg = compose([f"num_server_rounds={args.rounds}", "evaluate_every=1",
                       f"min_available_nodes={args.sites}",
                       f"min_train_nodes={args.sites}", f"min_train_replies={min(2, args.sites)}",
                       *args.overrides])
        print(f"configuration: {cfg['model']['backbone']}, {cfg['dataset']['image_size']} px, "
              f"{args.rounds} rounds, {args.sites} sites, overrides {args.overrides}", flush=True)
        if not args.no_deployment:
            deployed_file = run_deployment(work / "deployment", cfg, args.sites)
        if not args.no_simulation:
            simulated_file = run_simulation(work / "simulation", cfg, args.sites)
    deployed = read_costs(deployed_file)
    simulated = read_costs(simulated_file) if simulated_file.is_file() else []
    print(report(deployed, simulated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
