"""FedLSC and its personalized baselines as Flower 1.42 Message-API strategies.

``PersonalizedFedAvg`` keeps a set of layers private to each site: it sends only the
shared layers, checks every reply, and averages the shared layers by examples (the
FedAvg-FC / FedProx-FC baselines). ``FedLSC`` changes the per-layer weights to the
temperature softmax of layer similarity and picks its private layers after stage 1.
The array math lives in :mod:`fedlsc_flwr.similarity`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import DEBUG, INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fedlsc_flwr.similarity import (
    Layer,
    LayerReport,
    aggregate_layers,
    average_layers,
    group_layers,
    is_buffer,
    select_personalized,
)
from fedlsc_flwr.site_tracking import SiteTracking

#: ConfigRecord key that tells clients which layers stay on the site.
PERSONALIZED_LAYERS_KEY = "personalized-layers"
#: ConfigRecord key of the proximal coefficient μ (the name Flower's FedProx uses).
PROXIMAL_MU_KEY = "proximal-mu"
#: ConfigRecord key: "float16" asks clients to reply with w_i − w_g in float16 (half the bytes).
UPDATE_DTYPE_KEY = "update-dtype"
UPDATE_DTYPES = ("float32", "float16")


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of an Array's bytes, without the copy ``Array.numpy()`` makes.

    The ``.npy`` header is checked against the Array's declared dtype and shape with
    byte comparisons (parsing it with numpy costs more than the aggregation itself);
    anything unexpected falls back to numpy's own reader.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return array.numpy()
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        return array.numpy()
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    header = data[:start]
    expected_shape = repr(shape).encode()
    if (f"'descr': '{dtype.str}'".encode() not in header
            or b"'shape': " + expected_shape not in header
            or len(data) - start != math.prod(shape) * dtype.itemsize):
        return _checked(array.numpy(), shape)
    order = "F" if b"'fortran_order': True" in header else "C"
    flat = np.frombuffer(data, dtype=dtype, offset=start)
    return flat.reshape(shape, order=order)


def array_from_numpy(value: np.ndarray) -> Array:
    """An Array holding ``value`` in ``.npy`` format, as ``Array(value)`` makes it, but
    with one copy of the data instead of three (header and data joined once)."""
    if not value.flags.c_contiguous:
        value = value.copy(order="C")
    if value.dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    header = f"{{'descr': {value.dtype.str!r}, 'fortran_order': False, 'shape': {value.shape!r}, }}"
    # numpy pads so that the data starts on a 64-byte boundary, ending with a newline
    padding = -(10 + len(header) + 1) % 64
    header_bytes = (header + " " * padding + "\n").encode("latin1")
    prefix = b"\x93NUMPY\x01\x00" + len(header_bytes).to_bytes(2, "little") + header_bytes
    data = b"".join([prefix, memoryview(value.reshape(-1).view(np.uint8))])
    return Array(dtype=str(value.dtype), shape=tuple(int(d) for d in value.shape),
                 stype="numpy.ndarray", data=data)


def _checked(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if value.shape != shape:
        raise ValueError(f"holds shape {value.shape}, declared {shape}")
    return value


@dataclass
class RoundReport:
    """Per-layer similarity and weights of one aggregated round, for results files."""

    server_round: int
    node_ids: list[int]
    layers: dict[str, LayerReport]
    personalized_layers: list[str]

    def to_json(self) -> dict[str, Any]:
        def listed(x: np.ndarray | None) -> list | None:
            return None if x is None else np.asarray(x).round(6).tolist()

        return {
            "round": self.server_round,
            "node_ids": self.node_ids,
            "personalized_layers": self.personalized_layers,
            "layers": {
                name: {
                    "mean_similarity": listed(r.mean_similarity),
                    "weights": listed(r.weights),
                    "matrix": listed(r.matrix),
                }
                for name, r in self.layers.items()
            },
        }


class PersonalizedFedAvg(SiteTracking, FedAvg):
    """FedAvg whose ``personalized_layers`` never leave the sites.

    Replies that are errors, lack or add keys, have the wrong shape or dtype, hold
    NaN/Inf, or carry no positive example count are dropped with a WARNING naming
    the site and the key; the round goes on with the rest, as long as at least
    ``min_train_replies`` replies are usable (else the global model is kept). The
    returned ArrayRecord holds every key of the global model: personalized layers keep
    their last global value.
    """

    def __init__(
        self,
        personalized_layers: Iterable[str] = (),
        proximal_mu: float = 0.0,
        granularity: str = "layer",
        *,
        max_update_norm_ratio: float = 0.0,
        update_dtype: str = "float32",
        **fedavg_kwargs: Any,
    ) -> None:
        if update_dtype not in UPDATE_DTYPES:
            raise ValueError(f"update_dtype must be one of {UPDATE_DTYPES}, got {update_dtype!r}")
        if max_update_norm_ratio < 0:
            raise ValueError(
                f"max_update_norm_ratio must be >= 0 (0 = off), got {max_update_norm_ratio}")
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        if granularity not in ("layer", "tensor"):
            raise ValueError(f"granularity must be 'layer' or 'tensor', got {granularity!r}")
        super().__init__(**fedavg_kwargs)
        self.proximal_mu = float(proximal_mu)
        self.granularity = granularity
        self.max_update_norm_ratio = float(max_update_norm_ratio)
        self.update_dtype = update_dtype
        self.personalized_layers: frozenset[str] = frozenset(personalized_layers)
        self.last_report: RoundReport | None = None
        self._global: ArrayRecord | None = None
        self._sent_keys: list[str] = []

    # ------------------------------------------------------------------ configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``arrays`` as w_g; send only the shared layers, and name the private ones."""
        self._global = arrays
        layers = self._layers(arrays)
        unknown = self.personalized_layers - {layer.name for layer in layers}
        if unknown:
            raise ValueError(
                f"personalized layers not in the model: {sorted(unknown)[:5]}"
            )
        shared = [layer for layer in layers if layer.name not in self.personalized_layers]
        self._sent_keys = [k for layer in shared for k in _keys(layer)]
        config[PROXIMAL_MU_KEY] = self.proximal_mu
        config[PERSONALIZED_LAYERS_KEY] = sorted(self.personalized_layers)
        config[UPDATE_DTYPE_KEY] = self.update_dtype
        outgoing = (
            arrays
            if len(self._sent_keys) == len(arrays)
            else ArrayRecord({k: arrays[k] for k in self._sent_keys})
        )
        return super().configure_train(server_round, outgoing, config, grid)

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the shared layers of the valid replies; keep the rest."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        replies = self._received("train", server_round, replies)
        accepted, states = self._accepted_replies(server_round, replies)
        dropped = len(replies) - len(accepted)
        if self._too_few(server_round, len(accepted)):
            return None, MetricRecord({"num-replies-accepted": len(accepted),
                                       "num-replies-dropped": dropped})

        global_state = {k: array_view(self._global[k]) for k in self._global}
        shared = [
            layer for layer in self._layers(self._global)
            if layer.name not in self.personalized_layers
        ]
        examples = np.array(
            [float(_metrics(m)[self.weighted_by_key]) for m in accepted], dtype=np.float64
        )
        node_ids = [m.metadata.src_node_id for m in accepted]
        new_state, extra = self._aggregate_shared(
            server_round, global_state, states, node_ids, shared, examples / examples.sum()
        )
        record = ArrayRecord(
            {
                k: array_from_numpy(new_state[k]) if k in new_state else self._global[k]
                for k in self._global
            }
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        metrics["num-replies-accepted"] = len(accepted)
        metrics["num-replies-dropped"] = dropped
        metrics["num-personalized-layers"] = len(self.personalized_layers)
        for key, value in extra.items():
            metrics[key] = value
        return record, metrics

    def _aggregate_shared(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        states: list[dict[str, np.ndarray]],
        node_ids: list[int],
        shared: list[Layer],
        example_weights: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """New values of the shared tensors, and extra metrics. Here: FedAvg by examples."""
        return average_layers(global_state, states, shared, example_weights), {}

    def _accepted_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], list[dict[str, np.ndarray]]]:
        assert self._global is not None
        expected = {k: self._global[k] for k in self._sent_keys}
        global_views = {k: array_view(v) for k, v in expected.items()}
        float32_sizes = [v.size for v in global_views.values() if v.dtype == np.float32]
        scratch = np.empty(max(float32_sizes, default=0) if self.max_update_norm_ratio else 0,
                           np.float32)
        accepted: list[Message] = []
        states: list[dict[str, np.ndarray]] = []
        norms: list[float] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # logged with the site's name by SiteTracking
                continue
            problem, state, norm = self._check_reply(msg, expected, global_views, scratch)
            if problem:
                self._failed("train", server_round, node, f"dropped the reply: {problem}")
                continue
            accepted.append(msg)
            states.append(state)
            norms.append(norm)
        if self.max_update_norm_ratio > 0 and len(accepted) >= 3:
            limit = self.max_update_norm_ratio * float(np.median(norms))
            keep = [i for i, norm in enumerate(norms) if norm <= limit]
            for i in sorted(set(range(len(accepted))) - set(keep)):
                ratio = norms[i] / max(float(np.median(norms)), 1e-30)
                self._failed("train", server_round, accepted[i].metadata.src_node_id,
                             f"dropped the reply: update norm {norms[i]:.4g} is {ratio:.1f} x "
                             f"the median (limit {self.max_update_norm_ratio:g} x)")
            accepted, states = [accepted[i] for i in keep], [states[i] for i in keep]
        log(INFO, "aggregate_train: %s replies accepted, %s dropped",
            len(accepted), len(replies) - len(accepted))
        return accepted, states

    def _check_reply(
        self, msg: Message, expected: Mapping[str, Array],
        global_views: Mapping[str, np.ndarray], scratch: np.ndarray,
    ) -> tuple[str | None, dict[str, np.ndarray], float]:
        """Why a reply cannot be aggregated (None if it can), its arrays as views, and the
        norm of its update (parameters only)."""
        content = msg.content
        if self.arrayrecord_key not in content.array_records:
            return f"no ArrayRecord under '{self.arrayrecord_key}'", {}, 0.0
        if len(content.metric_records) != 1:
            return f"expected one MetricRecord, found {len(content.metric_records)}", {}, 0.0
        count = _metrics(msg).get(self.weighted_by_key)
        if isinstance(count, list) or count is None or not count > 0:
            return (f"metric '{self.weighted_by_key}' missing or not positive ({count!r})",
                    {}, 0.0)
        arrays = content.array_records[self.arrayrecord_key]
        missing = [k for k in expected if k not in arrays]
        if missing:
            return f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}", {}, 0.0
        extra = [k for k in arrays if k not in expected]
        if extra:
            return (f"unexpected keys {extra[:3]}{' …' if len(extra) > 3 else ''} "
                    "(personalized or unknown layers)"), {}, 0.0
        state: dict[str, np.ndarray] = {}
        squared_norm = 0.0
        for key, ref in expected.items():
            got = arrays[key]
            as_delta = self.update_dtype == "float16" and np.dtype(ref.dtype).kind == "f"
            dtype = "float16" if as_delta else ref.dtype
            if tuple(got.shape) != tuple(ref.shape) or got.dtype != dtype:
                return (f"key '{key}' has shape {tuple(got.shape)} {got.dtype}, "
                        f"expected {tuple(ref.shape)} {dtype}"), {}, 0.0
            try:
                value = array_view(got)
            except (ValueError, TypeError) as err:
                return f"key '{key}' cannot be read: {err}", {}, 0.0
            if as_delta:  # w_i = w_g + Δw_i, back in the global dtype
                value = (global_views[key] + value.astype(ref.dtype)).astype(ref.dtype)
            if np.issubdtype(value.dtype, np.floating):
                if is_buffer(key) or not self.max_update_norm_ratio:
                    finite = _all_finite(value)
                else:  # the norm filter needs ||Δw||: one more pass, only when it is on
                    step = _squared_distance(value, global_views[key], scratch)
                    finite = math.isfinite(step) or bool(np.isfinite(value).all())
                    squared_norm += step
                if not finite:
                    return f"key '{key}' holds NaN or Inf values", {}, 0.0
                if not math.isfinite(squared_norm):
                    return f"key '{key}' holds an update too large to measure", {}, 0.0
            state[key] = value
        return None, state, math.sqrt(squared_norm)

    # ------------------------------------------------------------------ state
    def _layers(self, arrays: ArrayRecord) -> list[Layer]:
        return group_layers({k: _meta(arrays[k]) for k in arrays}, self.granularity)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this strategy."""
        return {"personalized_layers": sorted(self.personalized_layers)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.personalized_layers = frozenset(state["personalized_layers"])

    def summary(self) -> None:
        log(INFO, "\t├──> Personalization:")
        log(INFO, "\t│\t├── Personalized layers: %s", sorted(self.personalized_layers) or "none")
        log(INFO, "\t│\t├── Granularity: %s", self.granularity)
        log(INFO, "\t│\t├── Updates sent as: %s", "float16 deltas" if self.update_dtype ==
            "float16" else "float32 weights")
        log(INFO, "\t│\t├── Update norm limit: %s", f"{self.max_update_norm_ratio:g} x median"
            if self.max_update_norm_ratio else "off")
        log(INFO, "\t│\t└── Proximal mu: %s", self.proximal_mu)
        super().summary()


class FedLSC(PersonalizedFedAvg):
    """FedLSC: per-layer temperature softmax of update similarity (Eq. 1-5) every
    round; after the first aggregated round (stage 1) the layers whose mean
    similarity is below the ``personalized_ratio`` quantile stay on the sites (Eq. 6).
    """

    def __init__(
        self,
        temperature: float = 0.2,
        personalized_ratio: float = 0.01,
        proximal_mu: float = 0.001,
        granularity: str = "layer",
        similarity_matrix: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= personalized_ratio < 1.0:
            raise ValueError(f"personalized_ratio must be in [0, 1), got {personalized_ratio}")
        super().__init__((), proximal_mu, granularity, **fedavg_kwargs)
        self.temperature = float(temperature)
        self.personalized_ratio = float(personalized_ratio)
        self.similarity_matrix = similarity_matrix
        self.stage1_round: int | None = None

    def _aggregate_shared(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        states: list[dict[str, np.ndarray]],
        node_ids: list[int],
        shared: list[Layer],
        example_weights: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new_state, reports = aggregate_layers(
            global_state, states, shared, self.temperature, self.similarity_matrix
        )
        if self.stage1_round is None:
            layer_means = {name: float(r.mean_similarity.mean()) for name, r in reports.items()}
            self.personalized_layers = select_personalized(layer_means, self.personalized_ratio)
            self.stage1_round = server_round
            log(INFO, "FedLSC stage 1 (round %s): %s of %s layers personalized: %s",
                server_round, len(self.personalized_layers), len(reports),
                sorted(self.personalized_layers))
        self.last_report = RoundReport(
            server_round, node_ids, reports, sorted(self.personalized_layers)
        )
        log(DEBUG, "FedLSC round %s similarity table: %s",
            server_round, json.dumps(self.last_report.to_json()["layers"]))
        return new_state, _weight_metrics(reports)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage1_round": self.stage1_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage1_round = state.get("stage1_round")

    def summary(self) -> None:
        log(INFO, "\t├──> FedLSC settings:")
        log(INFO, "\t│\t├── Temperature τ: %s", self.temperature)
        log(INFO, "\t│\t├── Personalized ratio (Per): %s", self.personalized_ratio)
        log(INFO, "\t│\t└── Stage 1 done: %s",
            "no" if self.stage1_round is None else f"round {self.stage1_round}")
        super().summary()


class LocalOnly(PersonalizedFedAvg):
    """Each site trains on its own: round 1 hands every site the same initial model,
    after which every layer is personalized and nothing is exchanged."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.personalized_layers = frozenset(layer.name for layer in self._layers(arrays))
        return messages


