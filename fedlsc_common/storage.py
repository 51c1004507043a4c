"""Atomic files, self-describing model files, and server checkpoints (torch only).

Every write goes to a temporary file in the target folder, is flushed to disk, then
replaces the target with ``os.replace``: a process killed mid-write leaves the previous
good file readable.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

MODEL_FORMAT = "fedlsc-model/1"
CHECKPOINT_FORMAT = "fedlsc-checkpoint/1"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None],
                 mode: int | None = None) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place.
    ``mode`` (e.g. 0o600) is set before any byte is written, so a private key is never
    readable by others, not even for a moment; else the temporary file's 0600 stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


class FolderInUse(RuntimeError):
    """Another live process writes to this results folder."""


def lock_folder(folder: str | Path) -> IO[str]:
    """Hold an exclusive lock on ``folder`` for as long as the returned file stays open.

    Two runs writing one results folder would interleave their rounds; the lock makes
    the second fail at once. The OS drops the lock when its process dies, so a killed
    run never leaves a stale lock behind.
    """
    import fcntl

    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - kept open to hold the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise FolderInUse(f"{folder} is in use by another run ({owner}); wait for it to end "
                          "or stop it, or choose another results-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def to_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """numpy or torch values -> CPU tensors (copies: the result owns its memory)."""
    return {k: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray)
                else v.detach().cpu().clone()) for k, v in state.items()}


def save_model(path: str | Path, state_dict: Mapping[str, Any], *, backbone: str,
               class_names: list[str], image_size: int, mean: list[float], std: list[float],
               **info: Any) -> Path:
    """A model file that is enough on its own to rebuild the model and predict."""
    return atomic_torch_save({
        "format": MODEL_FORMAT,
        "backbone": backbone,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "info": info,
        "state_dict": to_tensors(state_dict),
    }, path)


def _read_checked(path: str | Path, expected_format: str, what: str) -> dict[str, Any]:
    """A torch file this project wrote, loaded safely (weights only) and its format checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or not a torch file
        raise ValueError(f"{path}: not a readable {what} ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != expected_format:
        raise ValueError(f"{path}: not a fedlsc {what} (expected format {expected_format!r})")
    return blob


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The content of a file written by :func:`save_model`, checked."""
    return _read_checked(path, MODEL_FORMAT, "model file")


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns it (eval mode) and its description."""
    from fedlsc_flwr.model import build_model

    blob = read_model_file(path)
    model = build_model(blob["backbone"], num_classes=blob["num_classes"])
    result = model.load_state_dict(blob["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit backbone {blob['backbone']!r}: "
                         f"missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.eval()
    return model, {k: v for k, v in blob.items() if k != "state_dict"}


def save_checkpoint(path: str | Path, *, server_round: int, arrays: Mapping[str, Any],
                    strategy_state: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path:
    """What a ServerApp needs to resume after ``server_round``."""
    return atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "round": int(server_round),
        "arrays": to_tensors(arrays),
        "strategy_state": dict(strategy_state),
        "run_config": dict(run_config),
    }, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The content of a file written by :func:`save_checkpoint`, checked."""
    return _read_checked(path, CHECKPOINT_FORMAT, "checkpoint to resume from")
