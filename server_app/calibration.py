"""The ServerApp's head calibration after the last round (``calibration.*`` settings; the
method and its math: :mod:`fedlsc_flwr.calibration`): ask the sites for their class feature
statistics of the final global model, retrain its head on virtual features, have the sites
evaluate the calibrated model, and record it (:meth:`RunRecorder.record_calibration`).

A site that fails or sends unusable statistics is named and left out; with no usable
statistics, or for a strategy whose global model is not scored, the model as trained stays
the final one, and metrics.jsonl says why.
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
from fedlsc_flwr.wire import array_view
from server_app.recorder import MeteredGrid, RecordedStrategy, RunRecorder


def calibrate_and_evaluate(settings: Settings, grid: MeteredGrid, recorded: RecordedStrategy,
                           recorder: RunRecorder, *, last_round: int, round_offset: int
                           ) -> dict[str, Any] | None:
    """Calibrate the head of the run's final global model and record the sites' scores of
    it; ``last_round`` is Flower's number of the run's last round. Returns what was recorded
    (None when nothing was: calibration off, or no round recorded)."""
    c = settings.calibration
    arrays = recorder.last_arrays
    if not c.enabled or arrays is None:
        return None
    started = time.perf_counter()
    if not recorder.global_model_scored:
        reason = "the global model holds layers no round trained (they stay on the sites)"
        log(INFO, "Head calibration skipped: %s", reason)
        return recorder.record_calibration(None, {"skipped": reason})
    head_weight = f"{CLASSIFIER_LAYER}.weight"
    if head_weight not in arrays:
        reason = f"the model has no '{head_weight}'"
        log(WARNING, "Head calibration skipped: %s", reason)
        return recorder.record_calibration(None, {"skipped": reason})
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
        calibrated: ArrayRecord = with_calibrated_head(
            arrays, pooled, CLASSIFIER_LAYER, samples_per_class=c.samples_per_class,
            steps=c.steps, lr=c.lr, seed=settings.seed)
    except (StatisticsError, np.linalg.LinAlgError) as err:
        log(WARNING, "Head calibration skipped: %s; the model as trained stays final", err)
        return recorder.record_calibration(None, {**info, "skipped": str(err),
                                                  "seconds": _since(started)})
    info["class-counts"] = [int(n) for n in pooled.counts]
    info["fit-seconds"] = _since(started)
    log(INFO, "Head calibration: head retrained on %s virtual features per class of %s "
        "classes (images per class over %s site(s): %s); the sites now evaluate it",
        c.samples_per_class, int((pooled.counts > 0).sum()), len(statistics),
        info["class-counts"])
    messages = recorded.configure_evaluate(last_round, calibrated,
                                           ConfigRecord({"round-offset": round_offset}), grid)
    replies = grid.send_and_receive(messages, timeout=float(settings.round_timeout))
    recorded.aggregate_evaluate(last_round, replies)
    info["seconds"] = _since(started)
    entry = recorder.record_calibration(calibrated, info)
    before = recorder.rows[-1]["global"]
    log(INFO, "Head calibration: global balanced accuracy %.4f -> %.4f, accuracy %.4f -> "
        "%.4f (pooled held-out data), in %.1f s", before.get("balanced-accuracy", float("nan")),
        entry["global"].get("balanced-accuracy", float("nan")),
        before.get("accuracy", float("nan")), entry["global"].get("accuracy", float("nan")),
        info["seconds"])
    return entry


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)
