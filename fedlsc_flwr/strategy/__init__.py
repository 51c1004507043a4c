"""The paper's methods as Flower 1.42 Message-API strategies, and a registry by name.

One file per strategy: ``personalized`` (PersonalizedFedAvg, LocalOnly), ``fedlsc``
(FedLSC), ``site_tracking`` (the mixin every strategy here has, and Flower's own FedAvg /
FedProx with it).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg

from fedlsc_flwr.similarity import HyperParameterError
from fedlsc_flwr.strategy.fedlsc import FedLSC, RoundReport
from fedlsc_flwr.strategy.personalized import LocalOnly, PersonalizedFedAvg
from fedlsc_flwr.strategy.site_tracking import SiteAwareFedAvg, SiteAwareFedProx, SiteTracking

__all__ = ["STRATEGY_NAMES", "FedLSC", "HyperParameterError", "LocalOnly",
           "PersonalizedFedAvg", "RoundReport", "SiteAwareFedAvg", "SiteAwareFedProx",
           "SiteTracking", "build_strategy"]

STRATEGY_NAMES = (
    "fedlsc", "fedlsc-per0", "fedavg", "fedprox", "fedavg-fc", "fedprox-fc", "local-only")


def build_strategy(
    name: str,
    *,
    temperature: float = 0.2,
    personalized_ratio: float = 0.01,
    proximal_mu: float = 0.001,
    head_layer: str = "classifier",
    granularity: str = "layer",
    max_update_norm_ratio: float = 0.0,
    update_dtype: str = "float32",
    **fedavg_kwargs: Any,
) -> FedAvg:
    """The paper's methods by name, so its table is reproduced with one switch.

    ``fedavg-fc`` / ``fedprox-fc`` keep ``head_layer`` on the sites; ``fedlsc-per0``
    is FedLSC with Per = 0 (no personalized layer); ``local-only`` shares nothing
    after handing out the initial model. ``fedavg``/``fedprox`` aggregate exactly as
    Flower's own FedAvg/FedProx (subclassed only to name failed sites) and do not filter
    updates by norm (``max_update_norm_ratio`` applies to the other methods).
    """
    if name in ("fedavg", "fedprox"):
        if update_dtype != "float32":
            raise HyperParameterError(
                "update_dtype", update_dtype, "'float32' with Flower's own fedavg/fedprox",
                f"update_dtype {update_dtype!r} needs one of this project's strategies, "
                f"not Flower's own {name!r}")
        if not proximal_mu >= 0:
            raise HyperParameterError("proximal_mu", proximal_mu, "a number >= 0")
        if name == "fedavg":
            return SiteAwareFedAvg(**fedavg_kwargs)
        return SiteAwareFedProx(proximal_mu=proximal_mu, **fedavg_kwargs)
    fedavg_kwargs["max_update_norm_ratio"] = max_update_norm_ratio
    fedavg_kwargs["update_dtype"] = update_dtype
    if name == "fedlsc":
        return FedLSC(temperature, personalized_ratio, proximal_mu, granularity, **fedavg_kwargs)
    if name == "fedlsc-per0":
        return FedLSC(temperature, 0.0, proximal_mu, granularity, **fedavg_kwargs)
    if name == "fedavg-fc":
        return PersonalizedFedAvg([head_layer], 0.0, granularity, **fedavg_kwargs)
    if name == "fedprox-fc":
        return PersonalizedFedAvg([head_layer], proximal_mu, granularity, **fedavg_kwargs)
    if name == "local-only":
        return LocalOnly((), 0.0, granularity, **fedavg_kwargs)
    raise HyperParameterError("name", name, f"one of {', '.join(STRATEGY_NAMES)}",
                              f"unknown strategy {name!r}; choose one of "
                              f"{', '.join(STRATEGY_NAMES)}")
