"""Head calibration after the last round (beyond the paper): classifier calibration with
virtual representations, CCVR (Luo et al., "No Fear of Heterogeneity", NeurIPS 2021).

Under label skew each site pulls the shared classifier towards its own classes, and the
averaged head inherits that pull: on the main job's split, a class that one site holds
almost all of (``bcc``) is under-predicted by the global model. The features below the head
are shared well enough; the head is what is off. So, once training is over:

1. every site computes, with the final global model, the features the head sees (the
   pooled output of the layer before it) of its own training images, and reports per class
   only their number, mean and covariance (:func:`class_feature_statistics`); a class with
   fewer than ``min_count`` images at a site is not reported by it (its mean would come
   close to the features of single images);
2. the server pools the sites' statistics (:func:`pool_statistics`: exactly the mean and
   covariance of the union), draws the same number of virtual features from
   N(mean, covariance) for every class, and retrains the head alone on them, starting from
   the trained head (:func:`calibrate_head`). The classes no site reported keep their rows
   and stay out of the softmax.

No image and no single image's feature leaves a site; the counts, means and covariances
do (see the README, "Design decisions"). numpy only: the ClientApp computes the features
with its own model and passes them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedlsc_flwr.wire import array_from_numpy, array_view, site_name_in

#: The message type of the server's request for class feature statistics (Flower's
#: "<category>.<action>" form; the ClientApp registers ``@app.query("feature_statistics")``).
FEATURE_STATISTICS_MESSAGE_TYPE = "query.feature_statistics"
#: ConfigRecord key of the request: classes with fewer training images at a site than this
#: are not reported by that site.
MIN_CLASS_COUNT_KEY = "min-class-count"
#: The ArrayRecord of a site's reply.
STATISTICS_RECORD_KEY = "statistics"
_COUNTS, _MEANS, _COVARIANCES = "counts", "means", "covariances"


class StatisticsError(ValueError):
    """A site's statistics are unusable (wrong shapes, non-finite values, negative counts)."""


@dataclass(frozen=True)
class ClassFeatureStatistics:
    """Per class: number of images, mean feature (K×D) and covariance (K×D×D, divided by
    the count). A class with count 0 has zero mean and covariance."""

    counts: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def to_array_record(self) -> ArrayRecord:
        """For the wire: counts as int64, means and covariances as float32 (the server
        pools in float64)."""
        return ArrayRecord({
            _COUNTS: array_from_numpy(self.counts.astype(np.int64)),
            _MEANS: array_from_numpy(self.means.astype(np.float32)),
            _COVARIANCES: array_from_numpy(self.covariances.astype(np.float32)),
        })

    @classmethod
    def from_array_record(cls, record: ArrayRecord, num_classes: int | None = None,
                          dim: int | None = None) -> ClassFeatureStatistics:
        """Read and check a site's reply; :class:`StatisticsError` names what is wrong."""
        missing = [k for k in (_COUNTS, _MEANS, _COVARIANCES) if k not in record]
        if missing:
            raise StatisticsError(f"feature statistics lack {missing}")
        counts = np.asarray(array_view(record[_COUNTS]))
        means = np.asarray(array_view(record[_MEANS]), dtype=np.float64)
        covs = np.asarray(array_view(record[_COVARIANCES]), dtype=np.float64)
        k = counts.shape[0] if counts.ndim == 1 else -1
        d = means.shape[1] if means.ndim == 2 else -1
        if k < 1 or means.shape != (k, d) or covs.shape != (k, d, d):
            raise StatisticsError(f"feature statistics have shapes counts {counts.shape}, "
                                  f"means {means.shape}, covariances {covs.shape}: expected "
                                  "(K,), (K, D), (K, D, D)")
        if num_classes is not None and k != num_classes:
            raise StatisticsError(f"feature statistics for {k} classes, expected {num_classes}")
        if dim is not None and d != dim:
            raise StatisticsError(f"features of dimension {d}, expected {dim}")
        if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise StatisticsError(f"class counts {counts.tolist()} are not integers >= 0")
        if not (np.isfinite(means).all() and np.isfinite(covs).all()):
            raise StatisticsError("feature statistics hold non-finite values")
        return cls(counts.astype(np.int64), means, covs)


