"""Training images/s of one site inside the real ClientApp against a bare PyTorch loop.

The ClientApp side calls ``client_app.app.train(msg, context)`` in-process with a
real ``Context`` (run config composed from ``conf/``) and a real ``Message`` (the initial
global ArrayRecord), on real HAM10000 images of one Dirichlet partition; its time is the
whole call (settings, model build, assembling the received arrays, training, saving the
site's state, encoding the reply). The bare side is what a hand-written script does per
round: build the same model, Adam, the same (class-weighted) cross-entropy, and the same
number of batches from the very same DataLoader object. Data loading is cached in memory
before timing for both. Repeats are interleaved (the order alternates) and the median is
kept, so a busy machine slows both sides alike; the overhead is the ratio of the medians.

    python benchmarks/client_throughput.py --image-size 64 --batches 20 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from client_app import app as client_app
from client_app.data import class_weights
from fedlsc_common.settings import Settings, compose, to_run_config
from fedlsc_flwr.model import build_model
from fedlsc_flwr.wire import PROXIMAL_MU_KEY
from server_app.app import initial_arrays


def bare_round(settings: Settings, loader: torch.utils.data.DataLoader, batches: int,
               lr: float) -> tuple[int, float]:
    """(images, seconds) of a plain PyTorch round: model, Adam, CE, ``batches`` steps."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = build_model(settings.model.backbone, num_classes=settings.model.num_classes)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    weights = class_weights(loader.dataset.records) \
        if settings.training.class_weighted_loss else None
    criterion = nn.CrossEntropyLoss(weight=weights)
    seen = 0
    for step, (images, labels) in enumerate(loader, start=1):
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += labels.numel()
        if step >= batches:
            break
    return seen, time.perf_counter() - start


def client_round(context: Context, msg: Message) -> tuple[int, float, float]:
    """(images, seconds of the whole call, seconds of the training loop) of the ClientApp."""
    start = time.perf_counter()
    reply = client_app.train(msg, context)
    seconds = time.perf_counter() - start
    metrics = reply.content["metrics"]
    return int(metrics["num-examples"]), seconds, float(metrics["train-seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a simulated site gets 1 CPU)")
    parser.add_argument("--mu", type=float, default=0.001,
                        help="proximal μ sent to the ClientApp (0 = FedAvg's client)")
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, cProfile one ClientApp call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="fedlsc-throughput-"))
    flat = to_run_config(compose([
        f"dataset.image_size={args.image_size}", f"training.batch_size={args.batch_size}",
        f"training.max_batches_per_epoch={args.batches}", "partition=dirichlet",
        f"results_dir='{workdir / 'results'}'", *args.set]))
    settings = Settings.from_run_config(flat)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    context = Context(run_id=1, node_id=1, node_config={
        "partition-id": args.partition_id, "num-partitions": settings.partition.num_partitions,
        "output-dir": str(workdir / "site")}, state=RecordDict(), run_config=flat)
    msg = Message(RecordDict({"arrays": initial_arrays(settings), "config": ConfigRecord(
        {"server-round": 1, PROXIMAL_MU_KEY: args.mu})}),
        dst_node_id=1, message_type=MessageType.TRAIN)

    # Warm-up: decodes the images once (cached in memory for both sides), first-call costs.
    client_round(context, msg)
    site = client_app._site(context)
    loader = site.loader("train") if hasattr(site, "loader") else site.loaders()[0]
    bare_round(settings, loader, 2, settings.training.lr)

    bare, client, loop, pair = [], [], [], []
    for r in range(args.repeats):
        for side in (("bare", "client") if r % 2 == 0 else ("client", "bare")):
            if side == "bare":
                n, s = bare_round(settings, loader, args.batches, settings.training.lr)
                bare.append(n / s)
            else:
                n, s, inner = client_round(context, msg)
                client.append(n / s)
                loop.append(n / inner)
            print(f"repeat {r + 1}/{args.repeats} {side:6s}: {n} images, {n / s:7.1f} images/s",
                  flush=True)
        pair.append(bare[-1] / client[-1])  # time ratio client/bare of adjacent runs
    b, c, li = statistics.median(bare), statistics.median(client), statistics.median(loop)
    n = min(args.batches, len(loader)) * args.batch_size
    print(f"\n{settings.model.backbone}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.batches} batches (~{n} images) per round, μ = {args.mu}, "
          f"{args.threads} torch thread(s), median of {args.repeats} interleaved repeats:")
    print("| side | images/s | time vs bare |\n|---|---|---|")
    print(f"| bare PyTorch loop (model + Adam + {args.batches} batches) | {b:.1f} | 1.000 |")
    print(f"| ClientApp train(): training loop only (train_local) | {li:.1f} | {b / li:.3f} |")
    print(f"| ClientApp train(): whole call | {c:.1f} | {b / c:.3f} |")
    print(f"\noverhead of the ClientApp over the bare loop: {100 * (b / c - 1):+.1f} % "
          f"(inside the training loop {100 * (b / li - 1):+.1f} %, outside it "
          f"{n / c - n / li:.2f} s per call)")
    print(f"per-pair time ratio client/bare (adjacent runs, less sensitive to load drift): "
          f"median {statistics.median(pair):.3f}, range {min(pair):.3f}-{max(pair):.3f}")
    if args.profile:
        profile_call(context, msg)


def profile_call(context: Context, msg: Message, top: int = 14) -> None:
    """Where one ClientApp call spends its time outside the batches (cProfile, cumulative)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(client_app.train, msg, context)
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    print("\none ClientApp call under cProfile, project functions by cumulative time:")
    stats.print_stats(r"fedlsc_flwr|client_app|serialization|torch/serialization", top)


if __name__ == "__main__":
    main()
