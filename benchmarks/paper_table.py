"""The paper's table on real HAM10000: every method x split x seed as a real simulation,
then one markdown table (mean ± std over seeds, paired FedLSC − FedAvg 95 % CI),
rounds to reach target accuracies, bytes per round, and accuracy-per-round plots.

Runs go one after another (``flwr run`` in simulation, via ``fedlsc_tools.experiment.run_job``),
each in its own folder ``OUT/<split>/<method>/seed<k>/`` (``results/``, ``flower.log``,
``run_config.toml``). A run whose ``results/summary.json`` exists is skipped, so a stopped
sweep resumes where it was. Order is seed-major: a partial sweep still holds complete
paired comparisons for the seeds it finished. Everything in the table and the plots is read
back from those result files.

    python benchmarks/paper_table.py --preset cpu --out /tmp/fedlsc-paper-table
    python benchmarks/paper_table.py --preset paper --out /data/paper-table      # GPU
    python benchmarks/paper_table.py --out /tmp/fedlsc-paper-table --table-only  # rebuild

Presets (Hydra overrides of ``conf/``, the one source of truth):
  recipe — the main job's recipe, conf/'s defaults: EfficientNet-Lite0-SA (ImageNet), 96 px,
          10 rounds of 40 batches per site, cosine lr decay; recipe-4x1: the same network,
          4 rounds of whole local epochs, constant lr (the earlier main job); recipe-lite:
          the same network at 64 px, 3 rounds of <= 30 batches (all 8 methods x 2 splits x
          5 seeds fit one session on a 2-core CPU: benchmarks/reports/cpu-2026-11-28-*).
  --publish PREFIX [--preface FILE] also writes the report, plots and per-run scores into
          the repository (PREFIX.md, PREFIX_<plot>.png, PREFIX_runs.jsonl).
  cpu   — 32 px images, 10 batches of 32 per local epoch, 4 rounds: sized for a 2-core CPU.
  paper — ``+experiment=paper``: Res2Net50-SA, 224 px, whole local epochs, 50 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("local-only", "fedavg", "fedprox", "fedavg-fc", "fedprox-fc", "fedlsc-per0", "fedlsc",
           "fedlsc-fp16")
#: Methods that are a strategy plus settings; every other method is ``strategy=<method>``.
VARIANTS: dict[str, list[str]] = {
    # FedLSC with sites sending w_i − w_g in float16: half the upload; is it as accurate?
    "fedlsc-fp16": ["strategy=fedlsc", "strategy.update_dtype=float16"],
}
#: Paired comparisons in the report: (a, b) reads "a − b".
PAIRS = (("fedlsc", "fedavg"), ("fedlsc-fp16", "fedlsc"))
SPLITS = ("dirichlet", "site")
PRESETS: dict[str, list[str]] = {
    # What the CPU preset cuts from the paper: 32 px instead of 224, ResNet-10t-SA instead of
    # Res2Net50-SA (model=small, untrained), 10 batches (320 images) per local epoch instead
    # of the whole local set, 4 rounds instead of 50, Adam lr 1e-3 and class-weighted loss
    # (pinned here: the tables in benchmarks/reports were made with them). Measured: ~6 min
    # for one 5-round, 20-batch run on a loaded 2-core machine, most of it fixed start-up
    # and evaluation cost.
    "cpu": ["model=small", "dataset.image_size=32", "training.max_batches_per_epoch=10",
            "training.lr=0.001", "training.class_weighted_loss=true",
            "training.balanced_sampling=false",
            "num_server_rounds=4", "target_accuracies='0.6,0.65,0.7'",
            "calibration.enabled=false", "evaluate_every=1"],
    "paper": ["+experiment=paper"],
    # The main job's recipe as conf/ holds it (EfficientNet-Lite0-SA from ImageNet, 128 px,
    # early layers fixed, 8 rounds x 40 batches per site, Adam 5e-4 decaying (cosine),
    # balanced batches, head calibration after the last round), evaluated every round for
    # the table's curves and rounds to reach the targets (the main job evaluates every 4th).
    "recipe": ["evaluate_every=1"],
    # The main job's earlier recipe, 4 rounds x 1 whole local epoch: the GPU table of
    # benchmarks/reports/gpu-h100-2026-11-27-recipe.md was made with it.
    # Pinned as it ran: 96 px, constant lr, each site its own number of steps, every layer
    # training, no head calibration.
    "recipe-4x1": ["dataset.image_size=96", "num_server_rounds=4",
                   "training.max_batches_per_epoch=0",
                   "training.lr_decay=none", "training.equal_local_steps=false",
                   "training.frozen_layers=''", "calibration.enabled=false",
                   "evaluate_every=1"],
    # The recipe cut for sweeps of many runs on a 2-core CPU (the bad-site benchmark): the
    # same pretrained network and optimiser at 64 px, 30 batches of 32 per local epoch,
    # 3 rounds.
    # 3 rounds, constant lr, each site its own number of steps, every layer training, no
    # head calibration (as the bad-site report and the CPU paper table ran).
    "recipe-lite": ["dataset.image_size=64", "training.max_batches_per_epoch=30",
                    "num_server_rounds=3", "training.lr_decay=none",
                    "training.equal_local_steps=false", "training.frozen_layers=''",
                    "calibration.enabled=false", "evaluate_every=1"],
}
SPLIT_OVERRIDES: dict[str, list[str]] = {
    "dirichlet": ["partition=dirichlet"],
    # The 4 real hospitals: every one of them must take part in every round.
    "site": ["partition=site", "min_available_nodes=4", "min_train_nodes=4"],
}
GLOBAL_METRICS = ("accuracy", "balanced-accuracy", "precision", "recall", "f1")
SITE_METRICS = ("site-mean-accuracy", "site-mean-balanced-accuracy", "site-mean-f1")


# --------------------------------------------------------------------- statistics
def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Paired t over matched pairs (``scipy.stats.ttest_rel``): mean of a − b, its
    ``level`` confidence interval and the two-sided p-value."""
    try:
        from scipy import stats
    except ImportError:
        raise ImportError("the paired confidence intervals need scipy: "
                          "pip install 'fedlsc-flwr[bench]'") from None

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(diff)
    if n < 2:
        raise ValueError("a paired confidence interval needs at least 2 pairs")
    mean = float(diff.mean())
    if float(diff.std(ddof=1)) == 0:  # no spread: scipy would answer nan
        return {"mean": mean, "low": mean, "high": mean, "p": 1.0 if mean == 0 else 0.0,
                "n": n}
    result = stats.ttest_rel(a, b)
    interval = result.confidence_interval(confidence_level=level)
    return {"mean": mean, "low": float(interval.low), "high": float(interval.high),
            "p": float(result.pvalue), "n": n}


