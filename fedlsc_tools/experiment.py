"""``fedlsc-experiment``: Hydra sweeps of simulation runs, collected into one table.

    fedlsc-experiment -m strategy=fedavg,fedlsc seed=0,1,2
    fedlsc-experiment -m +experiment=paper partition=site strategy=fedlsc

Each job flattens its composed config into a Flower run-config TOML file and runs
``flwr run`` in simulation (one virtual SuperNode per partition); results land in the
job's folder. At the end of a sweep, ``table.md`` (mean ± std over seeds) is written
beside the jobs. The command exits with status 1 when any job failed (every job still
runs, and the table holds the ones that finished).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fedlsc_common.settings import (
    CONF_DIR,
    Settings,
    project_root,
    run_config_toml,
    to_run_config,
)
from fedlsc_common.storage import atomic_write_text
from fedlsc_tools.cli import collect, flower_env, markdown_table, simulate


def run_job(cfg: dict[str, Any], job_dir: Path, transport: str = "flwr") -> int:
    """One simulation with config ``cfg``; results under ``job_dir/results``.

    ``transport="flwr"``: ``flwr run`` (Ray, a local SuperLink); ``"inprocess"``: the
    same ServerApp and ClientApp in one subprocess (:mod:`fedlsc_tools.inprocess`)."""
    cfg = dict(cfg)
    cfg["results_dir"] = str(job_dir / "results")
    settings = Settings.from_run_config(to_run_config(cfg))  # fail early, with a clear line
    toml_file = job_dir / "run_config.toml"
    atomic_write_text(toml_file, run_config_toml(settings.to_run_config()))
    if transport == "inprocess":
        command = [sys.executable, "-m", "fedlsc_tools.inprocess", str(toml_file),
                   "--num-supernodes", str(settings.partition.num_partitions)]
        with open(job_dir / "flower.log", "w") as log:
            return subprocess.call(command, env=flower_env(), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=project_root() or Path.cwd())
    if transport != "flwr":
        raise ValueError(f"transport must be 'flwr' or 'inprocess', got {transport!r}")
    project = project_root() or Path.cwd()
    return simulate(project, [str(toml_file)],
                    num_supernodes=settings.partition.num_partitions,
                    log_file=job_dir / "flower.log")


#: Folders of the jobs of this process that failed (Hydra's basic launcher runs them here).
FAILED_JOBS: list[Path] = []


class CollectResults(Callback):
    """After a sweep: ``table.md`` of every job's summary.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        summaries = collect(sorted(p.parent for p in sweep.glob("*/results/summary.json")))
        if summaries:
            table = markdown_table(summaries)
            atomic_write_text(sweep / "table.md", table)
            print(f"\n{table}\nwritten to {sweep / 'table.md'}")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    code = run_job(plain, job_dir)  # type: ignore[arg-type]
    if code != 0:
        FAILED_JOBS.append(job_dir)
        print(f"fedlsc-experiment: job in {job_dir} failed (exit {code}); "
              f"see {job_dir / 'flower.log'}", file=sys.stderr)


def main() -> None:
    """Run the job or sweep; exit 1 if any job failed (a job's exception exits 1 too)."""
    FAILED_JOBS.clear()
    _main()
    if FAILED_JOBS:
        print(f"fedlsc-experiment: {len(FAILED_JOBS)} job(s) failed: "
              + ", ".join(str(j) for j in FAILED_JOBS), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
