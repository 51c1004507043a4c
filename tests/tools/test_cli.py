"""`fedlsc predict` and `fedlsc table` on files the tests make."""

from __future__ import annotations

import csv
import json

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
    from pathlib import Path

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
