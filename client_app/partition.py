"""Train/test splits and federated partitions of records, always by whole lesion.

HAM10000 holds several images per lesion, so every split here moves whole lesion
groups: no lesion is on both sides of a train/test split or on two simulated clients.
The partitioners are our own rather than flwr-datasets': those assign single rows of a
Hugging Face ``datasets.Dataset`` (pulling in ``datasets`` and pyarrow, and Flower into
this torch-only module) and cannot keep a lesion's images together.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from client_app.data import (
    CLASSES,
    OnError,
    Record,
    class_counts,
    read_records,
)

logger = logging.getLogger("flwr")

Partition = Literal["dirichlet", "site", "folder"]
PARTITIONS: tuple[str, ...] = ("dirichlet", "site", "folder")


def _lesion_groups(records: Sequence[Record]) -> list[list[int]]:
    """Indices of ``records`` grouped by lesion, groups sorted by lesion_id (input order free)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.lesion_id].append(i)
    return [groups[lesion] for lesion in sorted(groups)]


def _groups_by_class(records: Sequence[Record]) -> list[list[list[int]]]:
    """Lesion groups per class; a lesion counts under the label of its first image."""
    per_class: list[list[list[int]]] = [[] for _ in CLASSES]
    for group in _lesion_groups(records):
        per_class[records[group[0]].label].append(group)
    return per_class


def split_by_lesion(
    records: Sequence[Record], test_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Split into (train, test) by lesion, stratified by class, reproducible for a seed.

    Per class, lesion groups in a seeded order go to the test side while that brings its
    image count closer to ``test_fraction`` of the class. Input order does not matter, so
    a deployed site reading its own folder gets the split the simulation gave it.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = random.Random(seed)
    test: set[int] = set()
    for groups in _groups_by_class(records):
        groups = groups[:]
        rng.shuffle(groups)
        target = test_fraction * sum(len(g) for g in groups)
        taken = 0
        for group in groups:
            if abs(taken + len(group) - target) < abs(taken - target):
                test.update(group)
                taken += len(group)
    train = [r for i, r in enumerate(records) if i not in test]
    return train, [r for i, r in enumerate(records) if i in test]


def dirichlet_partition(
    records: Sequence[Record],
    num_partitions: int,
    beta: float,
    seed: int,
    min_partition_size: int = 1,
    max_attempts: int = 100,
) -> list[list[Record]]:
    """Label-skewed partitions: per class, lesion groups shared out by Dirichlet(beta) proportions.

    Redraws (up to ``max_attempts``, from one seeded generator) until every partition
    holds at least ``max(1, min_partition_size)`` images; a ValueError says so otherwise.
    """
    if num_partitions < 1 or beta <= 0:
        raise ValueError(f"need num_partitions >= 1 and beta > 0, got {num_partitions}, {beta}")
    minimum = max(1, min_partition_size)
    per_class = _groups_by_class(records)
    num_lesions = sum(len(groups) for groups in per_class)
    if num_partitions * minimum > len(records) or num_partitions > num_lesions:
        raise ValueError(
            f"cannot give {num_partitions} partitions >= {minimum} images each from "
            f"{len(records)} images of {num_lesions} lesions"
        )
    rng = np.random.default_rng(seed)
    for _ in range(max_attempts):
        owner = np.empty(len(records), dtype=np.int64)
        for groups in per_class:
            if not groups:
                continue
            order = rng.permutation(len(groups))
            sizes = np.array([len(groups[j]) for j in order])
            bounds = np.cumsum(rng.dirichlet(np.full(num_partitions, beta))) * sizes.sum()
            middles = np.cumsum(sizes) - sizes / 2  # a group goes where its middle image falls
            clients = np.minimum(np.searchsorted(bounds, middles), num_partitions - 1)
            for j, client in zip(order, clients, strict=True):
                owner[groups[j]] = client
        sizes_now = np.bincount(owner, minlength=num_partitions)
        if sizes_now.min() >= minimum:
            return [
                [r for r, o in zip(records, owner, strict=True) if o == k]
                for k in range(num_partitions)
            ]
    raise ValueError(
        f"no Dirichlet(beta={beta}) partition of {len(records)} images into {num_partitions} "
        f"partitions of >= {minimum} images in {max_attempts} attempts (seed {seed}); "
        "lower min_partition_size or num_partitions, or raise beta"
    )


def site_partition(records: Sequence[Record]) -> tuple[list[str], list[list[Record]]]:
    """The natural split by contributing site (HAM10000 ``dataset``), sites sorted by name.

    Sorted by name so that a site's partition id does not depend on how much data it has.
    HAM10000 has 9 lesions imaged at two sites; they stay where the data puts them.
    """
    by_site: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_site[r.site].append(r)
    names = sorted(by_site)
    return names, [by_site[name] for name in names]


def partition_records(
    records: Sequence[Record],
    partition: Partition,
    num_partitions: int,
    *,
    beta: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[list[Record]]:
    """All partitions for "dirichlet" or "site" (whose count must equal ``num_partitions``)."""
    if partition == "dirichlet":
        return dirichlet_partition(records, num_partitions, beta, seed, min_partition_size)
    if partition == "site":
        names, parts = site_partition(records)
        if len(parts) != num_partitions:
            raise ValueError(
                f"partition='site' gives {len(parts)} partitions ({', '.join(names)}), "
                f"but num_partitions is {num_partitions}"
            )
        return parts
    raise ValueError(f"partition must be 'dirichlet' or 'site' here, got {partition!r}")


def load_site_split(
    data_dir: str | Path,
    *,
    partition: Partition = "dirichlet",
    partition_id: int = 0,
    num_partitions: int = 3,
    beta: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_partition_size: int,
    on_error: OnError = "raise",
) -> tuple[list[Record], list[Record]]:
    """This site's (train, held-out test) records.

    "dirichlet"/"site": ``data_dir`` holds the whole set (simulation); it is partitioned
    across sites by lesion first, then this site splits its share. "folder": ``data_dir``
    is this site's own folder (deployment) and all of it is used. Either way the site's
    own records are split by lesion with ``seed``, so both give the same split.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    records = read_records(data_dir, on_error=on_error)
    if partition != "folder":
        parts = partition_records(
            records,
            partition,
            num_partitions,
            beta=beta,
            seed=seed,
            min_partition_size=min_partition_size,
        )
        if not 0 <= partition_id < len(parts):
            raise ValueError(f"partition_id {partition_id} not in [0, {len(parts)})")
        records = parts[partition_id]
    train, test = split_by_lesion(records, test_fraction, seed)
    logger.info(
        "Site %s (%s): %d train / %d test images, train labels %s",
        partition_id,
        partition,
        len(train),
        len(test),
        class_counts(train),
    )
    return train, test
