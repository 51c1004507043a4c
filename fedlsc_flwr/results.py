"""What the ServerApp records each round: metrics, traffic, checkpoints, plots, summary.

Files in the results folder (each written atomically):
``metrics.jsonl`` one JSON object per round; ``similarity.jsonl`` FedLSC's per-layer
table per round; ``checkpoint.pt`` enough to resume; ``global_model.pt`` a self-describing
model file; ``summary.json``; ``accuracy.png`` and ``similarity_heatmap.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedlsc_flwr.data import CLASSES
from fedlsc_flwr.plots import plot_accuracy, plot_similarity_heatmap
from fedlsc_flwr.storage import atomic_write_json, atomic_write_text, save_checkpoint, save_model
from fedlsc_flwr.training import classification_metrics

MODEL_GROUPS = ("global", "personal")


def message_bytes(message: Message) -> int:
    """Bytes of array payload a message carries (what dominates the traffic)."""
    if message.has_error():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values()
               for array in record.values())


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


def pooled_evaluate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Sites' evaluation replies -> one MetricRecord.

    Confusion matrices are summed, so accuracy, balanced accuracy and macro scores are
    those of the pooled held-out data of all sites (not an average of site scores);
    the unweighted mean over sites of the personalized models' scores is added too.
    Other scalars are example-weighted averages (Flower's default).
    """
    metrics = aggregate_metricrecords(
        [_without_lists(r) for r in records], weighted_by_key)
    metrics["num-sites"] = len(records)
    names = None
    for group in MODEL_GROUPS:
        key = f"{group}-confusion"
        matrices = [np.array(_metric(r, key)) for r in records if _metric(r, key) is not None]
        if not matrices:
            continue
        size = int(round(len(matrices[0]) ** 0.5))
        pooled = sum(m.reshape(size, size) for m in matrices)
        names = names or (list(CLASSES) if size == len(CLASSES)
                          else [f"class{i}" for i in range(size)])
        metrics[key] = [int(v) for v in pooled.reshape(-1)]
        for name, value in classification_metrics(pooled, names).items():
            metrics[f"{group}-{name}"] = value
        per_site = [classification_metrics(m.reshape(size, size), names) for m in matrices]
        for name in ("accuracy", "balanced-accuracy", "f1"):
            metrics[f"{group}-site-mean-{name}"] = float(np.mean([s[name] for s in per_site]))
    return metrics


def _metric(record: RecordDict, key: str) -> Any:
    return next(iter(record.metric_records.values())).get(key)


def _without_lists(record: RecordDict) -> RecordDict:
    metrics = next(iter(record.metric_records.values()))
    return RecordDict({"metrics": MetricRecord(
        {k: v for k, v in metrics.items() if not isinstance(v, list)})})


