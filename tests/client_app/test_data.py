"""HAM10000 reading, bad inputs, lesion-grouped splits and partitions, loaders and caches.

Hermetic tests build tiny images in tmp_path; tests on the real set read
``../shared/data/ham10000`` (metadata and file names only) and skip when it is absent.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client_app import data
from client_app.data import (
    METADATA_FILE,
    DataError,
    Record,
    balanced_record_weights,
    balanced_sampler,
    class_weights,
    decode_images,
    logit_offsets,
    make_loader,
    read_ham10000,
    read_image_folder,
    read_records,
    sampled_class_prior,
    verify_images,
)
from client_app.partition import (
    dirichlet_partition,
    load_site_split,
    partition_records,
    site_partition,
    split_by_lesion,
)
from fedlsc_common.classes import CLASSES, IMAGENET_MEAN, IMAGENET_STD, ISIC_COLUMNS, ISIC_TO_CLASS
from fedlsc_tools.site_folders import export_site_folders, plot_label_distribution

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000"
needs_real = pytest.mark.skipif(
    not (REAL / METADATA_FILE).is_file(), reason=f"real HAM10000 not at {REAL}"
)
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    data._memory_cache.clear()
    yield
    data._memory_cache.clear()


def write_image(path: Path, color: tuple[int, int, int] | None = None, size=(20, 15)) -> Path:
    """A tiny RGB image: noise, or a solid colour (PNG keeps it exact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    else:
        image = Image.new("RGB", size, color)
    image.save(path)
    return path


def write_metadata(root: Path, rows: list[dict[str, str]], columns=COLUMNS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / METADATA_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root / METADATA_FILE


def synthetic_rows(n_lesions: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows with 1-3 images per lesion, skewed labels, two sites."""
    rng = random.Random(seed)
    rows = []
    for lesion in range(n_lesions):
        dx = rng.choices(CLASSES, weights=[3, 5, 10, 1, 10, 60, 2])[0]
        site = "site_b" if lesion % 3 == 0 else "site_a"
        for _ in range(rng.choice([1, 1, 2, 3])):
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion:07d}",
                    "image_id": f"ISIC_{len(rows):07d}",
                    "dx": dx,
                    "dx_type": "histo",
                    "age": "50.0",
                    "sex": "male",
                    "localization": "back",
                    "dataset": site,
                }
            )
    return rows


def make_ham(root: Path, rows: list[dict[str, str]], layout: str = "flat") -> Path:
    """A HAM10000 tree: flat ``images/`` or Dataverse ``HAM10000_images_part_{1,2}/``."""
    for i, row in enumerate(rows):
        folder = "images" if layout == "flat" else f"HAM10000_images_part_{1 + i % 2}"
        write_image(root / folder / f"{row['image_id']}.jpg")
    write_metadata(root, rows)
    return root


@pytest.fixture
def ham(tmp_path) -> Path:
    return make_ham(tmp_path / "ham", synthetic_rows(60))


def synthetic_records(n_lesions: int, seed: int = 0) -> list[Record]:
    """Records without files, for the partitioning logic."""
    return [
        Record(
            Path(f"/x/{r['image_id']}.jpg"),
            r["image_id"],
            r["lesion_id"],
            CLASSES.index(r["dx"]),
            r["dataset"],
        )
        for r in synthetic_rows(n_lesions, seed)
    ]


@pytest.fixture(scope="module")
def real_records() -> list[Record]:
    if not (REAL / METADATA_FILE).is_file():
        pytest.skip(f"real HAM10000 not at {REAL}")
    return read_ham10000(REAL)


def lesion_owner(parts: list[list[Record]]) -> dict[str, set[int]]:
    owner: dict[str, set[int]] = {}
    for k, part in enumerate(parts):
        for r in part:
            owner.setdefault(r.lesion_id, set()).add(k)
    return owner


# --- constants -----------------------------------------------------------------------


def test_isic_columns_map_to_our_classes() -> None:
    assert [CLASSES[ISIC_TO_CLASS[c]] for c in ISIC_COLUMNS] == [c.lower() for c in ISIC_COLUMNS]
    assert ISIC_TO_CLASS["MEL"] == 4 and ISIC_TO_CLASS["AKIEC"] == 0


# --- reading -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "dataverse"])
def test_read_ham10000_layouts(tmp_path, layout) -> None:
    rows = synthetic_rows(12)
    root = make_ham(tmp_path / layout, rows, layout)
    records = read_ham10000(root)
    assert [r.image_id for r in records] == [r["image_id"] for r in rows]
    assert [CLASSES[r.label] for r in records] == [r["dx"] for r in rows]
    assert {r.site for r in records} == {"site_a", "site_b"}
    assert all(r.path.is_file() and r.path.stem == r.image_id for r in records)
    if layout == "dataverse":
        assert {r.path.parent.name for r in records} == {
            "HAM10000_images_part_1",
            "HAM10000_images_part_2",
        }


def test_png_images_are_found(tmp_path) -> None:
    rows = synthetic_rows(2)
    root = tmp_path / "png"
    for row in rows:
        write_image(root / "deep" / "er" / f"{row['image_id']}.png", (10, 20, 30))
    write_metadata(root, rows)
    assert all(r.path.suffix == ".png" for r in read_ham10000(root))


def test_missing_csv_names_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        read_ham10000(tmp_path)


def test_csv_missing_column_names_it(tmp_path) -> None:
    write_metadata(tmp_path, synthetic_rows(2), columns=["lesion_id", "image_id", "dataset"])
    with pytest.raises(DataError, match=f"{METADATA_FILE}: missing column.*dx"):
        read_ham10000(tmp_path)


def test_unknown_dx_names_row_and_value(ham, flwr_logs) -> None:
    rows = list(csv.DictReader((ham / METADATA_FILE).open()))
    rows[4]["dx"] = "melanoma"
    write_metadata(ham, rows)
    with pytest.raises(DataError, match=r"row 6: unknown dx 'melanoma'"):
        read_ham10000(ham)
    records = read_ham10000(ham, on_error="skip")
    assert len(records) == len(rows) - 1
    assert rows[4]["image_id"] not in {r.image_id for r in records}
    assert "Skipped 1 of" in flwr_logs.text and "melanoma" in flwr_logs.text


def test_missing_image_names_id_and_row(ham, flwr_logs) -> None:
    records = read_ham10000(ham)
    records[2].path.unlink()
    records[7].path.unlink()
    with pytest.raises(FileNotFoundError, match=f"row 4: no image file for {records[2].image_id}"):
        read_ham10000(ham)
    kept = read_ham10000(ham, on_error="skip")
    assert len(kept) == len(records) - 2
    assert f"Skipped 2 of {len(records)} rows" in flwr_logs.text
    assert records[2].image_id in flwr_logs.text


def test_corrupt_jpeg_detected_by_verify_and_loader(ham, flwr_logs) -> None:
    records = read_ham10000(ham)
    bad = records[3].path
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header parses, decoding fails
    assert len(read_ham10000(ham)) == len(records)  # reading does not decode
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        read_ham10000(ham, verify=True)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        verify_images(records)
    assert len(verify_images(records, on_error="skip")) == len(records) - 1
    assert "Skipped 1 of" in flwr_logs.text and bad.name in flwr_logs.text
    with pytest.raises(DataError, match=bad.name):
        make_loader(records, 16, train=False)
    loader = make_loader(records, 16, train=False, on_error="skip")
    assert len(loader.dataset) == len(records) - 1


def test_garbage_file_is_a_decode_error(tmp_path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="x.jpg"):
        data.load_image(path, 8)


def test_read_image_folder(tmp_path, flwr_logs) -> None:
    for name, n in (("mel", 2), ("nv", 3), ("BCC", 1)):
        for i in range(n):
            write_image(tmp_path / name / f"{name}_{i}.jpg")
    records = read_image_folder(tmp_path)
    assert Counter(CLASSES[r.label] for r in records) == {"mel": 2, "nv": 3, "bcc": 1}
    assert all(r.site == "imagefolder" and r.lesion_id == r.image_id for r in records)
    assert read_records(tmp_path) == records  # no metadata CSV: image-folder layout
    write_image(tmp_path / "melanoma" / "m.jpg")
    with pytest.raises(DataError, match="melanoma: folder name is not a class"):
        read_image_folder(tmp_path)
    assert read_image_folder(tmp_path, on_error="skip") == records
    assert "melanoma" in flwr_logs.text


def test_missing_image_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_image_folder(tmp_path / "nowhere")


# --- splits and partitions -------------------------------------------------------------


def test_split_by_lesion_synthetic() -> None:
    records = synthetic_records(400)
    train, test = split_by_lesion(records, 0.2, seed=1)
    assert not {r.lesion_id for r in train} & {r.lesion_id for r in test}
    assert sorted(train + test, key=lambda r: r.image_id) == records
    assert abs(len(test) / len(records) - 0.2) < 0.03
    assert split_by_lesion(records, 0.2, seed=1) == (train, test)
    assert split_by_lesion(records, 0.2, seed=2) != (train, test)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    _, test_shuffled = split_by_lesion(shuffled, 0.2, seed=1)
    assert {r.image_id for r in test_shuffled} == {r.image_id for r in test}
    assert split_by_lesion(records, 0.0, seed=1) == (records, [])
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_lesion(records, 1.0, seed=1)


@needs_real
def test_split_by_lesion_real_no_leak(real_records) -> None:
    train, test = split_by_lesion(real_records, 0.2, seed=0)
    assert len(train) + len(test) == 10015
    assert not {r.lesion_id for r in train} & {r.lesion_id for r in test}
    assert abs(len(test) / 10015 - 0.2) < 0.005
    total, held = Counter(r.label for r in real_records), Counter(r.label for r in test)
    for label, n in total.items():  # stratified: every class near 20 % (df has 115 images)
        assert abs(held[label] / n - 0.2) < 0.03, CLASSES[label]


def check_partitions(records, parts, minimum) -> None:
    assert sorted(r.image_id for p in parts for r in p) == sorted(r.image_id for r in records)
    assert all(len(p) >= max(1, minimum) for p in parts)
    assert all(len(owners) == 1 for owners in lesion_owner(parts).values())


def test_dirichlet_partition_properties() -> None:
    records = synthetic_records(300)
    parts = dirichlet_partition(records, 5, beta=0.5, seed=3, min_partition_size=20)
    assert len(parts) == 5
    check_partitions(records, parts, 20)
    assert dirichlet_partition(records, 5, beta=0.5, seed=3, min_partition_size=20) == parts
    assert dirichlet_partition(records, 5, beta=0.5, seed=4, min_partition_size=20) != parts
    # A small beta skews labels: some client's majority class is not the global one.
    skewed = dirichlet_partition(records, 5, beta=0.1, seed=3, min_partition_size=5)
    majorities = {Counter(r.label for r in p).most_common(1)[0][0] for p in skewed}
    assert majorities != {CLASSES.index("nv")}


def test_dirichlet_partition_impossible() -> None:
    records = synthetic_records(20)
    with pytest.raises(ValueError, match="cannot give 10 partitions"):
        dirichlet_partition(records, 10, beta=0.5, seed=0, min_partition_size=10)
    with pytest.raises(ValueError, match=r"in 5 attempts.*lower min_partition_size"):
        dirichlet_partition(records, 4, 0.01, seed=0, min_partition_size=6, max_attempts=5)
    with pytest.raises(ValueError, match="beta > 0"):
        dirichlet_partition(records, 2, beta=0.0, seed=0)


@needs_real
def test_dirichlet_partition_real(real_records) -> None:
    parts = dirichlet_partition(real_records, 3, beta=0.5, seed=0, min_partition_size=32)
    check_partitions(real_records, parts, 32)


@needs_real
def test_site_partition_real(real_records) -> None:
    names, parts = site_partition(real_records)
    assert names == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    assert [len(p) for p in parts] == [2259, 3363, 3954, 439]
    assert Counter(CLASSES[r.label] for r in parts[2]) == {
        "bcc": 2,
        "bkl": 124,
        "df": 30,
        "mel": 24,
        "nv": 3720,
        "vasc": 54,
    }
    with pytest.raises(ValueError, match="gives 4 partitions.*num_partitions is 3"):
        partition_records(real_records, "site", 3)


@needs_real
def test_load_site_split_real_sites() -> None:
    train, test = load_site_split(REAL, partition="site", partition_id=3, num_partitions=4,
                                  min_partition_size=50)
    assert len(train) + len(test) == 439 and {r.site for r in train + test} == {"vienna_dias"}
    assert not {r.lesion_id for r in train} & {r.lesion_id for r in test}


def test_load_site_split_arguments(ham) -> None:
    with pytest.raises(ValueError, match="partition must be one of"):
        load_site_split(ham, partition="iid", min_partition_size=1)
    with pytest.raises(ValueError, match="partition_id 3 not in"):
        load_site_split(
            ham, partition="dirichlet", partition_id=3, num_partitions=2, min_partition_size=1
        )


def test_export_site_folders_round_trip(tmp_path, ham) -> None:
    kwargs = dict(partition="dirichlet", num_partitions=3, beta=0.5, seed=7, min_partition_size=5)
    folders = export_site_folders(ham, tmp_path / "sites", **kwargs)
    assert [f.name for f in folders] == ["site_0", "site_1", "site_2"]
    for k, folder in enumerate(folders):
        sim = load_site_split(ham, partition_id=k, test_fraction=0.25, **kwargs)
        dep = load_site_split(folder, partition="folder", test_fraction=0.25, seed=7,
                              min_partition_size=1)
        assert [[r.image_id for r in side] for side in dep] == [
            [r.image_id for r in side] for side in sim
        ]
        assert all(r.path.is_relative_to(folder) for r in dep[0] + dep[1])
        header = (folder / METADATA_FILE).read_text().splitlines()[0]
        assert header == ",".join(COLUMNS)  # the original columns, rows copied as they were
    # Written once: a second export keeps the folders untouched.
    stamp = (folders[0] / METADATA_FILE).stat().st_mtime_ns
    assert export_site_folders(ham, tmp_path / "sites", **kwargs) == folders
    assert (folders[0] / METADATA_FILE).stat().st_mtime_ns == stamp
    # Different data in place is an error, not an overwrite.
    with pytest.raises(DataError, match="site_0 exists with other data"):
        export_site_folders(ham, tmp_path / "sites", **{**kwargs, "seed": 8})


def test_export_command_takes_the_split_from_conf(tmp_path, ham) -> None:
    from fedlsc_tools.site_folders import main

    # Overrides before and after the options, as a user types them.
    assert main(["export", str(tmp_path / "cli"), "seed=3", "--data-dir", str(ham),
                 "partition.min_partition_size=5"]) == 0
    expected = export_site_folders(ham, tmp_path / "api", partition="dirichlet",
                                   num_partitions=3, beta=0.5, seed=3, min_partition_size=5)
    written = sorted((tmp_path / "cli").iterdir())
    assert [f.name for f in written] == [f.name for f in expected]
    for cli, api in zip(written, expected, strict=True):
        assert (cli / METADATA_FILE).read_text() == (api / METADATA_FILE).read_text()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "x"), "--data-dir", str(ham), "partition=folder"])


# --- loaders, caches, imbalance ---------------------------------------------------------


def test_loader_shapes_dtypes_and_normalisation(tmp_path) -> None:
    color = (255, 0, 128)
    records = [
        Record(
            write_image(tmp_path / f"{i}.png", color, size=(30, 20)), f"i{i}", f"l{i}", i % 7, "s"
        )
        for i in range(5)
    ]
    images, labels = next(iter(make_loader(records, 24, train=False, batch_size=4)))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3]
    expected = [
        (c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.tensor(expected))
    train_loader = make_loader(records, 24, train=True, batch_size=2, drop_last=True)
    batches = list(train_loader)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 24, 24)


def test_cache_skips_decoding(tmp_path, ham, monkeypatch) -> None:
    records = read_ham10000(ham)
    calls = []
    decode = data.load_image
    monkeypatch.setattr(data, "load_image", lambda p, s: calls.append(p) or decode(p, s))
    cache = tmp_path / "cache"
    first = make_loader(records, 16, train=True, cache=cache)
    assert len(calls) == len(records)
    npy = list(cache.iterdir())
    assert len(npy) == 1 and npy[0].suffix == ".npy"  # no temporary file left behind
    list(first)
    list(first)  # epochs augment the cached tensor
    make_loader(records, 16, train=False, cache=cache)  # memory hit
    data._memory_cache.clear()
    second = make_loader(records, 16, train=False, cache=cache)  # disk hit, as a new process
    assert len(calls) == len(records)
    torch.testing.assert_close(second.dataset.images, first.dataset.images)
    make_loader(records, 20, train=False, cache=cache)  # another size is another key
    assert len(calls) == 2 * len(records) and len(list(cache.iterdir())) == 2
    lazy = make_loader(records[:4], 16, train=False, cache=False)
    calls.clear()
    list(lazy)
    list(lazy)
    assert len(calls) == 8  # no cache: every item decoded every epoch


def test_stale_disk_cache_is_ignored(tmp_path, ham) -> None:
    records = read_ham10000(ham)[:6]
    cache = tmp_path / "cache"
    make_loader(records, 16, train=False, cache=cache)
    (npy,) = cache.iterdir()
    np.save(npy, np.zeros((2, 3, 16, 16), dtype=np.uint8))  # wrong shape
    data._memory_cache.clear()
    loader = make_loader(records, 16, train=False, cache=cache)
    assert loader.dataset.images.shape == (6, 3, 16, 16) and loader.dataset.images.any()


def _records_with_labels(labels: list[int]) -> list[Record]:
    return [Record(Path(f"{i}.jpg"), str(i), str(i), y, "s") for i, y in enumerate(labels)]


def test_class_weights() -> None:
    weights = class_weights(_records_with_labels([5] * 6 + [4] * 2 + [0]))
    # n / (present classes * count): 9 / (3 * 1), 9 / (3 * 2), 9 / (3 * 6); absent classes 0.
    torch.testing.assert_close(weights, torch.tensor([3.0, 0, 0, 0, 1.5, 0.5, 0]))


def test_balanced_sampler_evens_classes() -> None:
    records = _records_with_labels([5] * 90 + [4] * 10)
    sampler = balanced_sampler(records, seed=0)
    drawn = Counter(records[i].label for i in sampler)
    assert len(sampler) == 100 and 35 <= drawn[4] <= 65
    assert list(balanced_sampler(records, seed=0)) == list(balanced_sampler(records, seed=0))


def test_balanced_sampler_power_tempers_the_classes() -> None:
    # 90 images of class 5, 10 of class 4: power 0.5 draws them 9^0.5 : 1 = 3 : 1 (25 % of
    # class 4), power 0 as they occur (10 %), power 1 equally (50 %).
    records = _records_with_labels([5] * 900 + [4] * 100)
    shares = {power: Counter(records[i].label for i in balanced_sampler(records, 0, power))[4]
              / len(records) for power in (0.0, 0.5, 1.0)}
    assert abs(shares[0.0] - 0.10) < 0.03
    assert abs(shares[0.5] - 0.25) < 0.04
    assert abs(shares[1.0] - 0.50) < 0.05
    with pytest.raises(ValueError, match="power = 1.5"):
        balanced_sampler(records, 0, 1.5)


def test_balanced_sampler_min_count_draws_a_tiny_class_less() -> None:
    # 2 images of class 3 among 200 of class 5: balanced, they are half the draws (each
    # image drawn ~100 times in 202); as if class 3 had 20 images, 2/20 of that.
    records = _records_with_labels([5] * 200 + [3] * 2)
    shares = {m: Counter(records[i].label for i in balanced_sampler(records, 0, 1.0, m))[3]
              / len(records) for m in (0, 20)}
    assert abs(shares[0] - 0.5) < 0.08
    assert abs(shares[20] - 2 / 22) < 0.05
    prior = sampled_class_prior(records, balanced=True, power=1.0, min_count=20)
    assert float(prior[3]) == pytest.approx(2 / 22, rel=1e-5)
    with pytest.raises(ValueError, match="min_count = -1"):
        balanced_sampler(records, 0, 1.0, -1)


def test_sampled_class_prior_follows_the_loader_sampling() -> None:
    # 900 images of class 5, 100 of class 4, none of the other five classes.
    records = _records_with_labels([5] * 900 + [4] * 100)
    for balanced, power, share_4 in ((False, 1.0, 0.10), (True, 0.0, 0.10), (True, 0.5, 0.25),
                                     (True, 1.0, 0.50)):
        prior = sampled_class_prior(records, balanced=balanced, power=power)
        assert float(prior.sum()) == pytest.approx(1.0)
        assert float(prior[4]) == pytest.approx(share_4, rel=1e-5)
        assert [float(prior[k]) for k in (0, 1, 2, 3, 6)] == [0.0] * 5
    # What the sampler really draws agrees with the prior (power 0.5: 25 % of class 4).
    drawn = Counter(records[i].label for i in balanced_sampler(records, 0, 0.5))
    assert abs(drawn[4] / len(records) - 0.25) < 0.04
    with pytest.raises(ValueError, match="no records"):
        sampled_class_prior([], balanced=True)


def test_balancing_over_the_federation_counts_each_class_over_all_sites() -> None:
    # This site: 200 images of class 5 and 2 of class 3. The federation: 2,000 of class 5
    # and 300 of class 3 (other sites hold the rest). Balanced over the site, class 3 is
    # drawn half the time; over the federation, each image weighs 1/total(class), so class 3
    # takes 2/300 against class 5's 200/2000: 6.25 % of the draws.
    records = _records_with_labels([5] * 200 + [3] * 2)
    totals = [0, 0, 0, 300, 0, 2000, 0]
    weights = balanced_record_weights(records, totals=totals)
    assert float(weights[0]) == pytest.approx(1 / 2000) and float(weights[-1]) == \
        pytest.approx(1 / 300)
    prior = sampled_class_prior(records, balanced=True, totals=totals)
    assert float(prior[3]) == pytest.approx((2 / 300) / (2 / 300 + 200 / 2000), rel=1e-5)
    assert float(sampled_class_prior(records, balanced=True)[3]) == pytest.approx(0.5)
    drawn = Counter(records[i].label for i in balanced_sampler(records, 0, totals=totals))
    assert drawn[3] / len(records) < 0.15
    # A total below the site's own count (a stale report) counts the site's own images.
    low = balanced_record_weights(records, totals=[0, 0, 0, 1, 0, 2000, 0])
    assert float(low[-1]) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match=r"class totals \[1, 2\]: expected 7 counts >= 0"):
        sampled_class_prior(records, balanced=True, totals=[1, 2])


def test_logit_offsets_are_tau_log_prior_and_leave_out_absent_classes() -> None:
    offsets = logit_offsets(torch.tensor([0.0, 0.25, 0.75]), tau=0.5)
    torch.testing.assert_close(offsets, torch.tensor(
        [data.ABSENT_CLASS_OFFSET, 0.5 * math.log(0.25), 0.5 * math.log(0.75)]))
    # Left out means a softmax weight of exactly 0 in float32.
    assert float(torch.softmax(offsets, 0)[0]) == 0.0


# --- plots ---------------------------------------------------------------------------


def test_plot_label_distribution(tmp_path) -> None:
    parts = dirichlet_partition(synthetic_records(200), 3, beta=0.5, seed=0)
    path = plot_label_distribution(parts, tmp_path / "plots" / "labels.png", ["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["labels.png"]
    with pytest.raises(ValueError, match="2 site names for 3 partitions"):
        plot_label_distribution(parts, tmp_path / "x.png", ["a", "b"])


def test_os_link_fallback_copies(tmp_path, ham, monkeypatch) -> None:
    def no_link(*args, **kwargs):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    folders = export_site_folders(ham, tmp_path / "copies", num_partitions=2, min_partition_size=1)
    assert sum(len(read_ham10000(f)) for f in folders) == len(read_ham10000(ham))


# --- progress bars ------------------------------------------------------------------------


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a person's shell would."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_decoding_and_export_show_progress_only_on_a_terminal(tmp_path, ham, monkeypatch,
                                                              terminal) -> None:
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    records = read_ham10000(ham)
    decode_images(records, 16)
    export_site_folders(ham, tmp_path / "sites", num_partitions=2, min_partition_size=5)
    shown = stderr.getvalue()
    if terminal:
        assert f"decoding images at 16 px:   0%|          | 0/{len(records)}" in shown
        assert "writing site folders: 100%" in shown
    else:  # (log records may reach this stream, depending on handlers other tests set up)
        assert "decoding images" not in shown and "writing site folders" not in shown
        assert "img/s" not in shown and "%|" not in shown


def test_random_resized_crops_only_in_training_and_only_below_scale_1():
    """crop_scale < 1 cuts a random part of the image (a different one each call) and
    resizes it back; at 1 and at evaluation the image keeps all of its content."""
    from torchvision.transforms import v2

    from client_app.data import build_transform

    kinds = lambda t: [type(step) for step in t.transforms]  # noqa: E731
    assert v2.RandomResizedCrop in kinds(build_transform(32, True, 0.5))
    assert v2.RandomResizedCrop not in kinds(build_transform(32, True))
    assert v2.RandomResizedCrop not in kinds(build_transform(32, False, 0.5))
    crop = next(s for s in build_transform(32, True, 0.5).transforms
                if isinstance(s, v2.RandomResizedCrop))
    assert tuple(crop.scale) == (0.5, 1.0) and tuple(crop.size) == (32, 32)
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32) / 3072
    torch.manual_seed(0)
    cuts = [crop(image) for _ in range(4)]
    assert all(c.shape == (3, 32, 32) for c in cuts)
    assert any(not torch.allclose(cuts[0], c) for c in cuts[1:])
    with pytest.raises(ValueError, match="crop_scale must be in \\(0, 1\\], got 0"):
        build_transform(32, True, 0)
