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
from logging import DEBUG, INFO
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedlsc_flwr.similarity import (
    Layer,
    LayerReport,
    aggregate_layers,
    check_personalized_ratio,
    check_temperature,
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
        }


class FedLSC(PersonalizedFedAvg):
    """FedLSC: per-layer temperature softmax of update similarity (Eq. 1-5) every
    round; after the first aggregated round (stage 1) the layers whose mean
    similarity is below the ``personalized_ratio`` quantile stay on the sites (Eq. 6).

    ``last_report`` holds the per-layer similarities and weights of the last aggregated
    round; ``stage1_round`` the round that fixed the personalized layers.
    """

    measures_updates = True  # the reply check's ||Δw||² are the similarities' norms

    def __init__(
        self,
        temperature: float = 0.2,
        personalized_ratio: float = 0.01,
        proximal_mu: float = 0.001,
        granularity: str = "layer",
        similarity_matrix: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        self.temperature = check_temperature(temperature)
        self.personalized_ratio = check_personalized_ratio(personalized_ratio)
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
            layer_means = {name: float(r.mean_similarity.mean()) for name, r in reports.items()}
            self.personalized_layers = select_personalized(layer_means, self.personalized_ratio)
            self.stage1_round = server_round
            log(INFO, "FedLSC stage 1 (round %s): %s of %s layers personalized: %s",
                server_round, len(self.personalized_layers), len(reports),
                sorted(self.personalized_layers))
        self.last_report = RoundReport(
            server_round, node_ids, reports, sorted(self.personalized_layers)
        )
        log(DEBUG, "FedLSC round %s similarity table: %s",
            server_round, json.dumps(self.last_report.to_json()["layers"]))
        return new_state, _weight_metrics(reports)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage1_round": self.stage1_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage1_round = state.get("stage1_round")

    def summary(self) -> None:
        log(INFO, "\t├──> FedLSC settings:")
        log(INFO, "\t│\t├── Temperature τ: %s", self.temperature)
        log(INFO, "\t│\t├── Personalized ratio (Per): %s", self.personalized_ratio)
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
