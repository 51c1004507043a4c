"""HAM10000 records, decoding to a cached uint8 tensor, transforms and DataLoaders.

Each image is decoded once, straight to the training size, and kept as uint8 (in
memory, and optionally in an on-disk .npy cache), so later epochs, rounds and processes
only run the cheap tensor augmentations. Torch, torchvision and PIL only: no Flower.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from fedlsc_common.classes import CLASSES, IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("flwr")  # shows up in Flower's logs without importing Flower


METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dataset")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
IMAGEFOLDER_SITE = "imagefolder"

OnError = Literal["raise", "skip"]

_CACHE_VERSION = "1"  # bump when the decoding changes, so old .npy caches are not reused
_MEMORY_CACHE_ENTRIES = 4  # decoded sets kept per process (e.g. one site's train + test)
_memory_cache: OrderedDict[str, tuple[torch.Tensor, tuple[int, ...]]] = OrderedDict()


class DataError(ValueError):
    """Input data that cannot be used: a bad row, label, folder or image."""


@dataclass(frozen=True)
class Record:
    """One labelled image; ``site`` is the contributing hospital (HAM10000 ``dataset``)."""

    path: Path
    image_id: str
    lesion_id: str
    label: int
    site: str


def _check_on_error(on_error: str) -> None:
    """Reject anything but "raise" and "skip"."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _report_skipped(skipped: list[str], total: int, what: str) -> None:
    """One WARNING for everything left out, with the count and the first few reasons."""
    if skipped:
        first = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        logger.warning("Skipped %d of %d %s: %s", len(skipped), total, what, first)


def index_images(root: str | Path) -> dict[str, Path]:
    """Map image stem -> path for every image below ``root``, the first in sorted order wins."""
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                index.setdefault(stem, Path(dirpath, name))
    return index


def read_ham10000(
    root: str | Path, *, on_error: OnError = "raise", verify: bool = False
) -> list[Record]:
    """Records of ``root/HAM10000_metadata.csv``, images found by ``image_id`` anywhere below root.

    Works for the Dataverse layout (``HAM10000_images_part_{1,2}/``) and a flat
    ``images/`` folder alike. Row problems (missing image, unknown ``dx``, duplicate or
    empty ids) raise, or with ``on_error="skip"`` are left out with one WARNING.
    ``verify=True`` also decodes every image to catch corrupt files now, not mid-training.
    """
    _check_on_error(on_error)
    root = Path(root)
    csv_path = root / METADATA_FILE
    if not csv_path.is_file():
        raise FileNotFoundError(f"HAM10000 metadata not found: {csv_path}")
    images = index_images(root)
    records: list[Record] = []
    skipped: list[str] = []
    seen: set[str] = set()
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{csv_path} row {reader.line_num}"
            image_id, lesion_id = row["image_id"].strip(), row["lesion_id"].strip()
            dx = row["dx"].strip().lower()
            error: Exception | None = None
            if not image_id or not lesion_id:
                error = DataError(f"{where}: empty image_id or lesion_id")
            elif dx not in CLASSES:
                error = DataError(f"{where}: unknown dx {row['dx']!r} (expected one of {CLASSES})")
            elif image_id in seen:
                error = DataError(f"{where}: duplicate image_id {image_id}")
            elif image_id not in images:
                error = FileNotFoundError(f"{where}: no image file for {image_id} below {root}")
            if error is not None:
                if on_error == "raise":
                    raise error
                skipped.append(str(error))
                continue
            seen.add(image_id)
            site = row["dataset"].strip()
            records.append(Record(images[image_id], image_id, lesion_id, CLASSES.index(dx), site))
    _report_skipped(skipped, len(records) + len(skipped), f"rows of {csv_path}")
    return verify_images(records, on_error=on_error) if verify else records


