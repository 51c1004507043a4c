"""What the ServerApp records each round: metrics, traffic, checkpoints, plots, summary.

Files in the results folder (each written atomically):
``metrics.jsonl`` one JSON object per round (with the round's confusion matrices, pooled
and per site); ``similarity.jsonl`` FedLSC's per-layer table per round; ``checkpoint.pt``
enough to resume; ``global_model.pt`` a self-describing model file; ``summary.json``;
``accuracy.png``, ``confusion_matrix.png``, ``similarity_heatmap.png`` and
``agreement.png`` (FedLSC's site agreement per round, one line per site); with
``tensorboard = true``, every round's metrics as TensorBoard scalars in ``tensorboard/``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlsc_common.settings import ConfigError
from fedlsc_common.storage import atomic_write_json, atomic_write_text, save_checkpoint, save_model
from fedlsc_flwr.metrics import MODEL_GROUPS
from fedlsc_flwr.packing import send_and_receive_by_polling
from fedlsc_flwr.strategy import SiteTracking
from fedlsc_flwr.wire import TIMING_RECORD_KEY, message_bytes, site_name_in
from server_app.plots import (
    PlotWriter,
    plot_accuracy,
    plot_agreement,
    plot_confusion,
    plot_similarity_heatmap,
)


class MeteredGrid:
    """A Grid that counts the array bytes it sends and receives, and notes when each
    phase's messages went out and its last reply came back; delegates the rest.

    ``send_and_receive`` pushes the messages and pulls replies every ``poll_interval``
    seconds through the Grid's own ``push_messages``/``pull_messages``: Flower 1.42's
    deployment Grid waits a fixed 3 s between pulls, so a round's last reply waited
    1.5 s on average, twice a round (the simulation's Grid polls every 0.1 s). It counts
    the bytes of the arrays as the strategy sees them: wrap it around a
    :class:`~fedlsc_flwr.packing.PackingGrid`, not inside one.
    """

    def __init__(self, grid: Any, poll_interval: float = 0.2) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.traffic: dict[str, int] = {}
        self.marks: dict[str, float] = {}  # "<phase>-sent" / "<phase>-replied": wall clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kind = message_kind(messages[0]) if messages else "evaluate"
        # counted before a PackingGrid below packs them, as the strategy made them
        self.traffic[f"{kind}-sent"] = self.traffic.get(f"{kind}-sent", 0) + sum(
            message_bytes(m) for m in messages)
        self.marks[f"{kind}-sent"] = time.time()
        replies = send_and_receive_by_polling(self._grid, messages, timeout,
                                              self.poll_interval)
        self.marks[f"{kind}-replied"] = time.time()
        self.traffic[f"{kind}-received"] = self.traffic.get(f"{kind}-received", 0) + sum(
            message_bytes(m) for m in replies)
        return replies

    def take_traffic(self) -> dict[str, int]:
        traffic, self.traffic = self.traffic, {}
        return traffic

    def take_marks(self) -> dict[str, float]:
        marks, self.marks = self.marks, {}
        return marks


def message_kind(message: Message) -> str:
    """"train", "evaluate" or "query" (the category of "query.<action>")."""
    kind = str(message.metadata.message_type).split(".", 1)[0]
    return kind if kind in (MessageType.TRAIN, MessageType.QUERY) else "evaluate"


class RecordedStrategy(Strategy):
    """Runs one of this package's strategies unchanged and keeps what its aggregate hooks
    returned in the current round, for that round's row of ``metrics.jsonl``.

    Flower's ``start()`` (inherited, not copied) drives the rounds through these hooks.
    """

    def __init__(self, inner: SiteTracking,
                 evaluates: Callable[[int], bool] = lambda server_round: True) -> None:
        if not isinstance(inner, SiteTracking):
            raise TypeError(f"RecordedStrategy needs a fedlsc_flwr strategy (a SiteTracking), "
                            f"got {type(inner).__name__}")
        self.inner = inner
        self.evaluates = evaluates  # by Flower's round number: ask the sites to evaluate?
        self.train_metrics: dict[str, Any] = {}
        self.evaluate_metrics: dict[str, Any] = {}
        #: each site's flat confusion matrices of the round: {site: {"global-confusion": [...]}}
        self.site_confusion: dict[str, dict[str, list[int]]] = {}
        self.aggregated = False  # False: too few usable replies, the model was kept
        self.costs: dict[str, Any] = {}  # what the round's replies say about its time
        self.marks: dict[str, float] = {}  # when aggregation ran: wall clock

    def take_round(self) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """The round's train metrics, evaluate metrics and aggregated flag; then reset."""
        taken = self.train_metrics, self.evaluate_metrics, self.aggregated
        self.train_metrics, self.evaluate_metrics, self.aggregated = {}, {}, False
        return taken

    def take_site_confusion(self) -> dict[str, dict[str, list[int]]]:
        """Each site's confusion matrices of the round (from its evaluate reply); then reset."""
        taken, self.site_confusion = self.site_confusion, {}
        return taken

    def take_costs(self) -> tuple[dict[str, Any], dict[str, float]]:
        """What the round's replies said about its time, and the aggregation marks."""
        taken = self.costs, self.marks
        self.costs, self.marks = {}, {}
        return taken

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.costs.update(train_costs(replies))
        self.costs.setdefault("sites", {})
        for name, marks in site_timings(replies).items():
            self.costs["sites"].setdefault(name, {})["train"] = marks
        self.marks["aggregate-start"] = time.time()
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self.marks["aggregate-end"] = time.time()
        self.train_metrics = dict(metrics) if metrics is not None else {}
        self.aggregated = arrays is not None
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluates(server_round):
            log(INFO, "configure_evaluate: no evaluation after round %s (evaluate-every)",
                server_round)
            return []
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        self.site_confusion = {}
        for msg in replies:
            if msg.has_error() or not msg.content.metric_records:
                continue
            record = next(iter(msg.content.metric_records.values()))
            name = site_name_in(msg) or f"node {msg.metadata.src_node_id}"
            matrices = {key: record.get(key) for key in (f"{g}-confusion" for g in MODEL_GROUPS)}
            self.site_confusion[name] = {key: [int(v) for v in value]
                                         for key, value in matrices.items()
                                         if isinstance(value, list)}
        self.costs.setdefault("sites", {})
        for name, marks in site_timings(replies).items():
            self.costs["sites"].setdefault(name, {})["evaluate"] = marks
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self.evaluate_metrics = dict(metrics) if metrics is not None else {}
        return metrics

    def summary(self) -> None:
        self.inner.summary()


class TensorBoardLog:
    """Every recorded round's numbers as TensorBoard scalars (``group/metric`` at step =
    round), for watching a run with ``tensorboard --logdir RESULTS_DIR``."""

    GROUPS = ("global", "personalized", "train", "similarity", "bytes")

    def __init__(self, folder: Path, first_round: int = 1) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("run config 'tensorboard' = true needs the tensorboard package: "
                              "pip install 'fedlsc-flwr[tensorboard]' (or set it to false)")
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        # purge_step: what an earlier run logged here from this round on is replaced
        self.writer = SummaryWriter(str(folder), purge_step=first_round)

    def write(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for group in self.GROUPS:
            for key, value in (row.get(group) or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.add_scalar("time/seconds-per-round", row["seconds"], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _train_seconds(msg: Message) -> float | None:
    metrics = next(iter(msg.content.metric_records.values()), None)
    value = metrics.get("train-seconds") if metrics is not None else None
    return float(value) if isinstance(value, int | float) else None


def train_costs(replies: list[Message]) -> dict[str, float]:
    """From a round's training replies: the slowest site's own training time
    (``train-seconds-max``), all sites' training images, and the span from the first
    site's start of training to the last site's end (``train-span-seconds``; the sites'
    clocks, so meaningful where they agree, e.g. NTP or one machine)."""
    usable = [m for m in replies if not m.has_error()]
    seconds = [s for m in usable if (s := _train_seconds(m)) is not None]
    costs: dict[str, float] = {}
    if seconds:
        costs["train-seconds-max"] = round(max(seconds), 3)
    images = [next(iter(m.content.metric_records.values())).get("num-examples", 0)
              for m in usable if m.content.metric_records]
    costs["train-images"] = int(sum(v for v in images if isinstance(v, int | float)))
    spans = [(float(t["train-start"]), float(t["train-end"])) for m in usable
             if (t := m.content.config_records.get(TIMING_RECORD_KEY)) is not None
             and "train-start" in t and "train-end" in t]
    if spans and len(spans) == len(usable):
        costs["train-span-seconds"] = round(max(e for _, e in spans) -
                                            min(s for s, _ in spans), 3)
    return costs


def site_timings(replies: list[Message]) -> dict[str, dict[str, float]]:
    """Each replying site's timing marks (see the ClientApp's ``Timeline``), by site name."""
    found: dict[str, dict[str, float]] = {}
    for msg in replies:
        name = site_name_in(msg)
        if name is not None and TIMING_RECORD_KEY in msg.content.config_records:
            found[name] = {k: float(v) for k, v in
                           msg.content.config_records[TIMING_RECORD_KEY].items()}
    return found


class RunRecorder:
    """Writes a row per round and a checkpoint, as Flower's ``evaluate_fn`` (called last
    in every round), from what :class:`RecordedStrategy` kept of the round."""

    def __init__(self, results_dir: Path, *, strategy: RecordedStrategy, grid: MeteredGrid,
                 run_config: Mapping[str, Any], strategy_name: str, round_offset: int,
                 model_info: Mapping[str, Any], class_names: list[str],
                 targets: list[float], previous_rows: list[dict[str, Any]] | None = None,
                 tensorboard: TensorBoardLog | None = None,
                 simulated_attack: Mapping[str, Any] | None = None,
                 plots: PlotWriter | None = None) -> None:
        self.dir = results_dir
        self.plots = plots or PlotWriter()  # at once, unless the caller draws them aside
        self.recorded = strategy
        self.strategy = strategy.inner
        self.grid = grid
        self.run_config = dict(run_config)
        self.strategy_name = strategy_name
        self.offset = round_offset
        self.model_info = dict(model_info)
        self.class_names = class_names
        self.targets = targets
        self.rows: list[dict[str, Any]] = list(previous_rows or [])
        self.tensorboard = tensorboard
        if tensorboard is not None:
            for row in self.rows:  # a resumed run's log holds its earlier rounds too
                tensorboard.write(row)
        self.simulated_attack = dict(simulated_attack) if simulated_attack else None
        self._round_start = time.perf_counter()
        self._round_started_at = time.time()
        self.last_arrays: ArrayRecord | None = None
        # A run resumed after stage 1 must not redraw the stage-1 heatmap with a later round.
        self._stage1_done_before = self.strategy.stage1_round is not None

    @property
    def global_model_scored(self) -> bool:
        """False when the global model holds layers no round ever trained (they stay on
        the sites): its scores are then not those of a classifier anyone would use."""
        return not self.strategy.never_shared

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: record the round that just ended."""
        if server_round == 0:
            self._round_start = time.perf_counter()
            self._round_started_at = time.time()
            return None
        record_start = time.time()
        true_round = server_round + self.offset
        row = self._row(true_round)
        row["agreement"] = self._agreement(server_round, true_round)
        self.rows.append(row)
        self.last_arrays = arrays
        self._write_rows()
        if self.tensorboard is not None:
            self.tensorboard.write(row)
        report = self.strategy.last_report
        if report is not None and report.server_round == server_round:
            as_json = report.to_json()
            as_json["round"] = true_round
            with open(self.dir / "similarity.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(as_json) + "\n")
            self.plots.submit(self.dir / "similarity_heatmap.png", plot_similarity_heatmap,
                              as_json)
            if not self._stage1_done_before and self.strategy.stage1_round == server_round:
                self.plots.submit(self.dir / "similarity_heatmap_stage1.png",
                                  plot_similarity_heatmap, as_json)
        state = self.strategy.state_dict()
        save_checkpoint(self.dir / "checkpoint.pt", server_round=true_round,
                        arrays={k: v.numpy() for k, v in arrays.items()},
                        strategy_state=state, run_config=self.run_config)
        rows = copy.deepcopy(self.rows)  # the plots may be drawn later
        self.plots.submit(self.dir / "accuracy.png", plot_accuracy, rows,
                          title=self.strategy_name)
        if row.get("confusion"):
            drawn, note = copy.deepcopy(row["confusion"]), ""
            if not self.global_model_scored:  # as in the log: its layers were never trained
                drawn.pop("global", None)
                note = " (global model not scored: some of its layers stay on the sites)"
            if len(drawn) > 1:
                self.plots.submit(
                    self.dir / "confusion_matrix.png", plot_confusion, drawn,
                    title=f"{self.strategy_name}, round {true_round}: held-out confusion "
                          f"matrices, colour = share of the true class{note}")
        if any(r.get("agreement") for r in self.rows):
            self.plots.submit(self.dir / "agreement.png", plot_agreement, rows,
                              title=self.strategy_name)
        # The round ends here: writing its results is part of it. The row was written
        # before the checkpoint (a resumed run finds a row for every checkpointed round);
        # now again with the round's wall time.
        row["round-seconds"] = round(time.perf_counter() - self._round_start, 2)
        row["timing"]["server"].update({"record-start": record_start, "recorded": time.time()})
        log(INFO, "Round %s server timing %s", true_round, json.dumps(row["timing"]))
        self._write_rows()
        self._round_start = time.perf_counter()
        self._round_started_at = time.time()
        glob, own = row["global"], row["personalized"]
        if not row["sites-evaluated"]:
            log(INFO, "Round %s: not evaluated (evaluate-every = %s: the sites evaluate every "
                "so many rounds and in the last); results in %s", true_round,
                self.run_config.get("evaluate-every", "?"), self.dir)
        elif self.global_model_scored:
            log(INFO, "Round %s: global accuracy %.4f, balanced accuracy %.4f (pooled held-out "
                "data of %s sites); results in %s", true_round, glob.get("accuracy", float("nan")),
                glob.get("balanced-accuracy", float("nan")), row["sites-evaluated"], self.dir)
        else:
            log(INFO, "Round %s: personalized models accuracy %.4f, balanced accuracy %.4f "
                "(pooled held-out data of %s sites; the global model is not scored: %s "
                "layer(s) stay on the sites); results in %s", true_round,
                own.get("accuracy", float("nan")), own.get("balanced-accuracy", float("nan")),
                row["sites-evaluated"], len(self.strategy.never_shared), self.dir)
        return MetricRecord({k: v for k, v in glob.items() if isinstance(v, float)})

    def _write_rows(self) -> None:
        """metrics.jsonl: every recorded row, written atomically."""
        atomic_write_text(self.dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in self.rows))

    def _row(self, true_round: int) -> dict[str, Any]:
        train, evaluate, aggregated = self.recorded.take_round()

        similarity = {k: v for k, v in train.items() if k.startswith("lsc-")}
        confusion = self._confusion(evaluate, self.recorded.take_site_confusion())
        similarity["num-personalized-layers"] = len(self.strategy.personalized_layers)
        costs, aggregate_marks = self.recorded.take_costs()
        sites = costs.pop("sites", {})
        server = {"round-start": self._round_started_at, **self.grid.take_marks(),
                  **aggregate_marks}
        return {
            "round": true_round,
            "strategy": self.strategy_name,
            "train": {k: v for k, v in train.items() if not k.startswith("lsc-")},
            "aggregated": aggregated,  # False: too few usable replies, model kept
            "global": _group(evaluate, "global-"),
            # False: the global model holds layers no round trained (see global_model_scored)
            "global-model-scored": self.global_model_scored,
            "personalized": _group(evaluate, "personal-"),
            "sites-evaluated": int(evaluate.get("num-sites", 0)) or None,
            # sites that failed this round: [{"site", "node", "reason"}] per phase
            "failures": {phase: list(found) for phase, found in self.strategy.failures.items()},
            "similarity": similarity,
            "bytes": self.grid.take_traffic(),
            "seconds": round(time.perf_counter() - self._round_start, 2),
            # K×K counts (rows: true class): pooled over the sites, and each site's
            "confusion": confusion,
            # wall time of the round at the ServerApp, from the end of the previous
            # round's recording to the end of this one's (checkpoint and plots included);
            # filled in once they are written
            "round-seconds": None,
            **costs,  # train-seconds-max, train-images, train-span-seconds
            "timing": {"server": server, "sites": sites},
        }

    def _confusion(self, evaluate: Mapping[str, Any],
                   sites: Mapping[str, Mapping[str, list[int]]]) -> dict[str, Any] | None:
        """The round's confusion matrices as nested lists, for metrics.jsonl and the plot."""
        k = len(self.class_names)
        out: dict[str, Any] = {"classes": list(self.class_names)}
        for group, name in zip(MODEL_GROUPS, ("global", "personalized")):
            key = f"{group}-confusion"
            # a site whose matrix is not K×K is left out here (its scores are wrong anyway)
            per_site = {site: square for site, m in sites.items()
                        if key in m and (square := _square(m[key], k)) is not None}
            pooled = _square(evaluate[key], k) if key in evaluate else None
            if pooled is None and per_site:
                pooled = np.sum(list(per_site.values()), axis=0).tolist()
            if pooled is not None:
                out[name] = {"pooled": pooled, "sites": per_site}
        return out if len(out) > 1 else None

    def _agreement(self, server_round: int, true_round: int) -> dict[str, Any] | None:
        """FedLSC's per-site agreement of this round (None for strategies that compute no
        similarities, or a round that did not aggregate)."""
        report = self.strategy.last_report
        if report is None or report.server_round != server_round \
                or getattr(report, "agreement", None) is None:
            return None
        return {**report.agreement, "round": true_round}

    def record_final_model(self, arrays: ArrayRecord | None,
                           info: Mapping[str, Any]) -> dict[str, Any]:
        """After the last round (``server_app.final_model``): how the final global model
        was made (``info``: averaged rounds, head calibration) and, when it differs from the
        last round's (``arrays``), the sites' evaluation of it, as ``"final-model"`` in the
        last row of metrics.jsonl. ``finish`` then saves it as global_model.pt and reports
        its scores as final; checkpoint.pt keeps the last round's model (a resume trains on
        from it)."""
        if not self.rows:
            raise RuntimeError("record_final_model: no round was recorded")
        _, evaluate, _ = self.recorded.take_round()
        site_confusion = self.recorded.take_site_confusion()
        self.recorded.take_costs()
        entry: dict[str, Any] = dict(info)
        if arrays is not None:
            entry.update({
                "global": _group(evaluate, "global-"),
                "personalized": _group(evaluate, "personal-"),
                "sites-evaluated": int(evaluate.get("num-sites", 0)) or None,
                "confusion": self._confusion(evaluate, site_confusion),
            })
            self.last_arrays = arrays
        entry["bytes"] = self.grid.take_traffic()
        row = self.rows[-1]
        row["final-model"] = entry
        self._write_rows()
        if entry.get("confusion"):
            self.plots.submit(
                self.dir / "confusion_matrix.png", plot_confusion,
                copy.deepcopy(entry["confusion"]),
                title=f"{self.strategy_name}, final model after round {row['round']}: "
                      "held-out confusion matrices, colour = share of the true class")
        return entry

    def finish(self) -> dict[str, Any]:
        """Final model and summary.json (after every plot is drawn); returns the summary."""
        self.plots.close()
        last = self.rows[-1] if self.rows else {}
        entry = last.get("final-model")
        evaluated = bool(entry and entry.get("global"))
        made = {"averaged_rounds": list(entry.get("averaged-rounds", [])) if evaluated else [],
                "head_calibrated": evaluated and _calibration_ran(entry)}
        if self.last_arrays is not None:
            save_model(self.dir / "global_model.pt",
                       {k: v.numpy() for k, v in self.last_arrays.items()},
                       **self.model_info, class_names=self.class_names,
                       round=last.get("round", 0), kind="global", **made)
        scored = self.global_model_scored
        final = entry if evaluated else {"global": last.get("global", {}),
                                         "personalized": last.get("personalized", {})}
        final_model = None
        if entry is not None:
            final_model = {
                "evaluated": evaluated, **made,
                "calibration": entry.get("calibration"),
                "before": {"global": last.get("global", {}) if scored else {},
                           "personalized": last.get("personalized", {})},
            }
        reached = {}
        for target in self.targets:
            hit = next((r["round"] for r in self.rows
                        if r["global"].get("accuracy", 0.0) >= target), None)
            reached[f"{target:g}"] = hit
        summary = {
            "strategy": self.strategy_name,
            "rounds": len(self.rows),
            "rounds_aggregated": sum(bool(r.get("aggregated", True)) for r in self.rows),
            # Not scored: the global model holds layers no round trained ("never_trained").
            "global_model": {"scored": scored,
                             "never_trained": sorted(self.strategy.never_shared)},
            # the final model's scores (server_app.final_model: averaged, head calibrated)
            "final": {"global": final["global"] if scored else {},
                      "personalized": final["personalized"]},
            # how the final model was made; "before" = the last round's model's scores
            "final_model": final_model,
            "rounds_to_reach_accuracy": reached if scored else {},
            "personalized_layers": sorted(self.strategy.personalized_layers),
            "bytes_per_round": _mean_traffic(self.rows),
            # a simulated bad site of this run (attack.*), or None
            "attack": self.simulated_attack,
            # sites FedLSC's agreement report named, with the first round it did
            "flagged_sites": _first_flagged(self.rows),
            "config": self.run_config,
        }
        atomic_write_json(self.dir / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


def _calibration_ran(entry: Mapping[str, Any]) -> bool:
    """Did the head calibration of this final-model entry run (not skipped)?"""
    calibration = entry.get("calibration")
    return bool(calibration and "skipped" not in calibration)


def _group(evaluate: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The scalar metrics of one model group ("global-", "personal-"), prefix removed."""
    return {k[len(prefix):]: v for k, v in evaluate.items()
            if k.startswith(prefix) and not isinstance(v, list)}


def _square(flat: list[int], size: int) -> list[list[int]] | None:
    """A flat K·K list (as sites send it) -> K rows of K counts; None if it is not K·K."""
    if len(flat) != size * size:
        return None
    return np.asarray(flat, dtype=np.int64).reshape(size, size).tolist()


def _mean_traffic(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r.get("bytes", {})})
    return {k: float(np.mean([r["bytes"].get(k, 0) for r in rows])) for k in keys}


def _first_flagged(rows: list[dict[str, Any]]) -> dict[str, int]:
    first: dict[str, int] = {}
    for row in rows:
        for name in (row.get("agreement") or {}).get("flagged", []):
            first.setdefault(name, row["round"])
    return first


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

