"""What the main job's data gives without the federation: one model, the main job's
network and recipe, the same number of training draws, on the union of the sites' training
images; scored after every "round" on the union of their held-out images (the main job's
global score). A reference for what federating costs, not a way to train.

    python benchmarks/centralized_reference.py --rounds 10 --threads 2

Defaults are the main job's (conf/): 3 Dirichlet β = 0.5 sites of seed 0, 128 px,
EfficientNet-Lite0-SA from ImageNet with the layers `training.frozen-layers` names fixed
(the main job's "early"), balanced batches of 32, Adam 5e-4 with cosine decay over the
rounds, and per round as many batches as the 3 sites train together (3 × 40).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from client_app.data import make_loader
from client_app.partition import load_site_split
from client_app.training import confusion_matrix, frozen_layer_prefixes, train_local
from fedlsc_common.classes import CLASSES
from fedlsc_common.settings import Settings, image_cache_dir, resolve_data_dir
from fedlsc_flwr.metrics import classification_metrics
from fedlsc_flwr.model import build_model, prepare_for_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="default: the run config's data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of the main job's settings")
    parser.add_argument("--rounds", type=int, default=None,
                        help="default: the settings' num_server_rounds")
    args = parser.parse_args(argv)
    s = Settings.from_hydra(args.set)
    rounds = args.rounds or s.num_server_rounds
    torch.set_num_threads(args.threads)
    t, p = s.training, s.partition
    data_dir = resolve_data_dir(args.data_dir or s.dataset.data_dir)
    splits = [load_site_split(data_dir, partition=p.name, partition_id=i,
                              num_partitions=p.num_partitions, beta=p.beta, seed=s.seed,
                              test_fraction=s.dataset.test_fraction,
                              min_partition_size=p.min_partition_size)
              for i in range(p.num_partitions)]
    train = [r for part, _ in splits for r in part]
    test = [r for _, part in splits for r in part]
    size = s.dataset.image_size
    torch.manual_seed(s.seed)
    model = prepare_for_device(build_model(s.model.backbone, s.model.num_classes,
                                           pretrained=s.model.pretrained_source), "cpu")
    loader = make_loader(train, size, train=True, batch_size=t.batch_size,
                         cache=image_cache_dir(), balanced=t.balanced_sampling,
                         sampling_power=t.sampling_power, seed=s.seed)
    test_loader = make_loader(test, size, train=False, batch_size=64, cache=image_cache_dir())
    batches = t.max_batches_per_epoch * p.num_partitions
    frozen = frozen_layer_prefixes(t.frozen_layers, s.model.backbone, s.model.pretrained_source)
    print(f"{len(train)} training / {len(test)} held-out images, {rounds} rounds of "
          f"{batches} batches of {t.batch_size}", flush=True)
    start = time.time()
    for r in range(1, rounds + 1):
        lr = t.lr * ((1 + math.cos(math.pi * (r - 1) / rounds)) / 2
                     if t.lr_decay == "cosine" else 1.0)
        train_local(model, loader, epochs=1, lr=lr, device=torch.device("cpu"),
                    max_batches=batches, equal_steps=True, frozen_layers=frozen,
                    log_every_seconds=1e9)
        matrix, _ = confusion_matrix(model, test_loader, torch.device("cpu"), len(CLASSES))
        m = classification_metrics(matrix, CLASSES)
        recalls = " ".join(f"{c} {m[f'recall-{c}']:.2f}" for c in CLASSES
                           if f"recall-{c}" in m)  # classes with held-out images
        print(f"round {r}: balanced accuracy {m['balanced-accuracy']:.4f}, accuracy "
              f"{m['accuracy']:.4f}; recall {recalls}; {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
