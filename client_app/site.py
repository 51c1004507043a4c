"""One hospital's side of a run: who it is, its data, its model, its training, its own disk.

A site keeps its latest locally trained weights (from which its personalized layers are
restored), the list of personalized layers, and its personalized model in its output
folder, so a restarted SuperNode picks up where it was without asking the server. The
ClientApp (``client_app.app``) only turns messages into calls of :class:`Site`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client_app.attack import attack_training_records
from client_app.data import (
    ImageDataset,
    balanced_record_weights,
    build_transform,
    class_counts,
    class_weights,
    logit_offsets,
    make_loader,
    sampled_class_prior,
)
from client_app.partition import load_site_split
from client_app.training import (
    TrainStats,
    cosine_factor,
    frozen_layer_prefixes,
    head_inputs,
    lr_for_round,
    resolve_device,
    train_local,
)
from fedlsc_common.classes import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from fedlsc_common.settings import (
    Settings,
    image_cache_dir,
    resolve_data_dir,
    resolve_results_dir,
)
from fedlsc_common.storage import atomic_torch_save, atomic_write_json, save_model
from fedlsc_flwr.calibration import ClassFeatureStatistics, class_feature_statistics
from fedlsc_flwr.model import CLASSIFIER_LAYER, build_model, prepare_for_device
from fedlsc_flwr.wire import is_personalized, layer_of

logger = logging.getLogger("flwr")

#: Torch threads of a site's ClientApp processes, when its node config has no
#: ``num-threads`` (0 or unset: torch's default, one per core).
NUM_THREADS_ENV = "FEDLSC_NUM_THREADS"
LOCAL_STATE_FILE = "local_state.pt"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
PERSONALIZED_LIST_FILE = "personalized_layers.json"
PERSONAL_MODEL_FILE = "personalized_model.pt"

_SPLITS: dict[tuple, tuple[list, list]] = {}  # per-process caches across rounds
_LOADERS: dict[tuple, Any] = {}


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site's name: ``site-name`` from the node config, else ``site-<partition-id>``."""
    pid = int(node_config.get("partition-id", 0))
    return str(node_config.get("site-name", "") or f"site-{pid}")


def thread_setting(node_config: Mapping[str, Any]) -> int:
    """Torch threads for this SuperNode's ClientApps: node config ``num-threads``, else
    $FEDLSC_NUM_THREADS, else 0 (torch's default: one per core). Several SuperNodes on
    one host set it to cores / SuperNodes, or they oversubscribe the cores."""
    if "num-threads" in node_config:
        raw, where = node_config["num-threads"], "node config 'num-threads'"
    else:
        raw, where = os.environ.get(NUM_THREADS_ENV, "0"), f"${NUM_THREADS_ENV}"
    try:
        threads = int(str(raw).strip() or 0)
    except ValueError:
        threads = -1
    if threads < 0 or isinstance(raw, bool | float):
        raise ValueError(f"{where} = {raw!r}: must be a whole number of threads >= 0 "
                         "(0 = torch's default)")
    return threads


def apply_thread_setting(node_config: Mapping[str, Any]) -> int:
    """Set torch's intra-op threads from :func:`thread_setting`; returns the count in use."""
    threads = thread_setting(node_config)
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("%s: torch uses %d thread(s) (num-threads)", site_name(node_config),
                    threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class SiteIdentity:
    """Who this site is and where its files are, from the node config."""

    name: str
    partition_id: int
    num_partitions: int
    data_dir: Path
    partition: str  # "dirichlet" / "site" (simulation: whole set) or "folder" (own folder)
    output_dir: Path
    previous_output_dir: Path | None = None  # the run resumed from, where its files are

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], settings: Settings,
                         run_id: int) -> SiteIdentity:
        pid = int(node_config.get("partition-id", 0))
        own_folder = str(node_config.get("data-dir", ""))
        partition = "folder" if own_folder else settings.partition.name
        data_dir = resolve_data_dir(own_folder or settings.dataset.data_dir)
        name = site_name(node_config)
        if node_config.get("output-dir"):
            output = Path(str(node_config["output-dir"]))
        elif settings.site_output_dir:
            output = Path(settings.site_output_dir) / name
        else:
            output = resolve_results_dir(settings.results_dir, run_id) / "sites" / name
        num = int(node_config.get("num-partitions", settings.partition.num_partitions))
        previous = None
        if settings.resume_from and not node_config.get("output-dir") \
                and not settings.site_output_dir:
            previous = (Path(settings.resume_from) / "sites" / name).expanduser().resolve()
        return cls(name, pid, num, data_dir, partition, output.expanduser().resolve(), previous)


