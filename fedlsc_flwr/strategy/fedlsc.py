"""FedLSC: per-layer temperature softmax of update similarity (Eq. 1-5) every round; after
the first aggregated round (stage 1) the least-agreeing layers stay on the sites (Eq. 6).

Only :meth:`FedLSC._aggregate_shared` differs from
:class:`~fedlsc_flwr.strategy.PersonalizedFedAvg`; the math is in
:func:`fedlsc_flwr.similarity.aggregate_layers`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedlsc_flwr.agreement import AgreementMonitor, site_agreement
from fedlsc_flwr.similarity import (
    HyperParameterError,
    Layer,
    LayerReport,
    aggregate_layers,
    check_personalized_ratio,
    check_temperature,
    rescaled_weights,
    reweigh_layers,
    select_personalized,
)
from fedlsc_flwr.strategy.personalized import PersonalizedFedAvg


@dataclass
class RoundReport:
    """Per-layer similarity and weights of one aggregated round, for results files."""

    server_round: int
    node_ids: list[int]
    layers: dict[str, LayerReport]
    personalized_layers: list[str]
    #: per-site agreement of the round (:meth:`FedLSC._site_agreement`), JSON-ready
    agreement: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        def listed(x: np.ndarray | None) -> list | None:
            return None if x is None else np.asarray(x).round(6).tolist()

        return {
            "round": self.server_round,
            "node_ids": self.node_ids,
            "personalized_layers": self.personalized_layers,
            "layers": {
                name: {
                    "mean_similarity": listed(r.mean_similarity),
                    "weights": listed(r.weights),
                    "matrix": listed(r.matrix),
                }
                for name, r in self.layers.items()
            },
            "agreement": self.agreement,
        }


class FedLSC(PersonalizedFedAvg):
    """FedLSC: per-layer temperature softmax of update similarity (Eq. 1-5) every
    round; after the first aggregated round (stage 1) the layers whose mean
    similarity is below the ``personalized_ratio`` quantile stay on the sites (Eq. 6).

    ``last_report`` holds the per-layer similarities and weights of the last aggregated
    round, and each site's agreement with the others (:mod:`fedlsc_flwr.agreement`, from
    the same numbers: no extra pass over the updates); a site whose agreement stays far
    below the others' for ``agreement_rounds`` consecutive rounds is named in a WARNING
    (``agreement_rounds = 0``: no warning). ``stage1_round`` is the round that fixed the
    personalized layers.

    Beyond the paper, ``disagreeing_weight`` < 1 multiplies the Eq. 4 weights of the sites
    below the agreement threshold in a round by that factor (0: left out of that round's
    average); 1, the default, aggregates exactly as the paper.
    """

    measures_updates = True  # the reply check's ||Δw||² are the similarities' norms

    def __init__(
        self,
        temperature: float = 0.2,
        personalized_ratio: float = 0.01,
        proximal_mu: float = 0.001,
        granularity: str = "layer",
        similarity_matrix: bool = False,
        *,
        agreement_k: float = 2.0,
        agreement_min_gap: float = 0.05,
        agreement_rounds: int = 2,
        disagreeing_weight: float = 1.0,
        **fedavg_kwargs: Any,
    ) -> None:
        self.temperature = check_temperature(temperature)
        if not 0.0 <= disagreeing_weight <= 1.0:
            raise HyperParameterError("disagreeing_weight", disagreeing_weight,
                                      "in [0, 1] (1 = the paper's aggregation)")
        self.disagreeing_weight = float(disagreeing_weight)
        self.personalized_ratio = check_personalized_ratio(personalized_ratio)
        self.agreement_monitor = AgreementMonitor(agreement_k, agreement_min_gap,
                                                  agreement_rounds)
        super().__init__((), proximal_mu, granularity, **fedavg_kwargs)
        self.similarity_matrix = similarity_matrix

    def _aggregate_shared(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        states: list[dict[str, np.ndarray]],
        node_ids: list[int],
        shared: list[Layer],
        example_weights: np.ndarray,
        squared_distances: list[dict[str, float]] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new_state, reports = aggregate_layers(
            global_state, states, shared, self.temperature, self.similarity_matrix,
            squared_distances=squared_distances,
        )
        if self.stage1_round is None:
            # A layer no site changed (frozen on the sites) has no similarity to rank.
            layer_means = {name: float(r.mean_similarity.mean())
                           for name, r in reports.items() if r.trained}
            self.personalized_layers = select_personalized(layer_means, self.personalized_ratio)
            self.stage1_round = server_round
            untouched = len(reports) - len(layer_means)
            log(INFO, "FedLSC stage 1 (round %s): %s of %s layers personalized%s: %s",
                server_round, len(self.personalized_layers), len(layer_means),
                f" ({untouched} more not trained by any site, left out)" if untouched else "",
                sorted(self.personalized_layers))
        agreement = self._site_agreement(server_round, node_ids, reports)
        if self.disagreeing_weight < 1.0 and agreement["below"]:
            new_state.update(self._reweigh(server_round, global_state, states, shared, reports,
                                           agreement))
        self.last_report = RoundReport(
            server_round, node_ids, reports, sorted(self.personalized_layers), agreement)
        log(DEBUG, "FedLSC round %s similarity table: %s",
            server_round, json.dumps(self.last_report.to_json()["layers"]))
        return new_state, _weight_metrics(reports)

    def _site_agreement(self, server_round: int, node_ids: list[int],
                        reports: Mapping[str, LayerReport]) -> dict[str, Any]:
        """Each site's agreement with the others this round, from the mean similarities
        Eq. 3 already gave (O(layers × sites)); logs it, and WARNs about flagged sites."""
        found = site_agreement(r.mean_similarity for r in reports.values())
        names = [self.site_names.get(node, f"node {node}") for node in node_ids]
        verdict = self.agreement_monitor.update(names, found)
        threshold = float(verdict["threshold"])
        sites = {
            name: {"node": node, "agreement": round(float(a), 6),
                   "least-share": round(float(share), 6), "below": name in verdict["below"],
                   "streak": self.agreement_monitor.streaks[name]}
            for name, node, a, share in zip(names, node_ids, found.agreement,
                                            found.least_share)
        }
        log(INFO, "Round %s site agreement (mean similarity to the others over %s layers): "
            "%s; threshold %.3f", server_round, found.num_layers,
            ", ".join(f"{n} {v['agreement']:.3f}" for n, v in sites.items()), threshold)
        median = float(np.median(found.agreement)) if len(names) else float("nan")
        for name in verdict["flagged"]:
            site = sites[name]
            log(WARNING, "Round %s: site '%s' (node %s) disagrees with the other sites: "
                "agreement %.3f against a median of %.3f (threshold %.3f) for %s consecutive "
                "rounds; least similar site in %.0f %% of layers. Check its data and its "
                "updates.", server_round, name, site["node"], site["agreement"], median,
                threshold, site["streak"], 100 * site["least-share"])
        return {"round": server_round, "threshold": threshold if np.isfinite(threshold)
                else None, "sites": sites, "flagged": list(verdict["flagged"]),
                "below": list(verdict["below"])}

    def _reweigh(self, server_round: int, global_state: Mapping[str, np.ndarray],
                 states: list[dict[str, np.ndarray]], shared: list[Layer],
                 reports: dict[str, LayerReport], agreement: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
        """The option beyond the paper (``disagreeing_weight`` < 1): this round's Eq. 4
        weights of the sites below the agreement threshold times ``disagreeing_weight``,
        renormalised, and Eq. 5 again (a second pass over the updates, only in such
        rounds). The reports then hold the weights used."""
        factors = np.array([self.disagreeing_weight if name in agreement["below"] else 1.0
                            for name in agreement["sites"]])
        for report in reports.values():
            report.weights = rescaled_weights(report.weights, factors)
        log(WARNING, "Round %s: weights of %s times %g in this round's aggregation "
            "(disagreeing-weight)", server_round, ", ".join(agreement["below"]),
            self.disagreeing_weight)
        return reweigh_layers(global_state, states, shared,
                              {name: r.weights for name, r in reports.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage1_round": self.stage1_round,
                "agreement_streaks": self.agreement_monitor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage1_round = state.get("stage1_round")
        self.agreement_monitor.load_state_dict(state.get("agreement_streaks", {}))

    def summary(self) -> None:
        log(INFO, "\t├──> FedLSC settings:")
        log(INFO, "\t│\t├── Temperature τ: %s", self.temperature)
        log(INFO, "\t│\t├── Personalized ratio (Per): %s", self.personalized_ratio)
        rule = self.agreement_monitor
        log(INFO, "\t│\t├── Disagreeing-site warning: %s",
            f"agreement < median − max({rule.k:g}·1.4826·MAD, {rule.min_gap:g}) for "
            f"{rule.rounds} round(s)" if rule.enabled else "off")
        log(INFO, "\t│\t├── Weight of a site below that threshold: %s",
            "as the paper (Eq. 4)" if self.disagreeing_weight == 1.0
            else f"Eq. 4 × {self.disagreeing_weight:g}")
        log(INFO, "\t│\t└── Stage 1 done: %s",
            "no" if self.stage1_round is None else f"round {self.stage1_round}")
        super().summary()


def _weight_metrics(reports: Mapping[str, LayerReport]) -> dict[str, float]:
    if not reports:
        return {}
    weights = np.concatenate([r.weights for r in reports.values()])
    sims = np.array([float(r.mean_similarity.mean()) for r in reports.values()])
    return {
        "lsc-weight-min": float(weights.min()),
        "lsc-weight-max": float(weights.max()),
        "lsc-mean-similarity": float(sims.mean()),
        "lsc-layer-similarity-min": float(sims.min()),
        "lsc-layer-similarity-max": float(sims.max()),
    }
