"""Flower's SuperNode, asking the SuperLink for the next message every 0.25 s when idle.

``flower-supernode`` (Flower 1.42) handles one message at a time: it pulls a message
from the SuperLink, waits for the ClientApp's reply (looking every 0.5 s), pushes it,
and pulls again; when the SuperLink has nothing for it, it sleeps a fixed 3 s, with no
option to change it. A round sends each site two messages (train, evaluate), so every
phase waited 1.5 s on average and up to 3 s for that sleep, and the sites started
training up to 3 s apart, each at its own moment in its own 3-s cycle (measured on the
loopback deployment, README "Deployment round cost").

This command is ``flower-supernode`` itself, with every sleep of that loop capped at
``$FEDLSC_SUPERNODE_POLL_INTERVAL`` seconds (default 0.25): same arguments, same
process, same protocol. The cost is one authenticated request to the SuperLink per
interval per idle SuperNode (12 a second for three hospitals).

    python -m fedlsc_tools.supernode --superlink HOST:9092 --isolation process ...
    fedlsc-supernode --superlink HOST:9092 --isolation process ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from logging import INFO, WARNING
from types import ModuleType
from typing import Any

from fedlsc_common.transport import seconds_from_environment

POLL_INTERVAL_ENV = "FEDLSC_SUPERNODE_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = 0.25
#: Flower's module whose loop sleeps (3 s when idle, 0.5 s waiting for a reply).
LOOP_MODULE = "flwr.supernode.start_client_internal"


def poll_interval(environ: dict[str, str] | None = None) -> float:
    """Seconds between idle polls: $FEDLSC_SUPERNODE_POLL_INTERVAL, else 0.25."""
    return seconds_from_environment(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL, 0.01, 3,
                                    environ=environ,
                                    why=" (Flower's own SuperNode waits 3 s)")


class _CappedSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep`` waits
    at most ``cap`` seconds; everything else is the real ``time``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_idle_polls(cap: float, module: ModuleType | None = None) -> bool:
    """Cap every sleep of the SuperNode's loop at ``cap`` seconds; False, with a WARNING,
    when this Flower version's loop is not where it was (the SuperNode then runs with
    Flower's own intervals)."""
    from flwr.common.logger import log

    if module is None:
        import importlib

        module = importlib.import_module(LOOP_MODULE)
    if getattr(module, "time", None) is not time:
        log(WARNING, "%s does not use the time module as expected: keeping Flower's own "
            "SuperNode poll intervals", module.__name__)
        return False
    module.time = _CappedSleep(cap)  # type: ignore[attr-defined]
    log(INFO, "SuperNode polls the SuperLink every %g s when idle (Flower's default 3 s)",
        cap)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """``flower-supernode`` with shorter idle polls; ``argv``: its arguments."""
    try:
        cap = poll_interval()
    except ValueError as err:
        sys.exit(f"fedlsc-supernode: {err}")
    from flwr.supernode.cli import flower_supernode

    shorten_idle_polls(cap)
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
