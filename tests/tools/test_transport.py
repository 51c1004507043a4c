"""Object pulls retry sooner than Flower's defaults, in the processes that ask for it."""

from __future__ import annotations

import pytest
from flwr.supercore.inflatable import inflatable_utils

from fedlsc_common.transport import BACKOFF_CAP, INITIAL_BACKOFF, retry_object_pulls_sooner


def test_object_pulls_retry_after_a_tenth_of_a_second(monkeypatch):
    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)
    for f in functions:  # Flower's own defaults here (an in-process ServerApp run of an
        # earlier test may have shortened them in this process); restored after the test
        monkeypatch.setattr(f, "__kwdefaults__", dict(
            f.__kwdefaults__, initial_backoff=inflatable_utils.PULL_INITIAL_BACKOFF,
            backoff_cap=inflatable_utils.PULL_BACKOFF_CAP))
    assert inflatable_utils.PULL_INITIAL_BACKOFF == 1  # Flower 1.42's 1, 2, 4, 8 s
    assert retry_object_pulls_sooner()
    for f in functions:
        assert f.__kwdefaults__["initial_backoff"] == INITIAL_BACKOFF
        assert f.__kwdefaults__["backoff_cap"] == BACKOFF_CAP
    # a pull that finds its object missing twice now returns within a second
    calls = []

    def pull(object_id):
        calls.append(object_id)
        if len(calls) < 3:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    import time

    start = time.monotonic()
    assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"content"}
    assert time.monotonic() - start < 1.0 and len(calls) == 3


def test_the_warm_superexecs_poll_interval_is_checked_the_same_way(monkeypatch):
    from fedlsc_tools import superexec

    monkeypatch.delenv(superexec.POLL_INTERVAL_ENV, raising=False)
    assert superexec.poll_interval() == 0.25
    monkeypatch.setenv(superexec.POLL_INTERVAL_ENV, "2")
    assert superexec.poll_interval() == 2.0
    for bad in ("0", "61", "soon"):
        monkeypatch.setenv(superexec.POLL_INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=rf"FLWR_SUPEREXEC_TASK_POLL_INTERVAL = '{bad}': "
                                             r"must be seconds in \[0.01, 60\]$"):
            superexec.poll_interval()
