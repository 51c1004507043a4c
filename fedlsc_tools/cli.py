"""The ``fedlsc`` command: run the main job, predict with a saved model, tabulate results,
look at partitions, and make the keys and certificates of a real federation.

    fedlsc run [--results-dir DIR] [--run-config "key=value ..."]
    fedlsc predict --model results/x/global_model.pt --images DIR --out preds.csv
    fedlsc table results/exp-* --out table.md
    fedlsc partitions --partition dirichlet --out label_distribution.png
    fedlsc keys DIR --name hospital-1            (at a hospital)
    fedlsc certs DIR --name coordinator.example.org   (at the coordinator)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    command = flwr_run_command(project, run_config, num_supernodes=num_supernodes,
                               cpus_per_client=cpus_per_client)
    out = open(log_file, "w") if log_file else None  # noqa: SIM115
    try:
        return subprocess.call(command, env=flower_env(), stdout=out or None,
                               stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def flwr_run_command(project: Path, run_config: Sequence[str], *, num_supernodes: int,
                     cpus_per_client: int = 1) -> list[str]:
    """The ``flwr run`` command line of a simulation with ``num_supernodes`` sites."""
    return [str(Path(sys.executable).parent / "flwr"), "run", str(project),
            "--run-config", " ".join(run_config),
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
            "--stream"]


def parse_run_config(run_config: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` values (``"key=value ..."`` strings or one TOML file each) as one
    flat dict, read the way ``flwr run`` reads them; later values win."""
    from flwr.common.config import parse_config_args

    merged: dict[str, Any] = {}
    for item in run_config:
        try:
            merged.update(parse_config_args([item]))
        except Exception as err:  # click's and tomli's errors: one line naming the value
            message = getattr(err, "message", None) or str(err)
            raise ValueError(f"--run-config {item!r}: {message}") from None
    return merged


def _toml_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config "key=value"`` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return f"'{text}'" if "'" not in text else json.dumps(text)


def partition_size(name: str) -> int:
    """How many sites partition ``name`` has in ``conf/partition/<name>.yaml``."""
    from fedlsc_common.settings import CONF_DIR, compose

    known = sorted(p.stem for p in (CONF_DIR / "partition").glob("*.yaml"))
    if name not in known:
        raise ValueError(f"run config 'partition.name' = {name!r}: must be one of "
                         f"{', '.join(repr(k) for k in known)}")
    return int(compose([f"partition={name}"])["partition"]["num_partitions"])


def federation_run_config(run_config: Sequence[str], num_supernodes: int | None
                          ) -> tuple[int, list[str]]:
    """The number of SuperNodes of a simulation and its run config, with the federation
    sized by the chosen partition where the user did not say otherwise.

    The partition (``partition.name``, else conf's default) decides how many sites there
    are: ``site`` has one per contributing hospital (4), ``dirichlet`` its
    ``num-partitions``. Unless given, ``num-supernodes`` is that count and
    ``min-available-nodes`` / ``min-train-nodes`` wait for every site;
    ``min-train-replies`` is lowered to the number of sites when it is larger. An explicit
    value of any of them is kept. Returns (num_supernodes, ``key=value`` overrides).
    """
    from fedlsc_common.settings import compose

    given = parse_run_config(run_config)
    defaults = compose()
    name = str(given.get("partition.name", defaults["partition"]["name"]))
    count = partition_size(name)
    if "partition.num-partitions" in given:
        count = int(given["partition.num-partitions"])
    if name == "site" and count != partition_size("site"):
        raise ValueError(f"partition.name='site' has {partition_size('site')} sites (the "
                         f"hospitals that contributed images), not {count}")
    if num_supernodes is not None:
        if num_supernodes < 1:
            raise ValueError(f"--num-supernodes {num_supernodes}: must be at least 1")
        if name == "site" and num_supernodes != count:
            raise ValueError(f"--num-supernodes {num_supernodes}: partition.name='site' has "
                             f"{count} sites, one SuperNode each")
        if "partition.num-partitions" in given and num_supernodes != count:
            raise ValueError(f"--num-supernodes {num_supernodes} but partition.num-partitions "
                             f"= {count}: in simulation every SuperNode is one partition")
        count = num_supernodes
    derived: dict[str, Any] = {"partition.num-partitions": count,
                               "min-available-nodes": count, "min-train-nodes": count}
    if count < int(defaults["min_train_replies"]):
        derived["min-train-replies"] = count
    merged = {**{k: v for k, v in derived.items() if k not in given}, **given}
    return count, [f"{key}={_toml_value(value)}" for key, value in merged.items()]


