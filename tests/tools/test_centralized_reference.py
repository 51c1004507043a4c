"""The centralized reference (benchmarks/centralized_reference.py) runs the main job's
settings on the union of the sites' images and prints a score per round."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_centralized_reference_trains_on_the_union_of_the_sites(tmp_path, write_tiny_ham):
    folder = write_tiny_ham(tmp_path / "data", 60, ["nv", "mel", "bkl"])
    done = subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "centralized_reference.py"),
         "--rounds", "2", "--threads", "1", "--data-dir", str(folder), "--set", "model=small",
         "dataset.image_size=32", "training.max_batches_per_epoch=1",
         "partition.min_partition_size=5"],
        capture_output=True, text=True, timeout=300, cwd=_ROOT,
        env={"FEDLSC_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    # 60 lesions over 3 sites, 20 % of each site held out: 3 batches (1 per site) a round
    header = re.search(r"(\d+) training / (\d+) held-out images, 2 rounds of 3 batches",
                       done.stdout)
    assert header and int(header[1]) + int(header[2]) == 60
    scores = re.findall(r"round (\d): balanced accuracy ([\d.]+), accuracy", done.stdout)
    assert [r for r, _ in scores] == ["1", "2"]
    assert all(0 <= float(v) <= 1 for _, v in scores)
