"""Other processes on this machine, read from /proc: who holds Flower's local SuperLink
port, and stopping the processes a run of ours started (found by a marker such as its
FLWR_HOME in their command line), never anyone else's."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
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
        if "flower-superlink" in cmd and f"--port {address[1]}" in cmd:
            return f"pid {pid}: {cmd.strip()}"
    return "an unknown process"


def local_superlink_port() -> int:
    """The port `flwr run` gives its local SuperLink (``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
    else 39091, as Flower 1.42 reads it)."""
    return int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", LOCAL_SUPERLINK[1]))


def superlink_pids(port: int) -> set[int]:
    """PIDs of the ``flower-superlink`` processes started with ``--port <port>``."""
    return {pid for pid, cmd in command_lines()
            if "flower-superlink" in cmd and f"--port {port} " in f"{cmd} "}


def stop_pids(pids: set[int], sig: int = signal.SIGTERM) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes_naming(marker: str, announce: bool = False) -> None:
    """SIGTERM the processes whose command line names ``marker``, and no other."""
    for pid, cmd in command_lines():
        if marker in cmd:
            if announce:
                print(f"stopping process {pid}: {cmd[:120]}", flush=True)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
