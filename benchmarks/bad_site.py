"""One bad hospital among honest ones: what it does to the global model under FedAvg,
FedLSC and Flower's robust strategies, and whether FedLSC's agreement report names it.

Every (sites, kind of bad site, method, seed) is a real ``flwr run`` simulation on the
HAM10000 images (Dirichlet β = 0.5 over lesions, lesion-grouped held-out sets), in its own
folder ``OUT/sites<N>/<kind>/<method>/seed<k>/``. Site 1 is the bad one (``attack.site=1``);
``none`` is the same federation without it. The score is the balanced accuracy of the
final global model on the pooled held-out images of the *honest* sites only, computed
after the run from ``global_model.pt`` with each site's own held-out loader
(``honest_eval.json``; the same evaluation over all sites is checked against the run's
own pooled score). Whether FedLSC's report named the bad site, and from which round, is
read from the run's ``summary.json``; norm-filter drops from ``metrics.jsonl``.

A finished run is skipped (the sweep resumes where it stopped); one that crashed is moved
aside and redone, at most ``--attempts`` times. Runs use the in-process transport by
default (``fedlsc_tools.inprocess``: the real ServerApp and ClientApp in one process, no
Ray, no SuperLink, no port). With ``--transport flwr`` they are ``flwr run`` simulations,
and only one of those may use the local SuperLink port (127.0.0.1:39091) on a machine:
before each run the driver then waits, polling every 30 s, while another FLWR_HOME's
SuperLink holds it, and stops its own SuperLink after each run so others get their turn.

    python benchmarks/bad_site.py --out /tmp/fedlsc-bad-site               # the sweep
    python benchmarks/bad_site.py --out /tmp/fedlsc-bad-site --table-only  # rebuild report
    python benchmarks/bad_site.py --out /tmp/fedlsc-bad-site --table-only \
        --publish benchmarks/reports/bad-site-2026-11-27   # report + plots into the repo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_table as pt  # noqa: E402  (the paper-table driver's helpers, reused)

BAD_SITE = 1
KINDS: dict[str, list[str]] = {
    "none": ["attack=none"],
    # half of the bad site's training labels shuffled among its images
    "label-noise": ["attack=label-noise", "attack.fraction=0.5"],
    "label-permutation": ["attack=label-permutation"],
    # w_g − 10·(w_i − w_g): below the default norm filter (25 × median), on purpose
    "poison": ["attack=poison", "attack.scale=10"],
    # w_g − 50·(w_i − w_g): above it
    "poison-50": ["attack=poison", "attack.scale=50"],
}
METHODS: dict[str, list[str]] = {
    "fedavg": ["strategy=fedavg"],
    "fedlsc": ["strategy=fedlsc"],  # conf default: norm filter at 25 × median
    # the option beyond the paper: sites below the agreement threshold left out of a round
    "fedlsc-exclude": ["strategy=fedlsc", "strategy.disagreeing_weight=0"],
    "fedlsc-nofilter": ["strategy=fedlsc", "strategy.max_update_norm_ratio=0"],
    "fedmedian": ["strategy=fedmedian"],
    "fedtrimmedavg": ["strategy=fedtrimmedavg", "strategy.trim_beta=0.2"],
    "krum": ["strategy=krum", "strategy.num_malicious_nodes=1"],
    "multikrum": ["strategy=multikrum", "strategy.num_malicious_nodes=1"],
}
REPORTING = ("fedlsc", "fedlsc-exclude", "fedlsc-nofilter")  # methods with the agreement report
PORT = ("127.0.0.1", 39091)  # fedlsc_tools.processes.LOCAL_SUPERLINK


@dataclass(frozen=True)
class Job:
    sites: int
    kind: str
    method: str
    seed: int
    preset: str = "recipe-lite"

    def folder(self, out: Path) -> Path:
        return out / f"sites{self.sites}" / self.kind / self.method / f"seed{self.seed}"

    def overrides(self, extra: Sequence[str] = ()) -> list[str]:
        n = self.sites
        return [*pt.PRESETS[self.preset], "partition=dirichlet", f"partition.num_partitions={n}",
                f"min_available_nodes={n}", f"min_train_nodes={n}", *METHODS[self.method],
                *KINDS[self.kind], f"attack.site={BAD_SITE}", f"seed={self.seed}", *extra]


# The sweep, cut to about two hours of a shared 2-core CPU: (sites, kinds, methods).
# Left out, and why: Krum (MultiKrum with N − f covers it; at 3 sites Krum keeps one site's
# model), Bulyan (needs N >= 4f + 3 = 7 sites), FedTrimmedAvg at 3 sites (it cuts
# int(β·3) sites: none for β < 1/3, else it is the median), label noise and label
# permutation at 5 sites, FedLSC without the norm filter (with poison scale 10 the filter
# never fires, so both are the same run: the report shows 0 drops). --extended adds them.
# Blocks run in this order, each seed-major: a sweep stopped early holds whole blocks.
SWEEP: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
    (3, ("none", "poison"), ("fedavg", "fedlsc", "fedlsc-exclude", "fedmedian")),
    (3, ("label-permutation",), ("fedavg", "fedlsc", "fedlsc-exclude", "fedmedian")),
    (3, ("none", "poison", "label-permutation"), ("multikrum",)),
    (5, ("none", "poison"), ("fedavg", "fedlsc", "fedlsc-exclude", "fedtrimmedavg")),
]
EXTENDED: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
    (3, ("label-noise",), ("fedavg", "fedlsc", "fedlsc-exclude")),
    (3, ("poison-50",), ("fedavg", "fedlsc", "fedlsc-nofilter", "fedlsc-exclude")),
    (3, ("none", "poison"), ("krum",)),
    (5, ("label-permutation",), ("fedavg", "fedlsc", "fedlsc-exclude", "fedtrimmedavg")),
]


def plan(seeds: Sequence[int], sweep: Sequence[tuple[int, Sequence[str], Sequence[str]]]
         = SWEEP, preset: str = "recipe-lite") -> list[Job]:
    """Seed-major within each block, so a sweep stopped early holds whole seeds."""
    return [Job(n, kind, method, seed, preset) for n, kinds, methods in sweep for seed in seeds
            for kind in kinds for method in methods]


# ---------------------------------------------------------------------- running
def port_owner(address: tuple[str, int] = PORT) -> str | None:
    """What listens on ``address`` (Flower's local SuperLink port): see
    :func:`fedlsc_tools.processes.local_superlink_owner`."""
    from fedlsc_tools.processes import local_superlink_owner

    return local_superlink_owner(address)


def wait_for_port(home: Path, poll_s: float = 30.0) -> None:
    """Return when the port is free or held by this sweep's own SuperLink."""
    waited = 0.0
    while (owner := port_owner()) is not None and str(home) not in owner:
        if waited % 300 == 0:
            print(f"waiting for {PORT[0]}:{PORT[1]} (held by: {owner[:160]})", flush=True)
        time.sleep(poll_s)
        waited += poll_s


def finished(results: Path) -> bool:
    """The run completed and was scored: summary with held-out metrics, and the honest-site
    evaluation. Failed sites do not make it unusable here: a bad site dropped by a filter,
    or sites broken by a poisoned global model, are outcomes, reported in the table."""
    return _completed(results) and (results.parent / "honest_eval.json").is_file()


def honest_eval(job: Job, folder: Path) -> dict[str, Any]:
    """The final global model on each site's own held-out loader: honest sites pooled, and
    all sites pooled (checked against the run's own score)."""
    import torch
    from flwr.common.config import flatten_dict

    from client_app.site import Site
    from client_app.training import confusion_matrix
    from fedlsc_common.classes import CLASSES
    from fedlsc_common.storage import atomic_write_json, load_model
    from fedlsc_flwr.metrics import classification_metrics

    run_config = flatten_dict(tomllib.loads((folder / "run_config.toml").read_text()))
    run_config["site-output-dir"] = str(folder / "eval-sites")
    model, _ = load_model(folder / "results" / "global_model.pt")
    torch.set_num_threads(1)
    per_site = {}
    for pid in range(job.sites):
        site = Site.for_run(run_config, {"partition-id": pid, "num-partitions": job.sites}, 0)
        matrix, _ = confusion_matrix(model, site.loader("test"), torch.device("cpu"),
                                     len(CLASSES))
        per_site[pid] = matrix
    # the same images for every kind: site 1's held-out set is left out in "none" too
    honest = sum(m for pid, m in per_site.items() if pid != BAD_SITE)
    everyone = sum(per_site.values())
    summary = json.loads((folder / "results" / "summary.json").read_text())
    result = {
        "honest_sites": [pid for pid in per_site if pid != BAD_SITE],
        "honest": classification_metrics(honest, CLASSES),
        "all": classification_metrics(everyone, CLASSES),
        "run_all_balanced_accuracy": summary["final"]["global"].get("balanced-accuracy"),
        "per_site_confusion": {str(pid): m.tolist() for pid, m in per_site.items()},
    }
    atomic_write_json(folder / "honest_eval.json", result)
    return result


def _completed(results: Path) -> bool:
    """The run wrote its final model and a summary with held-out metrics."""
    try:
        summary = json.loads((results / "summary.json").read_text())
        return "accuracy" in summary["final"]["global"] and \
            (results / "global_model.pt").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _score(job: Job, folder: Path, label: str) -> bool:
    """The honest-site evaluation of a completed run; a failure is printed, not raised,
    so that one bad run does not stop an unattended sweep."""
    try:
        honest = honest_eval(job, folder)["honest"]["balanced-accuracy"]
    except Exception as err:  # noqa: BLE001 (reported, and the run is tried again later)
        print(f"{label} scoring FAILED: {type(err).__name__}: {err}", flush=True)
        return False
    print(f"{label} honest-site balanced accuracy {honest:.3f}", flush=True)
    return True


def run_sweep(out: Path, jobs: Sequence[Job], extra: Sequence[str], attempts: int,
              transport: str = "inprocess") -> None:
    from fedlsc_common.settings import compose
    from fedlsc_tools.experiment import run_job

    home = Path(os.environ["FLWR_HOME"])
    for i, job in enumerate(jobs, start=1):
        folder = job.folder(out)
        label = f"[{i}/{len(jobs)}] {job.sites} sites, {job.kind}, {job.method}, seed {job.seed}"
        results = folder / "results"
        if finished(results):
            continue
        if _completed(results):  # the run finished; only its scoring is missing
            _score(job, folder, label)
            continue
        tries = len(list(folder.glob("results.incomplete-*")))
        if tries >= attempts:
            print(f"{label}: failed {tries} times, not tried again (see {folder})", flush=True)
            continue
        if results.exists():
            results.rename(folder / f"results.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.mkdir(parents=True, exist_ok=True)
        if transport == "flwr":
            wait_for_port(home)
        start = time.monotonic()
        code = run_job(compose(job.overrides(extra)), folder, transport=transport)
        if transport == "flwr":
            pt.stop_local_superlink(home)  # free the port for the other engineers' runs
        seconds = time.monotonic() - start
        ok = code == 0 and _completed(results)
        if ok:
            ok = _score(job, folder, f"{label}: ok in {seconds:.0f} s,")
        else:
            print(f"{label}: FAILED in {seconds:.0f} s (exit {code}; see "
                  f"{folder / 'flower.log'})", flush=True)
        with open(out / "runs.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"sites": job.sites, "kind": job.kind, "method": job.method,
                                "seed": job.seed, "exit": code, "ok": ok,
                                "transport": transport,
                                "seconds": round(seconds, 1),
                                "end": time.strftime("%FT%TZ", time.gmtime())}) + "\n")
        deadline = time.monotonic() + 30  # let our SuperLink go before the next run
        while transport == "flwr" and (owner := port_owner()) is not None \
                and str(home) in owner and time.monotonic() < deadline:
            time.sleep(1)