class Site:
    """Data, model, training and storage of one site for one run."""

    def __init__(self, settings: Settings, identity: SiteIdentity, device: torch.device) -> None:
        self.settings = settings
        self.identity = identity
        self.device = device
        identity.output_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_run(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                run_id: int) -> Site:
        """The site a SuperNode's ``--node-config`` describes, in the run ``run_config``."""
        settings = Settings.from_run_config(run_config)
        identity = SiteIdentity.from_node_config(dict(node_config), settings, run_id)
        return cls(settings, identity, resolve_device(settings.device))

    # ------------------------------------------------------------------ simulated bad site
    def attack_kind(self) -> str:
        """What this site does wrong in this run ("none" for an honest site): the
        ``attack.*`` settings name it by partition id, and only simulated partitions
        apply them (a site reading its own data folder never does)."""
        a, ident = self.settings.attack, self.identity
        if a.active and ident.partition != "folder" and ident.partition_id == a.site:
            return a.kind
        return "none"

    def _training_records(self, records: list) -> list:
        kind = self.attack_kind()
        if kind in ("label-noise", "label-permutation"):
            logger.warning("%s: SIMULATED BAD SITE: %s", self.identity.name,
                           self.settings.attack.describe())
            return attack_training_records(
                records, kind, fraction=self.settings.attack.fraction,
                num_classes=self.settings.model.num_classes, seed=self.settings.seed)
        return records

    # ------------------------------------------------------------------ data
    def loader(self, split: str) -> Any:
        """The "train" or "test" (held-out) loader of this site, built on first use and
        cached per process (a deployed ClientApp process only builds what it needs)."""
        s, ident = self.settings, self.identity
        key = (str(ident.data_dir), ident.partition, ident.partition_id, ident.num_partitions,
               s.partition.beta, s.seed, s.dataset.test_fraction, s.partition.min_partition_size,
               s.dataset.image_size, s.training.batch_size, s.dataset.on_error)
        kind = self.attack_kind()  # a simulated bad site may train on wrong labels
        wrong = (kind, s.attack.fraction) if kind.startswith("label-") else ("none", 0.0)
        sampling = (s.training.balanced_sampling, s.training.sampling_power,
                    s.training.balance_min_count, s.training.random_crop_scale) \
            if split == "train" else ()
        if (key, split, wrong, sampling) not in _LOADERS:
            if key not in _SPLITS:
                _SPLITS[key] = load_site_split(
                    ident.data_dir, partition=ident.partition, partition_id=ident.partition_id,
                    num_partitions=ident.num_partitions, beta=s.partition.beta, seed=s.seed,
                    test_fraction=s.dataset.test_fraction,
                    min_partition_size=s.partition.min_partition_size,
                    on_error=s.dataset.on_error)
            records = _SPLITS[key][0 if split == "train" else 1]
            if split == "train":
                records = self._training_records(records)
            _LOADERS[(key, split, wrong, sampling)] = make_loader(
                records, s.dataset.image_size, train=split == "train",
                balanced=split == "train" and s.training.balanced_sampling,
                sampling_power=s.training.sampling_power,
                balance_min_count=s.training.balance_min_count,
                crop_scale=s.training.random_crop_scale,
                batch_size=s.training.batch_size, num_workers=s.training.num_workers,
                cache=image_cache_dir() if s.dataset.cache else False, seed=s.seed,
                on_error=s.dataset.on_error)
        return _LOADERS[(key, split, wrong, sampling)]

    # ------------------------------------------------------------------ model
    def new_model(self) -> nn.Module:
        """The run's initial model, as the server builds it (same seed, same pretrained
        weights)."""
        torch.manual_seed(self.settings.seed)
        model = build_model(self.settings.model.backbone,
                            num_classes=self.settings.model.num_classes,
                            pretrained=self.settings.model.pretrained_source)
        return prepare_for_device(model, self.device)

    def _skeleton(self) -> nn.Module:
        """The model's structure on the meta device: no memory, no initialisation."""
        with torch.device("meta"):
            return build_model(self.settings.model.backbone,
                               num_classes=self.settings.model.num_classes)

    def _fill(self, skeleton: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
        """``skeleton`` given ``values`` for every tensor of its state_dict (in its
        dtypes): no weight is initialised, or loaded pretrained, only to be overwritten
        (building the small model costs 0.4 s on a busy 2-core CPU, the skeleton 0.1 s)."""
        dtypes = {k: v.dtype for k, v in skeleton.state_dict().items()}
        skeleton.load_state_dict({k: v.to(dtypes[k]) for k, v in values.items()},
                                 strict=True, assign=True)
        if any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
            raise RuntimeError("a tensor outside the state_dict stayed on the meta device")
        return prepare_for_device(skeleton, self.device)

    def assemble(self, received: dict[str, torch.Tensor], personalized: set[str],
                 local: dict[str, torch.Tensor] | None, server_round: int = 1) -> nn.Module:
        """The site's model: global values for what the server sent, its own (``local``,
        its last trained weights) for the rest.

        A site with no local weights at all (its first round in this run) starts its
        personalized layers from the initial model, which it builds itself from the same
        seed as the server; local weights that lack a personalized key are an error.
        """
        skeleton = self._skeleton()
        state = skeleton.state_dict()
        name = self.identity.name
        unknown = sorted(set(received) - set(state))
        if unknown:
            raise ValueError(f"{name}: the server sent keys this model lacks "
                             f"({unknown[:5]}); do server and site use the same backbone?")
        own_keys = [k for k in state if k not in received]
        own = {k: local[k] for k in own_keys if k in local} if local is not None else {}
        missing = [k for k in own_keys if k not in own]
        if local is not None and any(is_personalized(k, personalized) for k in missing):
            raise RuntimeError(
                f"{name}: personalized weights for {missing[:5]} are not in its local "
                f"weights ({self.local_state_path}); was it trained with another backbone?")
        if missing:  # what neither the server nor the site has: initial values
            initial = self.new_model().state_dict()
            own.update({k: initial[k] for k in missing})
        fresh = sorted({layer_of(k) for k in missing if is_personalized(k, personalized)})
        if fresh:
            logger.log(logging.WARNING if server_round > 1 else logging.INFO,
                       "%s round %s: no local weights in %s yet: personalized layers %s start "
                       "from the initial model%s", name, server_round, self.local_state_path,
                       fresh[:5], "" if server_round <= 1 else
                       " (a site new to this run, or its output folder was lost)")
        received = {**received, **own}
        return self._fill(skeleton, {k: received[k] for k in state})

    def train(self, model: nn.Module, shared_keys: set[str], server_round: int,
              proximal_mu: float, class_totals: list[int] | None = None
              ) -> tuple[TrainStats, float, int]:
        """One round of local training (Eq. 7); returns the stats, the lr and the size of
        the local training set. ``shared_keys`` are the parameters the proximal term
        anchors to their global values. ``class_totals`` (the federation's images per class,
        from the server) are what balanced sampling counts classes by when
        ``training.balance-over`` is "federation"."""
        t = self.settings.training
        loader = self.loader("train")
        totals = self._sampling_totals(class_totals)
        if t.balanced_sampling:  # every round: the cached loader may hold another round's
            loader.sampler.weights = balanced_record_weights(
                loader.dataset.records, t.sampling_power, t.balance_min_count, totals)
        num_train = len(loader.dataset)
        logger.info("%s round %s: training on %d images", self.identity.name, server_round,
                    num_train)
        anchor = {k: v.detach().clone() for k, v in model.named_parameters() if k in shared_keys}
        by_round = t.lr_step_unit == "round"
        lr = lr_for_round(t.lr, server_round, t.lr_step_size, t.lr_gamma) if by_round else t.lr
        if t.lr_decay == "cosine":
            lr *= cosine_factor(server_round, self.settings.num_server_rounds)
        # Same shuffling and augmentation for this site and round whichever process runs it.
        round_seed = self.settings.seed * 1000 + server_round
        torch.manual_seed(round_seed)
        for generator in {id(g): g for g in (getattr(loader, "generator", None),
                                              getattr(loader.sampler, "generator", None))
                          if g is not None}.values():
            generator.manual_seed(round_seed)
        weights = class_weights(loader.dataset.records) if t.class_weighted_loss else None
        offsets = None
        if t.logit_adjustment > 0:
            prior = sampled_class_prior(loader.dataset.records, balanced=t.balanced_sampling,
                                        power=t.sampling_power,
                                        min_count=t.balance_min_count,
                                        num_classes=self.settings.model.num_classes,
                                        totals=totals)
            offsets = logit_offsets(prior, t.logit_adjustment)
        kept = self.load_optimizer_state() if t.keep_optimizer_state else None
        stats = train_local(
            model, loader, epochs=t.local_epochs, lr=lr, device=self.device,
            proximal_mu=proximal_mu, anchor=anchor, class_weights=weights,
            logit_offsets=offsets, max_batches=t.max_batches_per_epoch,
            equal_steps=t.equal_local_steps,
            frozen_bn_statistics=t.frozen_bn_statistics,
            lr_step_epochs=0 if by_round else t.lr_step_size, lr_gamma=t.lr_gamma,
            optimizer_name=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
            label_smoothing=t.label_smoothing,
            frozen_layers=frozen_layer_prefixes(t.frozen_layers, self.settings.model.backbone,
                                                self.settings.model.pretrained_source),
            optimizer_state=kept, label=f"{self.identity.name} round {server_round}")
        if kept is not None:
            self.save_optimizer_state(kept, server_round)
        return stats, lr, num_train

    def _sampling_totals(self, class_totals: list[int] | None) -> list[int] | None:
        """The class totals balanced sampling uses this round: the server's, where the
        settings balance over the federation and it sent them (from round 2 on)."""
        t = self.settings.training
        if not (t.balanced_sampling and t.balance_over == "federation"):
            return None
        if not class_totals:
            logger.info("%s: no class totals from the server yet (round 1): balancing over "
                        "this site's own counts", self.identity.name)
            return None
        num_classes = self.settings.model.num_classes
        if len(class_totals) != num_classes or any(c < 0 for c in class_totals):
            raise ValueError(f"the server's class totals {class_totals!r} are not "
                             f"{num_classes} counts >= 0 (model.num-classes)")
        logger.info("%s: balancing over the federation's images per class %s",
                    self.identity.name, list(class_totals))
        return list(class_totals)

    def train_class_counts(self) -> list[int]:
        """This site's number of training images per class (what its loader trains on)."""
        return class_counts(self.loader("train").dataset.records,
                            self.settings.model.num_classes)

    def feature_statistics(self, model: nn.Module, min_count: int) -> ClassFeatureStatistics:
        """Per class: count, mean and covariance of what ``model``'s head receives for this
        site's training images, seen as at evaluation (no augmentation, each image once);
        a class with fewer than ``min_count`` images is left out (count 0)."""
        train = self.loader("train").dataset
        plain = ImageDataset(train.records, train.image_size,
                             build_transform(train.image_size, train=False), train.images)
        loader = torch.utils.data.DataLoader(plain, batch_size=128, shuffle=False)
        features, labels = head_inputs(model, loader, self.device, CLASSIFIER_LAYER)
        stats = class_feature_statistics(features, labels, self.settings.model.num_classes,
                                         min_count)
        left_out = [CLASSES[c] if c < len(CLASSES) else str(c)
                    for c, n in enumerate(self.train_class_counts()) if 0 < n < min_count]
        logger.info("%s: feature statistics of %d training images for head calibration%s",
                    self.identity.name, len(labels), f" (classes with fewer than {min_count} "
                    f"images not reported: {', '.join(left_out)})" if left_out else "")
        return stats

    def model_info(self) -> dict[str, Any]:
        return {"backbone": self.settings.model.backbone,
                "image_size": self.settings.dataset.image_size,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    # ------------------------------------------------------------------ disk
    @property
    def local_state_path(self) -> Path:
        return self.identity.output_dir / LOCAL_STATE_FILE

    def save_local_state(self, state: dict[str, torch.Tensor], server_round: int) -> None:
        atomic_torch_save({"round": server_round, "state_dict": state}, self.local_state_path)

    def _own_file(self, name: str) -> Path | None:
        """This site's file ``name``: in its output folder, else in the run it resumes."""
        for folder in (self.identity.output_dir, self.identity.previous_output_dir):
            if folder is not None and (folder / name).is_file():
                return folder / name
        return None

    def load_local_state(self) -> dict[str, torch.Tensor] | None:
        path = self._own_file(LOCAL_STATE_FILE)
        if path is None:
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("%s: restored local weights of round %s from %s", self.identity.name,
                    blob["round"], path)
        return blob["state_dict"]

    def save_optimizer_state(self, snapshot: dict[str, Any], server_round: int) -> None:
        """This site's local optimizer after ``server_round`` (training.keep-optimizer-state)."""
        atomic_torch_save({"round": server_round, **snapshot},
                          self.identity.output_dir / OPTIMIZER_STATE_FILE)

    def load_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state this site kept (from this run or the run it resumes); an
        empty dict when there is none yet: the optimizer then starts afresh."""
        path = self._own_file(OPTIMIZER_STATE_FILE)
        if path is None:
            return {}
        blob = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("%s: continuing the local optimizer of round %s from %s",
                    self.identity.name, blob.pop("round", "?"), path)
        return blob

    def save_personalized_list(self, keys: list[str]) -> None:
        """The state_dict keys this site keeps (never sent), for its personalized model."""
        atomic_write_json(self.identity.output_dir / PERSONALIZED_LIST_FILE, sorted(keys))

    def load_personalized_list(self) -> list[str]:
        path = self._own_file(PERSONALIZED_LIST_FILE)
        return json.loads(path.read_text()) if path is not None else []

    def save_personal_model(self, model: nn.Module, server_round: int,
                            metrics: dict[str, float]) -> Path:
        return save_model(self.identity.output_dir / PERSONAL_MODEL_FILE, model.state_dict(),
                          **self.model_info(), class_names=list(CLASSES), round=server_round,
                          kind="personalized", site=self.identity.name, metrics=metrics)
