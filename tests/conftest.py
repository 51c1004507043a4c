"""Shared fixtures: Flower message identity for mocked replies, and Flower log capture."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def task_identity():
    """Messages built outside a Flower process need a run/task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture
def flwr_logs(caplog):
    """Capture records of Flower's logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)
