"""Benchmark reports into the repository: a markdown report as PREFIX.md, its plots beside
it as PREFIX_<name>.png (the report's links rewritten), every file written atomically."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def publish_report(report: str, plots: Iterable[Path], prefix: Path,
                   extra: dict[str, str] | None = None) -> Path:
    """Write ``report`` to PREFIX.md and copy ``plots`` beside it; ``extra`` maps a suffix
    (e.g. ``"_runs.jsonl"``) to more text to write as PREFIX<suffix>. Returns PREFIX.md."""
    from fedlsc_common.storage import atomic_write, atomic_write_text

    prefix.parent.mkdir(parents=True, exist_ok=True)
    for png in sorted(plots):
        target = prefix.parent / f"{prefix.name}_{png.name}"
        data = png.read_bytes()
        atomic_write(target, lambda f, data=data: f.write(data))
        report = report.replace(f"]({png.name})", f"]({target.name})")
    for suffix, text in (extra or {}).items():
        atomic_write_text(prefix.parent / f"{prefix.name}{suffix}", text)
    path = prefix.with_suffix(".md")
    atomic_write_text(path, report)
    print(f"published to {path}")
    return path
