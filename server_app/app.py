"""The coordinator's Flower ServerApp: settings -> strategy and initial model -> rounds.

Every round is recorded (:mod:`server_app.recorder`); ``resume-from`` continues a stopped
run from its checkpoint.
"""

from __future__ import annotations

import functools
import json
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlsc_common.classes import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from fedlsc_common.settings import ConfigError, Settings, resolve_data_dir, resolve_results_dir
from fedlsc_common.storage import FolderInUse, atomic_write_text, load_checkpoint, lock_folder
from fedlsc_common.transport import retry_object_pulls_sooner
from fedlsc_flwr.metrics import pooled_evaluate_metrics
from fedlsc_flwr.model import build_model
from fedlsc_flwr.packing import PackingGrid
from fedlsc_flwr.wire import array_from_numpy
from server_app.final_model import averager_for, finish_model
from server_app.plots import PlotWriter
from server_app.recorder import (
    MeteredGrid,
    RecordedStrategy,
    RunRecorder,
    TensorBoardLog,
    read_rows,
)

app = ServerApp()


def wait_for_sites(grid: Grid, needed: int, timeout_s: float) -> None:
    """Fail with one clear line when fewer than ``needed`` sites connect in time."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {connected} site(s) connected after {timeout_s:.0f} s, but "
                f"min-available-nodes = {needed}: start more SuperNodes (or set "
                f"num-supernodes >= {needed} in simulation), or lower min-available-nodes")
        time.sleep(1.0)


def initial_arrays(settings: Settings) -> ArrayRecord:
    torch.manual_seed(settings.seed)
    model = build_model(settings.model.backbone, num_classes=settings.model.num_classes,
                        pretrained=settings.model.pretrained_source)
    return ArrayRecord({k: array_from_numpy(v.detach().cpu().numpy())
                        for k, v in model.state_dict().items()})


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = Settings.from_run_config(context.run_config)
        if settings.dataset.data_dir:  # sites read it in simulation: fail here, once
            resolve_data_dir(settings.dataset.data_dir)
    except ConfigError as err:
        log(ERROR, "Configuration error: %s", err)
        raise
    results_dir = resolve_results_dir(settings.results_dir, context.run_id)
    try:
        lock = lock_folder(results_dir)  # held until this process ends
    except FolderInUse as err:
        log(ERROR, "%s", err)
        raise
    log(INFO, "Results go to %s", results_dir)

    strategy = settings.build_strategy(evaluate_metrics_aggr_fn=functools.partial(
        pooled_evaluate_metrics, class_names=CLASSES))
    attack = _simulated_attack(settings)

    done, rows = 0, []
    if settings.resume_from:
        checkpoint = load_checkpoint(Path(settings.resume_from) / "checkpoint.pt")
        done = int(checkpoint["round"])
        arrays = ArrayRecord({k: array_from_numpy(v.numpy())
                              for k, v in checkpoint["arrays"].items()})
        strategy.load_state_dict(checkpoint["strategy_state"])
        rows = [r for r in read_rows(Path(settings.resume_from) / "metrics.jsonl")
                if r["round"] <= done]
        _truncate_similarity(Path(settings.resume_from), results_dir, done)
        log(INFO, "Resuming from %s after round %s", settings.resume_from, done)
    else:
        arrays = initial_arrays(settings)
    remaining = settings.num_server_rounds - done
    if remaining <= 0:
        log(INFO, "Nothing to do: %s of %s rounds already done", done,
            settings.num_server_rounds)
        return

    try:
        tensorboard = TensorBoardLog(results_dir / "tensorboard") if settings.tensorboard \
            else None
    except ConfigError as err:
        log(ERROR, "Configuration error: %s", err)
        raise
    wait_for_sites(grid, settings.min_available_nodes, settings.wait_for_sites_seconds)
    retry_object_pulls_sooner()  # replies are pulled as they arrive (MeteredGrid)
    metered = MeteredGrid(PackingGrid(grid))  # a model travels as one Array
    recorded = RecordedStrategy(strategy, lambda server_round: settings.evaluates(
        server_round + done))
    recorder = RunRecorder(
        results_dir, strategy=recorded, grid=metered, run_config=dict(context.run_config),
        strategy_name=settings.strategy.name, round_offset=done,
        model_info={"backbone": settings.model.backbone,
                    "image_size": settings.dataset.image_size,
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        class_names=list(CLASSES), targets=settings.targets, previous_rows=rows,
        tensorboard=tensorboard, simulated_attack=attack,
        plots=PlotWriter(background=True))  # off the round's critical path
    averager = averager_for(settings)  # the final model may average the last rounds'

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if averager is not None:
            averager.add(server_round + done, arrays)
        return recorder(server_round, arrays)

    recorded.start(grid=metered, initial_arrays=arrays, num_rounds=remaining,
                   timeout=float(settings.round_timeout),
                   train_config=ConfigRecord({"round-offset": done}),
                   evaluate_config=ConfigRecord({"round-offset": done}),
                   evaluate_fn=evaluate_fn)
    try:
        finish_model(settings, metered, recorded, recorder, averager, last_round=remaining,
                     round_offset=done)
    except Exception as err:  # the trained model and its results are still written
        log(ERROR, "Making the final model failed (%s: %s); the last round's model stays "
            "final", type(err).__name__, err)
        recorder.record_final_model(None, {"failed": f"{type(err).__name__}: {err}"})
    summary = recorder.finish()
    lock.close()
    if summary["rounds_aggregated"] == 0:
        raise RuntimeError(
            f"no round of this run was aggregated: no site sent a usable training reply "
            f"(see 'failures' in {results_dir / 'metrics.jsonl'} and the sites' logs)")
    final = summary["final"]["global"]
    log(INFO, "Finished: global model balanced accuracy %.4f, accuracy %.4f on the pooled "
        "held-out data; personalized models mean balanced accuracy %.4f. Files in %s",
        final.get("balanced-accuracy", float("nan")), final.get("accuracy", float("nan")),
        summary["final"]["personalized"].get("balanced-accuracy", float("nan")), results_dir)


def _simulated_attack(settings: Settings) -> dict[str, object] | None:
    """The run's simulated bad site (``attack.*``), announced in the log; None if none."""
    a = settings.attack
    if not a.active:
        return None
    if settings.partition.name == "folder":
        log(WARNING, "attack.kind = %s is set, but sites reading their own data folders "
            "(partition.name = folder) never apply it: no site is simulated as bad", a.kind)
        return None
    log(WARNING, "SIMULATED BAD SITE in this run: %s (site-%s unless the node config names "
        "it otherwise)", a.describe(), a.site)
    return {"kind": a.kind, "partition_id": a.site, "fraction": a.fraction, "scale": a.scale,
            "description": a.describe()}


def _truncate_similarity(source: Path, target: Path, done: int) -> None:
    """Keep the similarity rows of rounds already done (no round is counted twice)."""
    path = source / "similarity.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["round"] <= done]
    atomic_write_text(target / "similarity.jsonl", "".join(line + "\n" for line in kept))
