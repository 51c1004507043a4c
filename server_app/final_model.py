"""What the run's final global model is, once its rounds are done (beyond the paper):

1. with ``average-last-rounds = k`` > 1, the average of the global models of its last k
   rounds (:class:`RoundAverager`; weights of the same network a few rounds apart, as in
   stochastic weight averaging: it smooths the round-to-round swings of a federated run);
2. with ``calibration.enabled``, that model with its head calibrated
   (:mod:`fedlsc_flwr.calibration`): the sites send class feature statistics of it, the
   server retrains the head on virtual features;
3. the sites evaluate it (when 1 or 2 changed the last round's model), and
   :meth:`RunRecorder.record_final_model` records it: it becomes global_model.pt and the
   final scores.

A site that fails or sends unusable statistics is named and left out; with no usable
statistics, or for a strategy whose global model is not scored, the head stays as trained
and metrics.jsonl says why.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log

from fedlsc_common.settings import Settings
from fedlsc_flwr.calibration import (
    StatisticsError,
    pool_statistics,
    read_statistics,
    request_feature_statistics,
    with_calibrated_head,
)
from fedlsc_flwr.model import CLASSIFIER_LAYER
from fedlsc_flwr.wire import array_from_numpy, array_view
from server_app.recorder import MeteredGrid, RecordedStrategy, RunRecorder


class RoundAverager:
    """The running mean of the global models of rounds ``from_round`` on (true round
    numbers): float arrays averaged in float64 and returned in their dtype; other arrays
    (BatchNorm's ``num_batches_tracked``) the latest round's. One extra model in memory."""

    def __init__(self, from_round: int) -> None:
        self.from_round = from_round
        self.rounds: list[int] = []
        self._sum: dict[str, np.ndarray] = {}
        self._latest: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}

    def add(self, true_round: int, arrays: ArrayRecord) -> None:
        if true_round < self.from_round or true_round in self.rounds:
            return
        for key, array in arrays.items():
            value = array_view(array)
            self._dtypes[key] = value.dtype
            if np.issubdtype(value.dtype, np.floating):
                if key in self._sum:
                    self._sum[key] += value
                else:
                    self._sum[key] = value.astype(np.float64)
            else:
                self._latest[key] = value.copy()
        self.rounds.append(true_round)

    def average(self, like: ArrayRecord) -> ArrayRecord | None:
        """The mean model, keys in the order of ``like``; None with fewer than 2 rounds."""
        if len(self.rounds) < 2:
            return None
        n = len(self.rounds)
        return ArrayRecord({key: array_from_numpy(
            (self._sum[key] / n).astype(self._dtypes[key]) if key in self._sum
            else self._latest[key]) for key in like})


def averager_for(settings: Settings) -> RoundAverager | None:
    """The averager the settings ask for (None: ``average-last-rounds`` = 1); a run of
    fewer rounds averages them all."""
    k = min(settings.average_last_rounds, settings.num_server_rounds)
    return RoundAverager(settings.num_server_rounds - k + 1) if k > 1 else None


def finish_model(settings: Settings, grid: MeteredGrid, recorded: RecordedStrategy,
                 recorder: RunRecorder, averager: RoundAverager | None, *, last_round: int,
                 round_offset: int) -> dict[str, Any] | None:
    """Make, evaluate and record the final global model (see the module's doc);
    ``last_round`` is Flower's number of the run's last round. Returns what was recorded
    (None when the final model is the last round's and nothing was to be said)."""
    arrays = recorder.last_arrays
    if arrays is None:
        return None
    started = time.perf_counter()
    info: dict[str, Any] = {}
    final = arrays
    averaged = averager.average(arrays) if averager is not None else None
    if averaged is not None:
        final = averaged
        info["averaged-rounds"] = list(averager.rounds)
        log(INFO, "Final model: the average of the global models of rounds %s",
            averager.rounds)
    if settings.calibration.enabled:
        calibrated, info["calibration"] = _calibrate(settings, grid, recorded, recorder, final,
                                                     last_round, round_offset)
        final = calibrated if calibrated is not None else final
    if final is arrays:
        return recorder.record_final_model(None, info) if info else None
    messages = recorded.configure_evaluate(last_round, final,
                                           ConfigRecord({"round-offset": round_offset}), grid)
    replies = grid.send_and_receive(messages, timeout=float(settings.round_timeout))
    recorded.aggregate_evaluate(last_round, replies)
    info["seconds"] = round(time.perf_counter() - started, 2)
    entry = recorder.record_final_model(final, info)
    before = recorder.rows[-1]["global"]
    log(INFO, "Final model: global balanced accuracy %.4f (last round's model) -> %.4f, "
        "accuracy %.4f -> %.4f (pooled held-out data), in %.1f s",
        before.get("balanced-accuracy", float("nan")),
        entry["global"].get("balanced-accuracy", float("nan")),
        before.get("accuracy", float("nan")), entry["global"].get("accuracy", float("nan")),
        info["seconds"])
    return entry


def _calibrate(settings: Settings, grid: MeteredGrid, recorded: RecordedStrategy,
               recorder: RunRecorder, arrays: ArrayRecord, last_round: int, round_offset: int
               ) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """``arrays`` with the head calibrated, and what to record of it; None and the reason
    when it cannot be."""
    c = settings.calibration
    started = time.perf_counter()
    if not recorder.global_model_scored:
        reason = "the global model holds layers no round trained (they stay on the sites)"
        log(INFO, "Head calibration skipped: %s", reason)
        return None, {"skipped": reason}
    head_weight = f"{CLASSIFIER_LAYER}.weight"
    if head_weight not in arrays:
        reason = f"the model has no '{head_weight}'"
        log(WARNING, "Head calibration skipped: %s", reason)
        return None, {"skipped": reason}
    num_classes, dim = array_view(arrays[head_weight]).shape
    log(INFO, "Head calibration: asking the sites for class feature statistics of the final "
        "global model (classes with at least %s images per site)", c.min_class_count)
    replies = request_feature_statistics(
        grid, arrays, min_count=c.min_class_count, timeout=float(settings.round_timeout),
        server_round=last_round, round_offset=round_offset)
    statistics, failures = read_statistics(replies, num_classes, dim,
                                           recorded.inner.site_names)
    for failure in failures:
        log(WARNING, "Head calibration: %s left out: %s", failure["site"], failure["reason"])
    info: dict[str, Any] = {"sites": sorted(statistics), "failures": failures}
    try:
        if not statistics:
            raise StatisticsError("no site sent usable feature statistics")
        pooled = pool_statistics(list(statistics.values()))
        calibrated = with_calibrated_head(
            arrays, pooled, CLASSIFIER_LAYER, samples_per_class=c.samples_per_class,
            steps=c.steps, lr=c.lr, seed=settings.seed, draws=c.draws)
    except (StatisticsError, np.linalg.LinAlgError) as err:
        log(WARNING, "Head calibration skipped: %s; the head stays as trained", err)
        return None, {**info, "skipped": str(err)}
    info["class-counts"] = [int(n) for n in pooled.counts]
    info["seconds"] = round(time.perf_counter() - started, 2)
    log(INFO, "Head calibration: head retrained on %s virtual features per class of %s "
        "classes (images per class over %s site(s): %s)", c.samples_per_class,
        int((pooled.counts > 0).sum()), len(statistics), info["class-counts"])
    return calibrated, info
