"""A SuperExec for a hospital's ClientApps that starts each one from a warm process.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp``
process, launched by a SuperExec. Such a process spends seconds importing torch,
torchvision and timm before it reads its message (measured in the README section
"Deployment round cost"), and a round has two messages per site. This SuperExec does
what ``flower-superexec`` does (it asks the SuperNode's Runtime API for tasks and starts
one process per task, which runs Flower's own ``run_clientapp`` with the task's token),
but starts that process with ``fork()`` from a parent that imported those libraries
once. Each ClientApp is still a fresh process with nothing from earlier messages: the
parent never runs app code, never loads the app's FAB and never touches torch's thread
pools or a GPU (a child may use either).

Run it beside a SuperNode started with ``--isolation process``:

    flower-supernode ... --isolation process --port 9094
    python -m fedlsc_tools.superexec --runtime-api-address 127.0.0.1:9094 --insecure

``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's variable) sets how often it asks for a
task, in seconds (default 0.25 here; Flower's own SuperExec waits 1 s).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from logging import ERROR, INFO, WARNING

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates

from fedlsc_common.transport import retry_object_pulls_sooner, seconds_from_environment

#: What a ClientApp of this project imports that costs seconds: loaded once, here.
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision.transforms.v2", "timm",
           "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = 0.25


def poll_interval() -> float:
    """Seconds between task requests: $FLWR_SUPEREXEC_TASK_POLL_INTERVAL, else 0.25."""
    return seconds_from_environment(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL, 0.01, 60)


class ForkExecutor:
    """Flower executor (``flwr.supercore.superexec.executor.Executor``) that starts each
    ClientApp task in a child forked from this process; reaps finished children."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *,
                              insecure: bool = False, root_certificates_path: str | None = None
                              ) -> tuple[set[TaskType], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, *args: object, **kwargs: object) -> None:
        """No capacity gate: one process per task, as Flower's subprocess executor."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"this SuperExec runs ClientApps only, not "
                                       f"{spec.task_type}")
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            _run_clientapp_child(spec)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Collect the exit status of finished children (no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Children watch this process and stop when it is gone (Flower's own monitor)."""


def _run_clientapp_child(spec: ExecutionSpec) -> None:
    """In the forked child: Flower's ClientApp process, then exit with its code."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = ["flwr-clientapp"]
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        # forked within a second of the task, it may ask before its SuperNode has the
        # whole message: retry sooner than Flower's 1, 2, 4, 8 s (see the module)
        retry_object_pulls_sooner()

        log(INFO, "Start `flwr-clientapp` process (forked from warm SuperExec %s)",
            os.getppid())
        run_clientapp(
            runtime_api_address=spec.runtime_api_address, token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as done:  # Flower's flwr_exit ends the ClientApp this way
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def preload(modules: Sequence[str]) -> float:
    """Import ``modules``; returns the seconds it took. Nothing here starts a thread.

    The imported objects are then frozen out of the garbage collector's reach: a child's
    first full collection would otherwise walk (and so copy, page by page) the whole
    inherited heap, 1.7 s measured here."""
    start = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    if threading.active_count() > 1:
        raise RuntimeError("a preloaded module started a thread: forking would copy a "
                           "process whose other threads are gone")
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(runtime_api_address: str, *, insecure: bool, root_certificates_path: str | None,
          parent_pid: int | None, modules: Sequence[str]) -> None:
    """Preload ``modules``, then ask the SuperNode for ClientApp tasks and fork one child
    per task, until the parent process (if given) is gone or a signal stops it."""
    interval = poll_interval()
    seconds = preload(modules)
    log(INFO, "Warm SuperExec %s: imported %s in %.1f s; asking %s for ClientApp tasks "
        "every %.2f s", os.getpid(), ", ".join(modules), seconds, runtime_api_address,
        interval)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path,
                                                                 insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    executor = ForkExecutor()
    plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates_path,
                            runtime_dependency_install=False, executor=executor)
    try:
        while parent_pid is None or _alive(parent_pid):
            executor.reconcile()
            reply = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
            if reply.HasField("task") and reply.token:
                result = plugin.launch_task(token=reply.token, task=reply.task)
                if result.status != "accepted":
                    log(ERROR, "Task %s not started: %s", reply.task.task_id, result.message)
            time.sleep(interval)
        log(WARNING, "Warm SuperExec %s: parent process %s is gone, stopping", os.getpid(),
            parent_pid)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, e.g. 127.0.0.1:9094")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true",
                     help="the Runtime API has no TLS (a SuperNode on the same host)")
    tls.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process (e.g. the SuperNode) is gone")
    parser.add_argument("--preload", nargs="*", default=list(PRELOAD),
                        help="modules to import once before serving")
    args = parser.parse_args(argv)
    try:
        serve(args.runtime_api_address, insecure=args.insecure,
              root_certificates_path=args.root_certificates, parent_pid=args.parent_pid,
              modules=args.preload)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