def _weight_metrics(reports: Mapping[str, LayerReport]) -> dict[str, float]:
    if not reports:
        return {}
    weights = np.concatenate([r.weights for r in reports.values()])
    sims = np.array([float(r.mean_similarity.mean()) for r in reports.values()])
    return {
        "lsc-weight-min": float(weights.min()),
        "lsc-weight-max": float(weights.max()),
        "lsc-mean-similarity": float(sims.mean()),
        "lsc-layer-similarity-min": float(sims.min()),
        "lsc-layer-similarity-max": float(sims.max()),
    }


# ---------------------------------------------------------------------- helpers
class _ArrayMeta:
    """Shape and dtype of an Array without reading its bytes (for layer grouping)."""

    __slots__ = ("dtype", "shape", "size")

    def __init__(self, array: Array) -> None:
        self.dtype = np.dtype(array.dtype)
        self.shape = tuple(array.shape)
        self.size = math.prod(self.shape)


def _meta(array: Array) -> Any:
    return _ArrayMeta(array)


def _keys(layer: Layer) -> tuple[str, ...]:
    return layer.params + layer.buffers + layer.counters


def _metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


def _squared_distance(value: np.ndarray, reference: np.ndarray, scratch: np.ndarray) -> float:
    """||value − reference||² through a reused float32 buffer (no allocation per array).
    NaN/Inf anywhere makes it non-finite."""
    if value.dtype == np.float32 and reference.dtype == np.float32:
        diff = scratch[: value.size]
        np.subtract(value.reshape(-1), reference.reshape(-1), out=diff)
    else:
        diff = (value.astype(np.float64) - reference).reshape(-1)
    return float(np.dot(diff, diff))


