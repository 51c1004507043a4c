"""fedlsc-flwr: FedLSC layer-similarity federated learning as a Flower strategy.

Exports are loaded on first use, so ``fedlsc_flwr.similarity`` (numpy only) and
``fedlsc_flwr.model`` (torch only) can be imported without Flower.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FedLSC": "fedlsc_flwr.strategy",
    "PersonalizedFedAvg": "fedlsc_flwr.strategy",
    "LocalOnly": "fedlsc_flwr.strategy",
    "build_strategy": "fedlsc_flwr.strategy",
    "build_model": "fedlsc_flwr.model",
    "res2net50_sa": "fedlsc_flwr.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedlsc_flwr' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
