"""PersonalizedFedAvg: FedAvg whose personalized layers never leave the sites.

It sends only the shared layers, checks every reply in Flower's reply-checking hook
(``_check_and_log_replies``) and averages the shared layers by examples: the FedAvg-FC /
FedProx-FC baselines of the paper, and the base of :class:`~fedlsc_flwr.strategy.FedLSC`,
which changes only :meth:`PersonalizedFedAvg._aggregate_shared`. ``LocalOnly`` shares
nothing after handing out the initial model. The array math lives in
:mod:`fedlsc_flwr.similarity`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlsc_flwr.similarity import (
    HyperParameterError,
    Layer,
    average_layers,
    check_granularity,
    class_weighted_rows,
    group_layers,
    one_blas_thread,
    streams,
)
from fedlsc_flwr.strategy.site_tracking import SiteTracking
from fedlsc_flwr.wire import (
    CLASS_COUNTS_KEY,
    CLASS_COUNTS_METRIC,
    CLASS_TOTALS_KEY,
    PERSONALIZED_LAYERS_KEY,
    PROXIMAL_MU_KEY,
    UPDATE_DTYPE_KEY,
    UPDATE_DTYPES,
    UPDATE_SCALE_KEY,
    array_from_numpy,
    array_view,
    decode_update,
)


class PersonalizedFedAvg(SiteTracking, FedAvg):
    """FedAvg whose ``personalized_layers`` never leave the sites.

    Replies that are errors, lack or add keys, have the wrong shape or dtype, hold
    NaN/Inf, or carry no positive example count are dropped with a WARNING naming
    the site and the key; the round goes on with the rest, as long as at least
    ``min_train_replies`` replies are usable (else the global model is kept). The
    returned ArrayRecord holds every key of the global model: personalized layers keep
    their last global value.

    ``class_weighted_head`` (beyond the paper; "" = off) names the classifier layer whose
    rows are per class: its sites then report their number of training images per class
    (the train reply metric ``train-class-counts``, asked for in the round's config), and
    row c of that layer is averaged with weights proportional to each site's count of
    class c, instead of the layer's usual weights, so a site with no or a few images of a
    class has (almost) no say in that class's row. A reply without valid counts is dropped.
    ``share_class_totals`` asks for the same counts and sends the sites their sum over all
    sites (each site's last report) in every round's config (``class-totals``), for sites
    that balance their sampling over the federation (``training.balance-over``).
    """

    #: Does the reply check measure ||Δw||² of every parameter tensor for the aggregation
    #: (FedLSC's similarities)? The norm filter has it measured either way.
    measures_updates = False

    def __init__(
        self,
        personalized_layers: Iterable[str] = (),
        proximal_mu: float = 0.0,
        granularity: str = "layer",
        *,
        max_update_norm_ratio: float = 0.0,
        update_dtype: str = "float32",
        class_weighted_head: str = "",
        share_class_totals: bool = False,
        server_learning_rate: float = 1.0,
        **fedavg_kwargs: Any,
    ) -> None:
        if not (math.isfinite(server_learning_rate) and server_learning_rate > 0):
            raise HyperParameterError("server_learning_rate", server_learning_rate,
                                      "a number > 0 (1 = the new global model is the average)")
        if update_dtype not in UPDATE_DTYPES:
            raise HyperParameterError("update_dtype", update_dtype, "'float32' or 'float16'")
        if not max_update_norm_ratio >= 0:
            raise HyperParameterError("max_update_norm_ratio", max_update_norm_ratio,
                                      ">= 0 (0 = off)")
        if not proximal_mu >= 0:
            raise HyperParameterError("proximal_mu", proximal_mu, "a number >= 0")
        check_granularity(granularity)
        super().__init__(**fedavg_kwargs)
        self.proximal_mu = float(proximal_mu)
        self.granularity = granularity
        self.max_update_norm_ratio = float(max_update_norm_ratio)
        self.update_dtype = update_dtype
        self.class_weighted_head = str(class_weighted_head)
        self.share_class_totals = bool(share_class_totals)
        self.server_learning_rate = float(server_learning_rate)
        #: each site's last reported training images per class, by site name
        self.site_class_counts: dict[str, list[int]] = {}
        self._round_num_classes: int | None = None  # fixed by the round's first count list
        self.personalized_layers = frozenset(personalized_layers)
        self.never_shared = self.personalized_layers
        self._global: ArrayRecord | None = None
        self._sent_keys: list[str] = []
        # id(reply) -> its arrays as views, and ||Δw||² per parameter tensor when measured
        self._checked: dict[int, tuple[dict[str, np.ndarray], dict[str, float]]] = {}

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
        self._round_num_classes = None
        if self.class_weighted_head or self.share_class_totals:
            config[CLASS_COUNTS_KEY] = True
        if self.share_class_totals and self.site_class_counts:
            config[CLASS_TOTALS_KEY] = self.class_totals()
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
        """Aggregate the shared layers of the usable replies; keep the rest."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        with one_blas_thread():  # see one_blas_thread: steady, and faster on a busy host
            return self._aggregate_train(server_round, replies)

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None
        replies = self._received("train", server_round, replies)
        accepted, _ = self._check_and_log_replies(replies, is_train=True)
        states, squared = zip(*[self._checked.pop(id(m)) for m in accepted]) if accepted \
            else ((), ())
        self._checked.clear()
        counts = {"num-replies-accepted": len(accepted),
                  "num-replies-dropped": len(replies) - len(accepted)}
        if self._too_few(server_round, len(accepted)):
            return None, MetricRecord(counts)

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
            server_round, global_state, list(states), node_ids, shared,
            examples / examples.sum(), list(squared)
        )
        if self._wants_class_counts():
            for node, msg in zip(node_ids, accepted):
                name = self.site_names.get(node, f"node {node}")
                self.site_class_counts[name] = list(_metrics(msg)[CLASS_COUNTS_METRIC])
        head = self._class_weighted_head_layer(shared)
        if head is not None:
            class_counts = np.array([_metrics(m)[CLASS_COUNTS_METRIC] for m in accepted],
                                    dtype=np.float64)
            new_state.update(class_weighted_rows(
                states, head.params + head.buffers, class_counts, new_state))
        if self.server_learning_rate != 1.0:
            new_state.update(server_step(global_state, new_state, shared,
                                         self.server_learning_rate))
        record = ArrayRecord(
            {
                k: array_from_numpy(new_state[k]) if k in new_state else self._global[k]
                for k in self._global
            }
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        metrics.pop(CLASS_COUNTS_METRIC, None)  # a site's counts, not a round's metric
        for key, value in {**counts, "num-personalized-layers": len(self.personalized_layers),
                           **extra}.items():
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
        squared_distances: list[dict[str, float]] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """New values of the shared tensors, and extra metrics. Here: FedAvg by examples.
        ``squared_distances`` holds each reply's ||Δw||² per parameter tensor, where the
        reply check measured it (:attr:`measures_updates`)."""
        return average_layers(global_state, states, shared, example_weights), {}

    def _class_weighted_head_layer(self, layers: Iterable[Layer]) -> Layer | None:
        """The shared layer ``class_weighted_head`` names, or None (off, or kept private)."""
        if not self.class_weighted_head:
            return None
        return next((layer for layer in layers if layer.name == self.class_weighted_head), None)

    def class_totals(self) -> list[int]:
        """The federation's training images per class: the sum of the sites' last reports."""
        reports = list(self.site_class_counts.values())
        return [int(sum(column)) for column in zip(*reports)] if reports else []

    def _wants_class_counts(self) -> bool:
        """Do the replies have to carry the sites' class counts this round?"""
        assert self._global is not None
        if self.share_class_totals or not self.class_weighted_head:
            return self.share_class_totals  # (no layer grouping per reply when both are off)
        return self._class_weighted_head_layer(
            layer for layer in self._layers(self._global)
            if layer.name not in self.personalized_layers) is not None

    def _class_count_problem(self, msg: Message) -> str | None:
        """Why the reply's class counts are unusable (None: fine, or none asked for)."""
        assert self._global is not None
        if not self._wants_class_counts():
            return None
        # How many classes: the head's rows, else the earlier reports', else the first usable
        # list of this round (every reply must then match it: they are summed and averaged).
        head_rows = f"{self.class_weighted_head}.weight"
        num_classes = (self._global[head_rows].shape[0] if head_rows in self._global
                       else len(next(iter(self.site_class_counts.values()), []))
                       or self._round_num_classes)
        counts = _metrics(msg).get(CLASS_COUNTS_METRIC)
        if not isinstance(counts, list) or not counts \
                or len(counts) != (num_classes or len(counts)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            return (f"metric '{CLASS_COUNTS_METRIC}' must list "
                    f"{num_classes or 'the'} training-image counts >= 0 (one per class), "
                    f"got {counts!r}")
        self._round_num_classes = len(counts)
        return None

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Flower's hook: split off error replies (Flower logs them), then drop, with a
        WARNING naming the site, every training reply that cannot be aggregated, instead
        of failing the round as Flower's consistency check would."""
        valid, errors = super()._check_and_log_replies(replies, is_train, validate=False)
        if not is_train:
            return valid, errors
        assert self._global is not None
        expected = {k: self._global[k] for k in self._sent_keys}
        global_views = {k: array_view(v) for k, v in expected.items()}
        float32_sizes = [v.size for v in global_views.values() if v.dtype == np.float32]
        measured = self._measured_keys(len(valid))
        scratch = np.empty(min(max(float32_sizes, default=0), _SCRATCH_ELEMENTS) if measured
                           else 0, np.float32)
        accepted: list[Message] = []
        norms: list[float] = []
        server_round = self.current_round
        for msg in valid:
            problem, state, squared = self._check_reply(msg, expected, global_views, scratch,
                                                        measured)
            if problem:
                self._failed("train", server_round, msg.metadata.src_node_id,
                             f"dropped the reply: {problem}")
                errors.append(msg)
                continue
            accepted.append(msg)
            self._checked[id(msg)] = state, squared
            norms.append(math.sqrt(sum(squared.values())))
        if self.max_update_norm_ratio > 0 and len(accepted) >= 3:
            median = float(np.median(norms))
            limit = self.max_update_norm_ratio * median
            for msg, norm in zip(list(accepted), norms):
                if norm > limit:
                    self._failed("train", server_round, msg.metadata.src_node_id,
                                 f"dropped the reply: update norm {norm:.4g} is "
                                 f"{norm / max(median, 1e-30):.1f} x the median "
                                 f"(limit {self.max_update_norm_ratio:g} x)")
                    accepted.remove(msg)
                    errors.append(msg)
        log(INFO, "aggregate_train: %s replies accepted, %s dropped",
            len(accepted), len(valid) - len(accepted))
        return accepted, errors

    def _check_reply(
        self, msg: Message, expected: Mapping[str, Array],
        global_views: Mapping[str, np.ndarray], scratch: np.ndarray,
        measured: frozenset[str] = frozenset(),
    ) -> tuple[str | None, dict[str, np.ndarray], dict[str, float]]:
        """Why a reply cannot be aggregated (None if it can), its arrays as views, and
        ||Δw||² of the parameter tensors in ``measured``: the norm filter and FedLSC's
        streamed layers need them, and this pass reads every value anyway to find
        NaN/Inf."""
        content = msg.content
        if self.arrayrecord_key not in content.array_records:
            return f"no ArrayRecord under '{self.arrayrecord_key}'", {}, {}
        if len(content.metric_records) != 1:
            return f"expected one MetricRecord, found {len(content.metric_records)}", {}, {}
        count = _metrics(msg).get(self.weighted_by_key)
        if isinstance(count, list) or count is None or not count > 0:
            return (f"metric '{self.weighted_by_key}' missing or not positive ({count!r})",
                    {}, {})
        problem = self._class_count_problem(msg)
        if problem:
            return problem, {}, {}
        arrays = content.array_records[self.arrayrecord_key]
        missing = [k for k in expected if k not in arrays]
        if missing:
            return f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}", {}, {}
        extra = [k for k in arrays if k not in expected]
        if extra:
            return (f"unexpected keys {extra[:3]}{' …' if len(extra) > 3 else ''} "
                    "(personalized or unknown layers)"), {}, {}
        state: dict[str, np.ndarray] = {}
        squared: dict[str, float] = {}
        squared_norm = 0.0
        scales = content.config_records.get(UPDATE_SCALE_KEY, {})
        for key, ref in expected.items():
            got = arrays[key]
            as_delta = self.update_dtype == "float16" and np.dtype(ref.dtype).kind == "f"
            dtype = "float16" if as_delta else ref.dtype
            if tuple(got.shape) != tuple(ref.shape) or got.dtype != dtype:
                return (f"key '{key}' has shape {tuple(got.shape)} {got.dtype}, "
                        f"expected {tuple(ref.shape)} {dtype}"), {}, {}
            try:
                value = array_view(got)
            except (ValueError, TypeError) as err:
                return f"key '{key}' cannot be read: {err}", {}, {}
            if as_delta:
                exponent = scales.get(key, 0)
                if isinstance(exponent, bool) or not isinstance(exponent, int) \
                        or abs(exponent) > 1000:
                    return f"key '{key}' has an unusable update scale {exponent!r}", {}, {}
                value = decode_update(value, global_views[key], exponent)
            if np.issubdtype(value.dtype, np.floating):
                if key not in measured:
                    finite = _all_finite(value)
                else:
                    step = _squared_distance(value, global_views[key], scratch)
                    finite = math.isfinite(step) or bool(np.isfinite(value).all())
                    squared[key] = step
                    squared_norm += step
                if not finite:
                    return f"key '{key}' holds NaN or Inf values", {}, {}
                if not math.isfinite(squared_norm):
                    return f"key '{key}' holds an update too large to measure", {}, {}
            state[key] = value
        return None, state, squared

    def _measured_keys(self, num_replies: int) -> frozenset[str]:
        """Parameter tensors whose ||Δw||² the reply check measures: all of them for the
        norm filter; for FedLSC (:attr:`measures_updates`) those of the layers it will
        stream with this many replies (the others it computes from a whole matrix)."""
        assert self._global is not None
        layers = [layer for layer in self._layers(self._global)
                  if layer.name not in self.personalized_layers]
        if self.max_update_norm_ratio > 0:
            return frozenset(k for layer in layers for k in layer.params)
        if self.measures_updates:
            return frozenset(k for layer in layers if streams(num_replies, layer)
                             for k in layer.params)
        return frozenset()

    # ------------------------------------------------------------------ state
    def _layers(self, arrays: ArrayRecord) -> list[Layer]:
        return group_layers({k: _ArrayMeta(arrays[k]) for k in arrays}, self.granularity)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this strategy."""
        return {"personalized_layers": sorted(self.personalized_layers),
                "site_class_counts": dict(self.site_class_counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.personalized_layers = frozenset(state["personalized_layers"])
        self.site_class_counts = {str(k): [int(c) for c in v]
                                  for k, v in state.get("site_class_counts", {}).items()}

    def summary(self) -> None:
        log(INFO, "\t├──> Personalization:")
        log(INFO, "\t│\t├── Personalized layers: %s", sorted(self.personalized_layers) or "none")
        log(INFO, "\t│\t├── Granularity: %s", self.granularity)
        log(INFO, "\t│\t├── Updates sent as: %s", "float16 deltas" if self.update_dtype ==
            "float16" else "float32 weights")
        log(INFO, "\t│\t├── Class-weighted head: %s", self.class_weighted_head or "off")
        log(INFO, "\t│\t├── Update norm limit: %s", f"{self.max_update_norm_ratio:g} x median"
            if self.max_update_norm_ratio else "off")
        log(INFO, "\t│\t└── Proximal mu: %s", self.proximal_mu)
        super().summary()


class LocalOnly(PersonalizedFedAvg):
    """Each site trains on its own: round 1 hands every site the same initial model,
    after which every layer is personalized and nothing is exchanged."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        every_layer = frozenset(layer.name for layer in self._layers(arrays))
        first = not self.personalized_layers  # a resumed run has them from its checkpoint
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.personalized_layers = self.never_shared = every_layer
        if first:
            # The initial model went out whole, yet every layer is already the site's own:
            # it keeps this round's training as its personalized model (evaluated this
            # round too) and sends nothing back.
            for message in messages:
                message.content[self.configrecord_key][PERSONALIZED_LAYERS_KEY] = sorted(
                    every_layer)
        self._sent_keys = []  # no reply carries a shared tensor
        return messages


# ---------------------------------------------------------------------- helpers
def server_step(global_state: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
                layers: Iterable[Layer], learning_rate: float) -> dict[str, np.ndarray]:
    """The shared layers' trained parameters moved ``learning_rate`` times the way from
    the global model to their average: w_g + η·(average − w_g) (FedOpt's server learning
    rate with plain SGD, Reddi et al., ICLR 2021). Buffers (BatchNorm's running statistics)
    and counters stay the average: they are estimates, not steps."""
    moved = {}
    for layer in layers:
        for key in layer.params:
            if key in averaged:
                start = global_state[key]
                step = averaged[key].astype(np.float64) - start
                moved[key] = (start + learning_rate * step).astype(start.dtype)
    return moved


class _ArrayMeta:
    """Shape and dtype of an Array without reading its bytes (for layer grouping)."""

    __slots__ = ("dtype", "shape", "size")

    def __init__(self, array: Array) -> None:
        self.dtype = np.dtype(array.dtype)
        self.shape = tuple(array.shape)
        self.size = math.prod(self.shape)


def _keys(layer: Layer) -> tuple[str, ...]:
    return layer.params + layer.buffers + layer.counters


def _metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


#: Float32 elements of the reply check's difference buffer: small enough for a core's
#: cache, large enough that a tensor takes few numpy calls.
_SCRATCH_ELEMENTS = 1 << 16


def _squared_distance(value: np.ndarray, reference: np.ndarray, scratch: np.ndarray) -> float:
    """||value − reference||², a piece at a time through a reused float32 buffer (no
    allocation, and the buffer stays in cache). NaN/Inf anywhere makes it non-finite."""
    if value.dtype == np.float32 and reference.dtype == np.float32 and scratch.size:
        flat, ref = value.reshape(-1), reference.reshape(-1)
        total = 0.0
        for start in range(0, flat.size, scratch.size):
            stop = min(start + scratch.size, flat.size)
            diff = scratch[: stop - start]
            np.subtract(flat[start:stop], ref[start:stop], out=diff)
            total += float(np.dot(diff, diff))
        return total
    diff = (value.astype(np.float64) - reference).reshape(-1)
    return float(np.dot(diff, diff))


def _all_finite(value: np.ndarray) -> bool:
    """NaN/Inf check. A BLAS sum of squares is finite when every element is (fast path);
    when it is not, an exact element-wise check decides (a square can overflow)."""
    flat = value.reshape(-1)
    if math.isfinite(float(np.dot(flat, flat))):
        return True
    return bool(np.isfinite(flat).all())