def _all_finite(value: np.ndarray) -> bool:
    """NaN/Inf check. A BLAS sum of squares is finite when every element is (fast path);
    when it is not, an exact element-wise check decides (a square can overflow)."""
    flat = value.reshape(-1)
    if math.isfinite(float(np.dot(flat, flat))):
        return True
    return bool(np.isfinite(flat).all())


# ---------------------------------------------------------------------- registry
class SiteAwareFedAvg(SiteTracking, FedAvg):
    """Flower's own FedAvg (same aggregation) that names failed sites and honours
    ``min_train_replies``."""


class SiteAwareFedProx(SiteTracking, FedProx):
    """Flower's own FedProx (same aggregation) that names failed sites and honours
    ``min_train_replies``."""


STRATEGY_NAMES = (
    "fedlsc", "fedlsc-per0", "fedavg", "fedprox", "fedavg-fc", "fedprox-fc", "local-only")


def build_strategy(
    name: str,
    *,
    temperature: float = 0.2,
    personalized_ratio: float = 0.01,
    proximal_mu: float = 0.001,
    head_layer: str = "classifier",
    granularity: str = "layer",
    max_update_norm_ratio: float = 0.0,
    update_dtype: str = "float32",
    **fedavg_kwargs: Any,
) -> FedAvg:
    """The paper's methods by name, so its table is reproduced with one switch.

    ``fedavg-fc`` / ``fedprox-fc`` keep ``head_layer`` on the sites; ``fedlsc-per0``
    is FedLSC with Per = 0 (no personalized layer); ``local-only`` shares nothing
    after handing out the initial model. ``fedavg``/``fedprox`` aggregate exactly as
    Flower's own FedAvg/FedProx (subclassed only to name failed sites) and do not filter
    updates by norm (``max_update_norm_ratio`` applies to the other methods).
    """
    if name in ("fedavg", "fedprox"):
        if update_dtype != "float32":
            raise ValueError(f"update_dtype {update_dtype!r} needs one of this project's "
                             f"strategies, not Flower's own {name!r}")
        if name == "fedavg":
            return SiteAwareFedAvg(**fedavg_kwargs)
        return SiteAwareFedProx(proximal_mu=proximal_mu, **fedavg_kwargs)
    fedavg_kwargs["max_update_norm_ratio"] = max_update_norm_ratio
    fedavg_kwargs["update_dtype"] = update_dtype
    if name == "fedlsc":
        return FedLSC(temperature, personalized_ratio, proximal_mu, granularity, **fedavg_kwargs)
    if name == "fedlsc-per0":
        return FedLSC(temperature, 0.0, proximal_mu, granularity, **fedavg_kwargs)
    if name == "fedavg-fc":
        return PersonalizedFedAvg([head_layer], 0.0, granularity, **fedavg_kwargs)
    if name == "fedprox-fc":
        return PersonalizedFedAvg([head_layer], proximal_mu, granularity, **fedavg_kwargs)
    if name == "local-only":
        return LocalOnly((), 0.0, granularity, **fedavg_kwargs)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