def read_image_folder(
    root: str | Path, *, on_error: OnError = "raise", verify: bool = False
) -> list[Record]:
    """Records of ``root/CLASSNAME/*.jpg``; every class folder must be one of CLASSES.

    Without lesion ids each image is its own lesion; the site is "imagefolder".
    """
    _check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    records: list[Record] = []
    skipped: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.lower() not in CLASSES:
            error = DataError(f"{folder}: folder name is not a class (expected one of {CLASSES})")
            if on_error == "raise":
                raise error
            skipped.append(str(error))
            continue
        label = CLASSES.index(folder.name.lower())
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                records.append(Record(path, path.stem, path.stem, label, IMAGEFOLDER_SITE))
    _report_skipped(skipped, len(skipped), f"folders of {root}")
    if not records:
        raise DataError(f"{root}: no images in class folders {CLASSES}")
    return verify_images(records, on_error=on_error) if verify else records


def read_records(
    root: str | Path, *, on_error: OnError = "raise", verify: bool = False
) -> list[Record]:
    """HAM10000 layout when ``root`` holds the metadata CSV, else an image folder per class."""
    if (Path(root) / METADATA_FILE).is_file():
        return read_ham10000(root, on_error=on_error, verify=verify)
    return read_image_folder(root, on_error=on_error, verify=verify)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode an image to a uint8 3 x size x size tensor (squashed, so no lesion edge is cropped).

    JPEG draft mode lets libjpeg decode at a reduced scale first, which is most of the speed.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files
        raise DataError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _decoding_threads() -> int:
    """PIL releases the GIL while decoding, so threads use every core."""
    return min(8, os.cpu_count() or 1)


