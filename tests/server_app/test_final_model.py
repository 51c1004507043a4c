"""The final model's averaging of the last rounds' global models."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedlsc_common.settings import Settings
from fedlsc_flwr.wire import array_from_numpy, array_view
from server_app.final_model import RoundAverager, averager_for


def _model(value: float, step: int) -> ArrayRecord:
    return ArrayRecord({
        "conv.weight": array_from_numpy(np.full((2, 3), value, dtype=np.float32)),
        "bn.num_batches_tracked": array_from_numpy(np.array(step, dtype=np.int64)),
        "head.bias": array_from_numpy(np.array([value, -value], dtype=np.float16)),
    })


def test_mean_of_the_rounds_from_the_first_averaged_one_in_each_array_s_dtype():
    averager = RoundAverager(from_round=3)
    for true_round, value in [(1, 100.0), (2, 50.0), (3, 1.0), (4, 2.0), (5, 6.0)]:
        averager.add(true_round, _model(value, step=10 * true_round))
    averager.add(5, _model(1000.0, step=0))  # a round already added is not added again
    assert averager.rounds == [3, 4, 5]
    mean = averager.average(_model(0.0, 0))
    assert list(mean) == ["conv.weight", "bn.num_batches_tracked", "head.bias"]
    np.testing.assert_array_equal(array_view(mean["conv.weight"]), np.full((2, 3), 3.0))
    assert array_view(mean["conv.weight"]).dtype == np.float32
    assert array_view(mean["head.bias"]).dtype == np.float16
    np.testing.assert_array_equal(array_view(mean["head.bias"]), [3.0, -3.0])
    assert int(array_view(mean["bn.num_batches_tracked"])) == 50  # the latest, not a mean


def test_one_round_is_not_an_average():
    averager = RoundAverager(from_round=5)
    averager.add(5, _model(1.0, 1))
    assert averager.average(_model(0.0, 0)) is None


def test_the_settings_window_is_cut_to_the_run_s_rounds():
    assert averager_for(Settings.from_hydra(["average_last_rounds=1"])) is None
    assert averager_for(Settings.from_hydra(["average_last_rounds=4", "num_server_rounds=10"])
                        ).from_round == 7
    assert averager_for(Settings.from_hydra(["average_last_rounds=30"])).from_round == 1
