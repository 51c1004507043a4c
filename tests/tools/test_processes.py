"""Finding and stopping our own processes by their command line, never others'."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from fedlsc_tools.processes import command_lines, local_superlink_owner, stop_processes_naming


def test_stop_processes_naming_stops_only_the_marked_one(tmp_path):
    marker = str(tmp_path / "flwr-home-marker")
    code = "import time; time.sleep(60)"
    marked = subprocess.Popen([sys.executable, "-c", code, marker])
    other = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        assert any(pid == marked.pid and marker in cmd for pid, cmd in command_lines())
        stop_processes_naming(marker)
        assert marked.wait(10) != 0
        assert other.poll() is None
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()


def test_local_superlink_owner_names_a_listener_that_is_no_superlink():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        address = ("127.0.0.1", server.getsockname()[1])
        assert local_superlink_owner(address) is None
        server.listen()
        assert local_superlink_owner(address) == "an unknown process"