def mean_std(values: Iterable[float | None], scale: float = 100.0) -> str:
    """``mean ± std`` (sample std) of the values that exist, times ``scale``; '–' if none."""
    kept = [v for v in values if v is not None]
    if not kept:
        return "–"
    spread = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return f"{scale * float(np.mean(kept)):.2f} ± {scale * spread:.2f}"


def rounds_cell(rounds: Sequence[int | None]) -> str:
    """Mean rounds to reach a target over the seeds that reached it, and how many did."""
    hit = [r for r in rounds if r is not None]
    if not hit:
        return f"– (0/{len(rounds)})"
    return f"{np.mean(hit):.1f} ({len(hit)}/{len(rounds)})"


# ------------------------------------------------------------------------ the runs
def run_dir(out: Path, split: str, method: str, seed: int) -> Path:
    return out / split / method / f"seed{seed}"


def plan(methods: Sequence[str], splits: Sequence[str], seeds: Sequence[int],
         first: Sequence[str] = ("fedavg", "fedlsc")) -> list[tuple[str, str, int]]:
    """(split, method, seed): the ``first`` methods for every seed, then the rest; each
    part seed-major, so a sweep stopped early still holds complete paired comparisons."""
    head = [m for m in methods if m in first]
    rest = [m for m in methods if m not in first]
    return [(split, method, seed) for part in (head, rest) for seed in seeds
            for split in splits for method in part]


