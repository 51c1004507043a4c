"""fedlsc-supernode: Flower's SuperNode loop with its sleeps capped."""

from __future__ import annotations

import importlib
import inspect
import time
import types

import pytest

from fedlsc_tools import supernode


def test_the_loop_this_patches_is_the_one_flower_runs():
    """Flower 1.42's SuperNode loop sleeps 3 s when idle and 0.5 s while waiting for a
    reply, through the module-level ``time``: what shorten_idle_polls replaces."""
    loop = importlib.import_module(supernode.LOOP_MODULE)
    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    assert loop.time is time or isinstance(loop.time, supernode._CappedSleep)


def test_every_sleep_of_the_loop_is_capped(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    fake = types.ModuleType("fake_loop")
    fake.time = time
    assert supernode.shorten_idle_polls(0.25, fake)
    fake.time.sleep(3)
    fake.time.sleep(0.5)
    fake.time.sleep(0.1)
    assert slept == [0.25, 0.25, 0.1]
    assert fake.time.monotonic is time.monotonic  # the rest is the real time module


def test_a_loop_that_changed_is_left_alone_with_a_warning(flwr_logs):
    fake = types.ModuleType("changed_loop")  # no module-level time any more
    assert not supernode.shorten_idle_polls(0.25, fake)
    assert not hasattr(fake, "time")
    assert "keeping Flower's own" in flwr_logs.text


@pytest.mark.parametrize("raw, expected", [(None, 0.25), ("0.1", 0.1), ("3", 3.0)])
def test_the_interval_comes_from_the_environment(raw, expected):
    environ = {} if raw is None else {supernode.POLL_INTERVAL_ENV: raw}
    assert supernode.poll_interval(environ) == expected


@pytest.mark.parametrize("raw", ["0", "10", "soon", "-1"])
def test_a_bad_interval_names_the_variable_and_value(raw):
    with pytest.raises(ValueError, match=f"FEDLSC_SUPERNODE_POLL_INTERVAL = '{raw}'"):
        supernode.poll_interval({supernode.POLL_INTERVAL_ENV: raw})
