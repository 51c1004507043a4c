"""Each hospital's own data folder, written from the whole HAM10000 folder, and a plot
of what each holds. Tooling for demos and tests: a real hospital already has its folder.

A folder holds ``HAM10000_metadata.csv`` (its own rows) and its images, which is what
a SuperNode's ``data-dir`` node config points at (``partition.name = 'folder'``).

    python -m fedlsc_tools.site_folders export docker/sites          (3 Dirichlet sites)
    python -m fedlsc_tools.site_folders export OUT partition=site    (the 4 real hospitals)
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client_app.data import METADATA_FILE, DataError, Record, class_counts, read_ham10000
from client_app.partition import Partition, partition_records
from fedlsc_common.classes import CLASSES

logger = logging.getLogger("flwr")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra space) when the filesystem allows it, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _folder_matches(folder: Path, part: Sequence[Record]) -> bool:
    """True if ``folder`` already holds exactly these images (by id and file size)."""
    try:
        records = read_ham10000(folder)
    except (OSError, ValueError):
        return False
    have = {r.image_id: r.path.stat().st_size for r in records}
    return have == {r.image_id: r.path.stat().st_size for r in part}


def export_site_folders(
    source_root: str | Path,
    out_root: str | Path,
    *,
    partition: Partition = "dirichlet",
    num_partitions: int = 3,
    beta: float = 0.5,
    seed: int = 0,
    min_partition_size: int,
) -> list[Path]:
    """Write ``out_root/site_<id>/`` per partition: its metadata CSV rows and its images.

    Each deployed SuperNode then reads only its own folder (``partition="folder"``).
    Images are hard-linked where possible. A folder already holding the same images is
    kept; one holding different data raises rather than being overwritten.
    """
    source_root, out_root = Path(source_root), Path(out_root)
    records = read_ham10000(source_root)
    parts = partition_records(
        records,
        partition,
        num_partitions,
        beta=beta,
        seed=seed,
        min_partition_size=min_partition_size,
    )
    with (source_root / METADATA_FILE).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fieldnames = list(reader.fieldnames or ())
        rows = {row["image_id"].strip(): row for row in reader}
    out_root.mkdir(parents=True, exist_ok=True)
    folders = []
    # a progress bar over images when stderr is a terminal (tqdm's disable=None), else quiet
    with tqdm(total=sum(map(len, parts)), desc="writing site folders", unit="img",
              disable=None) as progress:
        for k, part in enumerate(parts):
            folder = out_root / f"site_{k}"
            folders.append(folder)
            if folder.exists():
                if not _folder_matches(folder, part):
                    raise DataError(
                        f"{folder} exists with other data; remove it or pick another out_root"
                    )
                logger.info("Site folder %s already written, kept", folder)
                progress.update(len(part))
                continue
            tmp = out_root / f".site_{k}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "images").mkdir(parents=True)
            for r in part:
                _link_or_copy(r.path, tmp / "images" / r.path.name)
                progress.update()
            with (tmp / METADATA_FILE).open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows[r.image_id] for r in part)
            os.rename(tmp, folder)  # the folder appears complete or not at all
            logger.info("Wrote %s: %d images", folder, len(part))
    return folders


def plot_label_distribution(
    partitions: Sequence[Sequence[Record]],
    path: str | Path,
    site_names: Sequence[str] | None = None,
) -> Path:
    """Save a stacked bar chart of label counts per client as PNG (written atomically)."""
    from matplotlib.figure import Figure  # lazy: plotting is rare, matplotlib is slow to import

    path = Path(path)
    names = (
        list(site_names)
        if site_names is not None
        else [f"site {k}" for k in range(len(partitions))]
    )
    if len(names) != len(partitions):
        raise ValueError(f"{len(names)} site names for {len(partitions)} partitions")
    counts = np.array([class_counts(p) for p in partitions])  # partitions x classes
    width = min(12.0, max(5.0, 0.8 * len(partitions) + 3))
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x, bottom = np.arange(len(partitions)), np.zeros(len(partitions))
    colors = [f"C{k}" for k in range(len(CLASSES))]
    for k, name in enumerate(CLASSES):
        ax.bar(x, counts[:, k], bottom=bottom, label=name, color=colors[k], width=0.7)
        bottom += counts[:, k]
    for xi, total in zip(x, bottom, strict=True):
        ax.annotate(f"{int(total)}", (xi, total), ha="center", va="bottom", fontsize=9)
    if max(map(len, names), default=0) > 8:
        ax.set_xticks(x, names, rotation=20, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(x, names)
    ax.set_ylabel("images")
    ax.set_title("Label distribution per client")
    ax.margins(y=0.08)
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``export OUT [overrides]``: the site folders of the configured split (conf/ gives
    the partition, its size, beta, seed and minimum partition size)."""
    from fedlsc_common.settings import compose, resolve_data_dir

    parser = argparse.ArgumentParser(
        description="Write each site's own data folder (OUT/site_<k>/) from HAM10000.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write OUT/site_0, OUT/site_1, ...")
    export.add_argument("out", type=Path, help="folder for the site folders")
    export.add_argument("--data-dir", default="",
                        help="the whole HAM10000 folder (default: as for a run)")
    export.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. partition=site or seed=1")
    # parse_known_args: overrides may also follow the options (argparse would refuse them)
    args, extra = parser.parse_known_args(argv)
    if unknown := [a for a in extra if a.startswith("-")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cfg = compose([*args.overrides, *extra])
    part = cfg["partition"]
    if part["name"] == "folder":
        parser.error("partition=folder reads existing site folders; export from dirichlet "
                     "or site")
    folders = export_site_folders(
        resolve_data_dir(args.data_dir or cfg["dataset"]["data_dir"]), args.out,
        partition=part["name"], num_partitions=part["num_partitions"], beta=part["beta"],
        seed=cfg["seed"], min_partition_size=part["min_partition_size"])
    print("\n".join(str(f) for f in folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
