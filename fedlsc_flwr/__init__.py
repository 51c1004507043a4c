"""fedlsc-flwr: FedLSC layer-similarity federated learning as a Flower strategy plugin.

- :mod:`fedlsc_flwr.strategy`: FedLSC, PersonalizedFedAvg (FedAvg-FC/FedProx-FC),
  LocalOnly, and ``build_strategy`` by name;
- :mod:`fedlsc_flwr.similarity`: the math of Eq. 1-6, numpy only;
- :mod:`fedlsc_flwr.wire`: what travels between the strategy and a site's ClientApp;
- :mod:`fedlsc_flwr.metrics`: classification metrics and pooled evaluation;
- :mod:`fedlsc_flwr.model`: Res2Net50-SA and the other registered backbones (torch).

Exports load on first use, so ``fedlsc_flwr.similarity`` imports without Flower and
``fedlsc_flwr.model`` without numpy-only users paying for torch.
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
