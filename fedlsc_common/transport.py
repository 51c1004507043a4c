"""How soon this project's Flower processes ask again for a message part not there yet.

Flower 1.42 moves a message as one object per array plus 5 MB chunks (a packed model,
:mod:`fedlsc_flwr.packing`, is a handful), and a process that pulls a message whose
objects are still arriving retries each missing one after 1, 2, 4, 8 s (at most 10 s
apart). A ClientApp forked by the warm SuperExec (``fedlsc_tools.superexec``) starts
while its SuperNode is still receiving the message, and the ServerApp polls for replies
every 0.2 s: measured on the loopback deployment, a ClientApp waited until 3.4 s after
its SuperNode had received the last object; with retries after 0.1 s doubling up to
1 s, sites given the same message at the same moment still started training up to 2 s
apart. Retrying after 0.05 s, doubling up to 0.25 s, bounds that wait by a quarter of
a second; the retries go to the process's own SuperNode (ClientApp) or SuperLink
(ServerApp). More tries keep the patience of Flower's defaults (about an hour per
object) for slow links.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from logging import WARNING

INITIAL_BACKOFF = 0.05
BACKOFF_CAP = 0.25
MAX_TRIES_PER_OBJECT = 15000


def retry_object_pulls_sooner() -> bool:
    """Make this process's object pulls retry sooner (the defaults of Flower's
    ``pull_objects`` and ``pull_and_inflate_object_from_tree``); returns False, with a
    WARNING, when this Flower version has no such defaults to change."""
    from flwr.common.logger import log
    from flwr.supercore.inflatable import inflatable_utils

    wanted = {"initial_backoff": INITIAL_BACKOFF, "backoff_cap": BACKOFF_CAP,
              "max_tries_per_object": MAX_TRIES_PER_OBJECT}
    functions = [getattr(inflatable_utils, name, None)
                 for name in ("pull_objects", "pull_and_inflate_object_from_tree")]
    defaults = [getattr(f, "__kwdefaults__", None) or {} for f in functions]
    if not all(set(wanted) <= set(d) for d in defaults):
        log(WARNING, "Flower's object pulls have no retry defaults to shorten here; "
            "keeping Flower's 1-10 s backoff")
        return False
    for d in defaults:
        d.update(wanted)
    return True


def seconds_from_environment(name: str, default: float, low: float, high: float, *,
                             environ: Mapping[str, str] | None = None,
                             why: str = "") -> float:
    """A polling interval from environment variable ``name`` (``default`` if unset); a
    value that is not seconds in [``low``, ``high``] is refused naming the variable and
    the value, followed by ``why``."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = low - 1.0
    if not low <= value <= high:
        raise ValueError(f"{name} = {raw!r}: must be seconds in [{low:g}, {high:g}]{why}")
    return value