class RunRecorder:
    """Writes a row per round and a checkpoint, as Flower's ``evaluate_fn`` (called last
    in every round); wraps the strategy's aggregate hooks to see their results."""

    def __init__(self, results_dir: Path, *, strategy: Any, grid: MeteredGrid,
                 run_config: Mapping[str, Any], strategy_name: str, round_offset: int,
                 model_info: Mapping[str, Any], class_names: list[str],
                 targets: list[float], previous_rows: list[dict[str, Any]] | None = None) -> None:
        self.dir = results_dir
        self.strategy = strategy
        self.grid = grid
        self.run_config = dict(run_config)
        self.strategy_name = strategy_name
        self.offset = round_offset
        self.model_info = dict(model_info)
        self.class_names = class_names
        self.targets = targets
        self.rows: list[dict[str, Any]] = list(previous_rows or [])
        self._train: dict[str, Any] = {}
        self._aggregated = False
        self._evaluate: dict[str, Any] = {}
        self._round_start = time.perf_counter()
        self.last_arrays: ArrayRecord | None = None
        self._wrap(strategy)

    def _wrap(self, strategy: Any) -> None:
        aggregate_train, aggregate_evaluate = strategy.aggregate_train, strategy.aggregate_evaluate

        def recorded_train(server_round: int, replies: Iterable[Message]):
            arrays, metrics = aggregate_train(server_round, replies)
            self._train = dict(metrics) if metrics is not None else {}
            self._aggregated = arrays is not None
            return arrays, metrics

        def recorded_evaluate(server_round: int, replies: Iterable[Message]):
            metrics = aggregate_evaluate(server_round, replies)
            self._evaluate = dict(metrics) if metrics is not None else {}
            return metrics

        strategy.aggregate_train = recorded_train
        strategy.aggregate_evaluate = recorded_evaluate

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: record the round that just ended."""
        if server_round == 0:
            self._round_start = time.perf_counter()
            return None
        true_round = server_round + self.offset
        row = self._row(true_round)
        self.rows.append(row)
        self.last_arrays = arrays
        atomic_write_text(self.dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in self.rows))
        report = getattr(self.strategy, "last_report", None)
        if report is not None and report.server_round == server_round:
            as_json = report.to_json()
            as_json["round"] = true_round
            with open(self.dir / "similarity.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(as_json) + "\n")
            plot_similarity_heatmap(as_json, self.dir / "similarity_heatmap.png")
            if getattr(self.strategy, "stage1_round", None) == server_round:
                plot_similarity_heatmap(as_json, self.dir / "similarity_heatmap_stage1.png")
        state = self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else {}
        save_checkpoint(self.dir / "checkpoint.pt", server_round=true_round,
                        arrays={k: v.numpy() for k, v in arrays.items()},
                        strategy_state=state, run_config=self.run_config)
        plot_accuracy(self.rows, self.dir / "accuracy.png", title=self.strategy_name)
        self._round_start = time.perf_counter()
        glob = row["global"]
        log(INFO, "Round %s: global accuracy %.4f, balanced accuracy %.4f (pooled held-out "
            "data of %s sites); results in %s", true_round, glob.get("accuracy", float("nan")),
            glob.get("balanced-accuracy", float("nan")), row["sites-evaluated"], self.dir)
        return MetricRecord({k: v for k, v in glob.items() if isinstance(v, float)})

    def _row(self, true_round: int) -> dict[str, Any]:
        train, evaluate, aggregated = self._train, self._evaluate, self._aggregated
        self._train, self._evaluate, self._aggregated = {}, {}, False

        def group(prefix: str) -> dict[str, Any]:
            return {k[len(prefix):]: v for k, v in evaluate.items()
                    if k.startswith(prefix) and not isinstance(v, list)}

        similarity = {k: v for k, v in train.items() if k.startswith("lsc-")}
        similarity["num-personalized-layers"] = len(
            getattr(self.strategy, "personalized_layers", ()) or ())
        return {
            "round": true_round,
            "strategy": self.strategy_name,
            "train": {k: v for k, v in train.items() if not k.startswith("lsc-")},
            "aggregated": aggregated,  # False: too few usable replies, model kept
            "global": group("global-"),
            "personalized": group("personal-"),
            "sites-evaluated": int(evaluate.get("num-sites", 0)) or None,
            # sites that failed this round: [{"site", "node", "reason"}] per phase
            "failures": {phase: list(found) for phase, found in
                         (getattr(self.strategy, "failures", None) or {}).items()},
            "similarity": similarity,
            "bytes": self.grid.take_traffic(),
            "seconds": round(time.perf_counter() - self._round_start, 2),
        }

    def finish(self) -> dict[str, Any]:
        """Final model and summary.json; returns the summary."""
        if self.last_arrays is not None:
            save_model(self.dir / "global_model.pt",
                       {k: v.numpy() for k, v in self.last_arrays.items()},
                       **self.model_info, class_names=self.class_names,
                       round=self.rows[-1]["round"] if self.rows else 0, kind="global")
        reached = {}
        for target in self.targets:
            hit = next((r["round"] for r in self.rows
                        if r["global"].get("accuracy", 0.0) >= target), None)
            reached[f"{target:g}"] = hit
        summary = {
            "strategy": self.strategy_name,
            "rounds": len(self.rows),
            "rounds_aggregated": sum(bool(r.get("aggregated", True)) for r in self.rows),
            "final": {"global": self.rows[-1]["global"] if self.rows else {},
                      "personalized": self.rows[-1]["personalized"] if self.rows else {}},
            "rounds_to_reach_accuracy": reached,
            "personalized_layers": sorted(getattr(self.strategy, "personalized_layers", ())),
            "bytes_per_round": _mean_traffic(self.rows),
            "config": self.run_config,
        }
        atomic_write_json(self.dir / "summary.json", summary)
        return summary


def _mean_traffic(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r.get("bytes", {})})
    return {k: float(np.mean([r["bytes"].get(k, 0) for r in rows])) for k in keys}


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