def overrides_for(preset: str, split: str, method: str, seed: int,
                  extra: Sequence[str] = ()) -> list[str]:
    strategy = VARIANTS.get(method, [f"strategy={method}"])
    return [*PRESETS[preset], *SPLIT_OVERRIDES[split], *strategy, f"seed={seed}", *extra]


def global_scored(summary: Mapping[str, Any]) -> bool:
    """False for a method whose global model holds layers no round trained (FedAvg-FC's
    head, local-only): its global columns are not applicable."""
    return bool(summary.get("global_model", {}).get("scored", True))


NOT_APPLICABLE = "n/a"


def usable(results: Path) -> bool:
    """A run counts when its summary holds global held-out metrics and no site failed a
    round: a run whose sites failed still writes a summary, which must not be tabled."""
    path = results / "summary.json"
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
        scored_group = "global" if global_scored(summary) else "personalized"
        if "accuracy" not in summary["final"][scored_group]:
            return False
        rows = [json.loads(line) for line in
                (results / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(rows) and not any(found for row in rows
                                  for found in row.get("failures", {}).values())


def run_all(out: Path, runs: Sequence[tuple[str, str, int]], preset: str,
            extra: Sequence[str], transport: str = "flwr") -> None:
    from fedlsc_common.settings import compose
    from fedlsc_tools.experiment import run_job

    log = out / "runs.jsonl"
    for i, (split, method, seed) in enumerate(runs, start=1):
        job = run_dir(out, split, method, seed)
        if usable(job / "results"):
            print(f"[{i}/{len(runs)}] {split} {method} seed {seed}: done before, skipped",
                  flush=True)
            continue
        if (job / "results").exists():  # stopped midway or failed: keep it aside, start anew
            (job / "results").rename(job / f"results.incomplete-{time.strftime('%H%M%S')}")
        job.mkdir(parents=True, exist_ok=True)
        overrides = overrides_for(preset, split, method, seed, extra)
        start = time.monotonic()
        code = run_job(compose(overrides), job, transport=transport)
        seconds = time.monotonic() - start
        ok = code == 0 and usable(job / "results")
        status = "ok" if ok else f"FAILED (exit {code}, no held-out metrics; see " \
                                 f"{job / 'flower.log'})"
        print(f"[{i}/{len(runs)}] {split} {method} seed {seed}: {status} in {seconds:.0f} s",
              flush=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"split": split, "method": method, "seed": seed, "exit": code,
                                "ok": ok, "seconds": round(seconds, 1),
                                "overrides": overrides, "end": time.strftime("%FT%TZ",
                                                                             time.gmtime())})
                    + "\n")


def stop_local_superlink(flwr_home: Path) -> None:
    """SIGTERM the processes whose command line names this FLWR_HOME (the detached local
    SuperLink `flwr run` started for this sweep), and no other."""
    from fedlsc_tools.processes import stop_processes_naming

    stop_processes_naming(str(flwr_home), announce=True)


# ------------------------------------------------------------------- table + plots
def load_runs(out: Path) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """{(split, method): {seed: {"summary": ..., "rows": [...]}}} of the finished runs."""
    found: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob("*/*/seed*/results/summary.json")):
        results = path.parent
        if not usable(results):
            continue
        seed = int(results.parent.name.removeprefix("seed"))
        method, split = results.parent.parent.name, results.parent.parent.parent.name
        rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        found.setdefault((split, method), {})[seed] = {
            "summary": json.loads(path.read_text()), "rows": rows}
    return found


def runs_jsonl(found: Mapping[tuple[str, str], dict[int, dict[str, Any]]]) -> str:
    """One line per finished run: its final scores and the global model's per round."""
    lines = []
    for (split, method), runs in sorted(found.items()):
        for seed, run in sorted(runs.items()):
            summary = run["summary"]
            lines.append(json.dumps({
                "split": split, "method": method, "seed": seed,
                "rounds": summary.get("rounds"), "global-model-scored": global_scored(summary),
                "final": summary["final"],
                "global-balanced-accuracy-per-round": [
                    row.get("global", {}).get("balanced-accuracy") for row in run["rows"]],
                "global-accuracy-per-round": [
                    row.get("global", {}).get("accuracy") for row in run["rows"]],
            }, sort_keys=True))
    return "\n".join(lines) + "\n"


