"""Server-side recording: pooled evaluation metrics and traffic metering."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlsc_common.classes import CLASSES
from fedlsc_flwr.metrics import classification_metrics, pooled_evaluate_metrics
from fedlsc_flwr.strategy import FedLSC, PersonalizedFedAvg, SiteAwareFedAvg
from server_app.recorder import MeteredGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _eval_record(cm, n):
    cm = np.asarray(cm)
    return RecordDict({"metrics": MetricRecord({
        "num-examples": n, "global-loss": 1.0 * n,
        "global-confusion": [int(v) for v in cm.reshape(-1)],
        "personal-confusion": [int(v) for v in cm.reshape(-1)]})})


def test_pooled_metrics_come_from_the_summed_confusion_matrix():
    a = np.zeros((7, 7), int)
    a[0, 0], a[1, 1], a[1, 0] = 10, 1, 9  # site A: class 0 right, class 1 mostly wrong
    b = np.zeros((7, 7), int)
    b[1, 1] = 30  # site B: only class 1, all right
    metrics = pooled_evaluate_metrics([_eval_record(a, 20), _eval_record(b, 30)],
                                      "num-examples", class_names=CLASSES)
    pooled = classification_metrics(a + b, [str(i) for i in range(7)])
    assert metrics["global-balanced-accuracy"] == pytest.approx(pooled["balanced-accuracy"])
    assert metrics["global-balanced-accuracy"] == pytest.approx((1.0 + 31 / 40) / 2)
    assert metrics["global-accuracy"] == pytest.approx(41 / 50)
    assert metrics["global-confusion"] == [int(v) for v in (a + b).reshape(-1)]
    assert metrics["global-recall-bcc"] == pytest.approx(31 / 40)
    site_mean = (classification_metrics(a, list("abcdefg"))["balanced-accuracy"] + 1.0) / 2
    assert metrics["personal-site-mean-balanced-accuracy"] == pytest.approx(site_mean)
    assert metrics["global-loss"] == pytest.approx((20 * 20 + 30 * 30) / 50)  # weighted
    assert metrics["num-sites"] == 2


class _Grid:
    def __init__(self):
        self.asked = 0

    def get_node_ids(self):
        self.asked += 1
        return [1, 2]

    def push_messages(self, messages):
        self.pushed = list(messages)
        for i, m in enumerate(self.pushed):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, message_ids):
        # one reply per pull, so the grid has to poll
        m = next(m for m in self.pushed if m.metadata.message_id in set(message_ids))
        return [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10, np.float32))}),
                                    "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)]


def test_metered_grid_counts_array_bytes_and_delegates():
    inner = _Grid()
    grid = MeteredGrid(inner, poll_interval=0.01)
    payload = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(100, np.float32))})})
    messages = [Message(payload, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    replies = grid.send_and_receive(messages)
    assert len(replies) == 2 and grid.get_node_ids() == [1, 2] and inner.asked == 1
    sent, received = len(Array(np.zeros(100, np.float32)).data), len(
        Array(np.zeros(10, np.float32)).data)
    assert grid.take_traffic() == {"train-sent": 2 * sent, "train-received": 2 * received}
    assert grid.take_traffic() == {}
    marks = grid.take_marks()
    assert marks["train-sent"] <= marks["train-replied"]


class _AlwaysFailing(SiteAwareFedAvg):
    """A strategy whose training rounds never aggregate (every site failed)."""

    def aggregate_train(self, server_round, replies):
        self.failures["train"] = [{"site": "site-0", "node": 1, "reason": "error reply"}]
        return None, None


def test_recorder_wraps_only_strategies_of_this_package():
    from flwr.serverapp.strategy import FedAvg

    from server_app.recorder import RecordedStrategy

    with pytest.raises(TypeError, match="needs a fedlsc_flwr strategy"):
        RecordedStrategy(FedAvg())


def test_rounds_without_an_update_are_recorded(tmp_path):
    from server_app.recorder import RecordedStrategy, RunRecorder

    strategy = RecordedStrategy(_AlwaysFailing())
    recorder = RunRecorder(tmp_path, strategy=strategy, grid=MeteredGrid(_Grid()),
                           run_config={}, strategy_name="fedavg", round_offset=0,
                           model_info={"backbone": "resnet10t_sa", "image_size": 32,
                                       "mean": [0.5] * 3, "std": [0.5] * 3},
                           class_names=["a", "b"], targets=[0.5])
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    for server_round in (1, 2):
        strategy.aggregate_train(server_round, [])
        recorder(server_round, arrays)
    assert [r["aggregated"] for r in recorder.rows] == [False, False]
    assert recorder.rows[0]["failures"]["train"][0]["site"] == "site-0"
    assert recorder.finish()["rounds_aggregated"] == 0


def _recorded_run(tmp_path, inner, name="fedlsc"):
    from server_app.recorder import RecordedStrategy, RunRecorder

    recorded = RecordedStrategy(inner)
    return recorded, RunRecorder(
        tmp_path, strategy=recorded, grid=MeteredGrid(_Grid()), run_config={},
        strategy_name=name, round_offset=0,
        model_info={"backbone": "resnet10t_sa", "image_size": 32, "mean": [0.5] * 3,
                    "std": [0.5] * 3}, class_names=list(CLASSES), targets=[0.1])


def _evaluated(recorded, accuracy):
    """What aggregate_evaluate would have kept after a round with this global accuracy."""
    recorded.evaluate_metrics = {"global-accuracy": accuracy, "global-balanced-accuracy": 0.4,
                                 "personal-accuracy": 0.8, "personal-balanced-accuracy": 0.5,
                                 "num-sites": 3}


@pytest.mark.parametrize("name, inner, scored", [
    ("fedavg-fc", lambda: PersonalizedFedAvg(["classifier"]), False),
    ("fedlsc", lambda: FedLSC(), True),
    ("fedavg", lambda: SiteAwareFedAvg(), True),
])
def test_global_model_with_never_trained_layers_is_not_scored(tmp_path, name, inner, scored):
    from fedlsc_tools.cli import finished_line

    recorded, recorder = _recorded_run(tmp_path, inner(), name)
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    _evaluated(recorded, 0.7)
    recorder(1, arrays)
    summary = recorder.finish()
    assert summary["global_model"]["scored"] is scored
    assert recorder.rows[0]["global-model-scored"] is scored
    line = finished_line(summary, 12.0, tmp_path)
    assert "personalized models: balanced accuracy 0.5000" in line
    if scored:
        assert summary["final"]["global"]["accuracy"] == pytest.approx(0.7)
        assert summary["rounds_to_reach_accuracy"] == {"0.1": 1}
        assert "global model: 0.4000" in line
    else:
        assert summary["global_model"]["never_trained"] == ["classifier"]
        assert summary["final"]["global"] == {} and summary["rounds_to_reach_accuracy"] == {}
        assert "Global model: not applicable (1 layer(s)" in line


def _report(server_round):
    from fedlsc_flwr.similarity import LayerReport
    from fedlsc_flwr.strategy import RoundReport

    layer = LayerReport(np.array([0.5, 0.4]), np.array([0.6, 0.4]))
    return RoundReport(server_round, [1, 2], {"stem": layer, "classifier": layer}, [])


def test_stage1_heatmap_is_drawn_once_and_not_redrawn_after_a_resume(tmp_path):
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    fresh = FedLSC()
    recorded, recorder = _recorded_run(tmp_path / "fresh", fresh)
    recorder(0, arrays)
    fresh.stage1_round, fresh.last_report = 1, _report(1)
    recorder(1, arrays)
    assert (tmp_path / "fresh" / "similarity_heatmap_stage1.png").is_file()

    resumed = FedLSC()
    resumed.load_state_dict({"personalized_layers": [], "stage1_round": 1})
    recorded, recorder = _recorded_run(tmp_path / "resumed", resumed)
    recorder(0, arrays)
    resumed.last_report = _report(1)  # round 1 of start() after the resume: a later round
    recorder(1, arrays)
    assert (tmp_path / "resumed" / "similarity_heatmap.png").is_file()
    assert not (tmp_path / "resumed" / "similarity_heatmap_stage1.png").exists()


def _evaluate_reply(node, site, global_cm, personal_cm):
    from fedlsc_flwr.wire import site_record

    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({
        "metrics": MetricRecord({
            "num-examples": int(np.sum(global_cm)), "global-loss": 1.0, "personal-loss": 1.0,
            "global-confusion": [int(v) for v in np.ravel(global_cm)],
            "personal-confusion": [int(v) for v in np.ravel(personal_cm)]}),
        "site": site_record(site)}), reply_to=sent)


def _recorder(tmp_path, strategy, class_names, **kwargs):
    from server_app.recorder import RunRecorder

    return RunRecorder(tmp_path, strategy=strategy, grid=MeteredGrid(_Grid()), run_config={},
                       strategy_name="fedlsc", round_offset=0,
                       model_info={"backbone": "resnet10t_sa", "image_size": 32,
                                   "mean": [0.5] * 3, "std": [0.5] * 3},
                       class_names=class_names, targets=[0.5], **kwargs)


def test_confusion_matrices_pooled_and_per_site_are_recorded_and_drawn(tmp_path):
    import functools
    import json

    from server_app.recorder import RecordedStrategy

    names = ["a", "b", "c"]
    strategy = RecordedStrategy(SiteAwareFedAvg(evaluate_metrics_aggr_fn=functools.partial(
        pooled_evaluate_metrics, class_names=names)))
    recorder = _recorder(tmp_path, strategy, names)
    g1, p1 = [[5, 1, 0], [0, 2, 0], [0, 0, 0]], [[6, 0, 0], [0, 2, 0], [0, 0, 0]]
    g2 = p2 = [[0, 0, 0], [1, 3, 0], [0, 1, 4]]
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    strategy.aggregate_evaluate(1, [_evaluate_reply(1, "hospital-1", g1, p1),
                                    _evaluate_reply(2, "hospital-2", g2, p2)])
    recorder(1, arrays)
    confusion = json.loads((tmp_path / "metrics.jsonl").read_text())["confusion"]
    assert confusion["classes"] == names
    assert confusion["global"]["pooled"] == (np.array(g1) + np.array(g2)).tolist()
    assert confusion["global"]["sites"] == {"hospital-1": g1, "hospital-2": g2}
    assert confusion["personalized"]["pooled"] == (np.array(p1) + np.array(p2)).tolist()
    assert confusion["personalized"]["sites"]["hospital-1"] == p1
    png = tmp_path / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left
    from PIL import Image

    width, height = Image.open(png).size
    assert 1.3 < width / height < 1.7  # 3 panels a row (pooled + 2 sites), 2 rows (models)
    # a later round without evaluation keeps the last drawing, and records no matrices
    recorder(2, arrays)
    assert recorder.rows[-1]["confusion"] is None and png.is_file()


def test_confusion_plot_leaves_out_an_unscored_global_model(tmp_path):
    import functools

    from server_app.recorder import RecordedStrategy

    names = ["a", "b"]
    strategy = RecordedStrategy(PersonalizedFedAvg(["classifier"], evaluate_metrics_aggr_fn=(
        functools.partial(pooled_evaluate_metrics, class_names=names))))
    recorder = _recorder(tmp_path, strategy, names)
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    strategy.aggregate_evaluate(1, [_evaluate_reply(1, "h1", [[1, 1], [1, 1]], [[2, 0], [0, 2]]),
                                    _evaluate_reply(2, "h2", [[1, 1], [1, 1]], [[2, 0], [1, 1]])])
    recorder(1, arrays)
    assert recorder.rows[0]["confusion"]["global"]["pooled"] == [[2, 2], [2, 2]]  # kept as data
    from PIL import Image

    width, height = Image.open(tmp_path / "confusion_matrix.png").size
    assert width / height > 2.2  # one row of panels (personalized), not two


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_logs_every_round(tmp_path):
    pytest.importorskip("tensorboard")
    import functools

    from server_app.recorder import RecordedStrategy, TensorBoardLog

    names = ["a", "b", "c"]
    strategy = RecordedStrategy(SiteAwareFedAvg(evaluate_metrics_aggr_fn=functools.partial(
        pooled_evaluate_metrics, class_names=names)))
    recorder = _recorder(tmp_path, strategy, names,
                         tensorboard=TensorBoardLog(tmp_path / "tensorboard"))
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    for server_round, right in ((1, 3), (2, 5)):
        cm = [[right, 6 - right, 0], [0, 4, 0], [0, 0, 0]]
        strategy.aggregate_evaluate(server_round, [_evaluate_reply(1, "h1", cm, cm)])
        recorder(server_round, arrays)
    recorder.finish()
    scalars = _scalars(tmp_path / "tensorboard")
    accuracy = scalars["global/accuracy"]
    assert [step for step, _ in accuracy] == [1, 2]
    assert [v for _, v in accuracy] == pytest.approx([r["global"]["accuracy"]
                                                      for r in recorder.rows])
    assert accuracy[1][1] == pytest.approx(9 / 10)
    assert "personalized/balanced-accuracy" in scalars and "time/seconds-per-round" in scalars


def test_tensorboard_of_a_resumed_run_holds_every_round_once(tmp_path):
    pytest.importorskip("tensorboard")
    from server_app.recorder import RecordedStrategy, TensorBoardLog

    def row(step, accuracy):
        return {"round": step, "global": {"accuracy": accuracy}, "seconds": 1.0}

    first = TensorBoardLog(tmp_path / "tensorboard")
    for step in (1, 2, 3):  # round 3 was logged, but the run stopped before its checkpoint
        first.write(row(step, 0.1 * step))
    first.close()
    # resumed from round 2's checkpoint, into the same folder: rounds 1-2 come from
    # metrics.jsonl, round 3 is run again
    recorder = _recorder(tmp_path, RecordedStrategy(SiteAwareFedAvg()), ["a", "b"],
                         previous_rows=[row(1, 0.1), row(2, 0.2)],
                         tensorboard=TensorBoardLog(tmp_path / "tensorboard"))
    recorder.tensorboard.write(row(3, 0.9))
    recorder.tensorboard.close()
    values = _scalars(tmp_path / "tensorboard")["global/accuracy"]
    assert [s for s, _ in values] == [1, 2, 3]
    assert [v for _, v in values] == pytest.approx([0.1, 0.2, 0.9])
    other = TensorBoardLog(tmp_path / "elsewhere")  # resumed into a new results folder
    _recorder(tmp_path, RecordedStrategy(SiteAwareFedAvg()), ["a", "b"],
              previous_rows=[row(1, 0.1), row(2, 0.2)], tensorboard=other)
    other.close()
    assert [s for s, _ in _scalars(tmp_path / "elsewhere")["global/accuracy"]] == [1, 2]


def test_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from fedlsc_common.settings import ConfigError
    from server_app.recorder import TensorBoardLog

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"true needs .*fedlsc-flwr\[tensorboard\]"):
        TensorBoardLog(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def _train_reply(node, seconds, examples, start):
    from flwr.app import ConfigRecord

    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        "metrics": MetricRecord({"num-examples": examples, "train-seconds": seconds}),
        "site": ConfigRecord({"name": f"site-{node}"}),
        "timing": ConfigRecord({"train-start": start, "train-end": start + seconds,
                                "reply-ready": start + seconds + 0.5})}),
        reply_to=instruction)


def test_round_costs_come_from_the_sites_own_training_times():
    from server_app.recorder import site_timings, train_costs

    replies = [_train_reply(1, 10.0, 320, 1000.0), _train_reply(2, 14.5, 300, 1002.0),
               _train_reply(3, 3.0, 100, 1001.0)]
    costs = train_costs(replies)
    assert costs == {"train-seconds-max": 14.5, "train-images": 720,
                     "train-span-seconds": pytest.approx(16.5)}  # 1000 -> 1016.5
    assert site_timings(replies)["site-2"]["train-end"] == pytest.approx(1016.5)


def test_recorded_rows_carry_round_and_slowest_training_seconds(tmp_path):
    from server_app.recorder import RecordedStrategy, RunRecorder, read_rows

    strategy = RecordedStrategy(SiteAwareFedAvg(min_available_nodes=3, min_train_nodes=3))
    recorder = RunRecorder(tmp_path, strategy=strategy, grid=MeteredGrid(_Grid()),
                           run_config={}, strategy_name="fedavg", round_offset=0,
                           model_info={"backbone": "resnet10t_sa", "image_size": 32,
                                       "mean": [0.5] * 3, "std": [0.5] * 3},
                           class_names=["a", "b"], targets=[0.5])
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    recorder(0, arrays)
    strategy.aggregate_train(1, [_train_reply(n, 1.0 + n, 10, 0.0) for n in (1, 2, 3)])
    recorder(1, arrays)
    row = read_rows(tmp_path / "metrics.jsonl")[0]
    assert row["train-seconds-max"] == 4.0 and row["train-images"] == 30
    assert row["round-seconds"] >= 0
    server = row["timing"]["server"]
    assert server["round-start"] <= server["aggregate-start"] <= server["aggregate-end"] \
        <= server["record-start"] <= server["recorded"]
    assert row["timing"]["sites"]["site-3"]["train"]["train-end"] == 4.0


@pytest.mark.parametrize("every, rounds, expected", [
    (1, 5, [1, 2, 3, 4, 5]), (2, 5, [2, 4, 5]), (3, 6, [3, 6]), (10, 3, [3])])
def test_sites_evaluate_every_kth_round_and_the_last(every, rounds, expected):
    from fedlsc_common.settings import Settings
    from server_app.recorder import RecordedStrategy

    settings = Settings.from_hydra([f"evaluate_every={every}", f"num_server_rounds={rounds}"])
    assert [r for r in range(1, rounds + 1) if settings.evaluates(r)] == expected
    done = 1  # a run resumed after round 1: Flower numbers its rounds from 1 again
    strategy = RecordedStrategy(SiteAwareFedAvg(min_available_nodes=2, min_train_nodes=2),
                                lambda server_round: settings.evaluates(server_round + done))
    asked = [r + done for r in range(1, rounds - done + 1)
             if list(strategy.configure_evaluate(r, ArrayRecord(), _config(), _Grid()))]
    assert asked == [r for r in expected if r > done]


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord()


def test_background_plots_draw_the_latest_of_each_file_and_all_by_close(tmp_path):
    import threading

    from server_app.plots import PlotWriter

    gate = threading.Event()
    drawn: list[tuple[str, int]] = []

    def draw(value, path):
        gate.wait(10)  # the first plot blocks until the others are queued
        drawn.append((path.name, value))
        path.write_text(str(value))

    plots = PlotWriter(background=True)
    plots.submit(tmp_path / "a.png", draw, 1)
    for value in (2, 3, 4):  # a.png: 2 and 3 are replaced by 4 while waiting
        plots.submit(tmp_path / "a.png", draw, value)
    plots.submit(tmp_path / "b.png", draw, 5)
    gate.set()
    plots.close()
    assert (tmp_path / "a.png").read_text() == "4" and (tmp_path / "b.png").read_text() == "5"
    assert drawn[-2:] == [("a.png", 4), ("b.png", 5)]
    assert {value for _, value in drawn} <= {1, 4, 5}  # 2 and 3 were never drawn
    assert not plots._thread.is_alive()


def test_a_plot_that_fails_is_logged_and_the_rest_are_drawn(tmp_path, flwr_logs):
    from server_app.plots import PlotWriter

    def broken(path):
        raise ValueError("no data")

    plots = PlotWriter(background=True)
    plots.submit(tmp_path / "bad.png", broken)
    plots.submit(tmp_path / "good.png", lambda path: path.write_text("ok"))
    plots.close()
    assert (tmp_path / "good.png").read_text() == "ok"
    assert "Could not draw" in flwr_logs.text and "no data" in flwr_logs.text


@pytest.mark.usefixtures("task_identity")
def test_traffic_counts_the_arrays_as_the_strategy_made_them_not_packed():
    from fedlsc_flwr.packing import PackingGrid, is_packed, packed_arrays_mod
    from fedlsc_flwr.wire import array_from_numpy

    class Echo:  # a Grid whose sites answer at once through the ClientApp's mod
        def __init__(self):
            self.replies, self.wire = {}, []

        def push_messages(self, messages):
            ids = []
            for i, m in enumerate(messages):
                self.wire.append(m.content["arrays"])
                m.metadata.__dict__["_message_id"] = f"m{i}"
                self.replies[f"m{i}"] = packed_arrays_mod(m, None, lambda msg, _: Message(
                    RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg))
                ids.append(f"m{i}")
            return ids

        def pull_messages(self, ids):
            return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    arrays = ArrayRecord({f"w{i}": array_from_numpy(np.ones(250, np.float32))
                          for i in range(4)})  # 4 x 1,000 bytes of data (+ .npy headers)
    tensor_bytes = sum(len(a.data) for a in arrays.values())
    echo = Echo()
    grid = MeteredGrid(PackingGrid(echo), poll_interval=0.0)
    messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in (1, 2)]
    replies = grid.send_and_receive(messages)
    assert all(is_packed(r) for r in echo.wire)  # packed on the wire
    assert grid.traffic == {"train-sent": 2 * tensor_bytes, "train-received": 2 * tensor_bytes}
    assert all(list(r.content["arrays"]) == list(arrays) for r in replies)
