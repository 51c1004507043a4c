"""`fedlsc predict` and `fedlsc table` on files the tests make."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedlsc_common.classes import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from fedlsc_common.storage import save_model
from fedlsc_flwr.model import build_model
from fedlsc_tools.cli import main, markdown_table


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet10t_sa", num_classes=7)
    return save_model(tmp_path / "global_model.pt", model.state_dict(), backbone="resnet10t_sa",
                      class_names=list(CLASSES), image_size=32, mean=list(IMAGENET_MEAN),
                      std=list(IMAGENET_STD), kind="global")


def test_predict_writes_isic_submission(tmp_path, model_file):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["ISIC_0034524", "ISIC_0034525", "nested/ISIC_0034526"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            images / f"{name}.jpg")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(model_file), "--images", str(images),
                 "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert sorted(r[0] for r in rows[1:]) == ["ISIC_0034524", "ISIC_0034525", "ISIC_0034526"]
    for row in rows[1:]:
        probs = np.array(row[1:], dtype=float)
        assert probs.min() >= 0 and probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_predict_column_order_follows_class_names(tmp_path, model_file):
    """MEL must be the model's 'mel' output, whatever index that has."""
    image_dir = tmp_path / "one"
    image_dir.mkdir()
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image_dir / "x.jpg")
    blob = torch.load(model_file, weights_only=True)
    blob["state_dict"]["classifier.bias"] = torch.tensor([0, 0, 0, 0, 50.0, 0, 0])  # 'mel'
    blob["state_dict"]["classifier.weight"].zero_()
    torch.save(blob, model_file)
    out = tmp_path / "p.csv"
    main(["predict", "--model", str(model_file), "--images", str(image_dir), "--out", str(out)])
    row = list(csv.DictReader(out.open()))[0]
    assert float(row["MEL"]) > 0.99


def test_predict_errors_name_the_path(tmp_path, model_file, capsys):
    assert main(["predict", "--model", str(tmp_path / "none.pt"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "o.csv")]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_file), "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "o.csv")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_table_gives_mean_and_std_over_seeds(tmp_path):
    for seed, acc in enumerate([0.5, 0.7]):
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({
            "strategy": "fedlsc", "config": {"partition.name": "dirichlet"},
            "final": {"global": {"accuracy": acc, "balanced-accuracy": acc / 2},
                      "personalized": {"site-mean-balanced-accuracy": 0.4}},
            "bytes_per_round": {"train-sent": 2**20, "train-received": 2**20}}))
    table = markdown_table([json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
                            for i in range(2)])
    assert "| fedlsc | dirichlet | 2 | 60.00 ± 14.14 | 30.00 ± 7.07 |" in table
    assert table.strip().endswith("| 2.0 |")


