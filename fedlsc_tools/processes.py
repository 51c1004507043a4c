"""Other processes on this machine, read from /proc: who holds Flower's local SuperLink
port, and stopping the processes a run of ours started (found by a marker such as its
FLWR_HOME in their command line), never anyone else's."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

#: `flwr run` in simulation starts (or reuses) a local SuperLink on this fixed address.
LOCAL_SUPERLINK = ("127.0.0.1", 39091)


def command_lines() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every other process whose command line can be read."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            yield int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue


def local_superlink_owner(address: tuple[str, int] = LOCAL_SUPERLINK) -> str | None:
    """``"pid N: <command line>"`` of the Flower SuperLink listening on ``address``, "an
    unknown process" if what listens there is not one, or None when nothing listens."""
    with socket.socket() as s:
        if s.connect_ex(address) != 0:
            return None
    for pid, cmd in command_lines():
        if _is_superlink_on(cmd, address[1]):
            return f"pid {pid}: {cmd.strip()}"
    return "an unknown process"


def _is_superlink_on(cmd: str, port: int) -> bool:
    """Is command line ``cmd`` a ``flower-superlink`` started with ``--port <port>``?"""
    return "flower-superlink" in cmd and f"--port {port} " in f"{cmd} "


def local_superlink_port() -> int:
    """The port `flwr run` gives its local SuperLink (``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
    else 39091, as Flower 1.42 reads it)."""
    return int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", LOCAL_SUPERLINK[1]))


def superlink_pids(port: int) -> set[int]:
    """PIDs of the ``flower-superlink`` processes started with ``--port <port>``."""
    return {pid for pid, cmd in command_lines() if _is_superlink_on(cmd, port)}


def stop_pids(pids: Iterable[int], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to each of ``pids``; one that has already gone is no error."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes_naming(marker: str, announce: bool = False) -> None:
    """SIGTERM the processes whose command line names ``marker``, and no other."""
    marked = [(pid, cmd) for pid, cmd in command_lines() if marker in cmd]
    if announce:
        for pid, cmd in marked:
            print(f"stopping process {pid}: {cmd[:120]}", flush=True)
    stop_pids(pid for pid, _ in marked)
