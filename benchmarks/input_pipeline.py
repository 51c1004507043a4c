"""Is the input pipeline fast enough? Images/s of loading vs images/s of training, same machine.

Pipeline: the first epoch (JPEG decode to the training size + augmentation), a cached
epoch (augmentation of the in-memory uint8 tensor) and a reload of the on-disk .npy
cache (what a later process does). Model: forward + backward + Adam step on random
batches. The ratio pipeline / model says how much of a training step loading costs:
at 20x, a step spends about 1/21 of its time waiting for data (num_workers=0). Each
rate is the best of ``--repeats`` runs: other processes on a small machine only ever
slow a run down.

    python benchmarks/input_pipeline.py --images 2000 --sizes 64 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from client_app import data
from client_app.data import make_loader, read_ham10000
from fedlsc_flwr.model import build_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"


def epoch_rate(loader: torch.utils.data.DataLoader) -> float:
    """Images/s of one pass over ``loader``."""
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def pipeline_rates(
    records: list[data.Record], size: int, cache_dir: Path, repeats: int
) -> dict[str, float]:
    """Decode, cached-epoch and disk-reload rates at one size; best of ``repeats`` each."""
    best = {"decode": 0.0, "cached": 0.0, "reload": 0.0}
    for _ in range(repeats):
        data._memory_cache.clear()
        for old in cache_dir.glob("*.npy"):
            old.unlink()
        start = time.perf_counter()
        loader = make_loader(records, size, train=True, batch_size=32, cache=cache_dir)
        best["decode"] = max(best["decode"], len(records) / (time.perf_counter() - start))
        best["cached"] = max(best["cached"], epoch_rate(loader))
        data._memory_cache.clear()
        start = time.perf_counter()
        make_loader(records, size, train=True, batch_size=32, cache=cache_dir)
        best["reload"] = max(best["reload"], len(records) / (time.perf_counter() - start))
    best["first"] = 1 / (1 / best["decode"] + 1 / best["cached"])  # decode + augmented epoch
    return best


def train_rate(backbone: str, size: int, repeats: int, batch: int = 32) -> float:
    """Training images/s: forward + backward + Adam on random batches; best of ``repeats``."""
    torch.manual_seed(0)
    model = build_model(backbone).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 7, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    step()  # warm-up
    best = 0.0
    for _ in range(repeats):
        start, steps = time.perf_counter(), 0
        while steps < 2 or time.perf_counter() - start < 2.0:
            step()
            steps += 1
        best = max(best, batch * steps / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=2000, help="first N records of the CSV")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--backbones", nargs="+", default=["resnet10t_sa", "res2net50_sa"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="keep the best of N runs")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    records = read_ham10000(args.data_dir)[: args.images]
    print(
        f"{len(records)} images from {args.data_dir}, torch threads {args.threads}, "
        f"best of {args.repeats}, load average {os.getloadavg()[0]:.2f} at start\n"
    )
    header = f"{'size':>5} {'stage':<28} {'img/s':>9}"
    print(header + "   pipeline/model ratio (cached, first epoch)")
    print("-" * (len(header) + 44))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rates = pipeline_rates(records, size, Path(tmp), args.repeats)
            print(f"{size:>5} {'decode to uint8 cache':<28} {rates['decode']:>9.0f}")
            print(f"{size:>5} {'first epoch (decode+augment)':<28} {rates['first']:>9.0f}")
            print(f"{size:>5} {'cached epoch (augment)':<28} {rates['cached']:>9.0f}")
            print(f"{size:>5} {'reload .npy disk cache':<28} {rates['reload']:>9.0f}")
            for backbone in args.backbones:
                model = train_rate(backbone, size, args.repeats)
                ratios = f"{rates['cached'] / model:8.1f}x {rates['first'] / model:8.1f}x"
                print(f"{size:>5} {'train ' + backbone:<28} {model:>9.1f}   {ratios}")
            print()
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes skew timings)")


if __name__ == "__main__":
    main()
