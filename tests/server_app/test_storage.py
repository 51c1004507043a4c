"""Atomic writes, self-describing model files and checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedlsc_common.storage import (
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    load_checkpoint,
    load_model,
    read_model_file,
    save_checkpoint,
    save_model,
)


def test_interrupted_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write_json(target, {"round": 1})

    def dies_midway(f):
        f.write(b'{"round": 2, "partial')
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies_midway)
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"round":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_mode_is_set_before_the_first_byte(tmp_path):
    target = tmp_path / "key.pem"
    seen = []

    def write(f):
        seen.append(os.stat(f.fileno()).st_mode & 0o777)
        f.write(b"secret")

    atomic_write(target, write, mode=0o400)
    assert seen == [0o400] and target.stat().st_mode & 0o777 == 0o400
    assert target.read_bytes() == b"secret"


def test_model_file_alone_rebuilds_the_model(tmp_path):
    from fedlsc_flwr.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet10t_sa", num_classes=7).eval()
    path = save_model(tmp_path / "m.pt", model.state_dict(), backbone="resnet10t_sa",
                      class_names=list("abcdefg"), image_size=32, mean=[0.5] * 3, std=[0.2] * 3,
                      round=3, kind="global")
    rebuilt, info = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert info["image_size"] == 32 and info["class_names"] == list("abcdefg")
    assert info["info"] == {"round": 3, "kind": "global"}


def test_bad_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_model_file(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: not a readable model file"):
        read_model_file(tmp_path / "junk.pt")
    atomic_torch_save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a fedlsc model file"):
        read_model_file(tmp_path / "other.pt")


def test_checkpoint_round_trip(tmp_path):
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "a.num_batches_tracked": np.array(4, dtype=np.int64)}
    save_checkpoint(tmp_path / "c.pt", server_round=7, arrays=arrays,
                    strategy_state={"personalized_layers": ["a"], "stage1_round": 1},
                    run_config={"seed": 0})
    blob = load_checkpoint(tmp_path / "c.pt")
    assert blob["round"] == 7 and blob["strategy_state"]["personalized_layers"] == ["a"]
    np.testing.assert_array_equal(blob["arrays"]["a.weight"].numpy(), arrays["a.weight"])
    with pytest.raises(FileNotFoundError, match="checkpoint to resume from not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_results_folder_lock_refuses_a_second_writer(tmp_path):
    from fedlsc_common.storage import FolderInUse, lock_folder

    first = lock_folder(tmp_path)
    with pytest.raises(FolderInUse, match=r"in use by another run \(pid \d+\)"):
        lock_folder(tmp_path)
    first.close()  # as when the first run ends or dies
    lock_folder(tmp_path).close()
