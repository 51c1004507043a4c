"""The GPU measurements of issue 12, for a short lease of a GPU machine (see run_on_gpu.sh).

    python benchmarks/device/gpu_runs.py preset --out DIR --seconds 200
        The paper preset (+experiment=paper: Res2Net50-SA, 224 px, Adam 1e-4, batch 32,
        3 Dirichlet sites) for as many rounds as fit in SECONDS, through the in-process
        transport (the real ServerApp and ClientApp, sites one after another on the one
        GPU). Prints per round: wall seconds, the slowest site's training seconds, each
        site's training images/s (from its own log line) and the global model's held-out
        accuracy and balanced accuracy.

    python benchmarks/device/gpu_runs.py table --out DIR --seconds 450 --parallel 10
        The paper table (benchmarks/paper_table.py --preset recipe-4x1) with one driver process
        per (split, seed), all at once on the one GPU; stopped at SECONDS, then the table is
        rebuilt from the runs that finished.

    python benchmarks/device/gpu_runs.py recipes --out DIR --seconds 480 --parallel 14 \
            --variants benchmarks/device/recipe_screen.json --seeds 0 1 2
        A screen of main-job recipes: each variant (a name and Hydra overrides on top of the
        main job's settings) for each seed, one in-process run per process, all at once on
        the one GPU; stopped at SECONDS. Writes recipes.md (final and best global balanced
        accuracy per variant and seed, mean over seeds) and recipes.jsonl (every round).

None needs a network: FEDLSC_DATA_DIR points at the carried images and ``--pretrained``
at a local backbone checkpoint when the weights package is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TRAINED = re.compile(r"(site-\d+) round (\d+): trained \d+ epoch\(s\), (\d+) images in "
                     r"([\d.]+) s \(([\d.]+) images/s\)")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the process group, then SIGKILL what is left after 20 s."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def run_preset(out: Path, seconds: float, overrides: list[str]) -> int:
    from fedlsc_common.settings import Settings, compose, run_config_toml, to_run_config

    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(["+experiment=paper", *overrides])
    cfg["results_dir"] = str(out / "results")
    settings = Settings.from_run_config(to_run_config(cfg))
    toml_file = out / "run_config.toml"
    toml_file.write_text(run_config_toml(settings.to_run_config()))
    log_file = out / "preset.log"
    command = [sys.executable, "-m", "fedlsc_tools.inprocess", str(toml_file),
               "--num-supernodes", str(settings.partition.num_partitions)]
    print("running", " ".join(command), f"for at most {seconds:.0f} s", flush=True)
    start = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            print(f"stopping the run after {seconds:.0f} s (time box)", flush=True)
            _stop(proc)
    print(f"wall {time.monotonic() - start:.1f} s, exit code {proc.returncode}")
    summary = summarise_preset(out / "results" / "metrics.jsonl", log_file)
    (out / "preset_summary.md").write_text(summary)
    print(summary)
    return 0


def summarise_preset(metrics_file: Path, log_file: Path) -> str:
    """Markdown table: one row per finished round."""
    speeds: dict[int, list[str]] = {}
    for line in log_file.read_text(errors="replace").splitlines():
        if m := TRAINED.search(line):
            site, rnd, images, secs, rate = m.groups()
            speeds.setdefault(int(rnd), []).append(
                f"{site} {float(rate):.0f} ({images} img, {secs} s)")
    lines = ["| round | round s | slowest site's training s | images/s per site | "
             "global acc | global bal. acc |", "|---|---|---|---|---|---|"]
    if metrics_file.is_file():
        for row in map(json.loads, metrics_file.read_text().splitlines()):
            g = row.get("global") or {}
            lines.append(
                f"| {row['round']} | {row.get('round-seconds', row.get('seconds', 0)):.1f} | "
                f"{row.get('train-seconds-max', float('nan')):.1f} | "
                f"{'; '.join(speeds.get(row['round'], []))} | "
                f"{g.get('accuracy', float('nan')):.4f} | "
                f"{g.get('balanced-accuracy', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def run_table(out: Path, seconds: float, parallel: int, seeds: list[int],
              splits: list[str], methods: list[str], overrides: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(split, seed) for seed in seeds for split in splits]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    running: list[tuple[subprocess.Popen, object]] = []
    deadline = time.monotonic() + seconds
    pending = list(jobs)
    while (pending or running) and time.monotonic() < deadline:
        while pending and len(running) < parallel:
            split, seed = pending.pop(0)
            log = open(out / f"driver-{split}-seed{seed}.log", "w")
            command = [sys.executable, str(ROOT / "benchmarks" / "paper_table.py"),
                       "--preset", "recipe-4x1", "--transport", "inprocess", "--out",
                       str(out / "table"), "--flwr-home", str(out / f"fh-{split}-{seed}"),
                       "--splits", split, "--seeds", str(seed), "--methods", *methods]
            if overrides:
                command += ["--set", *overrides]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=ROOT, env=env, start_new_session=True), log))
        time.sleep(5)
        finished = sum(1 for _ in (out / "table").glob("*/*/seed*/results/summary.json"))
        print(f"{time.strftime('%H:%M:%S')} runs finished: {finished}", flush=True)
        running = [(p, log) for p, log in running if p.poll() is None]
    for proc, _ in running:
        _stop(proc)
    subprocess.call([sys.executable, str(ROOT / "benchmarks" / "paper_table.py"), "--out",
                     str(out / "table"), "--table-only"], cwd=ROOT)
    return 0


def _run_config_file(out: Path, overrides: list[str]) -> Path:
    """The composed settings (main job's defaults + ``overrides``) as a run-config TOML file,
    with results and the sites' files under ``out``."""
    from fedlsc_common.settings import Settings, compose, run_config_toml, to_run_config

    cfg = compose(overrides)
    cfg["results_dir"] = str(out / "results")
    cfg["site_output_dir"] = str(out / "sites")
    settings = Settings.from_run_config(to_run_config(cfg))
    toml_file = out / "run_config.toml"
    toml_file.write_text(run_config_toml(settings.to_run_config()))
    return toml_file


def run_recipes(out: Path, seconds: float, parallel: int, seeds: list[int],
                variants: dict[str, list[str]], common: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in seeds for name in variants]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    running: list[tuple[subprocess.Popen, object]] = []
    deadline = time.monotonic() + seconds
    pending, started = list(jobs), time.monotonic()
    while (pending or running) and time.monotonic() < deadline:
        while pending and len(running) < parallel:
            name, seed = pending.pop(0)
            run_dir = out / name / f"seed{seed}"
            if (run_dir / "results" / "summary.json").is_file():
                continue  # finished on an earlier call
            run_dir.mkdir(parents=True, exist_ok=True)
            toml_file = _run_config_file(run_dir, [*common, *variants[name], f"seed={seed}"])
            log = open(run_dir / "run.log", "w")
            command = [sys.executable, "-m", "fedlsc_tools.inprocess", str(toml_file),
                       "--num-supernodes", "3"]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=ROOT, env=env, start_new_session=True), log))
        time.sleep(5)
        running = [(p, log) for p, log in running if p.poll() is None]
        done = sum(1 for _ in out.glob("*/seed*/results/summary.json"))
        print(f"{time.monotonic() - started:5.0f} s: {done} of {len(jobs)} runs finished, "
              f"{len(running)} running", flush=True)
    for proc, _ in running:
        _stop(proc)
    table, rows = summarise_recipes(out, variants, seeds)
    (out / "recipes.md").write_text(table)
    (out / "recipes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table)
    return 0


def summarise_recipes(out: Path, variants: dict[str, list[str]],
                      seeds: list[int]) -> tuple[str, list[dict]]:
    """A markdown table (one row per variant: each seed's last-round global balanced
    accuracy, with the round it is from when the run did not finish, and "→ final" where the
    run's final model (averaged, head calibrated) scored otherwise; the mean is of what the
    finished runs report as final) and every run's rounds."""
    rows, lines = [], ["| variant | overrides | " + " | ".join(f"seed {s}" for s in seeds)
                       + " | mean of finished |", "|---|---|" + "---|" * (len(seeds) + 1)]
    for name, overrides in variants.items():
        cells, finished = [], []
        for seed in seeds:
            results = out / name / f"seed{seed}" / "results"
            metrics = results / "metrics.jsonl"
            rounds = [json.loads(line) for line in metrics.read_text().splitlines()] \
                if metrics.is_file() else []
            scored = [(r["round"], r["global"]) for r in rounds if r.get("global")]
            done = (results / "summary.json").is_file()
            summary = json.loads((results / "summary.json").read_text()) if done else {}
            final = ((summary.get("final") or {}).get("global") or {}).get("balanced-accuracy")
            rows.append({"variant": name, "seed": seed, "overrides": overrides,
                         "finished": done, "final_balanced_accuracy": final,
                         "balanced_accuracy": {rnd: g.get("balanced-accuracy")
                                               for rnd, g in scored},
                         "accuracy": {rnd: g.get("accuracy") for rnd, g in scored}})
            if not scored:
                cells.append("–")
                continue
            last_round, last = scored[-1]
            value = last.get("balanced-accuracy", float("nan"))
            if not done:
                cells.append(f"{value:.3f} (round {last_round})")
                continue
            final = value if final is None else final
            cells.append(f"{value:.3f}" + (f" → {final:.3f}" if final != value else ""))
            finished.append(final)
        mean = f"{sum(finished) / len(finished):.3f} ({len(finished)})" if finished else "–"
        lines.append(f"| {name} | {' '.join(overrides) or '(main job)'} | "
                     + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n", rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("preset", "table", "recipes"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="time box")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--splits", nargs="+", default=["dirichlet", "site"])
    parser.add_argument("--methods", nargs="+",
                        default=["fedlsc", "fedavg", "fedprox", "fedlsc-per0", "fedavg-fc",
                                 "fedprox-fc", "local-only", "fedlsc-fp16"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for every run")
    parser.add_argument("--variants", type=Path,
                        help="recipes: JSON object, variant name -> list of Hydra overrides")
    args = parser.parse_args(argv)
    if args.what == "recipes":
        if args.variants is None:
            parser.error("recipes needs --variants FILE")
        variants = json.loads(args.variants.read_text())
        return run_recipes(args.out.resolve(), args.seconds, args.parallel, args.seeds,
                           variants, args.set)
    if args.what == "preset":
        return run_preset(args.out.resolve(), args.seconds, args.set)
    return run_table(args.out.resolve(), args.seconds, args.parallel, args.seeds, args.splits,
                     args.methods, args.set)


if __name__ == "__main__":
    sys.exit(main())
