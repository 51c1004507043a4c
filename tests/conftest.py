"""Shared fixtures: Flower message identity for mocked replies, and Flower log capture."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from fedlsc_tools.processes import LOCAL_SUPERLINK, local_superlink_owner, stop_pids


@pytest.fixture
def task_identity():
    """Messages built outside a Flower process need a run/task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture
def flwr_logs(caplog):
    """Capture records of Flower's logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text``, and all their descendants."""
    parents: dict[int, int] = {}
    roots = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                roots.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    found = set(roots)
    while more := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= more
    return sorted(found)


@pytest.fixture(scope="session")
def stop_processes():
    """``stop(text, sig)``: signal every process (tree) whose command line names ``text``,
    e.g. the detached local SuperLink a test's FLWR_HOME started. Never others'."""

    def stop(text: str, sig: int = signal.SIGTERM) -> None:
        stop_pids(processes_mentioning(text), sig)

    return stop


@pytest.fixture(scope="module")
def own_local_superlink():
    """Simulation tests kill and restart their own local SuperLink; one that another
    FLWR_HOME started (e.g. a benchmark sweep) would silently serve their runs instead."""
    import time

    deadline = time.monotonic() + 20  # one that a previous test just stopped may linger
    while (owner := local_superlink_owner()) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    if owner is not None:
        pytest.fail(f"another local Flower SuperLink already listens on "
                    f"{LOCAL_SUPERLINK[0]}:{LOCAL_SUPERLINK[1]} ({owner}); stop it first, "
                    f"or these tests would run on it")


@pytest.fixture(scope="session")
def write_tiny_ham():
    """``write(folder, n, classes, site_of=None)``: a HAM10000-layout folder of ``n`` random
    24x32 JPEGs, one lesion each, labelled ``classes[i % len(classes)]``, from hospital
    ``site_of(i)`` (default "site-a"); returns the folder."""
    import csv

    import numpy as np
    from PIL import Image

    def write(folder: Path, n: int, classes: list[str], site_of=None) -> Path:
        (folder / "images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        with open(folder / "HAM10000_metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                             "localization", "dataset"])
            for i in range(n):
                writer.writerow([f"HAM_{i:07d}", f"ISIC_{i:07d}", classes[i % len(classes)],
                                 "histo", 40, "male", "back",
                                 site_of(i) if site_of else "site-a"])
                Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                    folder / "images" / f"ISIC_{i:07d}.jpg")
        return folder

    return write
