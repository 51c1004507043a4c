"""``fedlsc``: run the main job, predict with a saved model, tabulate results.

    fedlsc run [--results-dir DIR] [--run-config "key=value ..."]
    fedlsc predict --model results/x/global_model.pt --images DIR --out preds.csv
    fedlsc table results/exp-* --out table.md
    fedlsc partitions --partition dirichlet --out label_distribution.png
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


# ------------------------------------------------------------------------------ run
def flower_env() -> dict[str, str]:
    """Environment for Flower's CLI here: no telemetry or update check, no per-run
    dependency installation (the venv has them), and this venv's tools on PATH (the CLI
    starts ``flower-superlink`` by name)."""
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def simulate(project: Path, run_config: Sequence[str], *, num_supernodes: int = 3,
             cpus_per_client: int = 1, log_file: Path | None = None) -> int:
    """``flwr run`` a simulation of this project, streaming its log; returns the exit code."""
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(project),
               "--run-config", " ".join(run_config),
               "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
               "--stream"]
    out = open(log_file, "w") if log_file else None  # noqa: SIM115
    try:
        return subprocess.call(command, env=flower_env(), stdout=out or None,
                               stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def cmd_run(args: argparse.Namespace) -> int:
    from fedlsc_common.settings import project_root

    project = Path(args.project).resolve() if args.project else (project_root() or Path.cwd())
    results = Path(args.results_dir or f"results/main-{time.strftime('%Y%m%d-%H%M%S')}")
    results = results.resolve()
    overrides = [f"results-dir='{results}'", *args.run_config]
    print(f"fedlsc: FedLSC simulation of {args.num_supernodes} sites; results in {results}",
          flush=True)
    start = time.monotonic()
    code = simulate(project, overrides, num_supernodes=args.num_supernodes)
    summary_path = results / "summary.json"
    if code != 0 or not summary_path.is_file():
        print(f"fedlsc: the run failed (exit code {code}); see the log above", file=sys.stderr)
        return code or 1
    summary = json.loads(summary_path.read_text())
    print(finished_line(summary, time.monotonic() - start, results))
    return 0


def finished_line(summary: dict, seconds: float, results: Path) -> str:
    """The last line of ``fedlsc run``: held-out scores of the global and personalized
    models; a global model that holds never-trained layers is said not to be scored."""
    final = summary["final"]
    nan = float("nan")
    own = (f"personalized models: balanced accuracy "
           f"{final['personalized'].get('balanced-accuracy', nan):.4f}, accuracy "
           f"{final['personalized'].get('accuracy', nan):.4f}")
    if summary.get("global_model", {}).get("scored", True):
        shared = (f"Held-out (lesion-grouped) balanced accuracy of the global model: "
                  f"{final['global'].get('balanced-accuracy', nan):.4f} (chance = {1 / 7:.4f}), "
                  f"accuracy {final['global'].get('accuracy', nan):.4f}; ")
    else:
        shared = (f"Global model: not applicable ({len(summary['global_model']['never_trained'])}"
                  f" layer(s) stay on the sites and were never trained in it); held-out "
                  f"(lesion-grouped) scores of the ")
    return (f"fedlsc: finished in {seconds:.0f} s, {summary['rounds']} rounds. {shared}{own}. "
            f"Files: {results}")


# -------------------------------------------------------------------------- predict
def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images under {folder}")
    return images


def predict(model_path: Path, folder: Path, out: Path, batch_size: int = 64) -> int:
    """Write the ISIC 2018 submission CSV (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)."""
    import torch
    from torchvision.transforms import v2

    from client_app.data import load_image
    from fedlsc_common.classes import ISIC_COLUMNS
    from fedlsc_common.storage import atomic_write_text, load_model

    model, info = load_model(model_path)
    names = info["class_names"]
    missing = [c for c in ISIC_COLUMNS if c.lower() not in names]
    if missing:
        raise ValueError(f"{model_path}: model classes {names} lack ISIC columns {missing}")
    columns = [names.index(c.lower()) for c in ISIC_COLUMNS]
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(info["mean"], info["std"])])
    images = list_images(folder)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *ISIC_COLUMNS])
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([normalize(load_image(p, info["image_size"])) for p in chunk])
            probs = torch.softmax(model(batch).float(), dim=1).numpy()
            for path, row in zip(chunk, probs):
                writer.writerow([path.stem, *(f"{row[c]:.6f}" for c in columns)])
            print(f"fedlsc predict: {min(start + batch_size, len(images))}/{len(images)} images",
                  file=sys.stderr, flush=True)
    atomic_write_text(out, buffer.getvalue())
    print(f"fedlsc predict: wrote {len(images)} rows to {out}")
    return len(images)


# ---------------------------------------------------------------------------- table
TABLE_METRICS = ("accuracy", "balanced-accuracy", "precision", "recall", "f1")


def collect(result_dirs: Sequence[Path]) -> list[dict]:
    """summary.json of each run folder (folders without one are reported and skipped)."""
    rows = []
    for folder in result_dirs:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            print(f"fedlsc table: no summary.json in {folder}, skipped", file=sys.stderr)
            continue
        rows.append(json.loads(path.read_text()))
    return rows


def markdown_table(summaries: Sequence[dict]) -> str:
    """Mean ± std over seeds per strategy (and split), global and personalized models."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        split = str(s["config"].get("partition.name", "?"))
        groups.setdefault((s["strategy"], split), []).append(s)
    head = ["method", "split", "seeds",
            *[f"global {m}" for m in TABLE_METRICS], "personalized bal. acc",
            "MB sent+received / round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (strategy, split), runs in sorted(groups.items()):
        def cell(values: list[float]) -> str:
            values = [v for v in values if v is not None]
            if not values:
                return "–"
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            return f"{100 * np.mean(values):.2f} ± {100 * spread:.2f}"

        row = [strategy, split, str(len(runs))]
        row += [cell([r["final"]["global"].get(m) for r in runs]) for m in TABLE_METRICS]
        row.append(cell([r["final"]["personalized"].get("site-mean-balanced-accuracy")
                         for r in runs]))
        traffic = [sum(r.get("bytes_per_round", {}).values()) / 2**20 for r in runs]
        row.append(f"{np.mean(traffic):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cmd_table(args: argparse.Namespace) -> int:
    summaries = collect([Path(p) for p in args.results])
    if not summaries:
        print("fedlsc table: no results found", file=sys.stderr)
        return 1
    table = markdown_table(summaries)
    if args.out:
        from fedlsc_common.storage import atomic_write_text

        atomic_write_text(args.out, table)
    print(table)
    return 0


# ----------------------------------------------------------------------- partitions
def cmd_partitions(args: argparse.Namespace) -> int:
    """Plot (PNG) and print the label counts per client of a partition of the data."""
    from client_app.data import class_counts, read_records
    from client_app.partition import partition_records, site_partition
    from fedlsc_common.classes import CLASSES
    from fedlsc_common.settings import resolve_data_dir
    from fedlsc_tools.site_folders import plot_label_distribution

    records = read_records(resolve_data_dir(args.data_dir))
    if args.partition == "site":
        names, parts = site_partition(records)
    else:
        parts = partition_records(records, "dirichlet", args.num_partitions, beta=args.beta,
                                  seed=args.seed, min_partition_size=args.min_partition_size)
        names = [f"site-{i}" for i in range(len(parts))]
    plot_label_distribution(parts, args.out, site_names=names)
    print("site " + " ".join(f"{c:>6}" for c in CLASSES) + "  total")
    for name, part in zip(names, parts):
        print(f"{name} " + " ".join(f"{n:>6}" for n in class_counts(part)) + f"  {len(part)}")
    print(f"fedlsc partitions: plot written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlsc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the main job: a FedLSC simulation on HAM10000")
    run.add_argument("--results-dir", default="")
    run.add_argument("--project", default="")
    run.add_argument("--num-supernodes", type=int, default=3)
    run.add_argument("--run-config", action="append", default=[],
                     help="extra Flower run-config overrides, e.g. \"strategy.name='fedavg'\"")
    pred = sub.add_parser("predict", help="ISIC submission CSV from a saved model")
    pred.add_argument("--model", required=True, type=Path)
    pred.add_argument("--images", required=True, type=Path)
    pred.add_argument("--out", required=True, type=Path)
    pred.add_argument("--batch-size", type=int, default=64)
    parts = sub.add_parser("partitions", help="label distribution per client (PNG)")
    parts.add_argument("--data-dir", default="")
    parts.add_argument("--partition", choices=("dirichlet", "site"), default="dirichlet")
    parts.add_argument("--num-partitions", type=int, default=3)
    parts.add_argument("--beta", type=float, default=0.5)
    parts.add_argument("--seed", type=int, default=0)
    parts.add_argument("--min-partition-size", type=int, default=50)
    parts.add_argument("--out", type=Path, default=Path("label_distribution.png"))
    table = sub.add_parser("table", help="mean ± std table of result folders")
    table.add_argument("results", nargs="+")
    table.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "predict":
            predict(args.model, args.images, args.out, args.batch_size)
            return 0
        if args.command == "partitions":
            return cmd_partitions(args)
        return cmd_table(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedlsc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