def verify_images(records: Sequence[Record], *, on_error: OnError = "raise") -> list[Record]:
    """Fully decode every image; a corrupt one raises, or with "skip" is left out with a WARNING."""
    _check_on_error(on_error)

    def check(record: Record) -> str | None:
        try:
            with Image.open(record.path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as e:
            return f"cannot decode image {record.path}: {e}"
        return None

    with ThreadPoolExecutor(_decoding_threads()) as pool:
        problems = list(pool.map(check, records))
    bad = [p for p in problems if p is not None]
    if bad and on_error == "raise":
        raise DataError(bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    _report_skipped(bad, len(records), "images that do not decode")
    return [r for r, p in zip(records, problems, strict=True) if p is None]


def cache_key(records: Sequence[Record], image_size: int) -> str:
    """Hash of the image list (path, size, mtime) and the training size: names a decoded set."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{image_size}\n".encode())
    for r in records:
        st = os.stat(r.path)
        h.update(f"{os.path.abspath(r.path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _read_disk_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A cached array of the expected shape, or None (absent, unreadable or stale)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path)
    except (OSError, ValueError) as e:
        logger.warning("Ignoring unreadable image cache %s: %s", path, e)
        return None
    if array.shape != shape or array.dtype != np.uint8:
        logger.warning("Ignoring image cache %s: shape %s, expected %s", path, array.shape, shape)
        return None
    return torch.from_numpy(array)


def _write_disk_cache(path: Path, images: torch.Tensor) -> None:
    """Write the .npy atomically (tmp file + os.replace), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, images.numpy())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def decode_images(
    records: Sequence[Record],
    image_size: int,
    *,
    cache_dir: str | Path | None = None,
    on_error: OnError = "raise",
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Decode ``records`` once into an N x 3 x S x S uint8 tensor, reusing cached results.

    Looks in this process's memory, then in ``cache_dir/<key>.npy``; decodes (threaded)
    only on a miss. Returns the images and the indices of ``records`` they belong to
    (all of them unless ``on_error="skip"`` dropped images that failed to decode).
    """
    _check_on_error(on_error)
    key = cache_key(records, image_size)
    if key in _memory_cache:
        _memory_cache.move_to_end(key)
        return _memory_cache[key]
    shape = (len(records), 3, image_size, image_size)
    disk = Path(cache_dir) / f"images-{image_size}px-{key}.npy" if cache_dir is not None else None
    images = _read_disk_cache(disk, shape) if disk is not None else None
    kept = tuple(range(len(records)))
    if images is None:
        images, kept = _decode_all(records, image_size, on_error)
        if disk is not None and len(kept) == len(records):
            _write_disk_cache(disk, images)
        elif disk is not None:
            logger.warning("Not writing image cache %s: some images did not decode", disk)
    _memory_cache[key] = (images, kept)
    while len(_memory_cache) > _MEMORY_CACHE_ENTRIES:
        _memory_cache.popitem(last=False)
    return images, kept


def _decode_all(
    records: Sequence[Record], image_size: int, on_error: OnError
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Decode every record with a thread pool; failures raise or are skipped."""

    def decode(record: Record) -> torch.Tensor | str:
        try:
            return load_image(record.path, image_size)
        except DataError as e:
            if on_error == "raise":
                raise
            return str(e)

    images = torch.empty((len(records), 3, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[str] = []
    # a progress bar when a person watches (stderr is a terminal), silent in logs and pipes
    with ThreadPoolExecutor(_decoding_threads()) as pool, tqdm(
            total=len(records), desc=f"decoding images at {image_size} px", unit="img",
            disable=None, leave=False) as progress:
        for i, result in enumerate(pool.map(decode, records)):
            progress.update()
            if isinstance(result, str):
                skipped.append(result)
            else:
                images[len(kept)] = result
                kept.append(i)
    _report_skipped(skipped, len(records), "images that do not decode")
    return images[: len(kept)], tuple(kept)


def build_transform(image_size: int, train: bool, crop_scale: float = 1.0) -> v2.Compose:
    """Resize (a no-op on cached images), augment when training, scale to float, ImageNet-normalise.

    Dermoscopy has no canonical orientation, so both flips and rotations are label-safe.
    ``crop_scale`` < 1 (training only) first cuts a random part of at least that share of
    the image's area and resizes it back (RandomResizedCrop).
    """
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    crop = [v2.RandomResizedCrop((image_size, image_size), scale=(crop_scale, 1.0),
                                 antialias=True)] if train and crop_scale < 1 else []
    augment = (
        [
            *crop,
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(20),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
        ]
        if train
        else []
    )
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            *augment,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageDataset(Dataset):
    """(image, label) pairs from a pre-decoded uint8 tensor, or decoded per item when none."""

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        transform: v2.Compose,
        images: torch.Tensor | None = None,
    ) -> None:
        if images is not None and len(images) != len(records):
            raise ValueError(f"{len(images)} images for {len(records)} records")
        self.records, self.image_size = list(records), image_size
        self.transform, self.images = transform, images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        record = self.records[i]
        if self.images is None:
            return self.transform(load_image(record.path, self.image_size)), record.label
        return self.transform(self.images[i]), record.label


def class_counts(records: Iterable[Record], num_classes: int = len(CLASSES)) -> list[int]:
    """Number of records per label."""
    counts = Counter(r.label for r in records)
    return [counts.get(k, 0) for k in range(num_classes)]


def class_weights(records: Sequence[Record], num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Inverse-frequency weights for weighted CE: n / (present classes * count); absent: 0."""
    counts = torch.tensor(class_counts(records, num_classes), dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def balanced_sampler(records: Sequence[Record], seed: int = 0, power: float = 1.0,
                     min_count: int = 0,
                     totals: Sequence[int] | None = None) -> WeightedRandomSampler:
    """Draw ``len(records)`` samples with replacement, each with weight
    max(count(class), min_count)^-power: ``power`` 1 draws every present class equally
    often, 0 as often as it occurs, and 0.5 in proportion to the square root of its count (a
    site's rare classes still come up more often than in its data, without most steps going
    to its handful of images). ``min_count`` > 0 draws a class of fewer images as if it had
    that many, so its few images are not each repeated hundreds of times a round.
    ``totals`` (the federation's images per class) count classes over all sites instead of
    this one: see :func:`balanced_record_weights`."""
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"balanced_sampler: power = {power!r}: must be in [0, 1]")
    if min_count < 0:
        raise ValueError(f"balanced_sampler: min_count = {min_count!r}: must be >= 0")
    weights = balanced_record_weights(records, power, min_count, totals)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, len(records), replacement=True, generator=generator)


def balanced_record_weights(records: Sequence[Record], power: float = 1.0, min_count: int = 0,
                            totals: Sequence[int] | None = None) -> torch.Tensor:
    """Each record's draw weight for :func:`balanced_sampler`. With ``totals`` (images per
    class over all sites, from the server) a class is counted federation-wide: an image is
    drawn with weight max(total, min_count)^-power, so the sites together draw every class
    about equally often, each of its images alike, as one balanced sampler over the pooled
    data would; a site then spends few steps on the 2 images it holds of a class others
    hold hundreds of. Without, the site's own counts (every class it holds equally often)."""
    counts = class_counts(records, len(CLASSES) if totals is None else len(totals))
    per_image = _balanced_image_weights(counts, power, min_count, totals)
    return torch.tensor([per_image[r.label] for r in records], dtype=torch.float64)


def _balanced_image_weights(counts: Sequence[int], power: float, min_count: int,
                            totals: Sequence[int] | None = None) -> list[float]:
    """The draw weight of one image of each class: max(count, min_count)^-power (0 for a
    class with no image); count = the class's federation total where ``totals`` is given
    (never below the site's own count)."""
    if totals is not None and (len(totals) != len(counts) or any(t < 0 for t in totals)):
        raise ValueError(f"class totals {list(totals)!r}: expected {len(counts)} counts >= 0")
    reference = counts if totals is None else [max(t, n) for t, n in zip(totals, counts)]
    return [max(r, min_count) ** -power if n > 0 else 0.0 for n, r in zip(counts, reference)]


#: The logit offset of a class a site holds no image of: its softmax weight in the loss is
#: exactly 0 in float32, so the site's training leaves that class's parameters alone (a mere
#: small weight would not: Adam scales a small but steady gradient up to full-size steps).
ABSENT_CLASS_OFFSET = -1e4


def sampled_class_prior(records: Sequence[Record], *, balanced: bool, power: float = 1.0,
                        min_count: int = 0, num_classes: int = len(CLASSES),
                        totals: Sequence[int] | None = None) -> torch.Tensor:
    """The class distribution a training loader draws from: in proportion to the counts
    when shuffling, to count·max(count, min_count)^−power with :func:`balanced_sampler`
    (count: the federation's ``totals`` where given); 0 for a class with no image."""
    counts = class_counts(records, num_classes)
    if sum(counts) <= 0:
        raise ValueError("sampled_class_prior: no records")
    per_image = _balanced_image_weights(counts, power, min_count, totals) if balanced \
        else [1.0] * num_classes
    mass = torch.tensor(counts, dtype=torch.float64) * torch.tensor(per_image,
                                                                    dtype=torch.float64)
    return (mass / mass.sum()).float()


def logit_offsets(prior: torch.Tensor, tau: float) -> torch.Tensor:
    """The logit-adjusted loss's offsets (Menon et al., ICLR 2021): τ·log prior per class,
    :data:`ABSENT_CLASS_OFFSET` for a class of prior 0."""
    offsets = torch.full_like(prior, ABSENT_CLASS_OFFSET)
    present = prior > 0
    offsets[present] = tau * torch.log(prior[present])
    return offsets


def make_loader(
    records: Sequence[Record],
    image_size: int,
    *,
    train: bool,
    batch_size: int = 32,
    num_workers: int = 0,
    cache: bool | str | Path = True,
    balanced: bool = False,
    sampling_power: float = 1.0,
    balance_min_count: int = 0,
    seed: int = 0,
    on_error: OnError = "raise",
    drop_last: bool = False,
    crop_scale: float = 1.0,
) -> DataLoader:
    """A DataLoader of normalised float images and int64 labels.

    ``cache``: True decodes everything once into memory (the default: augmentation then
    runs on uint8 tensors); a path adds an on-disk .npy cache shared by later processes;
    False decodes every item every epoch (for sets too large for memory). Training
    loaders shuffle with ``seed``, or, when ``balanced``, draw classes by
    :func:`balanced_sampler` with ``sampling_power`` and ``balance_min_count``.
    ``crop_scale``: random resized crops in training (:func:`build_transform`).
    """
    if not records:
        raise ValueError("make_loader: no records")
    images = None
    if cache is not False:
        cache_dir = None if cache is True else Path(cache)
        images, kept = decode_images(records, image_size, cache_dir=cache_dir, on_error=on_error)
        records = [records[i] for i in kept]
    dataset = ImageDataset(records, image_size, build_transform(image_size, train, crop_scale),
                           images)
    sampler = balanced_sampler(records, seed, sampling_power, balance_min_count) \
        if train and balanced else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