def class_feature_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int,
                             min_count: int = 1) -> ClassFeatureStatistics:
    """Count, mean and (biased) covariance of ``features`` (N×D) per class of ``labels``;
    a class with fewer than ``min_count`` images is reported as count 0."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    dim = features.shape[1]
    counts = np.zeros(num_classes, dtype=np.int64)
    means = np.zeros((num_classes, dim))
    covs = np.zeros((num_classes, dim, dim))
    for c in range(num_classes):
        rows = features[labels == c]
        if len(rows) < max(min_count, 1):
            continue
        counts[c] = len(rows)
        means[c] = rows.mean(axis=0)
        centred = rows - means[c]
        covs[c] = centred.T @ centred / len(rows)
    return ClassFeatureStatistics(counts, means, covs)


def pool_statistics(parts: Sequence[ClassFeatureStatistics]) -> ClassFeatureStatistics:
    """The count, mean and covariance per class of the union of the sites' images."""
    if not parts:
        raise ValueError("no feature statistics to pool")
    shapes = {(p.num_classes, p.dim) for p in parts}
    if len(shapes) != 1:
        raise StatisticsError(f"sites sent feature statistics of different shapes {shapes}")
    counts = np.sum([p.counts for p in parts], axis=0)
    safe = np.maximum(counts, 1).astype(np.float64)
    means = np.sum([p.counts[:, None] * p.means for p in parts], axis=0) / safe[:, None]
    second = np.sum([p.counts[:, None, None] * (p.covariances + np.einsum(
        "ki,kj->kij", p.means, p.means)) for p in parts], axis=0) / safe[:, None, None]
    covs = second - np.einsum("ki,kj->kij", means, means)
    covs[counts == 0] = 0.0
    return ClassFeatureStatistics(counts, means, (covs + covs.transpose(0, 2, 1)) / 2)


