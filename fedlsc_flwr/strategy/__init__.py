"""The paper's methods as Flower 1.42 Message-API strategies, and a registry by name.

One file per strategy: ``personalized`` (PersonalizedFedAvg, LocalOnly), ``fedlsc``
(FedLSC), ``site_tracking`` (the mixin every strategy here has, and Flower's own FedAvg /
FedProx with it), ``robust`` (Flower's FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan
with it).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg

from fedlsc_flwr.similarity import HyperParameterError
from fedlsc_flwr.strategy.fedlsc import FedLSC, RoundReport
from fedlsc_flwr.strategy.personalized import LocalOnly, PersonalizedFedAvg
from fedlsc_flwr.strategy.robust import (
    SiteAwareBulyan,
    SiteAwareFedMedian,
    SiteAwareFedTrimmedAvg,
    SiteAwareKrum,
    SiteAwareMultiKrum,
)
from fedlsc_flwr.strategy.site_tracking import SiteAwareFedAvg, SiteAwareFedProx, SiteTracking

__all__ = ["FLOWER_NAMES", "ROBUST_NAMES", "STRATEGY_NAMES", "FedLSC", "HyperParameterError",
           "LocalOnly", "PersonalizedFedAvg", "RoundReport", "SiteAwareFedAvg",
           "SiteAwareFedProx", "SiteTracking", "build_strategy"]

#: Flower 1.42's Byzantine-robust strategies (:mod:`fedlsc_flwr.strategy.robust`).
ROBUST_NAMES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
#: The names built from Flower's own aggregation: none of this project's options beyond it
#: (float16 updates, class counts) applies to them.
FLOWER_NAMES = ("fedavg", "fedprox", *ROBUST_NAMES)
STRATEGY_NAMES = (
    "fedlsc", "fedlsc-per0", "fedavg", "fedprox", "fedavg-fc", "fedprox-fc", "local-only",
    *ROBUST_NAMES)


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
    agreement_k: float = 2.0,
    agreement_min_gap: float = 0.05,
    agreement_rounds: int = 2,
    disagreeing_weight: float = 1.0,
    class_weighted_head: bool = False,
    share_class_totals: bool = False,
    server_learning_rate: float = 1.0,
    num_malicious_nodes: int = 1,
    num_nodes_to_select: int = 0,
    trim_beta: float = 0.2,
    **fedavg_kwargs: Any,
) -> FedAvg:
    """The paper's methods by name, so its table is reproduced with one switch.

    ``fedavg-fc`` / ``fedprox-fc`` keep ``head_layer`` on the sites; ``fedlsc-per0``
    is FedLSC with Per = 0 (no personalized layer); ``local-only`` shares nothing
    after handing out the initial model. ``fedavg``/``fedprox`` aggregate exactly as
    Flower's own FedAvg/FedProx (subclassed only to name failed sites) and do not filter
    updates by norm (``max_update_norm_ratio`` applies to the other methods).
    ``agreement_*`` set FedLSC's disagreeing-site warning (:mod:`fedlsc_flwr.agreement`);
    ``disagreeing_weight`` < 1 scales down, in FedLSC's aggregation, the sites that rule
    puts below its threshold in a round (an option beyond the paper; 1 = the paper).
    ``class_weighted_head`` (beyond the paper) averages ``head_layer`` row by row, each
    class's row weighted by the sites' training-image counts of that class
    (:class:`~fedlsc_flwr.strategy.PersonalizedFedAvg`); this project's strategies only.
    ``share_class_totals`` asks the sites for those counts too and sends back their sum
    each round, for sites that balance their sampling over the federation.
    ``server_learning_rate`` η (beyond the paper; this project's strategies only) moves
    the shared parameters η times the way from the global model to the aggregate
    (:func:`~fedlsc_flwr.strategy.personalized.server_step`); 1 = the aggregate itself.
    The names in ``ROBUST_NAMES`` are Flower's robust strategies (:func:`_build_robust`).
    """
    if name in FLOWER_NAMES:
        for option, value, off, words in (
                ("class_weighted_head", class_weighted_head, False, "false"),
                ("share_class_totals", share_class_totals, False, "false"),
                ("server_learning_rate", server_learning_rate, 1.0, "1")):
            if value != off:
                raise HyperParameterError(
                    option, value,
                    f"{words} with Flower's own fedavg/fedprox and the robust strategies",
                    f"{option} needs one of this project's strategies, not {name!r}")
        if update_dtype != "float32":
            raise HyperParameterError(
                "update_dtype", update_dtype, "'float32' with Flower's own fedavg/fedprox",
                f"update_dtype {update_dtype!r} needs one of this project's strategies, "
                f"not Flower's own {name!r}")
        if not proximal_mu >= 0:
            raise HyperParameterError("proximal_mu", proximal_mu, "a number >= 0")
        if name == "fedavg":
            return SiteAwareFedAvg(**fedavg_kwargs)
        if name == "fedprox":
            return SiteAwareFedProx(proximal_mu=proximal_mu, **fedavg_kwargs)
        return _build_robust(name, num_malicious_nodes, num_nodes_to_select, trim_beta,
                             **fedavg_kwargs)
    fedavg_kwargs["max_update_norm_ratio"] = max_update_norm_ratio
    fedavg_kwargs["update_dtype"] = update_dtype
    fedavg_kwargs["class_weighted_head"] = head_layer if class_weighted_head else ""
    fedavg_kwargs["share_class_totals"] = bool(share_class_totals)
    fedavg_kwargs["server_learning_rate"] = server_learning_rate
    if name in ("fedlsc", "fedlsc-per0"):
        ratio = personalized_ratio if name == "fedlsc" else 0.0
        return FedLSC(temperature, ratio, proximal_mu, granularity,
                      agreement_k=agreement_k, agreement_min_gap=agreement_min_gap,
                      agreement_rounds=agreement_rounds,
                      disagreeing_weight=disagreeing_weight, **fedavg_kwargs)
    if name == "fedavg-fc":
        return PersonalizedFedAvg([head_layer], 0.0, granularity, **fedavg_kwargs)
    if name == "fedprox-fc":
        return PersonalizedFedAvg([head_layer], proximal_mu, granularity, **fedavg_kwargs)
    if name == "local-only":
        return LocalOnly((), 0.0, granularity, **fedavg_kwargs)
    raise HyperParameterError("name", name, f"one of {', '.join(STRATEGY_NAMES)}",
                              f"unknown strategy {name!r}; choose one of "
                              f"{', '.join(STRATEGY_NAMES)}")


def _build_robust(name: str, num_malicious_nodes: int, num_nodes_to_select: int,
                  trim_beta: float, **fedavg_kwargs: Any) -> FedAvg:
    """One of Flower's robust strategies, site-aware. ``num_malicious_nodes`` is f of
    Krum, MultiKrum and Bulyan; MultiKrum keeps ``num_nodes_to_select`` updates (0: N − f
    with N = ``min_train_nodes``); FedTrimmedAvg cuts ``trim_beta`` at each end."""
    sites = int(fedavg_kwargs.get("min_train_nodes", 2))
    if isinstance(num_malicious_nodes, bool) or not isinstance(num_malicious_nodes, int) \
            or num_malicious_nodes < 0:
        raise HyperParameterError("num_malicious_nodes", num_malicious_nodes,
                                  "an integer >= 0")
    if name == "fedmedian":
        return SiteAwareFedMedian(**fedavg_kwargs)
    if name == "fedtrimmedavg":
        if not 0.0 <= trim_beta < 0.5:
            raise HyperParameterError("trim_beta", trim_beta, "in [0, 0.5)")
        return SiteAwareFedTrimmedAvg(beta=trim_beta, **fedavg_kwargs)
    if name == "bulyan":
        if sites < 4 * num_malicious_nodes + 3:
            raise HyperParameterError(
                "num_malicious_nodes", num_malicious_nodes,
                f"at most (min-train-nodes − 3) / 4 for bulyan (min-train-nodes = {sites})")
        return SiteAwareBulyan(num_malicious_nodes=num_malicious_nodes, **fedavg_kwargs)
    if name == "krum":
        return SiteAwareKrum(num_malicious_nodes=num_malicious_nodes, **fedavg_kwargs)
    select = num_nodes_to_select or max(1, sites - num_malicious_nodes)
    if isinstance(select, bool) or not isinstance(select, int) or not 1 <= select <= sites:
        raise HyperParameterError("num_nodes_to_select", num_nodes_to_select,
                                  f"an integer in [0, min-train-nodes = {sites}] (0: N − f)")
    return SiteAwareMultiKrum(num_malicious_nodes=num_malicious_nodes,
                              num_nodes_to_select=select, **fedavg_kwargs)
