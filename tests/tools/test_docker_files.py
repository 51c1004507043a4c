"""The compose files and the image's build context keep the properties the docker demo
needs (docker/demo.sh runs them for real in CI; these checks are fast and need no Docker):
GPUs only on request, volumes given to Flower's user first, TLS on every link to the
SuperLink, no private key bind-mounted into a long-running container, no data or keys in
the build context."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ROOT = DOCKER.parent
HOSPITALS = (1, 2, 3)


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return _load("compose.yml")


@pytest.fixture(scope="module")
def tls() -> dict[str, Any]:
    return _load("compose.tls.yml")


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]  # type: ignore[misc]


def test_gpus_only_in_the_opt_in_override(base: dict[str, Any]) -> None:
    assert not [name for name, s in base["services"].items() if "deploy" in s]
    gpu = _load("compose.gpu.yml")["services"]
    assert sorted(gpu) == [f"superexec-clientapp-{k}" for k in HOSPITALS]
    for service in gpu.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@pytest.mark.parametrize("overlays", [(), ("compose.tls.yml",)])
def test_every_named_volume_is_given_to_flowers_user_first(base: dict[str, Any],
                                                           overlays: tuple[str, ...]) -> None:
    files = [base, *(_load(o) for o in overlays)]
    named = {v for f in files for v in (f.get("volumes") or {})}
    init_targets = {target for f in files
                    for source, target in _mounts(f["services"].get("volumes-init", {}))
                    if source in named}
    assert init_targets == {f"/volumes/{v}" for v in named}
    for f in files:
        for name, service in f["services"].items():
            if name == "volumes-init":
                continue
            if any(source in named for source, _ in _mounts(service)):
                depends = {**base["services"][name].get("depends_on", {})}
                assert depends.get("volumes-init") == {
                    "condition": "service_completed_successfully"}, name


def test_tls_covers_every_link_to_the_superlink(base: dict[str, Any],
                                                tls: dict[str, Any]) -> None:
    services = tls["services"]
    on_federation = [name for name, s in base["services"].items()
                     if "federation" in s.get("networks", [])]
    assert sorted(on_federation) == sorted(
        ["superlink", "superexec-serverapp", *(f"supernode-{k}" for k in HOSPITALS)])
    for name in on_federation:
        command = services[name]["command"]
        assert "--insecure" not in command, name
        if name == "superlink":
            assert {"--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(command)
        else:
            assert command[command.index("--root-certificates") + 1] == "/certs/ca.crt", name
    for k in HOSPITALS:  # the executor reaches its own SuperNode only, on its own network
        executor = base["services"][f"superexec-clientapp-{k}"]
        assert executor["networks"] == [f"hospital-{k}"]
        assert f"supernode-{k}:9094" in executor["command"]


def test_no_private_key_is_bind_mounted_into_a_running_service(tls: dict[str, Any]) -> None:
    for name, service in tls["services"].items():
        binds = [(s, t) for s, t in _mounts(service) if s.startswith(".")]
        if name == "volumes-init":  # copies each key into its own 0400 volume, then exits
            assert binds and all(t.startswith("/secrets/") for _, t in binds)
            assert "install -o 49999 -g 49999 -m 0400" in service["command"][0]
            continue
        for source, _ in binds:
            assert re.search(r"\.(crt|pem)$", source), f"{name} mounts {source}"
        for source, _ in _mounts(service):
            assert "ca.key" not in source, name


def test_build_context_holds_only_what_the_image_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is left out unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    dockerfile = (DOCKER / "superexec.Dockerfile").read_text()
    copied = {src for line in dockerfile.splitlines() if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")}
    assert copied == allowed
    for secret in ("docker", ".venv", ".git", "results"):
        assert secret not in allowed


def test_hospitals_get_the_fast_path_by_default(base: dict[str, Any]) -> None:
    """What the loopback deployment measured (README "Deployment round cost") is what
    the containers run: SuperNodes with short idle polls, warm ClientApp executors, one
    torch thread per hospital on a shared host."""
    services = base["services"]
    for k in HOSPITALS:
        supernode, executor = services[f"supernode-{k}"], services[f"superexec-clientapp-{k}"]
        assert supernode["entrypoint"] == ["fedlsc-supernode"]
        assert supernode["image"] == executor["image"]  # the project's image has the command
        assert executor["entrypoint"] == ["python", "-m", "fedlsc_tools.superexec"]
        assert executor["environment"]["FEDLSC_NUM_THREADS"] == "${FEDLSC_NUM_THREADS:-1}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'fedlsc-supernode = "fedlsc_tools.supernode:main"' in pyproject
