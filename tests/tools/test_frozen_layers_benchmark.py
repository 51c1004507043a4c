"""benchmarks/frozen_layers.py times local training with the early layers fixed against
every layer training, on one site's images, and prints both and their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, folder, *settings):
    return subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "frozen_layers.py"), "--batches", "2",
         "--repeats", "1", "--threads", "1", "--set", f"dataset.data_dir={folder}",
         "dataset.image_size=32", "training.batch_size=4", "partition.min_partition_size=5",
         *settings],
        capture_output=True, text=True, timeout=300, cwd=_ROOT,
        env={"FEDLSC_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_frozen_layers_benchmark_prints_both_sides_and_their_ratio(tmp_path, write_tiny_ham):
    folder = write_tiny_ham(tmp_path / "data", 60, ["nv", "mel", "bkl"])
    done = _run(tmp_path, folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fixed: backbone.conv_stem, backbone.bn1, backbone.blocks.0, backbone.blocks.1, " \
           "backbone.blocks.2" in done.stdout
    sides = dict(re.findall(r"(all layers train|early layers fixed) +[\d.]+ s +([\d.]+) images/s",
                            done.stdout))
    assert set(sides) == {"all layers train", "early layers fixed"}
    assert all(float(v) > 0 for v in sides.values())
    assert re.search(r"speed-up with the early layers fixed: \d+\.\d\dx", done.stdout)
    # An untrained model has no early layers to fix: said, not timed.
    untrained = _run(tmp_path, folder, "model.pretrained='false'")
    assert untrained.returncode == 2
    assert "has no early layers to fix" in untrained.stderr
