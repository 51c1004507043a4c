"""What the ServerApp records each round: metrics, traffic, checkpoints, plots, summary.

Files in the results folder (each written atomically):
``metrics.jsonl`` one JSON object per round; ``similarity.jsonl`` FedLSC's per-layer
table per round; ``checkpoint.pt`` enough to resume; ``global_model.pt`` a self-describing
model file; ``summary.json``; ``accuracy.png``, ``similarity_heatmap.png`` and
``agreement.png`` (FedLSC's site agreement per round, one line per site).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlsc_common.storage import atomic_write_json, atomic_write_text, save_checkpoint, save_model
from fedlsc_flwr.strategy import SiteTracking
from fedlsc_flwr.wire import message_bytes
from server_app.plots import plot_accuracy, plot_agreement, plot_similarity_heatmap


class MeteredGrid:
    """A Grid that counts the array bytes it sends and receives; delegates the rest."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.traffic: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kind = "train" if messages and messages[0].metadata.message_type == MessageType.TRAIN \
            else "evaluate"
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.traffic[f"{kind}-sent"] = self.traffic.get(f"{kind}-sent", 0) + sum(
            message_bytes(m) for m in messages)
        self.traffic[f"{kind}-received"] = self.traffic.get(f"{kind}-received", 0) + sum(
            message_bytes(m) for m in replies)
        return replies

    def take_traffic(self) -> dict[str, int]:
        traffic, self.traffic = self.traffic, {}
        return traffic


class RecordedStrategy(Strategy):
    """Runs one of this package's strategies unchanged and keeps what its aggregate hooks
    returned in the current round, for that round's row of ``metrics.jsonl``.

    Flower's ``start()`` (inherited, not copied) drives the rounds through these hooks.
    """

    def __init__(self, inner: SiteTracking) -> None:
        if not isinstance(inner, SiteTracking):
            raise TypeError(f"RecordedStrategy needs a fedlsc_flwr strategy (a SiteTracking), "
                            f"got {type(inner).__name__}")
        self.inner = inner
        self.train_metrics: dict[str, Any] = {}
        self.evaluate_metrics: dict[str, Any] = {}
        self.aggregated = False  # False: too few usable replies, the model was kept

    def take_round(self) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """The round's train metrics, evaluate metrics and aggregated flag; then reset."""
        taken = self.train_metrics, self.evaluate_metrics, self.aggregated
        self.train_metrics, self.evaluate_metrics, self.aggregated = {}, {}, False
        return taken

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self.train_metrics = dict(metrics) if metrics is not None else {}
        self.aggregated = arrays is not None
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self.evaluate_metrics = dict(metrics) if metrics is not None else {}
        return metrics

    def summary(self) -> None:
        self.inner.summary()


class RunRecorder:
    """Writes a row per round and a checkpoint, as Flower's ``evaluate_fn`` (called last
    in every round), from what :class:`RecordedStrategy` kept of the round."""

    def __init__(self, results_dir: Path, *, strategy: RecordedStrategy, grid: MeteredGrid,
                 run_config: Mapping[str, Any], strategy_name: str, round_offset: int,
                 model_info: Mapping[str, Any], class_names: list[str],
                 targets: list[float], previous_rows: list[dict[str, Any]] | None = None,
                 simulated_attack: Mapping[str, Any] | None = None) -> None:
        self.dir = results_dir
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
        self.simulated_attack = dict(simulated_attack) if simulated_attack else None
        self._round_start = time.perf_counter()
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
            return None
        true_round = server_round + self.offset
        row = self._row(true_round)
        row["agreement"] = self._agreement(server_round, true_round)
        self.rows.append(row)
        self.last_arrays = arrays
        atomic_write_text(self.dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in self.rows))
        report = self.strategy.last_report
        if report is not None and report.server_round == server_round:
            as_json = report.to_json()
            as_json["round"] = true_round
            with open(self.dir / "similarity.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(as_json) + "\n")
            plot_similarity_heatmap(as_json, self.dir / "similarity_heatmap.png")
            if not self._stage1_done_before and self.strategy.stage1_round == server_round:
                plot_similarity_heatmap(as_json, self.dir / "similarity_heatmap_stage1.png")
        state = self.strategy.state_dict()
        save_checkpoint(self.dir / "checkpoint.pt", server_round=true_round,
                        arrays={k: v.numpy() for k, v in arrays.items()},
                        strategy_state=state, run_config=self.run_config)
        plot_accuracy(self.rows, self.dir / "accuracy.png", title=self.strategy_name)
        if any(r.get("agreement") for r in self.rows):
            plot_agreement(self.rows, self.dir / "agreement.png", title=self.strategy_name)
        self._round_start = time.perf_counter()
        glob, own = row["global"], row["personalized"]
        if self.global_model_scored:
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

    def _row(self, true_round: int) -> dict[str, Any]:
        train, evaluate, aggregated = self.recorded.take_round()

        def group(prefix: str) -> dict[str, Any]:
            return {k[len(prefix):]: v for k, v in evaluate.items()
                    if k.startswith(prefix) and not isinstance(v, list)}

        similarity = {k: v for k, v in train.items() if k.startswith("lsc-")}
        similarity["num-personalized-layers"] = len(self.strategy.personalized_layers)
        return {
            "round": true_round,
            "strategy": self.strategy_name,
            "train": {k: v for k, v in train.items() if not k.startswith("lsc-")},
            "aggregated": aggregated,  # False: too few usable replies, model kept
            "global": group("global-"),
            # False: the global model holds layers no round trained (see global_model_scored)
            "global-model-scored": self.global_model_scored,
            "personalized": group("personal-"),
            "sites-evaluated": int(evaluate.get("num-sites", 0)) or None,
            # sites that failed this round: [{"site", "node", "reason"}] per phase
            "failures": {phase: list(found) for phase, found in self.strategy.failures.items()},
            "similarity": similarity,
            "bytes": self.grid.take_traffic(),
            "seconds": round(time.perf_counter() - self._round_start, 2),
        }

    def _agreement(self, server_round: int, true_round: int) -> dict[str, Any] | None:
        """FedLSC's per-site agreement of this round (None for strategies that compute no
        similarities, or a round that did not aggregate)."""
        report = self.strategy.last_report
        if report is None or report.server_round != server_round \
                or getattr(report, "agreement", None) is None:
            return None
        return {**report.agreement, "round": true_round}

    def finish(self) -> dict[str, Any]:
        """Final model and summary.json; returns the summary."""
        if self.last_arrays is not None:
            save_model(self.dir / "global_model.pt",
                       {k: v.numpy() for k, v in self.last_arrays.items()},
                       **self.model_info, class_names=self.class_names,
                       round=self.rows[-1]["round"] if self.rows else 0, kind="global")
        scored = self.global_model_scored
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
            "final": {"global": self.rows[-1]["global"] if self.rows and scored else {},
                      "personalized": self.rows[-1]["personalized"] if self.rows else {}},
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
        return summary


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

