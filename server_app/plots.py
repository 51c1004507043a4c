"""Plots of a run's results (matplotlib, headless); each written atomically as PNG.

Figures are made with matplotlib's object API (``Figure``), not pyplot's global state,
so the ServerApp can draw them in a background thread (:class:`PlotWriter`)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedlsc_common.storage import atomic_write  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy and balanced accuracy per round, global model and personalized models."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    rounds = [r["round"] for r in rows]
    for group, style in (("global", "-"), ("personalized", "--")):
        for metric, color in (("accuracy", "tab:blue"), ("balanced-accuracy", "tab:orange")):
            values = [r.get(group, {}).get(metric)
                      if group != "global" or r.get("global-model-scored", True) else None
                      for r in rows]
            if any(v is not None for v in values):
                ax.plot(rounds, [np.nan if v is None else v for v in values], style,
                        color=color, marker="o", ms=3, label=f"{group} {metric}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to plot when no round was evaluated
        ax.legend(fontsize=8)
    ax.set_title(title or "accuracy per round")
    return _save(fig, path)


def plot_similarity_heatmap(report: Mapping[str, Any], path: str | Path) -> Path:
    """Mean similarity s̄_i per layer (rows) and client (columns); personalized layers marked."""
    personalized = set(report.get("personalized_layers", []))
    # after stage 1 the personalized layers are no longer compared: grey rows
    layers = list(report["layers"]) + sorted(personalized - set(report["layers"]))
    width = len(next(iter(report["layers"].values()))["mean_similarity"])
    sims = np.array([report["layers"][name]["mean_similarity"] if name in report["layers"]
                     else [np.nan] * width for name in layers])
    height = min(max(3.0, 0.12 * len(layers)), 40.0)
    fig = Figure(figsize=(2.5 + 1.2 * sims.shape[1], height))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu"].copy()
    cmap = cmap.with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(sims), aspect="auto", cmap=cmap, vmin=-1, vmax=1,
                      interpolation="nearest")
    ax.set_xticks(range(sims.shape[1]),
                  [f"node …{str(n)[-4:]}" for n in report.get("node_ids", range(sims.shape[1]))],
                  rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)),
                  [("★ " if name in personalized else "") + name for name in layers],
                  fontsize=max(3, min(8, int(600 / max(len(layers), 1)))))
    for row, name in enumerate(layers):
        if name in personalized:
            ax.get_yticklabels()[row].set_color("crimson")
    fig.colorbar(image, ax=ax, label="mean cosine similarity of updates")
    ax.set_title(f"layer similarity, round {report.get('round')} "
                 "(★ personalized: kept on the sites, grey once no longer compared)", fontsize=9)
    return _save(fig, path)


#: Sites drawn one by one in the confusion plot; beyond this only the pooled matrix is drawn.
MAX_SITE_PANELS = 8


def plot_confusion(confusion: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Confusion matrices of a round: one row per model (global; personalized when it
    differs), the pooled held-out data of all sites first, then each site's.

    ``confusion`` is a ``metrics.jsonl`` row's ``confusion`` entry: ``classes`` and per
    model ``{"pooled": K×K counts, "sites": {name: K×K counts}}`` (rows: true class).
    Colour is the share of each true class (recall on the diagonal); cells print counts.
    """
    classes = list(confusion["classes"])
    groups = [g for g in ("global", "personalized") if confusion.get(g)]
    same = ""
    if "personalized" in groups and confusion["personalized"] == confusion.get("global"):
        groups.remove("personalized")  # the same matrices twice: draw them once
        same = "\n(the personalized models give the same matrices)"
    panels = []
    for group in groups:
        sites = confusion[group].get("sites", {})
        row = [(f"{group} model, pooled ({len(sites)} sites)", confusion[group]["pooled"])]
        if len(sites) <= MAX_SITE_PANELS:
            row += [(f"{group} model, {name}", m) for name, m in sorted(sites.items())]
        panels.append(row)
    if not panels:
        raise ValueError("no confusion matrix to plot")
    ncols = max(len(row) for row in panels)
    size = 1.2 + 0.38 * len(classes)
    fig = Figure(figsize=(size * ncols, size * len(panels)))
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    for r, row in enumerate(panels):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            name, counts = row[c]
            counts = np.asarray(counts, dtype=float)
            totals = counts.sum(axis=1, keepdims=True)
            share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            for i, j in np.ndindex(counts.shape):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                            fontsize=6, color="white" if share[i, j] > 0.5 else "black")
            ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set_title(f"{name}\n{int(counts.sum())} images, "
                         f"accuracy {np.trace(counts) / max(counts.sum(), 1):.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel("true class", fontsize=8)
            if r == len(panels) - 1:
                ax.set_xlabel("predicted class", fontsize=8)
    fig.suptitle((title or "confusion matrices (colour: share of the true class)") + same,
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_agreement(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Each site's agreement with the others per round (FedLSC's report), one line per
    site; the rule's threshold dotted, rounds where a site was flagged marked with ✕."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    reported = [r for r in rows if r.get("agreement")]
    sites = sorted({name for r in reported for name in r["agreement"]["sites"]})
    for j, name in enumerate(sites):
        color = matplotlib.colormaps["tab10"](j % 10)
        mine = [r for r in reported if name in r["agreement"]["sites"]]
        xs = [r["round"] for r in mine]
        ys = [r["agreement"]["sites"][name]["agreement"] for r in mine]
        ax.plot(xs, ys, marker="o", ms=3, color=color, label=name)
        hits = [(x, y) for x, y, r in zip(xs, ys, mine)
                if name in r["agreement"].get("flagged", [])]
        if hits:
            ax.plot(*zip(*hits), "x", ms=10, mew=2, color=color)
    limits = [(r["round"], r["agreement"]["threshold"]) for r in reported
              if r["agreement"].get("threshold") is not None]
    if limits:
        ax.plot(*zip(*limits), ":", color="grey", label="threshold")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("agreement (mean similarity to the others)")
    ax.grid(alpha=0.3)
    if sites:
        ax.legend(fontsize=8)
    ax.set_title(title or "site agreement per round (✕ flagged)")
    return _save(fig, path)


class PlotWriter:
    """Draws a run's plots: at once, or (``background=True``) in one low-priority thread
    off the round's critical path, where the ServerApp would otherwise wait 2-3 s a round
    for them (measured on the loopback deployment, README "Deployment round cost").

    A plot waiting to be drawn is replaced by a newer one of the same file, so a slow
    machine draws the latest state instead of a backlog. The thread runs at the lowest
    CPU priority (Linux nice 19) so that it takes what training leaves. :meth:`close`
    draws what is still waiting; a failed plot is logged, never fatal. Data handed to
    :meth:`submit` must not change afterwards (pass copies).
    """

    def __init__(self, background: bool = False) -> None:
        self.background = background
        self._pending: dict[Path, Callable[[], Any]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name="fedlsc-plots",
                                            daemon=True)
            self._thread.start()

    def submit(self, path: str | Path, draw: Callable[..., Any], *args: Any,
               **kwargs: Any) -> None:
        """Draw ``draw(*args, path, **kwargs)``: now, or soon in the background."""
        job = lambda: draw(*args, path, **kwargs)  # noqa: E731
        if not self.background:
            self._run(Path(path), job)
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("PlotWriter is closed")
            self._pending.pop(Path(path), None)  # the newer one goes to the end
            self._pending[Path(path)] = job
            self._cond.notify()

    def close(self) -> None:
        """Draw every plot still waiting, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def _run(path: Path, job: Callable[[], Any]) -> None:
        try:
            job()
        except Exception as err:  # noqa: BLE001 - a plot never stops a run
            from flwr.common.logger import log

            log(WARNING, "Could not draw %s: %s: %s", path, type(err).__name__, err)

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass  # not Linux: the thread keeps the process's priority
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                path = next(iter(self._pending))
                job = self._pending.pop(path)
            self._run(path, job)
