"""The project's real ServerApp and ClientApp, run in one process for benchmark sweeps.

:class:`InProcessGrid` is a Flower ``Grid`` that hands each message straight to the
ClientApp's ``train``/``evaluate`` function of the addressed site (one after another,
each with its own ``Context``: node config and state survive between rounds as on a
SuperNode), and turns an exception into an error reply, as a SuperNode does. The
ServerApp's own ``main`` drives it, so strategy, recorder, checkpoints and results files
are exactly those of ``flwr run``; what is left out is Ray, the SuperLink and one process
per message. On a 2-core machine this saves ~30 s of start-up per run and lets each site
train on every core in turn: the paper-table sweep uses it (``--transport inprocess``).
It is not a deployment: the deployment tests start real Flower processes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlsc_flwr.calibration import FEATURE_STATISTICS_MESSAGE_TYPE
from fedlsc_flwr.packing import packed_arrays_mod


class InProcessGrid(Grid):
    """Delivers messages to in-process sites: ``{node_id: Context}``."""

    def __init__(self, contexts: Mapping[int, Context], run_id: int) -> None:
        self.contexts = dict(contexts)
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid API
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102 - Grid API
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"inprocess-{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self._replies[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def _deliver(self, message: Message) -> Message:
        from client_app import app as client_app

        handler = {MessageType.TRAIN: client_app.train,
                   MessageType.EVALUATE: client_app.evaluate,
                   FEATURE_STATISTICS_MESSAGE_TYPE: client_app.feature_statistics,
                   }[message.metadata.message_type]
        context = self.contexts[message.metadata.dst_node_id]
        TaskIdentity.node_id = message.metadata.dst_node_id
        try:  # through the ClientApp's mods, as Flower calls it
            return packed_arrays_mod(message, context, handler)
        except Exception as err:  # a SuperNode sends the failure back as an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                           reply_to=message)
        finally:
            TaskIdentity.node_id = 0


def run_in_process(run_config: Mapping[str, Any], node_configs: list[dict[str, Any]],
                   run_id: int | None = None) -> float:
    """Run the ServerApp on ``run_config`` with one in-process site per node config;
    returns the wall time in seconds. Results go where ``results-dir`` says."""
    from server_app import app as server_app

    run_id = run_id or int(time.time() * 1000) % 2**31
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    contexts = {node + 1: Context(run_id=run_id, node_id=node + 1, node_config=config,
                                  state=RecordDict(), run_config=dict(run_config))
                for node, config in enumerate(node_configs)}
    grid = InProcessGrid(contexts, run_id)
    server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config))
    start = time.monotonic()
    server_app.main(grid, server_context)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlsc_tools.inprocess RUN_CONFIG.toml --num-supernodes N``."""
    import argparse
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    parser = argparse.ArgumentParser(
        prog="python -m fedlsc_tools.inprocess",
        description="Run the ServerApp and N ClientApp sites in this one process (no Ray, "
                    "no SuperLink), on a run-config TOML file as `flwr run` takes it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_config", type=Path, help="run-config TOML file (all keys)")
    parser.add_argument("--num-supernodes", type=int, default=3, help="number of sites")
    args = parser.parse_args(argv)
    run_config = flatten_dict(tomllib.loads(args.run_config.read_text()))
    nodes = [{"partition-id": i, "num-partitions": args.num_supernodes}
             for i in range(args.num_supernodes)]
    seconds = run_in_process(run_config, nodes)
    print(f"in-process run finished in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
