"""Time FedLSC.aggregate_train against Flower's FedAvg.aggregate_train on the same replies.

FedLSC's site-agreement report is part of its ``aggregate_train``; the last column times
the report alone (``FedLSC._site_agreement`` on the round's per-layer similarities), so
its share of the aggregation is measured in the same process.

Both strategies receive identical mocked replies (Flower ``Message`` objects holding
``ArrayRecord`` s) for a model's state_dict shapes; each (strategy, N) is timed
``--repeats`` times, interleaved, and the spread is printed: min / median / max seconds
of each, and FedLSC / FedAvg for each of the three, measured in the same run, so the
ratios survive a noisy machine. "worst" is FedLSC's slowest call over FedAvg's fastest.
The first call of each strategy (one-time costs: FedLSC finds the BLAS library and
touches its workspace) is not among the repeats; the last column prints it.

    python benchmarks/aggregation.py --model res2net50_sa --clients 3 10 30
    python benchmarks/aggregation.py --model small --clients 3 10 30 100
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from functools import partial

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedlsc_flwr import FedLSC


def model_shapes(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """State_dict shapes and dtypes of a model, without keeping its weights."""
    if name == "small":
        return {"conv.weight": ((64, 32, 3, 3), "float32"), "bn.weight": ((64,), "float32"),
                "bn.bias": ((64,), "float32"), "bn.running_mean": ((64,), "float32"),
                "bn.running_var": ((64,), "float32"), "bn.num_batches_tracked": ((), "int64"),
                "classifier.weight": ((7, 64), "float32"), "classifier.bias": ((7,), "float32")}
    if name.startswith("timm:"):  # any timm architecture, e.g. timm:res2net50_26w_4s
        import timm

        model = timm.create_model(name[5:], num_classes=7)
    else:
        from fedlsc_flwr.model import build_model

        model = build_model(name, num_classes=7)
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in model.state_dict().items()}


def make_state(shapes, rng, base=None, scale=1.0):
    state = {}
    for key, (shape, dtype) in shapes.items():
        if dtype.startswith("int"):
            state[key] = np.array(5, dtype=dtype).reshape(shape)
        elif base is None:
            state[key] = rng.standard_normal(shape, dtype=np.float32)
        else:
            state[key] = base[key] + scale * rng.standard_normal(shape, dtype=np.float32)
    return state


def make_replies(global_state, n, rng):
    replies = []
    for node in range(1, n + 1):
        state = make_state({k: (v.shape, str(v.dtype)) for k, v in global_state.items()},
                           rng, base=global_state, scale=1e-3)
        instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                              "metrics": MetricRecord({"num-examples": 100 + node})})
        replies.append(Message(content=content, reply_to=instruction))
        del state
    return replies


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def time_call(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _spread(times: list[float]) -> str:
    return f"{min(times):.3f}/{statistics.median(times):.3f}/{max(times):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="res2net50_sa")
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the strategies log every call
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    rng = np.random.default_rng(0)
    shapes = model_shapes(args.model)
    global_state = make_state(shapes, rng)
    params = sum(v.size for v in global_state.values())
    print(f"model={args.model} tensors={len(global_state)} elements={params:,} "
          f"({params * 4 / 2**20:.1f} MiB float32)")
    print(f"{'N':>4} {'FedAvg s min/med/max':>22} {'FedLSC s min/med/max':>22} "
          f"{'ratio min/med/max':>18} {'worst':>6} {'+norm filter s med':>19} {'ratio':>6} "
          f"{'report ms':>10} {'share':>7} {'first call s FedAvg/FedLSC':>27}")
    global_record = ArrayRecord({k: Array(v) for k, v in global_state.items()})
    rows = []
    for n in args.clients:
        replies = make_replies(global_state, n, rng)
        fedavg, fedlsc = FedAvg(), FedLSC(personalized_ratio=0.0)
        filtered = FedLSC(personalized_ratio=0.0, max_update_norm_ratio=25.0)
        for strategy in (fedlsc, filtered):
            list(strategy.configure_train(1, global_record, ConfigRecord(), _Grid(n)))
        # The first call of each pays one-time costs (FedLSC: finding the BLAS library,
        # its workspace's pages); printed apart, then the timed repeats.
        first_avg = time_call(partial(fedavg.aggregate_train, 1, replies))
        first_lsc = time_call(partial(fedlsc.aggregate_train, 1, replies))
        time_call(partial(filtered.aggregate_train, 1, replies))
        avg_t, lsc_t, filt_t = [], [], []
        for _ in range(args.repeats):
            avg_t.append(time_call(partial(fedavg.aggregate_train, 1, replies)))
            lsc_t.append(time_call(partial(fedlsc.aggregate_train, 1, replies)))
            filt_t.append(time_call(partial(filtered.aggregate_train, 1, replies)))
        a, b, c = (statistics.median(t) for t in (avg_t, lsc_t, filt_t))
        report = fedlsc.last_report
        r = statistics.median(time_call(partial(
            fedlsc._site_agreement, 1, report.node_ids, report.layers)) for _ in range(20))
        rows.append((n, a, b))
        ratios = (min(lsc_t) / min(avg_t), b / a, max(lsc_t) / max(avg_t))
        print(f"{n:>4} {_spread(avg_t):>22} {_spread(lsc_t):>22} "
              f"{'/'.join(f'{x:.2f}' for x in ratios):>18} {max(lsc_t) / min(avg_t):>6.2f} "
              f"{c:>19.3f} {c / a:>6.2f} {1000 * r:>10.3f} {r / b:>7.2%} "
              f"{first_avg:>6.3f}/{first_lsc:.3f}", flush=True)
        del replies
    if len(rows) > 1:
        (n0, _, t0), (n1, _, t1) = rows[0], rows[-1]
        print(f"FedLSC growth N={n0}->{n1}: time x{t1 / t0:.2f} for clients x{n1 / n0:.2f}")


if __name__ == "__main__":
    main()