def _ordered(found: Mapping[tuple[str, str], Any], split: str) -> list[str]:
    present = {m for s, m in found if s == split}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def accuracy_table(found: Mapping[tuple[str, str], dict[int, dict]], split: str) -> list[str]:
    head = ["method", "seeds", *[f"global {m}" for m in GLOBAL_METRICS],
            *[f"personalized {m}" for m in SITE_METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in _ordered(found, split):
        runs = found[(split, method)]
        final = [r["summary"]["final"] for r in runs.values()]
        cells = [method, ",".join(map(str, sorted(runs)))]
        if all(global_scored(r["summary"]) for r in runs.values()):
            cells += [mean_std(f["global"].get(m) for f in final) for m in GLOBAL_METRICS]
        else:
            cells += [NOT_APPLICABLE] * len(GLOBAL_METRICS)
        cells += [mean_std(f["personalized"].get(m) for f in final) for m in SITE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_lines(found: Mapping[tuple[str, str], dict[int, dict]], split: str,
                 a: str = "fedlsc", b: str = "fedavg") -> list[str]:
    """``a`` − ``b`` per metric, paired by seed (same partition, same initial model)."""
    if (split, a) not in found or (split, b) not in found:
        return [f"(no paired comparison: {a} or {b} has no finished run)"]
    seeds = sorted(set(found[(split, a)]) & set(found[(split, b)]))
    if len(seeds) < 2:
        return [f"(no paired comparison: {len(seeds)} seed(s) with both {a} and {b})"]
    lines = [f"| {a} − {b} (points, seeds {','.join(map(str, seeds))}) | mean | 95 % CI | p |",
             "|---|---|---|---|"]
    scored = all(global_scored(found[(split, m)][s]["summary"]) for m in (a, b) for s in seeds)
    groups = (("global", GLOBAL_METRICS),) if scored else ()
    for group, metrics in (*groups, ("personalized", SITE_METRICS)):
        for metric in metrics:
            va = [found[(split, a)][s]["summary"]["final"][group].get(metric) for s in seeds]
            vb = [found[(split, b)][s]["summary"]["final"][group].get(metric) for s in seeds]
            if None in va or None in vb:
                continue
            ci = paired_ci(va, vb)
            lines.append(f"| {group} {metric} | {100 * ci['mean']:+.2f} | "
                         f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] | {ci['p']:.3f} |")
    return lines


def rounds_table(found: Mapping[tuple[str, str], dict[int, dict]], split: str) -> list[str]:
    targets = sorted({t for (s, _), runs in found.items() if s == split for r in runs.values()
                      for t in r["summary"]["rounds_to_reach_accuracy"]}, key=float)
    head = ["method", *[f"rounds to global acc ≥ {t}" for t in targets], "rounds run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in _ordered(found, split):
        runs = list(found[(split, method)].values())
        cells = [method]
        if all(global_scored(r["summary"]) for r in runs):
            cells += [rounds_cell([r["summary"]["rounds_to_reach_accuracy"].get(t)
                                   for r in runs]) for t in targets]
        else:
            cells += [NOT_APPLICABLE] * len(targets)
        cells.append(str(max(r["summary"]["rounds"] for r in runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bytes_table(found: Mapping[tuple[str, str], dict[int, dict]], split: str) -> list[str]:
    """Measured array bytes per round (mean over rounds and seeds), from summary.json."""
    head = ["method", "train sent MiB", "train received MiB", "train total MiB",
            "evaluate sent MiB", "round 1 train total MiB", "later rounds train total MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mb = 2 ** 20
    for method in _ordered(found, split):
        runs = list(found[(split, method)].values())

        def mean_of(key: str, runs: list[dict] = runs) -> float:
            return float(np.mean([r["summary"]["bytes_per_round"].get(key, 0) for r in runs]))

        def train_total(rows: list[dict]) -> float:
            return float(np.mean([r["bytes"].get("train-sent", 0)
                                  + r["bytes"].get("train-received", 0) for r in rows]))

        first = np.mean([train_total(r["rows"][:1]) for r in runs])
        later = [train_total(r["rows"][1:]) for r in runs if len(r["rows"]) > 1]
        sent, received = mean_of("train-sent"), mean_of("train-received")
        lines.append(f"| {method} | {sent / mb:.3f} | {received / mb:.3f} | "
                     f"{(sent + received) / mb:.3f} | {mean_of('evaluate-sent') / mb:.3f} | "
                     f"{first / mb:.3f} | "
                     f"{(np.mean(later) / mb if later else float('nan')):.3f} |")
    return lines


def paper_bytes_lines(num_clients: int = 3) -> list[str]:
    """Computed (not measured) train traffic per round for the paper's model: what an
    ArrayRecord of res2net50_sa weighs, whole and without the classifier."""
    from fedlsc_flwr.model import CLASSIFIER_LAYER, build_model
    from fedlsc_flwr.wire import array_from_numpy

    state = build_model("res2net50_sa", num_classes=7).state_dict()
    size = {k: len(array_from_numpy(v.numpy()).data) for k, v in state.items()}
    total = sum(size.values())
    head = sum(v for k, v in size.items() if k.startswith(CLASSIFIER_LAYER + "."))
    mb = 2 ** 20  # MiB, the unit of the paper's 543 "MB" and of Flower's ArrayRecord log line
    both = 2 * num_clients
    return [
        f"Computed (not measured) for the paper's model (res2net50_sa, {len(state)} tensors, "
        f"float32 .npy ArrayRecord = {total / mb:.1f} MiB = {total / 1e6:.1f} MB; classifier "
        f"{head / 1e3:.1f} kB), {num_clients} clients, train sent + received per round:",
        "",
        "| method | train MiB / round (computed) |", "|---|---|",
        f"| fedavg, fedprox, fedlsc-per0, and every method in round 1 | {both * total / mb:.1f} |",
        f"| fedavg-fc, fedprox-fc (classifier stays local) | {both * (total - head) / mb:.1f} |",
        f"| fedlsc (Per = 1 %: stage-1-chosen layers stay local) | ≤ {both * total / mb:.1f} "
        f"(less the chosen layers; the measured tables below show the small model's) |",
        "| local-only | round 1 downlink only, then 0 |",
        f"| float16 updates (strategy.update_dtype=float16, fedlsc family) | "
        f"{num_clients * total / mb + num_clients * total / 2 / mb:.1f} |",
    ]


def plot_split(found: Mapping[tuple[str, str], dict[int, dict]], split: str,
               path: Path) -> Path | None:
    """Global accuracy and balanced accuracy per round, mean over seeds (band: ± std),
    and personalized site-mean balanced accuracy; one line per method."""
    methods = _ordered(found, split)
    if not methods:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = (("global", "accuracy"), ("global", "balanced-accuracy"),
              ("personalized", "site-mean-balanced-accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2), sharex=True)
    for ax, (group, metric) in zip(axes, panels):
        for j, method in enumerate(methods):
            runs = list(found[(split, method)].values())
            if group == "global" and not all(global_scored(r["summary"]) for r in runs):
                continue  # its global model is no classifier (layers never trained)
            length = min(len(r["rows"]) for r in runs)
            rounds = [r["round"] for r in runs[0]["rows"][:length]]
            values = np.array([[row[group].get(metric, np.nan) for row in r["rows"][:length]]
                               for r in runs], dtype=float)
            mean = np.nanmean(values, axis=0)
            color = plt.cm.tab10(j)
            ax.plot(rounds, mean, marker="o", ms=3, color=color,
                    lw=2.2 if method == "fedlsc" else 1.2, label=f"{method} (n={len(runs)})")
            if len(runs) > 1:
                std = np.nanstd(values, axis=0, ddof=1)
                ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.12)
        if "balanced" in metric:
            ax.axhline(1 / 7, color="grey", ls=":", lw=1, label="chance (1/7)")
        ax.set_title(f"{group} {metric}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out score (lesion-grouped)")
    axes[0].legend(fontsize=7)
    axes[-1].legend(fontsize=7)  # the only panel with the methods whose global is not scored
    fig.suptitle(f"HAM10000, partition={split}: mean over seeds (band ± std)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def build_report(out: Path, command: str, note: str = "") -> str:
    found = load_runs(out)
    timing = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
              ] if (out / "runs.jsonl").is_file() else []
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# FedLSC paper table on HAM10000 — {stamp}",
             "", f"Command: `{command}`", "", f"Results folder: `{out}`", ""]
    if note:
        lines += [note, ""]
    if timing:
        ok = [t for t in timing if t["ok"]]
        lines += [f"Runs logged: {len(timing)} ({len(ok)} ok), wall time of the runs "
                  f"{sum(t['seconds'] for t in timing) / 60:.1f} min "
                  f"(median {np.median([t['seconds'] for t in ok]) if ok else 0:.0f} s per run).",
                  ""]
    lines += ["Scores in % on the pooled lesion-grouped held-out images of all sites "
              "(global model); personalized = mean over sites of each site's own model on "
              "its own held-out images. Mean ± sample std over seeds. Paired CI: Student t "
              "over seeds (a seed fixes partition, split and initial model for both methods).",
              ""]
    for split in SPLITS:
        if not any(s == split for s, _ in found):
            continue
        lines += [f"## partition={split}", "", *accuracy_table(found, split), "",
                  *[line for a, b in PAIRS for line in (*paired_lines(found, split, a, b), "")],
                  *rounds_table(found, split), "",
                  "Measured array bytes per round (mean over rounds and seeds):", "",
                  *bytes_table(found, split), ""]
        png = plot_split(found, split, out / f"accuracy_{split}.png")
        if png:
            lines += [f"![accuracy per round, {split}]({png.name})", ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path("/tmp") / f"fedlsc-paper-table-{time.strftime('%Y%m%d')}")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every run, e.g. num_server_rounds=3")
    parser.add_argument("--table-only", action="store_true",
                        help="only rebuild table.md and the plots from the result files")
    parser.add_argument("--paper-bytes", action="store_true",
                        help="add the computed bytes per round of the paper's model")
    parser.add_argument("--transport", choices=("flwr", "inprocess"), default="flwr",
                        help="flwr: `flwr run` simulations; inprocess: the same ServerApp and "
                             "ClientApp code in one process per run (no Ray, no SuperLink: "
                             "faster on a small machine)")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help="FLWR_HOME for this sweep (default OUT/flwr-home)")
    parser.add_argument("--publish", type=Path, default=None, metavar="PREFIX",
                        help="also write the report as PREFIX.md, its plots as "
                             "PREFIX_<plot>.png and every finished run's scores as "
                             "PREFIX_runs.jsonl, e.g. benchmarks/reports/cpu-2026-11-28")
    parser.add_argument("--preface", type=Path, default=None, metavar="FILE",
                        help="markdown put before the generated report when publishing "
                             "(what was run, on which machine, what was cut)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/paper_table.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if not args.table_only:
        home = (args.flwr_home or out / "flwr-home").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["FLWR_HOME"] = str(home)  # our own local SuperLink, not anyone else's
        runs = plan(args.methods, args.splits, args.seeds)
        print(f"{len(runs)} runs, preset {args.preset}, out {out}, FLWR_HOME {home}", flush=True)
        try:
            run_all(out, runs, args.preset, args.set, args.transport)
        finally:
            stop_local_superlink(home)
    note = "\n".join(paper_bytes_lines()) if args.paper_bytes else ""
    report = build_report(out, command, note)
    (out / "table.md").write_text(report)
    print(report)
    print(f"written to {out / 'table.md'}")
    if args.publish:
        from fedlsc_tools.reports import publish_report

        preface = args.preface.read_text() if args.preface else ""
        publish_report(preface + report, out.glob("accuracy_*.png"), args.publish,
                       {"_runs.jsonl": runs_jsonl(load_runs(out))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
