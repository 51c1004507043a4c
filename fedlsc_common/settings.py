"""The Hydra configuration in ``conf/`` <-> Flower's flat run config, and typed settings.

``conf/`` is the one source of truth for every hyper-parameter. Flower wants flat scalar
values with kebab-case keys; nested groups become dotted keys (``strategy.proximal-mu``),
flattened and unflattened by Flower's own ``flatten_dict``/``unflatten_dict`` and written
as TOML by ``tomli_w`` (:func:`run_config_toml`, :func:`pyproject_section`).
``python -m fedlsc_common.settings`` prints the pyproject section generated from
``conf/``; a test checks they agree.

Where things are on a machine (not hyper-parameters) is resolved here too, and only here:
the data folder (:func:`resolve_data_dir`), the decoded-image cache
(:func:`image_cache_dir`) and the project checkout (:func:`project_root`).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w
from flwr.common.config import flatten_dict, unflatten_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says what to change."""


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The Hydra configuration with ``overrides`` (Hydra syntax), as a plain nested dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _keys_to(cfg: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    return {str(k).replace(old, new): _keys_to(v, old, new) if isinstance(v, Mapping) else v
            for k, v in cfg.items()}


def to_run_config(cfg: Mapping[str, Any]) -> dict[str, Scalar]:
    """Nested snake_case config -> Flower's flat run config (dotted kebab-case keys)."""
    try:
        return flatten_dict(_keys_to(cfg, "_", "-"))
    except ValueError as err:
        raise ConfigError(f"config cannot be a Flower run config: {err}") from None


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's flat run config -> nested snake_case dict (inverse of :func:`to_run_config`)."""
    return _keys_to(unflatten_dict(dict(run_config)), "-", "_")


def run_config_toml(run_config: Mapping[str, Any]) -> str:
    """A run-config file for ``flwr run --run-config FILE``: groups as TOML tables."""
    return tomli_w.dumps(unflatten_dict(dict(run_config)))


def pyproject_section(cfg: Mapping[str, Any]) -> str:
    """The ``[tool.flwr.app.config]`` TOML text for the nested config ``cfg``."""
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": _keys_to(cfg, "_", "-")}}}})


# --------------------------------------------------------------------- typed settings
@dataclass(frozen=True)
class StrategySettings:
    name: str
    temperature: float
    personalized_ratio: float
    proximal_mu: float
    granularity: str
    max_update_norm_ratio: float
    update_dtype: str
    agreement_k: float
    agreement_min_gap: float
    agreement_rounds: int
    disagreeing_weight: float
    class_weighted_head: bool
    server_learning_rate: float
    num_malicious_nodes: int
    num_nodes_to_select: int
    trim_beta: float


@dataclass(frozen=True)
class DatasetSettings:
    name: str
    data_dir: str
    image_size: int
    test_fraction: float
    on_error: str
    cache: bool


@dataclass(frozen=True)
class PartitionSettings:
    name: str
    num_partitions: int
    beta: float
    min_partition_size: int


@dataclass(frozen=True)
class ModelSettings:
    backbone: str
    pretrained: str
    num_classes: int

    @property
    def pretrained_source(self) -> bool | str:
        """``pretrained`` for :func:`fedlsc_flwr.model.build_model`: False, True or a path."""
        return {"false": False, "": False, "true": True}.get(self.pretrained.lower(),
                                                            self.pretrained)


#: The local optimizers (``training.optimizer``): Adam (the paper's), AdamW (decoupled
#: weight decay), SGD with ``training.momentum``.
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class TrainingSettings:
    local_epochs: int
    batch_size: int
    lr: float
    lr_step_size: int
    lr_step_unit: str
    lr_gamma: float
    lr_decay: str
    max_batches_per_epoch: int
    equal_local_steps: bool
    frozen_bn_statistics: bool
    class_weighted_loss: bool
    balanced_sampling: bool
    sampling_power: float
    balance_min_count: int
    balance_over: str
    logit_adjustment: float
    optimizer: str
    momentum: float
    weight_decay: float
    label_smoothing: float
    random_crop_scale: float
    frozen_layers: str
    keep_optimizer_state: bool
    num_workers: int


@dataclass(frozen=True)
class CalibrationSettings:
    """Head calibration after the last round (``fedlsc_flwr.calibration``)."""

    enabled: bool
    min_class_count: int
    samples_per_class: int
    steps: int
    lr: float
    draws: int


#: What a simulated bad site can do (``attack.kind``); see conf/attack/none.yaml.
ATTACK_KINDS = ("none", "label-noise", "label-permutation", "poison")


@dataclass(frozen=True)
class AttackSettings:
    """A simulated bad site (experiments only): which one, and what it does wrong."""

    kind: str
    site: int
    fraction: float
    scale: float

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        """One line for logs and summaries."""
        what = {"none": "none", "label-noise": f"{self.fraction:g} of its training labels "
                "shuffled", "label-permutation": "trains on a permuted label map",
                "poison": f"replies w_g − {self.scale:g}·(w_i − w_g)"}[self.kind]
        return "none" if not self.active else f"{self.kind} at partition {self.site}: {what}"


@dataclass(frozen=True)
class Settings:
    """Every hyper-parameter of a run; built from the run config, values from ``conf/``."""

    strategy: StrategySettings
    dataset: DatasetSettings
    partition: PartitionSettings
    model: ModelSettings
    training: TrainingSettings
    attack: AttackSettings
    calibration: CalibrationSettings
    num_server_rounds: int
    seed: int
    results_dir: str
    resume_from: str
    site_output_dir: str
    target_accuracies: str
    min_available_nodes: int
    min_train_nodes: int
    min_train_replies: int
    round_timeout: int
    wait_for_sites_seconds: int
    evaluate_every: int
    average_last_rounds: int
    device: str
    tensorboard: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """Typed settings; a missing, unknown or ill-typed key raises :class:`ConfigError`."""
        settings = _build(cls, from_run_config(run_config), "")
        settings.validate()
        return settings

    @classmethod
    def from_hydra(cls, overrides: Sequence[str] = ()) -> Settings:
        return cls.from_run_config(to_run_config(compose(overrides)))

    def to_run_config(self) -> dict[str, Scalar]:
        return to_run_config(dataclasses.asdict(self))

    def evaluates(self, true_round: int) -> bool:
        """Do the sites evaluate after this round? Every ``evaluate-every``-th round and
        the last one."""
        return true_round % self.evaluate_every == 0 or true_round >= self.num_server_rounds

    @property
    def targets(self) -> list[float]:
        return [float(t) for t in self.target_accuracies.split(",") if t.strip()]

    def build_strategy(self, **flower_kwargs: Any) -> Any:
        """The strategy these settings name (a ``fedlsc_flwr`` strategy); a hyper-parameter
        it refuses raises :class:`ConfigError` naming the run-config key."""
        from fedlsc_flwr.model import CLASSIFIER_LAYER
        from fedlsc_flwr.strategy import HyperParameterError, build_strategy

        s = self.strategy
        try:
            return build_strategy(
                s.name, temperature=s.temperature, personalized_ratio=s.personalized_ratio,
                proximal_mu=s.proximal_mu, head_layer=CLASSIFIER_LAYER, granularity=s.granularity,
                max_update_norm_ratio=s.max_update_norm_ratio, update_dtype=s.update_dtype,
                min_train_nodes=self.min_train_nodes,
                min_evaluate_nodes=self.min_train_nodes,
                min_available_nodes=self.min_available_nodes,
                min_train_replies=self.min_train_replies,
                agreement_k=s.agreement_k, agreement_min_gap=s.agreement_min_gap,
                agreement_rounds=s.agreement_rounds, disagreeing_weight=s.disagreeing_weight,
                class_weighted_head=s.class_weighted_head,
                server_learning_rate=s.server_learning_rate,
                share_class_totals=self.training.balanced_sampling
                and self.training.balance_over == "federation",
                num_malicious_nodes=s.num_malicious_nodes,
                num_nodes_to_select=s.num_nodes_to_select, trim_beta=s.trim_beta,
                **flower_kwargs)
        except HyperParameterError as err:
            key = "strategy." + err.name.replace("_", "-")
            raise ConfigError(f"run config '{key}' = {err.value!r}: must be {err.requirement}"
                              ) from None

    def validate(self) -> None:
        """Values that are well-typed but unusable: one clear line on what to change."""
        from fedlsc_flwr.model import BACKBONES
        from fedlsc_flwr.strategy import FLOWER_NAMES

        checks = [
            (self.model.backbone in BACKBONES, "model.backbone",
             f"one of {', '.join(BACKBONES)}"),
            (self.dataset.on_error in ("raise", "skip"), "dataset.on-error", "'raise' or 'skip'"),
            (self.dataset.image_size >= 16, "dataset.image-size", "at least 16"),
            (0 < self.dataset.test_fraction < 1, "dataset.test-fraction", "in (0, 1)"),
            (self.partition.name in ("dirichlet", "site", "folder"), "partition.name",
             "'dirichlet', 'site' or 'folder'"),
            (self.partition.num_partitions >= 1, "partition.num-partitions", "at least 1"),
            (self.partition.beta > 0, "partition.beta", "a number > 0"),
            (self.num_server_rounds >= 1, "num-server-rounds", "at least 1"),
            (self.training.local_epochs >= 1, "training.local-epochs", "at least 1"),
            (self.training.batch_size >= 1, "training.batch-size", "at least 1"),
            (self.training.lr > 0, "training.lr", "a number > 0"),
            (self.training.lr_step_size >= 1, "training.lr-step-size", "at least 1"),
            (self.training.lr_step_unit in ("local-epoch", "round"), "training.lr-step-unit",
             "'local-epoch' or 'round'"),
            (self.training.lr_decay in ("none", "cosine"), "training.lr-decay",
             "'none' or 'cosine'"),
            (0 <= self.training.sampling_power <= 1, "training.sampling-power", "in [0, 1]"),
            (self.training.balance_min_count >= 0, "training.balance-min-count",
             "at least 0 (0 = off)"),
            (self.training.balance_over in ("site", "federation"), "training.balance-over",
             "'site' or 'federation'"),
            (self.training.balance_over == "site" or self.strategy.name not in FLOWER_NAMES,
             "training.balance-over",
             "'site' with Flower's own fedavg/fedprox and the robust strategies (they do not "
             "pass the class totals on)"),
            (0 <= self.training.logit_adjustment <= 2, "training.logit-adjustment",
             "in [0, 2] (0 = off)"),
            (self.training.optimizer in OPTIMIZERS, "training.optimizer",
             f"one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.training.momentum < 1, "training.momentum", "in [0, 1)"),
            (self.training.weight_decay >= 0, "training.weight-decay", "at least 0"),
            (0 <= self.training.label_smoothing < 1, "training.label-smoothing", "in [0, 1)"),
            (0 < self.training.random_crop_scale <= 1, "training.random-crop-scale",
             "in (0, 1] (1 = off)"),
            (self.calibration.min_class_count >= 1, "calibration.min-class-count",
             "at least 1"),
            (self.calibration.samples_per_class >= 1, "calibration.samples-per-class",
             "at least 1"),
            (self.calibration.steps >= 1, "calibration.steps", "at least 1"),
            (self.calibration.lr > 0, "calibration.lr", "a number > 0"),
            (self.calibration.draws >= 1, "calibration.draws", "at least 1"),
            (self.min_train_nodes >= 1, "min-train-nodes", "at least 1"),
            (self.min_available_nodes >= self.min_train_nodes, "min-available-nodes",
             f"at least min-train-nodes ({self.min_train_nodes})"),
            (1 <= self.min_train_replies <= self.min_train_nodes, "min-train-replies",
             f"between 1 and min-train-nodes ({self.min_train_nodes})"),
            (self.round_timeout >= 1, "round-timeout", "at least 1 (seconds)"),
            (self.evaluate_every >= 1, "evaluate-every", "at least 1 (rounds)"),
            (self.average_last_rounds >= 1, "average-last-rounds", "at least 1 (1 = off)"),
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
             "'auto', 'cpu', 'cuda' or 'cuda:N'"),
            *self._attack_checks(),
        ]
        for ok, key, expected in checks:
            if not ok:
                value = _lookup(self, key)
                raise ConfigError(f"run config '{key}' = {value!r}: must be {expected}")
        self.build_strategy()  # the strategies check their own hyper-parameters
        try:
            _ = self.targets
        except ValueError:
            raise ConfigError(f"run config 'target-accuracies' = {self.target_accuracies!r}: "
                              "must be comma-separated numbers, e.g. '0.7,0.8'") from None


    def _attack_checks(self) -> list[tuple[bool, str, str]]:
        a = self.attack
        return [
            (a.kind in ATTACK_KINDS, "attack.kind", "one of " + ", ".join(ATTACK_KINDS)),
            (not a.active or 0 <= a.site < self.partition.num_partitions, "attack.site",
             f"a partition id in [0, {self.partition.num_partitions - 1}]"),
            (a.kind != "label-noise" or 0 < a.fraction <= 1, "attack.fraction", "in (0, 1]"),
            (a.kind != "poison" or a.scale > 0, "attack.scale", "a number > 0"),
        ]


def project_root() -> Path | None:
    """The source checkout to run: $FEDLSC_PROJECT_DIR, else the one this package was
    installed from (editable installs), if any.

    Flower runs apps from a copy under FLWR_HOME, so ``__file__`` does not say where the
    checkout is; pip's ``direct_url.json`` does.
    """
    import importlib.metadata
    import json
    import os
    from urllib.parse import unquote, urlparse

    if os.environ.get("FEDLSC_PROJECT_DIR"):  # another checkout than the installed one
        return Path(os.environ["FEDLSC_PROJECT_DIR"]).resolve()
    try:
        text = importlib.metadata.distribution("fedlsc-flwr").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    url = json.loads(text).get("url", "")
    return Path(unquote(urlparse(url).path)) if url.startswith("file://") else None


def resolve_data_dir(setting: str) -> Path:
    """The HAM10000 folder: the setting, else $FEDLSC_DATA_DIR, else ../shared/data/ham10000
    beside the project checkout."""
    import os

    if setting:
        path = Path(setting).expanduser()
        if not path.is_dir():
            raise ConfigError(f"dataset.data-dir = {setting!r}: no such folder")
        return path.resolve()
    candidates = []
    if os.environ.get("FEDLSC_DATA_DIR"):
        candidates.append(Path(os.environ["FEDLSC_DATA_DIR"]))
    if (root := project_root()) is not None:
        candidates.append(root.parent / "shared" / "data" / "ham10000")
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise ConfigError("no HAM10000 folder found: set run config 'dataset.data-dir' or "
                      "FEDLSC_DATA_DIR (looked in: " + ", ".join(map(str, candidates)) + ")")


def image_cache_dir() -> Path:
    """Decoded images at training size, shared by runs on this machine (keyed by content):
    $FEDLSC_CACHE_DIR, else ~/.cache/fedlsc-flwr."""
    import os

    return Path(os.environ.get("FEDLSC_CACHE_DIR", Path.home() / ".cache" / "fedlsc-flwr"))


def resolve_results_dir(setting: str, run_id: int) -> Path:
    """``results-dir``, or ``results/run-<run id>`` under the working directory."""
    return Path(setting).expanduser().resolve() if setting else (
        Path.cwd() / "results" / f"run-{run_id}").resolve()


def _lookup(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part.replace("-", "_"))
    return node


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{where}{close[0].replace('_', '-')}'?)" if close else ""
        raise ConfigError(f"run config has unknown key '{where}{key.replace('_', '-')}'{hint}")
    kwargs = {}
    for name in names:
        key = f"{where}{name.replace('_', '-')}"
        if name not in values:
            raise ConfigError(f"run config is missing key '{key}'")
        hint = hints[name]
        value = values[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"run config '{key}' must be a group of keys")
            kwargs[name] = _build(hint, value, key + ".")
            continue
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(
                f"run config '{key}' = {value!r}: expected {hint.__name__}, "
                f"got {type(value).__name__}")
        kwargs[name] = value
    return cls(**kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the ``[tool.flwr.app.config]`` section generated from ``conf/``."""
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(pyproject_section(compose(args)))


if __name__ == "__main__":
    main()
