"""The GPU lease driver's summary reads each site's own training log lines and the
server's metrics rows back, round by round; the recipe presets compose."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fedlsc_common.settings import Settings

_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "gpu_runs", _ROOT / "benchmarks" / "device" / "gpu_runs.py")
gpu_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_runs)


def test_preset_summary_pairs_site_speeds_with_their_round(tmp_path):
    log = tmp_path / "preset.log"
    log.write_text(
        "INFO :      site-1 round 1: trained 1 epoch(s), 3389 images in 8.7 s "
        "(389.5 images/s), loss 1.9, accuracy 0.3\n"
        "INFO :      site-0 round 2: trained 1 epoch(s), 4141 images in 10.4 s "
        "(398.2 images/s), loss 1.1, accuracy 0.6\n")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(row) for row in [
        {"round": 1, "round-seconds": 51.2, "train-seconds-max": 8.7,
         "global": {"accuracy": 0.6723, "balanced-accuracy": 0.1513}},
        {"round": 2, "round-seconds": 29.0, "train-seconds-max": 10.4,
         "global": {"accuracy": 0.6912, "balanced-accuracy": 0.1895}}]) + "\n")
    table = gpu_runs.summarise_preset(metrics, log).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| 1 | 51.2 | 8.7 | site-1 390 (3389 img, 8.7 s) | 0.6723 |")
    assert "site-0 398 (4141 img, 10.4 s)" in table[3] and "site-1" not in table[3]


def test_recipe_presets_compose():
    import sys
    sys.path.insert(0, str(_ROOT / "benchmarks"))
    import paper_table as pt

    lite = Settings.from_hydra([*pt.PRESETS["recipe-lite"], "strategy=fedlsc"])
    assert lite.model.backbone == "efficientnet_lite0_sa" and lite.dataset.image_size == 64
    assert lite.training.max_batches_per_epoch == 30 and lite.num_server_rounds == 3
    recipe = Settings.from_hydra(pt.PRESETS["recipe"])
    assert recipe == Settings.from_hydra(["evaluate_every=1"])  # conf's recipe, every round
    earlier = Settings.from_hydra(pt.PRESETS["recipe-4x1"])
    assert earlier.num_server_rounds == 4 and earlier.training.max_batches_per_epoch == 0
    assert earlier.model == recipe.model and earlier.training.lr == recipe.training.lr


def test_recipe_screen_summary_names_unfinished_runs_and_averages_finished_ones(tmp_path):
    # variant a: seed 0 finished (0.5), seed 1 stopped after round 2 (0.4); variant b: none.
    for seed, rows, done in ((0, [(1, 0.3), (2, 0.5)], True), (1, [(1, 0.2), (2, 0.4)], False)):
        results = tmp_path / "a" / f"seed{seed}" / "results"
        results.mkdir(parents=True)
        (results / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"round": r, "global": {"balanced-accuracy": v, "accuracy": 0.7}}) for r, v in rows))
        if done:
            (results / "summary.json").write_text("{}")
    table, rows = gpu_runs.summarise_recipes(tmp_path, {"a": ["training.lr=0.001"], "b": []},
                                             [0, 1])
    assert "| a | training.lr=0.001 | 0.500 | 0.400 (round 2) | 0.500 (1) |" in table
    assert "| b | (main job) | – | – | – |" in table
    assert [(r["variant"], r["seed"], r["finished"]) for r in rows] == [
        ("a", 0, True), ("a", 1, False), ("b", 0, False), ("b", 1, False)]
    assert rows[1]["balanced_accuracy"] == {1: 0.2, 2: 0.4}


def test_recipe_screen_summary_shows_the_final_model_where_it_scored_otherwise(tmp_path):
    results = tmp_path / "a" / "seed0" / "results"
    results.mkdir(parents=True)
    (results / "metrics.jsonl").write_text(json.dumps(
        {"round": 1, "global": {"balanced-accuracy": 0.5, "accuracy": 0.7}}))
    (results / "summary.json").write_text(json.dumps(
        {"final": {"global": {"balanced-accuracy": 0.55}}}))
    table, rows = gpu_runs.summarise_recipes(tmp_path, {"a": []}, [0])
    assert "| a | (main job) | 0.500 → 0.550 | 0.550 (1) |" in table
    assert rows[0]["final_balanced_accuracy"] == 0.55


def test_recipe_screen_variants_compose():
    variants = json.loads((_ROOT / "benchmarks" / "device" / "recipe_screen.json").read_text())
    variants.update(json.loads(
        (_ROOT / "benchmarks" / "device" / "recipe_screen_2.json").read_text()))
    variants.update(json.loads(
        (_ROOT / "benchmarks" / "device" / "recipe_final_model.json").read_text()))
    for overrides in variants.values():
        Settings.from_hydra(overrides)  # raises on a key or value that does not exist