# ----------------------------------------------------------------------- reading back
def load_results(out: Path) -> dict[tuple[int, str, str], dict[int, dict[str, Any]]]:
    """{(sites, kind, method): {seed: {"summary", "rows", "honest"}}} of finished runs."""
    found: dict[tuple[int, str, str], dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob("sites*/*/*/seed*/honest_eval.json")):
        folder = path.parent
        if not finished(folder / "results"):
            continue
        seed = int(folder.name.removeprefix("seed"))
        method, kind = folder.parent.name, folder.parent.parent.name
        sites = int(folder.parent.parent.parent.name.removeprefix("sites"))
        rows = pt_rows(folder / "results" / "metrics.jsonl")
        found.setdefault((sites, kind, method), {})[seed] = {
            "summary": json.loads((folder / "results" / "summary.json").read_text()),
            "rows": rows, "honest": json.loads(path.read_text())}
    return found


def pt_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(run: Mapping[str, Any]) -> float:
    return float(run["honest"]["honest"]["balanced-accuracy"])


def detection(run: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """What the run's own files say about the bad site: first round the agreement report
    named it, other sites it named (false alarms), rounds the norm filter dropped it,
    and site-rounds that failed for any other reason."""
    bad = f"site-{BAD_SITE}"
    flagged = run["summary"].get("flagged_sites") or {}
    dropped, failed = 0, 0
    for row in run["rows"]:
        for failure in row.get("failures", {}).get("train", []):
            if "update norm" in failure.get("reason", ""):
                dropped += failure.get("site") == bad
            else:
                failed += 1
        failed += len(row.get("failures", {}).get("evaluate", []))
    return {"named_round": flagged.get(bad) if kind != "none" else None,
            "false_alarms": sorted(s for s in flagged if kind == "none" or s != bad),
            "filter_drops": dropped, "other_failures": failed}


def paired(a: Sequence[float], b: Sequence[float]) -> str:
    """mean of a − b in points, with the paired t 95 % CI (scipy)."""
    from scipy import stats

    diff = 100 * (np.asarray(a) - np.asarray(b))
    if len(diff) < 2:
        return f"{diff.mean():+.1f} (n = {len(diff)})"
    if np.allclose(diff, diff[0]):
        return f"{diff.mean():+.1f} (the same in every seed)"
    ci = stats.ttest_rel(100 * np.asarray(a), 100 * np.asarray(b)).confidence_interval(0.95)
    return f"{diff.mean():+.1f} [{ci.low:+.1f}, {ci.high:+.1f}]"


def _methods(found: Mapping, sites: int) -> list[str]:
    present = {m for n, _, m in found if n == sites}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def _kinds(found: Mapping, sites: int) -> list[str]:
    present = {k for n, k, _ in found if n == sites}
    return [k for k in KINDS if k in present]


def accuracy_table(found: Mapping, sites: int) -> list[str]:
    kinds = _kinds(found, sites)
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for method in _methods(found, sites):
        cells = []
        for kind in kinds:
            runs = found.get((sites, kind, method), {})
            cells.append(pt.mean_std([score(r) for r in runs.values()]) +
                         (f" (n={len(runs)})" if runs and len(runs) < 3 else "")
                         if runs else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def damage_table(found: Mapping, sites: int) -> list[str]:
    """Paired over seeds: (with the bad site) − (without it), per method and kind."""
    kinds = [k for k in _kinds(found, sites) if k != "none"]
    lines = ["| method | " + " | ".join(f"{k} − none" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for method in _methods(found, sites):
        base = found.get((sites, "none", method), {})
        cells = []
        for kind in kinds:
            runs = found.get((sites, kind, method), {})
            seeds = sorted(set(runs) & set(base))
            cells.append(paired([score(runs[s]) for s in seeds],
                                [score(base[s]) for s in seeds]) if seeds else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def versus_table(found: Mapping, sites: int, reference: str = "fedavg") -> list[str]:
    """Paired over seeds: method − ``reference`` under each kind."""
    kinds = _kinds(found, sites)
    lines = [f"| method − {reference} | " + " | ".join(kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for method in _methods(found, sites):
        if method == reference:
            continue
        cells = []
        for kind in kinds:
            runs, ref = found.get((sites, kind, method), {}), found.get((sites, kind, reference),
                                                                        {})
            seeds = sorted(set(runs) & set(ref))
            cells.append(paired([score(runs[s]) for s in seeds],
                                [score(ref[s]) for s in seeds]) if seeds else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def detection_table(found: Mapping, sites: int) -> list[str]:
    lines = ["| method | bad site | runs | report named it | first round named (per seed) "
             "| other sites named | norm filter dropped it (site-rounds) | other failed "
             "site-rounds |", "|---|---|---|---|---|---|---|---|"]
    for method in _methods(found, sites):
        for kind in _kinds(found, sites):
            runs = found.get((sites, kind, method), {})
            if not runs:
                continue
            found_ = {seed: detection(r, kind) for seed, r in sorted(runs.items())}
            named = [d["named_round"] for d in found_.values()]
            reports = method in REPORTING
            cells = [
                method, kind, str(len(runs)),
                (f"{sum(r is not None for r in named)}/{len(runs)}" if kind != "none"
                 else "–") if reports else "no report",
                ", ".join("–" if r is None else str(r) for r in named)
                if reports and kind != "none" else "–",
                (", ".join(sorted({s for d in found_.values() for s in d["false_alarms"]}))
                 or "none") if reports else "–",
                str(sum(d["filter_drops"] for d in found_.values())),
                str(sum(d["other_failures"] for d in found_.values())),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def agreement_lines(found: Mapping, sites: int) -> list[str]:
    """Mean agreement of site 1 (the bad one, or honest in `none`) and of the other sites,
    and how often each was below the threshold, per kind (FedLSC runs)."""
    bad = f"site-{BAD_SITE}"
    lines = [f"| kind | FedLSC rounds | {bad}: mean agreement | {bad}: rounds below | "
             "other sites: mean (min–max) | other sites: site-rounds below | mean threshold |",
             "|---|---|---|---|---|---|---|"]
    for kind in _kinds(found, sites):
        mine, others, limits, rounds = [], [], [], 0
        below_mine = below_others = 0
        for run in found.get((sites, kind, "fedlsc"), {}).values():
            for row in run["rows"]:
                report = row.get("agreement")
                if not report:
                    continue
                rounds += 1
                if report.get("threshold") is not None:
                    limits.append(report["threshold"])
                for name, site in report["sites"].items():
                    if name == bad:
                        mine.append(site["agreement"])
                        below_mine += bool(site.get("below"))
                    else:
                        others.append(site["agreement"])
                        below_others += bool(site.get("below"))
        if not rounds:
            continue
        lines.append(
            f"| {kind} | {rounds} | {np.mean(mine):.3f} | {below_mine}/{len(mine)} | "
            f"{np.mean(others):.3f} ({min(others):.3f}–{max(others):.3f}) | "
            f"{below_others}/{len(others)} | "
            f"{np.mean(limits) if limits else float('nan'):.3f} |")
    return lines


def plot_accuracy(found: Mapping, sites: int, path: Path) -> Path | None:
    """Honest-site balanced accuracy per kind (groups) and method (bars), mean ± std."""
    methods, kinds = _methods(found, sites), _kinds(found, sites)
    if not methods:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(kinds) * len(methods) / 3, 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        means, stds = [], []
        for kind in kinds:
            values = [100 * score(r) for r in found.get((sites, kind, method), {}).values()]
            means.append(np.mean(values) if values else np.nan)
            stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        ax.bar(np.arange(len(kinds)) + j * width - 0.4 + width / 2, means, width, yerr=stds,
               capsize=2, color=plt.cm.tab10(j), label=method)
    ax.axhline(100 / 7, color="grey", ls=":", lw=1, label="chance (1/7)")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("global balanced accuracy (%), honest sites' held-out")
    ax.set_title(f"{sites} sites (Dirichlet β = 0.5), site {BAD_SITE} bad: mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    import io

    from fedlsc_common.storage import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def build_report(out: Path, command: str) -> str:
    found = load_results(out)
    timing = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
              ] if (out / "runs.jsonl").is_file() else []
    planned = plan([0, 1, 2])  # the planned sweep (not --extended)
    lines = [f"# One bad hospital — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Command: `{command}`", "", f"Results folder: `{out}`", "",
             f"Finished runs: {sum(len(v) for v in found.values())} of {len(planned)} planned."]
    if timing:
        ok = [t["seconds"] for t in timing if t["ok"]]
        lines[-1] += (f" Runs logged: {len(timing)} ({len(ok)} ok), "
                      f"{sum(t['seconds'] for t in timing) / 60:.0f} min in all, median "
                      f"{np.median(ok) if ok else 0:.0f} s per run.")
    lines += ["", "Score: balanced accuracy (%) of the final global model on the pooled "
              "lesion-grouped held-out images of the honest sites (every site but site "
              f"{BAD_SITE}, the bad one; left out for `none` too, so every kind is scored on "
              "the same images); mean ± sample std over seeds. Paired "
              "differences: mean over seeds [95 % CI of scipy.stats.ttest_rel]; a seed fixes "
              "the partition, the split and the initial model for every method and kind.", ""]
    for sites in sorted({n for n, _, _ in found}):
        lines += [f"## {sites} sites", "", *accuracy_table(found, sites), "",
                  "Damage done by the bad site (points, paired by seed):", "",
                  *damage_table(found, sites), "",
                  "Each method against FedAvg under the same bad site (points, paired):", "",
                  *versus_table(found, sites), "",
                  "What the coordinator saw:", "", *detection_table(found, sites), "",
                  "FedLSC's agreement numbers (all rounds and seeds):", "",
                  *agreement_lines(found, sites), ""]
        png = plot_accuracy(found, sites, out / f"bad_site_{sites}sites.png")
        if png:
            lines += [f"![honest-site balanced accuracy, {sites} sites]({png.name})", ""]
    missing = [job for job in plan([0, 1, 2], SWEEP + EXTENDED)
               if job.folder(out).is_dir() and not finished(job.folder(out) / "results")]
    if missing:
        lines += ["Runs started but never completed (each tried again up to --attempts "
                  "times; see their flower.log):", ""]
        lines += [f"- {j.sites} sites, {j.kind}, {j.method}, seed {j.seed}: "
                  f"{len(list(j.folder(out).glob('results*')))} attempt(s)" for j in missing]
        lines.append("")
    checks = [abs(r["honest"]["all"]["balanced-accuracy"] -
                  r["honest"]["run_all_balanced_accuracy"])
              for runs in found.values() for r in runs.values()
              if r["honest"].get("run_all_balanced_accuracy") is not None]
    if checks:
        lines += [f"Check: the after-run evaluation over all sites matches the run's own pooled "
                  f"balanced accuracy to within {max(checks):.2g} in all {len(checks)} runs.", ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedlsc-bad-site"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", default=[], metavar="SITES:KIND:METHOD",
                        help="run only these cells, e.g. 3:poison:fedlsc (any part may be *)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every run")
    parser.add_argument("--preset", choices=sorted(pt.PRESETS), default="recipe-lite",
                        help="the paper-table driver's preset every run starts from (one "
                             "preset per OUT folder)")
    parser.add_argument("--extended", action="store_true",
                        help="after the planned sweep, the cells it leaves out (EXTENDED)")
    parser.add_argument("--attempts", type=int, default=2,
                        help="how many times a crashed run is tried")
    parser.add_argument("--transport", choices=("inprocess", "flwr"), default="inprocess",
                        help="inprocess: ServerApp and ClientApp in one process per run (no "
                             "Ray, no SuperLink port); flwr: `flwr run` simulations")
    parser.add_argument("--table-only", action="store_true",
                        help="only rebuild report.md and the plots from the result files")
    parser.add_argument("--publish", type=Path, default=None, metavar="PREFIX",
                        help="also write the report to PREFIX.md and its plots to "
                             "PREFIX_<plot>.png (e.g. benchmarks/reports/bad-site-DATE)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bad_site.py " + " ".join(sys.argv[1:] if argv is None
                                                          else argv)
    if not args.table_only:
        home = (out / "flwr-home").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["FLWR_HOME"] = str(home)  # our own local SuperLink, not anyone else's
        from fedlsc_common.settings import resolve_data_dir

        # one data folder for every run, found (or refused) here rather than by each site
        data = f"dataset.data_dir={resolve_data_dir('')}"
        args.set = [data, *args.set] if not any("data_dir" in s for s in args.set) else args.set
        blocks = SWEEP + (EXTENDED if args.extended else [])
        jobs = [j for j in plan(args.seeds, blocks, args.preset) if _selected(j, args.only)]
        print(f"{len(jobs)} runs, out {out}, FLWR_HOME {home}", flush=True)
        try:
            run_sweep(out, jobs, args.set, args.attempts, args.transport)
        finally:
            pt.stop_local_superlink(home)
    from fedlsc_common.storage import atomic_write_text

    report = build_report(out, command)
    atomic_write_text(out / "report.md", report)
    print(report)
    print(f"written to {out / 'report.md'}")
    if args.publish:
        publish(out, report, args.publish)
    return 0


def publish(out: Path, report: str, prefix: Path) -> None:
    """The report as PREFIX.md, its plots beside it as PREFIX_<name>.png (links rewritten)."""
    from fedlsc_tools.reports import publish_report

    publish_report(report, out.glob("bad_site_*.png"), prefix)


def _selected(job: Job, only: Sequence[str]) -> bool:
    if not only:
        return True
    for pattern in only:
        parts = (pattern.split(":") + ["*", "*", "*"])[:3]
        if all(p in ("*", str(v)) for p, v in zip(parts, (job.sites, job.kind, job.method))):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
