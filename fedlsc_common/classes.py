"""The label set and input normalisation every part of a run agrees on (no image code).

The sites read images (``client_app.data``); the coordinator names classes in metrics and
model files; ``fedlsc predict`` writes ISIC submission columns.
"""

#: Class names in label order: index = label.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
#: Column order of the ISIC 2018 Task 3 submission CSV (after its ``image`` column).
ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
#: ISIC column -> our class index; ``probs[:, [ISIC_TO_CLASS[c] for c in ISIC_COLUMNS]]``.
ISIC_TO_CLASS: dict[str, int] = {c: CLASSES.index(c.lower()) for c in ISIC_COLUMNS}

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
