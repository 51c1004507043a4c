"""conf/ (Hydra) is the one source of truth: pyproject agrees with it, settings are typed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedlsc_common.settings import (
    ConfigError,
    Settings,
    compose,
    from_run_config,
    pyproject_section,
    to_run_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_is_generated_from_conf():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower_view = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert flower_view == to_run_config(compose()), (
        "pyproject's [tool.flwr.app.config] differs from conf/: regenerate it with "
        "`python -m fedlsc_common.settings`")
    section = tomllib.loads(pyproject_section(compose()))
    assert flatten_dict(section["tool"]["flwr"]["app"]["config"]) == flower_view


def test_run_config_round_trip():
    flat = to_run_config(compose())
    settings = Settings.from_run_config(flat)
    assert settings.to_run_config() == flat
    assert from_run_config(flat)["strategy"]["proximal_mu"] == settings.strategy.proximal_mu
    assert settings.strategy.name == "fedlsc" and settings.partition.num_partitions == 3


def test_paper_experiment_and_group_switches():
    paper = Settings.from_hydra(["+experiment=paper"])
    assert paper.num_server_rounds == 50
    assert paper.training.lr == pytest.approx(1e-4)
    assert paper.model.backbone == "res2net50_sa"
    assert paper.model.pretrained_source is True  # ImageNet start, as in the paper
    assert paper.dataset.image_size == 224
    assert paper.strategy.temperature == pytest.approx(0.2)
    assert paper.strategy.personalized_ratio == pytest.approx(0.01)
    assert paper.strategy.proximal_mu == pytest.approx(0.001)
    natural = Settings.from_hydra(["partition=site", "strategy=fedavg-fc"])
    assert natural.partition.name == "site" and natural.partition.num_partitions == 4
    assert natural.strategy.name == "fedavg-fc"


@pytest.mark.parametrize("key, value, words", [
    ("strategy.temperature", 0.0, "'strategy.temperature' = 0.0: must be a number > 0"),
    ("strategy.personalized-ratio", 1.0, "'strategy.personalized-ratio' = 1.0: must be in [0, 1)"),
    ("strategy.name", "fedsgd", "'strategy.name' = 'fedsgd': must be one of fedlsc"),
    ("model.num-classes", "seven", "'model.num-classes' = 'seven': expected int"),
    ("min-available-nodes", 1, "'min-available-nodes' = 1: must be at least min-train-nodes"),
    ("target-accuracies", "high", "'target-accuracies'"),
    ("training.sampling-power", 2.0, "'training.sampling-power' = 2.0: must be in [0, 1]"),
    ("training.balance-min-count", -1, "'training.balance-min-count' = -1: must be at least 0"),
    ("training.logit-adjustment", -1.0, "'training.logit-adjustment' = -1.0: must be in [0, 2]"),
    ("training.balance-over", "world", "'training.balance-over' = 'world': must be 'site' or"),
    ("training.optimizer", "rmsprop", "'training.optimizer' = 'rmsprop': must be one of adam"),
    ("training.momentum", 1.0, "'training.momentum' = 1.0: must be in [0, 1)"),
    ("training.weight-decay", -0.1, "'training.weight-decay' = -0.1: must be at least 0"),
    ("training.label-smoothing", 1.0, "'training.label-smoothing' = 1.0: must be in [0, 1)"),
    ("training.random-crop-scale", 0.0, "'training.random-crop-scale' = 0.0: must be in (0, 1]"),
])
def test_bad_values_name_key_and_value(key, value, words):
    flat = to_run_config(compose())
    flat[key] = value
    with pytest.raises(ConfigError) as err:
        Settings.from_run_config(flat)
    assert words in str(err.value)


def test_balancing_over_the_federation_needs_a_strategy_that_passes_the_totals_on():
    flat = to_run_config(compose(["strategy=fedavg", "training.balance_over=federation"]))
    with pytest.raises(ConfigError, match="'training.balance-over' = 'federation': must be "
                                          "'site' with Flower's own fedavg"):
        Settings.from_run_config(flat)
    fedlsc = Settings.from_run_config(to_run_config(compose(["training.balance_over=federation"])))
    assert fedlsc.build_strategy().share_class_totals
    assert not Settings.from_run_config(to_run_config(compose())).build_strategy(
        ).share_class_totals


def test_unknown_and_missing_keys():
    flat = to_run_config(compose())
    flat["strategy.temprature"] = 1.0
    with pytest.raises(ConfigError, match="unknown key 'strategy.temprature' "
                                          r"\(did you mean 'strategy.temperature'\?\)"):
        Settings.from_run_config(flat)
    flat = to_run_config(compose())
    del flat["seed"]
    with pytest.raises(ConfigError, match="missing key 'seed'"):
        Settings.from_run_config(flat)


def test_ints_are_accepted_for_floats():
    flat = to_run_config(compose())
    flat["strategy.temperature"] = 2
    assert Settings.from_run_config(flat).strategy.temperature == 2.0


def test_project_dir_can_point_at_another_checkout(tmp_path, monkeypatch):
    from fedlsc_common.settings import project_root

    monkeypatch.setenv("FEDLSC_PROJECT_DIR", str(tmp_path))
    assert project_root() == tmp_path.resolve()
    monkeypatch.delenv("FEDLSC_PROJECT_DIR")
    assert project_root() != tmp_path.resolve()