def cpus_per_client_for(num_supernodes: int, cores: int) -> int:
    """CPUs (and torch threads: Ray sets ``OMP_NUM_THREADS`` from them) per virtual
    SuperNode of a simulation on ``cores`` cores.

    With at least as many cores as sites, each site gets an equal share and they train
    side by side. With fewer cores than sites, sites with one core each would run in
    waves whose last one leaves cores idle (3 sites on 2 cores: the third trains alone on
    one core while the other waits), so each site gets every core and they take turns.
    """
    if num_supernodes < 1 or cores < 1:
        raise ValueError(f"{num_supernodes} SuperNode(s) on {cores} core(s): both must be "
                         "at least 1")
    return cores // num_supernodes if cores >= num_supernodes else cores


def _concurrency_words(num_supernodes: int, cores: int, cpus: int) -> str:
    at_once = max(1, min(num_supernodes, cores // cpus))
    return ("the sites train one after another" if at_once == 1
            else f"{at_once} of the {num_supernodes} sites train at a time")


def cmd_run(args: argparse.Namespace) -> int:
    from fedlsc_common.settings import project_root
    from fedlsc_tools.processes import local_superlink_port, stop_pids, superlink_pids

    cores = os.cpu_count() or 1
    if not 0 <= args.cpus_per_client <= cores:
        raise ValueError(f"--cpus-per-client {args.cpus_per_client}: must be 0 (automatic) "
                         f"or a number of CPUs up to this machine's {cores} (a site asking "
                         "for more would never be started)")
    project = Path(args.project).resolve() if args.project else (project_root() or Path.cwd())
    results = Path(args.results_dir or f"results/main-{time.strftime('%Y%m%d-%H%M%S')}")
    results = results.resolve()
    num_supernodes, overrides = federation_run_config(
        [*args.run_config, f"results-dir={_toml_value(str(results))}"], args.num_supernodes)
    print(f"fedlsc: simulation of {num_supernodes} sites; results in {results}", flush=True)
    start = time.monotonic()
    port = local_superlink_port()
    superlinks_before = superlink_pids(port)
    try:
        cpus = args.cpus_per_client or cpus_per_client_for(num_supernodes, cores)
        print(f"fedlsc: {cpus} CPU(s) per site: "
              f"{_concurrency_words(num_supernodes, cores, cpus)}", flush=True)
        code = simulate(project, overrides, num_supernodes=num_supernodes,
                        cpus_per_client=cpus)
    finally:
        started = superlink_pids(port) - superlinks_before
        if started and not args.keep_superlink:
            # `flwr run` leaves the local SuperLink it started running; stop that one only.
            print(f"fedlsc: stopping the local SuperLink this run started (pid "
                  f"{', '.join(map(str, sorted(started)))}; --keep-superlink keeps it)",
                  flush=True)
            stop_pids(started)
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
    from tqdm import tqdm

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
    # a progress bar on a terminal, nothing in logs and pipes (tqdm's disable=None)
    with torch.no_grad(), tqdm(total=len(images), desc="fedlsc predict", unit="img",
                               disable=None) as progress:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([normalize(load_image(p, info["image_size"])) for p in chunk])
            probs = torch.softmax(model(batch).float(), dim=1).numpy()
            for path, row in zip(chunk, probs):
                writer.writerow([path.stem, *(f"{row[c]:.6f}" for c in columns)])
            progress.update(len(chunk))
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


# ------------------------------------------------------------------- keys and certs
def cmd_keys(args: argparse.Namespace) -> int:
    from fedlsc_tools.certs import make_key_pair

    private = make_key_pair(args.folder, args.name)
    print(f"fedlsc keys: private key {private} (0600: it never leaves this machine; pass it "
          f"to flower-supernode --auth-supernode-private-key)\n"
          f"fedlsc keys: public key  {private}.pub (send this one to the coordinator, who runs "
          f"'flwr supernode register {private.name}.pub <federation> --name {args.name}')")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedlsc_tools.certs import certificate_names, make_certificates

    folder = Path(args.folder)
    before = certificate_names(folder / "server.pem") if (folder / "server.pem").is_file() \
        else []
    had_ca = (folder / "ca.crt").is_file()
    paths = make_certificates(folder, names=args.name, ips=args.ip, days=args.days)
    now = certificate_names(paths["cert"])
    print(f"fedlsc certs: {'kept the CA' if had_ca else 'new CA'} {paths['ca']} (send it to "
          f"every hospital); its key {paths['ca_key']} stays here (0600)")
    print(f"fedlsc certs: SuperLink certificate {paths['cert']} and key {paths['key']}, "
          f"valid {args.days} days for: {', '.join(now)}")
    if dropped := [n for n in before if n not in now]:
        print(f"fedlsc certs: note: the previous certificate also covered {', '.join(dropped)}"
              f"; pass them again (--name/--ip) to keep them", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- main
class HelpFormatter(argparse.HelpFormatter):
    """Prose wrapped to the terminal, example lines (indented) kept as written, and every
    option's default shown unless its help already says it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []
        for line in [*text.splitlines(), None]:
            if line and not line.startswith(" "):
                prose.append(line)
                continue
            if prose:
                out.append(textwrap.fill(" ".join(" ".join(prose).split()), width,
                                         initial_indent=indent, subsequent_indent=indent,
                                         break_on_hyphens=False))
                prose = []
            if line is not None:
                out.append(indent + line if line.strip() else "")
        return "\n".join(out)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never break "min-train-nodes" or "fedlsc-experiment" at a hyphen
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default is None or action.default is False
                or action.default in ("", []) or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _sub(sub: Any, name: str, summary: str, description: str, examples: str
         ) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description,
                          epilog="examples:\n" + examples, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The ``fedlsc`` command line (every option says what it does and its default)."""
    parser = argparse.ArgumentParser(
        prog="fedlsc", formatter_class=HelpFormatter,
        description="FedLSC (federated learning with layer similarity comparison) for "
                    "skin-lesion classification across hospitals: run simulations, predict "
                    "with a saved model, tabulate results, and make the keys and "
                    "certificates of a real federation.",
        epilog="examples:\n"
               "  fedlsc run --results-dir results/main\n"
               "  fedlsc predict --model results/main/global_model.pt "
               "--images ../shared/data/isic2018_test/images --out preds.csv\n"
               "  fedlsc keys keys/ --name hospital-1\n"
               "\nRun 'fedlsc COMMAND --help' for a command's options; sweeps over settings: "
               "fedlsc-experiment --help")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _sub(sub, "run", "simulate a federation on HAM10000 (flwr run) and print the result",
               "Run the app as a Flower simulation (`flwr run --stream`) on this machine: one "
               "virtual SuperNode per site of the chosen partition, settings from conf/ with "
               "your --run-config overrides. Prints the global model's held-out balanced "
               "accuracy at the end; every file of the run is in --results-dir.",
               "  fedlsc run --results-dir results/main\n"
               "  fedlsc run --run-config \"strategy.name='fedavg' num-server-rounds=10\"\n"
               "  fedlsc run --run-config \"partition.name='site'\"   "
               "(the 4 real hospitals: 4 SuperNodes)\n"
               "  fedlsc run --run-config my_settings.toml\n")
    run.add_argument("--results-dir", default="", metavar="DIR",
                     help="where the run writes metrics, plots, models and checkpoints "
                          "(default: results/main-<date>-<time>)")
    run.add_argument("--project", default="", metavar="DIR",
                     help="the Flower app to run (default: this checkout: "
                          "$FEDLSC_PROJECT_DIR, else where fedlsc-flwr is installed from)")
    run.add_argument("--num-supernodes", type=int, default=None, metavar="N",
                     help="virtual SuperNodes (sites) (default: the partition's number of "
                          "sites: partition.num-partitions, or 4 for partition.name='site'); "
                          "min-available-nodes and min-train-nodes follow it unless given")
    run.add_argument("--cpus-per-client", type=int, default=0, metavar="N",
                     help="CPUs, and torch threads, per virtual SuperNode "
                          "(client-resources-num-cpus) (default: 0 = cores / sites when "
                          "there are at least as many cores as sites, else every core, the "
                          "sites taking turns)")
    run.add_argument("--run-config", action="append", default=[], metavar="'KEY=VALUE ...'",
                     help="Flower run-config overrides of conf/'s settings, as for flwr run: "
                          "space-separated key=value pairs or a .toml file; may be repeated "
                          "(default: none, conf/ as it is)")
    run.add_argument("--keep-superlink", action="store_true",
                     help="leave running the local SuperLink that flwr run starts for the "
                          "simulation (on 127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, "
                          "39091 unless set) when this run started it (default: False: the "
                          "run stops it at the end; one already running is left alone)")

    pred = _sub(sub, "predict", "class probabilities of every image in a folder (ISIC CSV)",
                "Write the ISIC 2018 Task 3 submission CSV (image,MEL,NV,BCC,AKIEC,BKL,DF,"
                "VASC: one row of probabilities per image) for every .jpg/.jpeg/.png below "
                "--images, with a model file a run wrote (global_model.pt, or a site's "
                "personalized_model.pt).",
                "  fedlsc predict --model results/main/global_model.pt "
                "--images ../shared/data/isic2018_test/images --out preds.csv\n")
    pred.add_argument("--model", required=True, type=Path, metavar="FILE",
                      help="model file written by a run (global_model.pt or "
                           "sites/<site>/personalized_model.pt)")
    pred.add_argument("--images", required=True, type=Path, metavar="DIR",
                      help="folder searched recursively for images")
    pred.add_argument("--out", required=True, type=Path, metavar="CSV",
                      help="CSV file to write (atomically)")
    pred.add_argument("--batch-size", type=int, default=64, metavar="N",
                      help="images per forward pass")

    parts = _sub(sub, "partitions", "label counts per site of a partition (table and PNG)",
                 "Split HAM10000 as a simulation would and show how many images of each "
                 "class every site gets: printed as a table and drawn as a stacked bar chart.",
                 "  fedlsc partitions --partition site --out sites.png\n"
                 "  fedlsc partitions --num-partitions 5 --beta 0.1 --out skewed.png\n")
    parts.add_argument("--data-dir", default="", metavar="DIR",
                       help="HAM10000 folder (default: $FEDLSC_DATA_DIR, else "
                            "../shared/data/ham10000 beside the checkout)")
    parts.add_argument("--partition", choices=("dirichlet", "site"), default="dirichlet",
                       help="dirichlet: label skew drawn from Dirichlet(beta) over lesions; "
                            "site: one site per contributing hospital")
    parts.add_argument("--num-partitions", type=int, default=3, metavar="N",
                       help="number of sites (dirichlet only)")
    parts.add_argument("--beta", type=float, default=0.5,
                       help="Dirichlet concentration: smaller is more skewed (dirichlet only)")
    parts.add_argument("--seed", type=int, default=0, help="random seed of the split")
    parts.add_argument("--min-partition-size", type=int, default=50, metavar="N",
                       help="fewest images a site may get (dirichlet only)")
    parts.add_argument("--out", type=Path, default=Path("label_distribution.png"),
                       metavar="PNG", help="plot to write")

    table = _sub(sub, "table", "mean ± std table of finished runs (markdown)",
                 "Read summary.json of every results folder given and print a markdown table: "
                 "per strategy and partition, mean ± std over the runs (seeds) of the global "
                 "model's held-out scores, the personalized models' balanced accuracy, and "
                 "traffic per round.",
                 "  fedlsc table results/fedavg-* results/fedlsc-* --out table.md\n"
                 "  fedlsc table multirun/2026-11-27_10-00-00/*/results\n")
    table.add_argument("results", nargs="+", metavar="DIR",
                       help="results folders (each with a summary.json)")
    table.add_argument("--out", type=Path, metavar="MD",
                       help="also write the table to this file (default: print only)")

    keys = _sub(sub, "keys", "at a hospital: its SuperNode key pair (only .pub leaves)",
                "Make this hospital's SuperNode key pair (ECDSA P-384, OpenSSH format): "
                "FOLDER/NAME, the private key (0600; it never leaves this machine) and "
                "FOLDER/NAME.pub, the public key to send to the coordinator, who registers "
                "it with 'flwr supernode register'. An existing key is kept.",
                "  fedlsc keys /etc/fedlsc --name hospital-1\n"
                "  flower-supernode ... --auth-supernode-private-key /etc/fedlsc/hospital-1\n")
    keys.add_argument("folder", type=Path, metavar="FOLDER", help="where to write the keys")
    keys.add_argument("--name", required=True,
                      help="this hospital's name: the key's file name and comment")

    certs = _sub(sub, "certs", "at the coordinator: CA and SuperLink TLS certificate",
                 "Make the federation's CA (FOLDER/ca.crt, to send to every hospital; its key "
                 "FOLDER/ca.key stays here, 0600) and the SuperLink's certificate "
                 "(FOLDER/server.pem, FOLDER/server.key) valid for every host name and IP "
                 "address the hospitals use to reach it. No hospital key is made here: each "
                 "hospital makes its own with 'fedlsc keys'. Run it again with another "
                 "--name to re-sign the certificate with the same CA (pass the old names "
                 "too): the hospitals' ca.crt stays valid.",
                 "  fedlsc certs certs/ --name coordinator.example.org\n"
                 "  fedlsc certs certs/ --name coordinator.example.org --name fl.example.org "
                 "--ip 10.0.0.5\n"
                 "  flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile "
                 "certs/server.pem --ssl-keyfile certs/server.key ...\n")
    certs.add_argument("folder", type=Path, metavar="FOLDER",
                       help="where the CA and the certificate are (kept between runs)")
    certs.add_argument("--name", action="append", default=[], metavar="HOST",
                       help="a host name the SuperLink is reached by; repeat for several "
                            "(default: none; give at least one --name or --ip)")
    certs.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                       help="an IP address the SuperLink is reached by; repeat for several")
    certs.add_argument("--days", type=int, default=365,
                       help="days the SuperLink certificate is valid; a new CA gets 10 "
                            "times as many")
    return parser


def cmd_predict(args: argparse.Namespace) -> int:
    predict(args.model, args.images, args.out, args.batch_size)
    return 0


COMMANDS = {"run": cmd_run, "predict": cmd_predict, "partitions": cmd_partitions,
            "table": cmd_table, "keys": cmd_keys, "certs": cmd_certs}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as err:  # ConfigError, CertificateError too
        print(f"fedlsc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
