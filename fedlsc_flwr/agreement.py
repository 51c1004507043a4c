"""Which site disagrees with the others: a per-round report from FedLSC's similarities.

FedLSC already computes, every round and for every shared layer l, each site's mean
similarity s̄_i^(l) to the other sites (Eq. 3). This module turns those numbers, and
nothing else, into a per-site report, so it costs O(L·N) on top of the round:

- agreement a_i = mean over layers of s̄_i^(l): how much site i's update points the way
  the others' do (1: same direction, 0: unrelated, < 0: against them);
- least share: the share of layers in which site i has the lowest s̄_i^(l) of all sites.

A site is *below* in a round when a_i < median(a) − max(k · 1.4826 · MAD(a), min_gap),
MAD = median |a − median(a)| over the sites of that round (1.4826·MAD estimates a
standard deviation, so ``k`` reads "robust standard deviations"). Median and MAD are
not moved by one bad site. ``min_gap`` keeps sites whose agreement differs by a small
amount from being named when the honest sites happen to agree closely (with 3 sites the
MAD is the distance between two of them and can be near 0). A site is *flagged* once it
has been below in ``rounds`` consecutive rounds in which it took part; ``rounds = 0``
turns the rule off (the numbers are still reported).

Strategies that compute no similarities (FedAvg, FedProx, Flower's robust strategies)
report nothing: the report would need the pass over every update that is most of FedLSC's
own aggregation (Eq. 1-3, about as long as FedAvg's whole ``aggregate_train``), so it is
a by-product of FedLSC, not an extra cost put on the others.

numpy only: no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedlsc_flwr.similarity import HyperParameterError

#: 1.4826 · MAD estimates the standard deviation of normally distributed values.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class SiteAgreement:
    """Per-site agreement of one round; arrays follow the order of the sites given."""

    agreement: np.ndarray  # a_i, mean over layers of s̄_i^(l), shape (N,)
    least_share: np.ndarray  # share of layers where site i has the lowest s̄, shape (N,)
    num_layers: int


def site_agreement(layer_mean_similarity: Iterable[np.ndarray]) -> SiteAgreement:
    """Agreement and least-similar share per site from s̄^(l) of each layer, shape (N,) each.

    A layer where several sites tie for the lowest value splits its count between them,
    so the shares sum to 1 over sites (when there is at least one layer and N ≥ 2).
    """
    rows = [np.asarray(s, dtype=np.float64) for s in layer_mean_similarity]
    if not rows:
        return SiteAgreement(np.zeros(0), np.zeros(0), 0)
    table = np.stack(rows)  # (L, N)
    num_layers, n = table.shape
    agreement = table.mean(axis=0)
    if n < 2:
        return SiteAgreement(agreement, np.zeros(n), num_layers)
    lowest = table == table.min(axis=1, keepdims=True)
    least_share = (lowest / lowest.sum(axis=1, keepdims=True)).sum(axis=0) / num_layers
    return SiteAgreement(agreement, least_share, num_layers)


def below_threshold(agreement: np.ndarray, k: float, min_gap: float) -> float:
    """The rule's threshold, median − max(k·1.4826·MAD, min_gap); −inf with fewer than 3
    sites (with two sites there is no majority to disagree with)."""
    values = np.asarray(agreement, dtype=np.float64)
    if values.size < 3:
        return float("-inf")
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median - max(k * MAD_TO_SIGMA * mad, min_gap)


def check_agreement_rule(k: float, min_gap: float, rounds: int) -> tuple[float, float, int]:
    """The rule's settings, checked; raises :class:`HyperParameterError` naming the one
    that is wrong."""
    if not k >= 0:
        raise HyperParameterError("agreement_k", k, "a number >= 0")
    if not min_gap >= 0:
        raise HyperParameterError("agreement_min_gap", min_gap, "a number >= 0")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise HyperParameterError("agreement_rounds", rounds, "an integer >= 0 (0 = off)")
    return float(k), float(min_gap), rounds


@dataclass
class AgreementMonitor:
    """The rule over rounds: which sites are below this round, and which have been below
    for ``rounds`` consecutive rounds in which they took part (``flagged``)."""

    k: float = 2.0
    min_gap: float = 0.05
    rounds: int = 2
    streaks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.k, self.min_gap, self.rounds = check_agreement_rule(self.k, self.min_gap,
                                                                 self.rounds)

    @property
    def enabled(self) -> bool:
        return self.rounds > 0

    def update(self, sites: Sequence[str], report: SiteAgreement) -> dict[str, object]:
        """Apply the rule to one round; ``sites`` name the entries of ``report``.

        Returns ``{"threshold", "below": [site...], "flagged": [site...]}``. A site absent
        from a round keeps its streak (it was not measured); one above the threshold
        starts again from 0.
        """
        threshold = below_threshold(report.agreement, self.k, self.min_gap)
        below = [s for s, a in zip(sites, report.agreement) if a < threshold]
        for site in sites:
            self.streaks[site] = self.streaks.get(site, 0) + 1 if site in below else 0
        flagged = [s for s in sites if self.enabled and self.streaks[s] >= self.rounds]
        return {"threshold": threshold, "below": below, "flagged": flagged}

    def state_dict(self) -> dict[str, int]:
        return dict(self.streaks)

    def load_state_dict(self, streaks: Mapping[str, int]) -> None:
        self.streaks = dict(streaks)
