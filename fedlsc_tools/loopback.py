"""A real Flower deployment on one machine: SuperLink + one SuperNode per hospital.

``LoopbackFederation`` starts ``flower-superlink`` (TLS, SuperNode authentication) and
one SuperNode per site on 127.0.0.1 (``flower-supernode`` with 0.25-s idle polls:
:mod:`fedlsc_tools.supernode`), each given only its own data folder and
output folder through ``--node-config``; runs the app with ``flwr run``, follows it with
``flwr ls`` until it ends, and stops every process it started, by PID (process group),
also when something fails.

The sites share this machine's cores, so each SuperNode gets ``num-threads`` = cores /
sites (at least 1) in its node config: torch's default of one thread per core in every
site's process would oversubscribe them. Each SuperNode runs its ClientApps through the
warm SuperExec of :mod:`fedlsc_tools.superexec` (``--isolation process``; same process
group as its SuperNode, same log), or with ``warm=False`` through Flower's own SuperExec.

    python -m fedlsc_tools.loopback run --work /tmp/fedlsc-deploy --rounds 2
    python -m fedlsc_tools.loopback certs docker/certs     (for docker/compose.tls.yml)

Keys follow the production flow: the coordinator's folder (``certs/``) holds the CA and
the SuperLink's certificate only; each hospital's key pair is made in that hospital's own
folder (``keys/<hospital>/``) and only its public key is read to register it. In
production the same commands run one per machine: see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedlsc_common.settings import project_root, run_config_toml
from fedlsc_tools.certs import make_certificates, make_key_pair
from fedlsc_tools.cli import flower_env


class DeploymentError(RuntimeError):
    """A Flower process failed; the message names it and ends with its log."""


@dataclass(frozen=True)
class Hospital:
    """One SuperNode of the loopback federation: its name and its two folders."""

    name: str
    data_dir: Path
    output_dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackFederation:
    """SuperLink and SuperNodes as real processes on 127.0.0.1; a context manager."""

    def __init__(self, work: Path, sites: Sequence[Hospital], *, tls: bool = True,
                 auth: bool = True, project: Path | None = None,
                 database: Path | None = None, warm: bool = True,
                 threads_per_site: int | None = None) -> None:
        self.work = work.resolve()
        self.sites = list(sites)
        self.tls, self.auth = tls, auth
        self.warm = warm
        self.threads_per_site = threads_per_site or max(1, (os.cpu_count() or 1) //
                                                        max(1, len(self.sites)))
        self.database = database  # None: Flower's in-memory state (nothing to lock on disk)
        self.project = project or project_root() or Path.cwd()
        self.port = free_port()
        self.env = {**flower_env(), "FLWR_HOME": str(self.work / "flwr-home"),
                    # Flower's SuperExec asks for tasks every second by default
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
        self.processes: dict[str, subprocess.Popen] = {}
        self.certs: dict[str, Path] = {}
        self.federation = "loopback"

    # ------------------------------------------------------------------ processes
    def _start(self, name: str, command: list[str], log_name: str | None = None,
               group: int | None = None) -> subprocess.Popen:
        """Start ``command`` in a new process group (or in ``group``), its output appended
        to ``logs/<log_name or name>.log``. Groups stay in this session: a process may
        only join a group of its own session."""
        path = self.work / "logs" / f"{log_name or name}.log"
        if group is None:
            path.write_bytes(b"")
        log = open(path, "ab")  # noqa: SIM115 - O_APPEND: two processes may share a log
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.work, process_group=0 if group is None else group)
        log.close()
        self.processes[name if group is None else f"{name}/superexec"] = proc
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.work / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode}; its log "
                                      f"ends with:\n{self.log_tail(name.split('/')[0])}")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop one process and everything in its process group (a SuperNode: also its
        SuperExec and ClientApps)."""
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass

    def __enter__(self) -> LoopbackFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            if "/" not in name:  # a SuperExec goes with its SuperNode's group
                self.stop(name)

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        link = ["--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.database is not None:
            link += ["--database", str(self.database)]
        if self.tls:
            self.certs = make_certificates(self.work / "certs")
            link += ["--ssl-ca-certfile", str(self.certs["ca"]),
                     "--ssl-certfile", str(self.certs["cert"]),
                     "--ssl-keyfile", str(self.certs["key"])]
        else:
            link += ["--insecure"]
        if self.auth:
            link += ["--enable-supernode-auth"]
        self._start("superlink", ["flower-superlink", *link])
        connection: dict[str, Any] = {"address": f"127.0.0.1:{self.port}"}
        connection.update({"root-certificates": str(self.certs["ca"])} if self.tls
                          else {"insecure": True})
        (home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": self.federation, self.federation: connection}}))
        self._wait_for_port(self.port, "superlink")
        for index, site in enumerate(self.sites):
            self.start_site(index, site)

    def _wait_for_port(self, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise DeploymentError(f"{name} did not open port {port} in {timeout:.0f} s:\n"
                              f"{self.log_tail(name)}")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.work, capture_output=True,
                              text=True, timeout=timeout)

    def key_folder(self, name: str) -> Path:
        """Where hospital ``name`` keeps its own key pair (never the coordinator's folder)."""
        return self.work / "keys" / name

    def register(self, key: Path, name: str) -> None:
        """The coordinator registers a hospital from its public key (``key``.pub) alone."""
        done = self.flwr("supernode", "register", f"{key}.pub", self.federation, "--name", name)
        if done.returncode != 0:
            raise DeploymentError(f"registering {name} failed: {done.stdout}{done.stderr}")

    def node_config(self, index: int, site: Hospital) -> dict[str, Any]:
        """The ``--node-config`` of ``site`` as partition ``index``: its own folders, its
        share of the cores."""
        return {"partition-id": index, "num-partitions": len(self.sites),
                "site-name": site.name, "data-dir": str(site.data_dir),
                "output-dir": str(site.output_dir), "num-threads": self.threads_per_site}

    def start_site(self, index: int, site: Hospital, *, register: bool = True,
                   name: str | None = None, log_name: str | None = None) -> subprocess.Popen:
        """One hospital's SuperNode, reading only ``site.data_dir``; its log goes to
        ``logs/<log_name or name>.log``."""
        name = name or site.name
        site.output_dir.mkdir(parents=True, exist_ok=True)
        node_config = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}"
                               for k, v in self.node_config(index, site).items())
        runtime_port = free_port()
        # flower-supernode with 0.25-s idle polls (fedlsc_tools.supernode)
        command = [sys.executable, "-m", "fedlsc_tools.supernode",
                   "--superlink", f"127.0.0.1:{self.port}",
                   "--node-config", node_config, "--port", str(runtime_port)]
        command += (["--root-certificates", str(self.certs["ca"])] if self.tls
                    else ["--insecure"])
        if self.auth:
            key = make_key_pair(self.key_folder(name), name)  # made at the hospital
            if register:
                self.register(key, name)
            command += ["--auth-supernode-private-key", str(key)]
        if self.warm:
            command += ["--isolation", "process"]
        supernode = self._start(name, command, log_name)
        if self.warm:  # in the SuperNode's process group: a kill of the site takes both
            self._start(name, [sys.executable, "-m", "fedlsc_tools.superexec",
                               "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                               "--insecure", "--parent-pid", str(supernode.pid)],
                        log_name or name, group=supernode.pid)
        return supernode

    def restart_site(self, index: int, log_name: str) -> subprocess.Popen:
        """Start site ``index`` again (after a crash): same key and node config, so the
        SuperLink knows it as before; a fresh process with nothing in memory."""
        site = self.sites[index]
        self.stop(site.name, signal.SIGKILL)
        return self.start_site(index, site, register=False, log_name=log_name)

    # ------------------------------------------------------------------ runs
    def run(self, run_config: Mapping[str, Any], timeout: float = 1200) -> dict[str, Any]:
        """Submit the app, follow it until it ends; returns ``flwr ls`` facts of the run."""
        return self.wait(self.submit(run_config), timeout)

    def submit(self, run_config: Mapping[str, Any]) -> int:
        """Start a run of the app with this run config; returns its run id."""
        toml_file = self.work / "run_config.toml"
        toml_file.write_text(run_config_toml(run_config))
        submitted = self.flwr("run", str(self.project), self.federation, "--run-config",
                              str(toml_file), "--format", "json", timeout=300)
        if submitted.returncode != 0:
            raise DeploymentError(f"flwr run failed: {submitted.stdout}{submitted.stderr}")
        return int(json.loads(submitted.stdout)["run-id"])

    def server_log(self, run_id: int, timeout: float = 60) -> str:
        """What the ServerApp of this run has logged so far."""
        logs = self.flwr("log", str(run_id), self.federation, "--show", timeout=timeout)
        return logs.stdout + logs.stderr

    def wait(self, run_id: int, timeout: float = 1200) -> dict[str, Any]:
        """Follow a run until it ends (its ServerApp log is saved under logs/)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self._check_alive()
            status = self.status(run_id)
            if status.startswith("finished"):
                try:  # the run is over: its log is a convenience, not worth failing for
                    text = self.server_log(run_id, timeout=300)
                except subprocess.TimeoutExpired:
                    text = "flwr log timed out after 300 s\n"
                (self.work / "logs" / f"serverapp-{run_id}.log").write_text(text)
                return {"run-id": run_id, "status": status,
                        "seconds": round(time.monotonic() - start, 1)}
            time.sleep(2)
        self.flwr("stop", str(run_id), self.federation)
        raise DeploymentError(f"run {run_id} did not finish in {timeout:.0f} s")

    def status(self, run_id: int) -> str:
        listed = self.flwr("ls", self.federation, "--run-id", str(run_id), "--format", "json")
        if listed.returncode != 0:
            return "unknown"
        runs = json.loads(listed.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"


def hospital_folders(source: Path, out: Path, partition: str, num_sites: int, *,
                     seed: int = 0, min_partition_size: int) -> list[Hospital]:
    """Each hospital's own data folder, written once from the whole HAM10000 folder."""
    from fedlsc_tools.site_folders import export_site_folders

    folders = export_site_folders(source, out / "data", partition=partition,
                                  num_partitions=num_sites, seed=seed,
                                  min_partition_size=min_partition_size)
    return [Hospital(f"hospital-{i}", Path(f), out / "sites" / f"hospital-{i}")
            for i, f in enumerate(folders)]


def main(argv: Sequence[str] | None = None) -> int:
    from fedlsc_common.settings import compose, resolve_data_dir, to_run_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a loopback federation and run the app on it")
    run.add_argument("--work", type=Path, required=True, help="folder for everything")
    run.add_argument("--data-dir", default="")
    run.add_argument("--partition", choices=("dirichlet", "site"), default="dirichlet")
    run.add_argument("--sites", type=int, default=3)
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--no-tls", action="store_true")
    run.add_argument("--no-auth", action="store_true")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset.image_size=32")
    certs = sub.add_parser(
        "certs", help="for the docker demo: FOLDER/coordinator/ (CA, SuperLink certificate) "
                      "and FOLDER/hospital-<k>/ (each hospital's own key pair)")
    certs.add_argument("folder", type=Path)
    certs.add_argument("--sites", type=int, default=3, help="hospitals (default: 3)")
    certs.add_argument("--name", action="append", default=[],
                       help="DNS names the SuperLink certificate must cover (default: "
                            "localhost and superlink, the compose service name)")
    args = parser.parse_args(argv)
    if args.command == "certs":
        paths = make_certificates(args.folder / "coordinator",
                                  names=args.name or ["localhost", "superlink"])
        keys = [make_key_pair(args.folder / f"hospital-{i + 1}", f"hospital-{i + 1}")
                for i in range(args.sites)]
        print("\n".join(str(p) for p in [*paths.values(), *keys]))
        return 0
    work = args.work.resolve()
    cfg = compose([f"num_server_rounds={args.rounds}", f"min_available_nodes={args.sites}",
                   f"min_train_nodes={args.sites}", f"min_train_replies={min(2, args.sites)}",
                   *args.overrides])
    sites = hospital_folders(resolve_data_dir(args.data_dir), work, args.partition, args.sites,
                             seed=cfg["seed"],
                             min_partition_size=cfg["partition"]["min_partition_size"])
    config = to_run_config(cfg)
    config["results-dir"] = str(work / "results")
    with LoopbackFederation(work, sites, tls=not args.no_tls, auth=not args.no_auth) as fed:
        print(f"SuperLink on 127.0.0.1:{fed.port}, {len(sites)} SuperNodes; logs in "
              f"{work / 'logs'}", flush=True)
        outcome = fed.run(config)
    print(json.dumps(outcome))
    return 0 if outcome["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
