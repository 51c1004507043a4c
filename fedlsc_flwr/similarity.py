"""Layer-similarity math of FedLSC (Eq. 1-6 of Liu, Chen & Lv 2026), numpy only.

Nothing here imports Flower: the functions take and return plain ``numpy`` arrays
keyed by state_dict names, so they can be tested and reused outside a federation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import ThreadpoolController

#: State_dict suffixes that are buffers, not parameters. An ArrayRecord does not say
#: which tensors are buffers, so they are recognised by name (see FEDLSC.md).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

#: A norm below this is treated as a zero update (similarity 0 to everyone).
ZERO_NORM = 1e-30
GRANULARITIES = ("layer", "tensor")


class HyperParameterError(ValueError):
    """A hyper-parameter value that cannot be used. ``name`` is the keyword argument,
    ``requirement`` completes "must be ...", so an app can name its own config key."""

    def __init__(self, name: str, value: object, requirement: str,
                 message: str | None = None) -> None:
        super().__init__(message or f"{name} must be {requirement}, got {value!r}")
        self.name, self.value, self.requirement = name, value, requirement


# The one place each FedLSC hyper-parameter is checked: the strategies call these, and
# an app validates its settings by building the strategy.
def check_temperature(temperature: float) -> float:
    """τ of Eq. 4."""
    if not temperature > 0:
        raise HyperParameterError("temperature", temperature, "a number > 0")
    return float(temperature)


def check_personalized_ratio(ratio: float) -> float:
    """The "Per" quantile of Eq. 6."""
    if not 0.0 <= ratio < 1.0:
        raise HyperParameterError("personalized_ratio", ratio, "in [0, 1)")
    return float(ratio)


def check_granularity(granularity: str) -> str:
    """What one aggregation unit is: a leaf module ("layer") or one tensor ("tensor")."""
    if granularity not in GRANULARITIES:
        raise HyperParameterError("granularity", granularity, "'layer' or 'tensor'")
    return granularity


def layer_of(key: str) -> str:
    """The layer (leaf-module prefix) a state_dict key belongs to: ``a.b.weight`` -> ``a.b``."""
    return key.rpartition(".")[0] or key


def is_buffer(key: str) -> bool:
    """True for norm running statistics and counters, recognised by name."""
    return key.rpartition(".")[2] in BUFFER_SUFFIXES


@dataclass(frozen=True)
class Layer:
    """One aggregation unit: the float parameters compared, and the tensors that follow."""

    name: str
    params: tuple[str, ...]  # float parameters, concatenated into the update vector
    buffers: tuple[str, ...] = ()  # float buffers: averaged with the layer's weights
    counters: tuple[str, ...] = ()  # integer tensors: never averaged
    sizes: tuple[int, ...] = field(default=(), compare=False)  # element count of params

    @property
    def size(self) -> int:
        return int(sum(self.sizes))


def group_layers(
    state: Mapping[str, np.ndarray], granularity: str = "layer"
) -> list[Layer]:
    """Group state_dict entries into layers, in first-seen order.

    ``granularity="layer"`` groups every tensor under the same leaf-module prefix;
    ``"tensor"`` makes each parameter its own unit, named by its key (buffers then
    follow the ``weight`` of their module, or its first parameter).
    """
    check_granularity(granularity)
    params: dict[str, list[str]] = {}
    buffers: dict[str, list[str]] = {}
    counters: dict[str, list[str]] = {}
    order: list[str] = []
    for key, value in state.items():
        prefix = layer_of(key)
        if prefix not in params:
            params[prefix], buffers[prefix], counters[prefix] = [], [], []
            order.append(prefix)
        if not np.issubdtype(value.dtype, np.floating):
            counters[prefix].append(key)
        elif is_buffer(key):
            buffers[prefix].append(key)
        else:
            params[prefix].append(key)

    layers: list[Layer] = []
    for prefix in order:
        sizes = tuple(int(state[k].size) for k in params[prefix])
        if granularity == "layer" or not params[prefix]:
            layers.append(
                Layer(prefix, tuple(params[prefix]), tuple(buffers[prefix]),
                      tuple(counters[prefix]), sizes)
            )
            continue
        names = params[prefix]
        owner = f"{prefix}.weight" if f"{prefix}.weight" in names else names[0]
        for key, size in zip(names, sizes):
            extra = key == owner
            layers.append(
                Layer(key, (key,), tuple(buffers[prefix]) if extra else (),
                      tuple(counters[prefix]) if extra else (), (size,))
            )
    return layers


def update_matrix(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layer: Layer,
    workspace: np.ndarray | None = None,
) -> np.ndarray:
    """Eq. 1 for one layer: rows are Δw_i = w_i - w_g, the layer's parameters flattened.

    Returned as float32 of shape (N, P_l), written in one pass per client. A
    ``workspace`` (flat float32, at least N·P_l long) is reused instead of allocating:
    fresh pages cost more than the subtraction itself.
    """
    n = len(client_states)
    if workspace is None:
        out = np.empty((n, layer.size), dtype=np.float32)
    else:
        out = workspace[: n * layer.size].reshape(n, layer.size)
    offset = 0
    for key, size in zip(layer.params, layer.sizes):
        g = np.asarray(global_state[key]).reshape(-1)
        for i, state in enumerate(client_states):
            np.subtract(np.asarray(state[key]).reshape(-1), g,
                        out=out[i, offset:offset + size], casting="unsafe")
        offset += size
    return out


_blas: ThreadpoolController | None = None


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """A context in which BLAS (numpy's matrix products) runs on one thread.

    The aggregation's products are matrix-vector ones over data that does not fit in
    cache: memory-bound, nothing to gain from threads. With OpenBLAS's default of one
    thread per core they waited on each other whenever a core was busy: on this 2-core
    machine with other work running, a (3, 349525) vector-matrix product took 41 ms
    instead of 0.1 ms, and FedLSC's aggregation time was bimodal (0.34-0.64 s where
    Flower's FedAvg, which uses no BLAS, was steady).
    """
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()  # finds the loaded BLAS libraries once
    return _blas.limit(limits=1, user_api="blas")


#: Largest (N, P) update matrix, in float32 elements, that a layer is computed from
#: whole (one pass over the clients' tensors, then passes over the matrix with BLAS):
#: 128 MiB for up to FEW_CLIENTS clients, 4 MiB beyond. A larger layer is streamed a
#: block of columns at a time (passes over the clients' tensors, nothing of size N·P
#: allocated). Measured on this 2-core machine, FedLSC / Flower FedAvg time, medians of
#: 7-11 interleaved calls: with few clients the whole matrices are faster (Res2Net50,
#: N = 3: 0.82-0.86 whole, 1.02 streamed from 4 MiB; N = 10: 0.82 whole, 1.05
#: streamed); from N = 30 on they are not (ResNet-10t, N = 30: 1.90 all whole, 1.01
#: streamed from 4 MiB; N = 100: 2.93 and 0.98 — the largest layer's matrix is 0.9 GB
#: there, fresh pages every round).
MATRIX_ELEMENTS = 1 << 20
FEW_CLIENTS_MATRIX_ELEMENTS = 1 << 25
FEW_CLIENTS = 16
#: Float32 elements of a streamed block: it stays in cache.
BLOCK_ELEMENTS = 1 << 20
#: Columns per block at least: fewer would make per-call overhead dominate at large N.
MIN_BLOCK_COLUMNS = 16384


def block_columns(n: int) -> int:
    """Columns of an update block for ``n`` clients."""
    return max(MIN_BLOCK_COLUMNS, BLOCK_ELEMENTS // max(n, 1))


def streams(n: int, layer: Layer) -> bool:
    """Is ``layer`` aggregated a block at a time for ``n`` clients (see MATRIX_ELEMENTS)?"""
    limit = FEW_CLIENTS_MATRIX_ELEMENTS if n <= FEW_CLIENTS else MATRIX_ELEMENTS
    return n * layer.size > limit


def update_blocks(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layer: Layer,
    workspace: np.ndarray,
) -> Iterator[tuple[str, int, int, np.ndarray]]:
    """Eq. 1 a block of columns at a time: yields ``(key, start, stop, block)`` where
    ``block[i]`` holds Δw_i of elements ``start:stop`` of tensor ``key`` (flattened),
    as float32 in ``workspace`` (overwritten by the next block)."""
    n = len(client_states)
    width = max(1, workspace.size // max(n, 1))
    for key in layer.params:
        g = np.asarray(global_state[key]).reshape(-1)
        flats = [np.asarray(state[key]).reshape(-1) for state in client_states]
        for start in range(0, g.size, width):
            stop = min(start + width, g.size)
            block = workspace[: n * (stop - start)].reshape(n, stop - start)
            for i, flat in enumerate(flats):
                np.subtract(flat[start:stop], g[start:stop], out=block[i], casting="unsafe")
            yield key, start, stop, block


def streamed_squared_norms(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layer: Layer,
    workspace: np.ndarray,
) -> np.ndarray:
    """||Δw_i||² of a streamed layer for each client, one pass, summed in float64."""
    squared_norms = np.zeros(len(client_states))
    for *_, block in update_blocks(global_state, client_states, layer, workspace):
        squared_norms += np.einsum("ij,ij->i", block, block)
    return squared_norms


def streamed_mean_similarity(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layer: Layer,
    workspace: np.ndarray,
    squared_norms: np.ndarray,
) -> np.ndarray:
    """Eq. 2-3 as :func:`mean_similarity`, for a layer streamed through ``workspace``,
    given ``squared_norms`` (||Δw_i||² of the layer, e.g. :func:`streamed_squared_norms`):
    one pass for û_i · Σ_j û_j, sums accumulated in float64."""
    n = len(client_states)
    if n == 1:
        return np.zeros(1)
    norms = np.sqrt(squared_norms)
    nonzero = norms > ZERO_NORM
    inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
    inv32 = inv.astype(np.float32)
    dots = np.zeros(n)
    for *_, block in update_blocks(global_state, client_states, layer, workspace):
        dots += block @ (inv32 @ block)  # Δ_i · Σ_j û_j over these columns
    return (dots * inv - nonzero.astype(np.float64)) / (n - 1)


def streamed_weighted_params(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layer: Layer,
    weights: np.ndarray,
    workspace: np.ndarray,
) -> dict[str, np.ndarray]:
    """Eq. 5 for a layer's parameters, streamed: w_g + Σ_i ŵ_i Δw_i, in the global dtypes."""
    w32 = np.asarray(weights, dtype=np.float32)
    flat = {key: np.empty(np.asarray(global_state[key]).size, np.float32) for key in layer.params}
    for key, start, stop, block in update_blocks(global_state, client_states, layer, workspace):
        np.add(w32 @ block, np.asarray(global_state[key]).reshape(-1)[start:stop],
               out=flat[key][start:stop])
    out = {}
    for key, values in flat.items():
        g = np.asarray(global_state[key])
        out[key] = values.reshape(g.shape).astype(g.dtype, copy=False)
    return out


def row_norms(updates: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, accumulated in float64 through BLAS dot products."""
    return np.sqrt(np.array([float(np.dot(row, row)) for row in updates]))


def mean_similarity(updates: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Eq. 2-3 without the N×N loop: s̄_i = (û_i·Σ_j û_j − û_i·û_i) / (N − 1).

    ``updates`` is (N, P). A zero row has similarity 0 to every client (and every
    client to it). N = 1 gives 0. Cost O(N·P).
    """
    n = updates.shape[0]
    if n == 1:
        return np.zeros(1)
    if norms is None:
        norms = row_norms(updates)
    nonzero = norms > ZERO_NORM
    inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
    direction_sum = inv.astype(np.float32) @ updates  # Σ_j û_j, shape (P,)
    dots = (updates @ direction_sum).astype(np.float64) * inv  # û_i · Σ_j û_j
    self_dot = nonzero.astype(np.float64)  # û_i · û_i
    return (dots - self_dot) / (n - 1)


def similarity_matrix(updates: np.ndarray) -> np.ndarray:
    """Eq. 2, the full N×N cosine matrix (for reports and plots; O(N²·P))."""
    u = updates.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", u, u))
    nonzero = norms > ZERO_NORM
    u[nonzero] /= norms[nonzero, None]
    u[~nonzero] = 0.0
    sim = u @ u.T
    np.fill_diagonal(sim, np.where(nonzero, 1.0, 0.0))
    return sim


def softmax_weights(mean_sim: np.ndarray, temperature: float) -> np.ndarray:
    """Eq. 4: softmax over clients of s̄_i / τ, computed stably."""
    check_temperature(temperature)
    z = np.asarray(mean_sim, dtype=np.float64) / temperature
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


def weighted_sum(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layer: Layer,
    weights: np.ndarray,
    updates: np.ndarray | None = None,
    workspace: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Eq. 5 for one layer, returned in the global model's dtypes.

    With the update matrix at hand it computes w_g + Σ_i ŵ_i Δw_i (the same as
    Σ_i ŵ_i w_i when Σ ŵ = 1) as one matrix-vector product; without it, streamed a
    block at a time through ``workspace`` (or a whole matrix when none is given).
    Buffers follow the same weights; integer counters take the largest client value
    (never averaged).
    """
    w32 = np.asarray(weights, dtype=np.float32)
    out: dict[str, np.ndarray] = {}
    if layer.params and updates is None and workspace is not None:
        out.update(streamed_weighted_params(global_state, client_states, layer, weights,
                                            workspace))
    elif layer.params:
        if updates is None:
            updates = update_matrix(global_state, client_states, layer)
        flat = w32 @ updates
        offset = 0
        for key, size in zip(layer.params, layer.sizes):
            g = np.asarray(global_state[key])
            flat[offset:offset + size] += g.reshape(-1)
            out[key] = flat[offset:offset + size].reshape(g.shape).astype(g.dtype, copy=False)
            offset += size
    for key in layer.buffers:
        g = np.asarray(global_state[key])
        acc = np.zeros(g.shape, dtype=np.float64)
        for w, state in zip(weights, client_states):
            acc += float(w) * np.asarray(state[key], dtype=np.float64)
        out[key] = acc.astype(g.dtype)
    for key in layer.counters:
        out[key] = np.max(np.stack([np.asarray(s[key]) for s in client_states]), axis=0)
    return out


def select_personalized(layer_mean_sim: Mapping[str, float], ratio: float) -> frozenset[str]:
    """Eq. 6: layers whose mean similarity is strictly below the ``ratio`` quantile.

    Pass only layers that trained (:attr:`LayerReport.trained`): an untouched layer's
    similarity of 0 is a convention, and counted it would move the quantile.

    The quantile is ``numpy.quantile`` with its default (linear) method. Ratio 0 selects
    nothing (nothing is strictly below the minimum).
    """
    check_personalized_ratio(ratio)
    if not layer_mean_sim:
        return frozenset()
    names = list(layer_mean_sim)
    values = np.array([layer_mean_sim[n] for n in names], dtype=np.float64)
    threshold = np.quantile(values, ratio)
    return frozenset(n for n, v in zip(names, values) if v < threshold)


@dataclass
class LayerReport:
    """What one round of Eq. 1-5 found for one layer."""

    mean_similarity: np.ndarray  # s̄_i per client, shape (N,)
    weights: np.ndarray  # ŵ_i per client, shape (N,)
    matrix: np.ndarray | None = None  # full s_ij, when asked for
    #: False when no client changed the layer's parameters (every update exactly zero, as
    #: for a layer frozen on the sites): its similarities are zeros by convention, not
    #: measurements.
    trained: bool = True


def aggregate_layers(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layers: Iterable[Layer],
    temperature: float,
    with_matrix: bool = False,
    squared_distances: Sequence[Mapping[str, float]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, LayerReport]]:
    """Eq. 1-5 over the given layers: new global tensors, and a report per layer.

    A layer whose (N, P) update matrix fits in one block is computed from that matrix;
    a larger one is streamed a block of columns at a time (passes over the clients'
    tensors, nothing of size N·P allocated): the same equations, sums taken in another
    order. ``squared_distances`` (per client, ||Δw||² of each parameter tensor, e.g. from
    a check that read every value already) spare the streamed layers their norm pass.
    A layer without float parameters (only buffers) has nothing to compare: its
    tensors are averaged with uniform weights.
    """
    n = len(client_states)
    layers = list(layers)
    new_state: dict[str, np.ndarray] = {}
    reports: dict[str, LayerReport] = {}
    workspace = _workspace(n, layers)
    for layer in layers:
        if not layer.params:
            new_state.update(weighted_sum(global_state, client_states, layer, np.full(n, 1.0 / n)))
            continue
        if not streams(n, layer) or with_matrix:
            updates = update_matrix(global_state, client_states, layer,
                                    workspace if n * layer.size <= workspace.size else None)
            norms = row_norms(updates)
            mean_sim = mean_similarity(updates, norms)
            weights = softmax_weights(mean_sim, temperature)
            new_state.update(weighted_sum(global_state, client_states, layer, weights, updates))
            matrix = similarity_matrix(updates) if with_matrix else None
        else:
            if squared_distances is not None and all(
                    key in d for d in squared_distances for key in layer.params):
                squared = np.array([sum(d[key] for key in layer.params)
                                    for d in squared_distances])
            else:
                squared = streamed_squared_norms(global_state, client_states, layer, workspace)
            norms = np.sqrt(squared)
            mean_sim = streamed_mean_similarity(global_state, client_states, layer, workspace,
                                                squared)
            weights = softmax_weights(mean_sim, temperature)
            new_state.update(weighted_sum(global_state, client_states, layer, weights,
                                          workspace=workspace))
            matrix = None
        reports[layer.name] = LayerReport(mean_sim, weights, matrix,
                                          trained=bool(np.any(norms > ZERO_NORM)))
    return new_state, reports


_kept = threading.local()  # this thread's workspace, kept from one aggregation to the next


def _workspace(n: int, layers: Sequence[Layer]) -> np.ndarray:
    """Room for the largest whole update matrix and for one streamed block (at most
    FEW_CLIENTS_MATRIX_ELEMENTS: 128 MiB), kept between aggregations of this thread.

    Allocated afresh each round, its pages were new every time: the kernel zeroes and
    maps them on first touch, and FedLSC's time at N = 10 was bimodal (ResNet-10t-SA:
    median 0.92 x Flower's FedAvg, slowest call 2.1 x, on a quiet machine)."""
    whole = [n * layer.size for layer in layers if layer.params and not streams(n, layer)]
    block = [n * min(layer.size, block_columns(n)) for layer in layers
             if layer.params and streams(n, layer)]
    size = max([*whole, *block], default=0)
    kept = getattr(_kept, "workspace", None)
    if kept is None or kept.size < size:
        kept = np.zeros(size, np.float32)  # zeros: its pages are touched here, once
        _kept.workspace = kept
    return kept[:size]


def rescaled_weights(weights: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Eq. 4 weights times a factor per client, renormalised to sum to 1 (unchanged when
    every factor is 0)."""
    scaled = np.asarray(weights, dtype=np.float64) * np.asarray(factors, dtype=np.float64)
    total = scaled.sum()
    return scaled / total if total > 0 else np.asarray(weights, dtype=np.float64)


def reweigh_layers(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layers: Iterable[Layer],
    weights: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Eq. 5 again for the named layers with the given weights (a second pass over the
    updates, e.g. after some clients' Eq. 4 weights were scaled down)."""
    layers = [layer for layer in layers if layer.name in weights]
    n = len(client_states)
    workspace = np.empty(n * max((layer.size for layer in layers), default=0), np.float32)
    new_state: dict[str, np.ndarray] = {}
    for layer in layers:
        updates = update_matrix(global_state, client_states, layer, workspace)
        new_state.update(weighted_sum(global_state, client_states, layer, weights[layer.name],
                                      updates))
    return new_state


def average_layers(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    layers: Iterable[Layer],
    weights: np.ndarray,
) -> dict[str, np.ndarray]:
    """The same weights for every layer (FedAvg by examples), for the -FC baselines."""
    layers = list(layers)
    n = len(client_states)
    workspace = _workspace(n, layers)
    new_state: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer.params and not streams(n, layer):
            updates = update_matrix(global_state, client_states, layer, workspace)
            new_state.update(weighted_sum(global_state, client_states, layer, weights, updates))
        else:
            new_state.update(weighted_sum(global_state, client_states, layer, weights,
                                          workspace=workspace))
    return new_state


def class_weighted_rows(
    client_states: Sequence[Mapping[str, np.ndarray]],
    keys: Iterable[str],
    class_counts: np.ndarray,
    fallback: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Each tensor in ``keys`` (first axis: one row per class, e.g. a classifier's weight
    and bias) aggregated row by row: row c is Σ_i n_ic·row_ic / Σ_i n_ic, where
    ``class_counts[i, c]`` = n_ic is client i's number of training images of class c. A
    class that no client holds keeps its row of ``fallback`` (the usual aggregate)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    totals = counts.sum(axis=0)
    held = totals > 0
    weights = np.divide(counts, totals, out=np.zeros_like(counts), where=held)  # (N, C)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        base = fallback[key]
        if base.ndim == 0 or base.shape[0] != counts.shape[1]:
            raise ValueError(f"'{key}' has {base.shape[0] if base.ndim else 0} rows, "
                             f"expected one per class ({counts.shape[1]})")
        rows = np.zeros(base.shape, dtype=np.float64)
        for i, state in enumerate(client_states):
            rows += weights[i].reshape((-1,) + (1,) * (base.ndim - 1)) * state[key]
        mask = held.reshape((-1,) + (1,) * (base.ndim - 1))
        out[key] = np.where(mask, rows, base).astype(base.dtype, copy=False)
    return out
