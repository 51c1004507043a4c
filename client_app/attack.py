"""Simulated bad sites, for experiments: what one hospital does wrong (``attack.*``).

Three kinds, each a pure function of what it changes, seeded by the run's seed so a
site does the same wrong thing in every round and process:

- label noise: a share of the site's training labels shuffled among those images (the
  class counts stay the same; an image may draw its own label back);
- label permutation: every training label y becomes π(y) for a fixed permutation π that
  moves every class (a wrong label map);
- poison: the site replies w_g − s·(w_i − w_g) for its float parameters (its update
  negated and scaled by s). Norm running statistics and counters are sent as trained: a
  negative running variance would break every model at once, which no aggregation rule
  is needed to notice.

The held-out data of the site is never touched. Torch and numpy only (no Flower).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from client_app.data import Record
from fedlsc_flwr.similarity import is_buffer


def shuffle_labels(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """``round(fraction · n)`` records, chosen at random, get their labels shuffled among
    themselves; the other records are returned unchanged."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    out = list(records)
    chosen = rng.choice(len(out), size=int(round(fraction * len(out))), replace=False)
    labels = [out[i].label for i in chosen]
    for i, label in zip(chosen, rng.permutation(labels)):
        out[i] = dataclasses.replace(out[i], label=int(label))
    return out


def label_permutation(num_classes: int, seed: int) -> list[int]:
    """A permutation π of the classes with π(c) ≠ c for every c (a seeded derangement)."""
    if num_classes < 2:
        raise ValueError(f"a label permutation needs at least 2 classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    while True:
        perm = [int(c) for c in rng.permutation(num_classes)]
        if all(p != c for c, p in enumerate(perm)):
            return perm


def permute_labels(records: Sequence[Record], permutation: Sequence[int]) -> list[Record]:
    """Every record's label y replaced by ``permutation[y]``."""
    return [dataclasses.replace(r, label=int(permutation[r.label])) for r in records]


def attack_training_records(records: Sequence[Record], kind: str, *, fraction: float,
                            num_classes: int, seed: int) -> list[Record]:
    """The training records a bad site of ``kind`` trains on (unchanged for other kinds)."""
    if kind == "label-noise":
        return shuffle_labels(records, fraction, seed)
    if kind == "label-permutation":
        return permute_labels(records, label_permutation(num_classes, seed))
    return list(records)


def poison_update(trained: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                  scale: float) -> dict[str, torch.Tensor]:
    """w_g − scale·(w_i − w_g) for every float parameter the server sent (``sent`` = w_g);
    buffers and integer tensors as trained. Keys not in ``sent`` are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, global_value in sent.items():
        value = trained[key]
        if value.is_floating_point() and not is_buffer(key):
            g = global_value.to(value.dtype)
            value = g - scale * (value - g)
        out[key] = value
    return out
