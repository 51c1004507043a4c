"""Local training time with the backbone's early layers fixed against every layer training.

``training.frozen-layers = "early"`` keeps the stem and first stage(s) of a pretrained
backbone at their ImageNet values (:func:`fedlsc_flwr.model.early_layers`); autograd then
skips their backward pass. This times ``client_app.training.train_local`` (what a site runs
each round) on the very same batches of one Dirichlet site's real HAM10000 images, with
every layer training and with the early layers fixed, repeats interleaved (the order
alternates, the median is kept, so a busy machine slows both sides alike), and prints the
images/s of each and their ratio. Batches are drawn and decoded once before timing, so the
ratio is the model's, not the data loading's.

    python benchmarks/frozen_layers.py --batches 40 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from client_app.data import make_loader
from client_app.partition import load_site_split
from client_app.training import frozen_layer_prefixes, train_local
from fedlsc_common.settings import Settings, image_cache_dir, resolve_data_dir
from fedlsc_flwr.model import build_model, prepare_for_device


def time_training(settings: Settings, batches: list, frozen: tuple[str, ...],
                  device: torch.device) -> float:
    """Seconds of one ``train_local`` call over ``batches`` from a fresh pretrained model."""
    torch.manual_seed(settings.seed)
    model = prepare_for_device(build_model(settings.model.backbone, settings.model.num_classes,
                                           settings.model.pretrained_source), device)
    stats = train_local(model, batches, epochs=1, lr=settings.training.lr, device=device,
                        max_batches=len(batches), frozen_layers=frozen, log_every_seconds=1e9)
    return stats.seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: what torch chose)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of the main job's settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings.from_hydra(args.set)
    frozen = frozen_layer_prefixes("early", settings.model.backbone,
                                   settings.model.pretrained_source)
    if not frozen:
        parser.error(f"{settings.model.backbone} with pretrained={settings.model.pretrained!r} "
                     "has no early layers to fix (they are fixed only on a pretrained start)")
    p = settings.partition
    train, _ = load_site_split(resolve_data_dir(settings.dataset.data_dir), partition="dirichlet",
                               partition_id=0, num_partitions=p.num_partitions, beta=p.beta,
                               seed=settings.seed, test_fraction=settings.dataset.test_fraction,
                               min_partition_size=p.min_partition_size)
    loader = make_loader(train, settings.dataset.image_size, train=True,
                         batch_size=settings.training.batch_size, cache=image_cache_dir(),
                         balanced=settings.training.balanced_sampling, seed=settings.seed)
    batches = list(itertools.islice(loader, args.batches))
    device = torch.device("cpu")
    time_training(settings, batches[:2], (), device)  # warm-up: first-call costs
    seconds: dict[str, list[float]] = {"all layers train": [], "early layers fixed": []}
    for repeat in range(args.repeats):
        order = [((), "all layers train"), (frozen, "early layers fixed")]
        for prefixes, side in order if repeat % 2 == 0 else order[::-1]:
            seconds[side].append(time_training(settings, batches, prefixes, device))
    images = sum(int(labels.numel()) for _, labels in batches)
    print(f"{settings.model.backbone}, {settings.dataset.image_size} px, batch "
          f"{settings.training.batch_size}, {len(batches)} batches, {args.threads} threads, "
          f"median of {args.repeats}; fixed: {', '.join(frozen)}")
    medians = {side: statistics.median(values) for side, values in seconds.items()}
    for side, median in medians.items():
        print(f"  {side:<20} {median:7.2f} s  {images / median:7.1f} images/s")
    ratio = medians["all layers train"] / medians["early layers fixed"]
    print(f"  speed-up with the early layers fixed: {ratio:.2f}x")
    return {"ratio": ratio, **medians}


if __name__ == "__main__":
    main()