def test_partitions_plot_of_the_real_sites(tmp_path, capsys):
    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000"
    if not data.is_dir():
        pytest.skip("real HAM10000 data not found")
    out = tmp_path / "sites.png"
    assert main(["partitions", "--data-dir", str(data), "--partition", "site",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "vidir_molemax" in printed and printed.count("\n") >= 5
    totals = {line.split()[0]: int(line.split()[-1]) for line in printed.splitlines()[1:5]}
    assert totals == {"rosendahl": 2259, "vidir_modern": 3363, "vidir_molemax": 3954,
                      "vienna_dias": 439}


# --------------------------------------------------------------------------- run
def _settings_of(overrides):
    """The Settings a run gets: conf's run config (pyproject's) with these overrides."""
    from flwr.common.config import parse_config_args

    from fedlsc_common.settings import Settings, compose, to_run_config

    run_config = to_run_config(compose())
    run_config.update(parse_config_args([" ".join(overrides)]))
    return Settings.from_run_config(run_config)


def test_run_sizes_the_federation_from_the_site_partition():
    from fedlsc_tools.cli import federation_run_config, flwr_run_command

    count, overrides = federation_run_config(["partition.name='site'"], None)
    assert count == 4
    settings = _settings_of(overrides)
    assert settings.partition.name == "site" and settings.partition.num_partitions == 4
    assert settings.min_available_nodes == settings.min_train_nodes == 4
    command = flwr_run_command(Path("/app"), overrides, num_supernodes=count)
    assert "num-supernodes=4 client-resources-num-cpus=1" in command


def test_run_keeps_what_the_user_gave():
    from fedlsc_tools.cli import federation_run_config

    count, overrides = federation_run_config(
        ["min-train-nodes=2 strategy.name='fedavg'", "num-server-rounds=7"], 5)
    settings = _settings_of(overrides)
    assert count == 5 and settings.partition.num_partitions == 5
    assert (settings.min_available_nodes, settings.min_train_nodes) == (5, 2)
    assert settings.strategy.name == "fedavg" and settings.num_server_rounds == 7
    one, overrides = federation_run_config([], 1)  # one site: at most one usable reply
    assert one == 1 and _settings_of(overrides).min_train_replies == 1
    default, overrides = federation_run_config([], None)  # conf's Dirichlet split: 3 sites
    assert default == 3 and _settings_of(overrides).min_available_nodes == 3


def test_run_reads_a_toml_run_config(tmp_path):
    from fedlsc_tools.cli import federation_run_config

    toml = tmp_path / "mine.toml"
    toml.write_text("[partition]\nname = 'site'\n[strategy]\ntemperature = 0.5\n")
    count, overrides = federation_run_config([str(toml)], None)
    settings = _settings_of(overrides)
    assert count == 4 and settings.strategy.temperature == 0.5


def test_run_refuses_a_federation_that_cannot_work(capsys):
    from fedlsc_tools.cli import federation_run_config

    with pytest.raises(ValueError, match="'site' has 4 sites"):
        federation_run_config(["partition.name='site'"], 3)
    with pytest.raises(ValueError, match="partition.name' = 'nope': must be one of"):
        federation_run_config(["partition.name='nope'"], None)
    assert main(["run", "--run-config", "partition.name='site'", "--num-supernodes", "3"]) == 2
    assert "fedlsc run: error: --num-supernodes 3" in capsys.readouterr().err


def _write_finished_run(results: Path) -> None:
    """What a finished run leaves for `fedlsc run`'s last line: summary.json."""
    results.mkdir(exist_ok=True)
    (results / "summary.json").write_text(json.dumps({
        "rounds": 1, "final": {"global": {"balanced-accuracy": 0.5, "accuracy": 0.6},
                               "personalized": {"balanced-accuracy": 0.4}}}))


def test_cmd_run_passes_the_derived_federation_to_flwr(tmp_path, monkeypatch, capsys):
    import fedlsc_tools.cli as cli

    called = {}

    def fake_simulate(project, overrides, *, num_supernodes, cpus_per_client):
        called.update(project=project, overrides=overrides, num_supernodes=num_supernodes,
                      cpus_per_client=cpus_per_client)
        _write_finished_run(tmp_path / "out")
        return 0

    monkeypatch.setattr(cli, "simulate", fake_simulate)
    assert main(["run", "--results-dir", str(tmp_path / "out"), "--project", str(tmp_path),
                 "--run-config", "partition.name='site' results-dir='/elsewhere'"]) == 0
    assert called["num_supernodes"] == 4
    assert called["cpus_per_client"] == cli.cpus_per_client_for(4, os.cpu_count() or 1)
    settings = _settings_of(called["overrides"])
    assert settings.results_dir == str(tmp_path / "out")  # --results-dir wins
    assert settings.min_available_nodes == 4
    assert "balanced accuracy of the global model: 0.5000" in capsys.readouterr().out


def test_cpus_per_client_shares_the_cores_or_gives_each_site_all_of_them():
    from fedlsc_tools.cli import cpus_per_client_for

    assert cpus_per_client_for(3, 2) == 2  # fewer cores than sites: they take turns
    assert cpus_per_client_for(3, 1) == 1
    assert cpus_per_client_for(3, 16) == 5  # at least as many: an equal share each
    assert cpus_per_client_for(4, 4) == 1
    assert cpus_per_client_for(1, 8) == 8
    with pytest.raises(ValueError, match="0 SuperNode"):
        cpus_per_client_for(0, 2)


def test_cmd_run_passes_the_cpus_asked_for_and_refuses_negative(tmp_path, monkeypatch,
                                                                 capsys):
    import fedlsc_tools.cli as cli

    called = {}

    def fake_simulate(project, overrides, *, num_supernodes, cpus_per_client):
        called["cpus"] = cpus_per_client
        _write_finished_run(tmp_path / "out")
        return 0

    monkeypatch.setattr(cli, "simulate", fake_simulate)
    args = ["run", "--results-dir", str(tmp_path / "out"), "--project", str(tmp_path)]
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 4)
    assert main([*args, "--cpus-per-client", "3"]) == 0
    assert called["cpus"] == 3
    assert main([*args, "--cpus-per-client", "-1"]) == 2
    assert "--cpus-per-client -1: must be 0" in capsys.readouterr().err
    assert main([*args, "--cpus-per-client", "5"]) == 2
    assert "up to this machine's 4" in capsys.readouterr().err
    command = cli.flwr_run_command(Path("/app"), [], num_supernodes=3, cpus_per_client=2)
    assert "num-supernodes=3 client-resources-num-cpus=2" in command


def test_cmd_run_stops_the_local_superlink_it_started_and_no_other(tmp_path, monkeypatch,
                                                                   capsys):
    """Stand-ins of Flower's detached local SuperLink: real processes whose command line
    reads like it, on a port of their own."""
    import fedlsc_tools.cli as cli

    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "45991")
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "flower-superlink",
               "--simulation", "--port", "45991"]
    already_there = subprocess.Popen(sleeper)
    started = []

    def fake_simulate(project, overrides, *, num_supernodes, cpus_per_client):
        started.append(subprocess.Popen(sleeper))
        time.sleep(0.3)  # its command line is readable from /proc
        _write_finished_run(tmp_path / "out")
        return 0

    monkeypatch.setattr(cli, "simulate", fake_simulate)
    time.sleep(0.3)
    try:
        args = ["run", "--results-dir", str(tmp_path / "out"), "--project", str(tmp_path)]
        assert main(args) == 0
        assert started[0].wait(timeout=10) == -signal.SIGTERM
        assert already_there.poll() is None
        assert f"stopping the local SuperLink this run started (pid {started[0].pid}" \
            in capsys.readouterr().out
        assert main([*args, "--keep-superlink"]) == 0
        time.sleep(0.5)
        assert started[1].poll() is None
    finally:
        for proc in (already_there, *started):
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["run", "predict", "partitions", "table", "keys", "certs"])
def test_every_command_explains_itself(command, capsys):
    from fedlsc_tools.cli import build_parser

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"fedlsc {command}" in text.split("examples:")[1]
    assert "``" not in text
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            if not action.required and action.default not in (None, [], ""):
                assert f"(default: {action.default}" in " ".join(text.split()), action.dest


def test_top_level_help_lists_commands_without_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "examples:" in text
    for command in ("run", "predict", "partitions", "table", "keys", "certs"):
        assert f"    {command}" in text


def test_predict_progress_bar_only_on_a_terminal(tmp_path, model_file, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(images / f"x{i}.jpg")
    for stderr, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        assert main(["predict", "--model", str(model_file), "--images", str(images),
                     "--out", str(tmp_path / "p.csv"), "--batch-size", "2"]) == 0
        assert ("fedlsc predict: 100%" in stderr.getvalue() and "3/3" in stderr.getvalue()) \
            == shown
        assert shown or "%|" not in stderr.getvalue()


def test_readme_shows_every_command_and_option():
    """README's "Command-line help" holds each command's help with every option in it."""
    from fedlsc_tools.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Command-line help")[1].split("\n## ")[0]
    assert "usage: fedlsc [-h] COMMAND ..." in section
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, sub in commands.items():
        block = section.split(f"<code>fedlsc {name} --help</code>")[1].split("</details>")[0]
        assert f"usage: fedlsc {name} " in block
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in block, f"README's 'fedlsc {name} --help' lacks {flag}"