def sample_virtual_features(stats: ClassFeatureStatistics, samples_per_class: int,
                            rng: np.random.Generator, shrinkage: float = 1e-3
                            ) -> tuple[np.ndarray, np.ndarray]:
    """``samples_per_class`` draws from N(mean, covariance) for every class with a count;
    the covariance gets ``shrinkage`` × its mean variance added on the diagonal (a class
    with fewer images than dimensions has a singular covariance)."""
    xs, ys = [], []
    for c in np.flatnonzero(stats.counts > 0):
        cov = stats.covariances[c]
        ridge = shrinkage * max(float(np.trace(cov)) / stats.dim, 1e-12)
        lower = np.linalg.cholesky(cov + ridge * np.eye(stats.dim))
        z = rng.standard_normal((samples_per_class, stats.dim))
        xs.append(stats.means[c] + z @ lower.T)
        ys.append(np.full(samples_per_class, c))
    if not xs:
        raise StatisticsError("no class has feature statistics: nothing to calibrate on")
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def calibrate_head(weight: np.ndarray, bias: np.ndarray, stats: ClassFeatureStatistics, *,
                   samples_per_class: int = 2000, steps: int = 300, lr: float = 1e-3,
                   batch_size: int = 256, seed: int = 0, draws: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The linear head (``weight`` K×D, ``bias`` K) retrained by Adam on class-balanced
    virtual features, from its trained values; rows of classes without statistics are
    kept and left out of the softmax. With ``draws`` > 1: the mean of the heads retrained
    on that many independent draws of virtual features (seeds ``seed``, ``seed`` + 1, …),
    itself a linear head, which depends less on one draw."""
    if draws < 1:
        raise ValueError(f"draws = {draws}: must be at least 1")
    if draws > 1:
        heads = [calibrate_head(weight, bias, stats, samples_per_class=samples_per_class,
                                steps=steps, lr=lr, batch_size=batch_size, seed=seed + i)
                 for i in range(draws)]
        return (np.mean([w for w, _ in heads], axis=0), np.mean([b for _, b in heads], axis=0))
    weight = np.asarray(weight, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    if weight.shape != (stats.num_classes, stats.dim) or bias.shape != (stats.num_classes,):
        raise StatisticsError(f"head of shape {weight.shape} / {bias.shape} does not match "
                              f"statistics of {stats.num_classes} classes × {stats.dim} "
                              "features")
    rng = np.random.default_rng(seed)
    x, y = sample_virtual_features(stats, samples_per_class, rng)
    present = np.flatnonzero(stats.counts > 0)
    target = np.searchsorted(present, y)  # label -> position among the present classes
    params = [weight[present].copy(), bias[present].copy()]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x), size=batch_size)
        xb, tb = x[idx].astype(np.float64), target[idx]
        logits = xb @ params[0].T + params[1]
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        prob[np.arange(batch_size), tb] -= 1.0  # d(mean cross-entropy)/d(logits) × batch
        grads = [prob.T @ xb / batch_size, prob.mean(axis=0)]
        for p, g, m in zip(params, grads, moments):
            m[0] = beta1 * m[0] + (1 - beta1) * g
            m[1] = beta2 * m[1] + (1 - beta2) * g * g
            p -= lr * (m[0] / (1 - beta1 ** step)) / (np.sqrt(m[1] / (1 - beta2 ** step)) + eps)
    new_weight, new_bias = weight.copy(), bias.copy()
    new_weight[present], new_bias[present] = params
    return new_weight, new_bias


# ------------------------------------------------------------------ the server's side
def request_feature_statistics(grid: Any, arrays: ArrayRecord, *, min_count: int,
                               timeout: float | None, server_round: int = 0,
                               round_offset: int = 0,
                               node_ids: Iterable[int] | None = None) -> list[Message]:
    """Send the (final global) model to every site (or ``node_ids``) and ask for its class
    feature statistics; the replies, errors included."""
    nodes = list(grid.get_node_ids() if node_ids is None else node_ids)
    config = ConfigRecord({MIN_CLASS_COUNT_KEY: int(min_count), "server-round": server_round,
                           "round-offset": round_offset})
    messages = [Message(content=RecordDict({"arrays": arrays, "config": config}),
                        message_type=FEATURE_STATISTICS_MESSAGE_TYPE, dst_node_id=node)
                for node in nodes]
    return list(grid.send_and_receive(messages, timeout=timeout))


def read_statistics(replies: Iterable[Message], num_classes: int, dim: int,
                    site_names: Mapping[int, str] | None = None
                    ) -> tuple[dict[str, ClassFeatureStatistics], list[dict[str, str]]]:
    """The usable statistics by site name, and ``{"site", "reason"}`` for every reply that
    is not usable (an error reply, or statistics :class:`StatisticsError` refuses). An error
    reply names no site: ``site_names`` (node id -> name, from earlier rounds) does."""
    usable: dict[str, ClassFeatureStatistics] = {}
    failures: list[dict[str, str]] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        name = site_name_in(msg) or (site_names or {}).get(node) or f"node {node}"
        if msg.has_error():
            failures.append({"site": name, "reason": str(msg.error.reason)})
            continue
        record = msg.content.array_records.get(STATISTICS_RECORD_KEY)
        try:
            if record is None:
                raise StatisticsError(f"reply holds no '{STATISTICS_RECORD_KEY}' arrays")
            usable[name] = ClassFeatureStatistics.from_array_record(record, num_classes, dim)
        except StatisticsError as err:
            failures.append({"site": name, "reason": str(err)})
    return usable, failures


def with_calibrated_head(arrays: ArrayRecord, stats: ClassFeatureStatistics, head: str,
                         **calibration: Any) -> ArrayRecord:
    """``arrays`` with the ``head`` layer's weight and bias from :func:`calibrate_head`
    (keyword arguments go to it); every other array unchanged."""
    keys = (f"{head}.weight", f"{head}.bias")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"the model has no {missing} to calibrate")
    weight, bias = (array_view(arrays[k]) for k in keys)
    new_weight, new_bias = calibrate_head(weight, bias, stats, **calibration)
    out = ArrayRecord({k: v for k, v in arrays.items()})
    out[keys[0]] = array_from_numpy(new_weight.astype(weight.dtype))
    out[keys[1]] = array_from_numpy(new_bias.astype(bias.dtype))
    return out
