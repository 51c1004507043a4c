"""Classification metrics from confusion matrices, and pooled evaluation over sites.

numpy only, plus Flower's record types for :func:`pooled_evaluate_metrics` (a strategy's
``evaluate_metrics_aggr_fn``). Sites send confusion matrices, not scores, so the server
computes every score of the pooled held-out data exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

#: Prefixes of the two models a site evaluates: the global one and its personalized one.
MODEL_GROUPS = ("global", "personal")


def classification_metrics(matrix: np.ndarray, class_names: Iterable[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro precision/recall/F1 and per-class recall from a
    confusion matrix (rows: true class, columns: predicted class).

    The definitions are scikit-learn's, so numbers compare with published ones:
    macro precision, recall and F1 average over the classes present in the true labels
    *or* the predictions (``precision_recall_fscore_support(average="macro")``; a class
    predicted but absent from the labels counts with recall 0 and F1 0, an undefined
    precision counts as 0); balanced accuracy is the mean recall over the classes present
    in the true labels (``balanced_accuracy_score``). Per-class recall is given for the
    classes present in the true labels.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    total = matrix.sum()
    true = matrix.sum(1)
    pred = matrix.sum(0)
    tp = np.diag(matrix)
    in_truth = true > 0
    seen = in_truth | (pred > 0)  # scikit-learn's labels: in y_true or y_pred
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros_like(tp), where=(precision + recall) > 0)

    def mean(values: np.ndarray, where: np.ndarray) -> float:
        return float(values[where].mean()) if where.any() else 0.0

    metrics = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced-accuracy": mean(recall, in_truth),
        "precision": mean(precision, seen),
        "recall": mean(recall, seen),
        "f1": mean(f1, seen),
    }
    for name, value, has in zip(class_names, recall, in_truth):
        if has:
            metrics[f"recall-{name}"] = float(value)
    return metrics


def pooled_evaluate_metrics(records: list[RecordDict], weighted_by_key: str,
                            class_names: Sequence[str] | None = None) -> MetricRecord:
    """Sites' evaluation replies -> one MetricRecord.

    Confusion matrices are summed, so accuracy, balanced accuracy and macro scores are
    those of the pooled held-out data of all sites (not an average of site scores);
    the unweighted mean over sites of the personalized models' scores is added too.
    Other scalars are example-weighted averages (Flower's default). Use it as a
    strategy's ``evaluate_metrics_aggr_fn`` (bind ``class_names`` with functools.partial).
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
        names = names or (list(class_names) if class_names and len(class_names) == size
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
