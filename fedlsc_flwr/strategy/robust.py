"""Flower 1.42's Byzantine-robust strategies, with this package's site tracking.

Each class is Flower's own strategy, aggregation unchanged, with :class:`SiteTracking`
in front: failed sites are named, ``min_train_replies`` is honoured, and the ServerApp's
recorder accepts it. They aggregate whole weights, not per layer, and report no site
agreement (they compute no similarities; see :mod:`fedlsc_flwr.agreement`).

- FedMedian: coordinate-wise median (Yin et al. 2018).
- FedTrimmedAvg: coordinate-wise mean after cutting ``beta`` of the sites at each end
  (``int(beta · N)`` of them: with 3 sites ``beta`` < 1/3 cuts nothing).
- Krum / MultiKrum: keep the 1 / ``num_nodes_to_select`` updates closest to their
  N − f − 2 nearest others (Blanchard et al. 2017), f = ``num_malicious_nodes``.
- Bulyan: MultiKrum selection, then a trimmed coordinate-wise mean (El Mhamdi et al. 2018);
  needs at least 4f + 3 replies.
"""

from __future__ import annotations

from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedlsc_flwr.strategy.site_tracking import SiteTracking


class _KrumCaveat:
    """Krum's guarantee needs N ≥ 2f + 3 sites; fewer is legal (Flower runs it), so the
    run's summary says so once."""

    num_malicious_nodes: int
    min_train_nodes: int

    def summary(self) -> None:
        needed = 2 * self.num_malicious_nodes + 3
        if self.min_train_nodes < needed:
            log(WARNING, "%s assumes at least 2f + 3 = %s sites for f = %s malicious, but "
                "min-train-nodes = %s: it runs, without its guarantee", type(self).__name__,
                needed, self.num_malicious_nodes, self.min_train_nodes)
        super().summary()  # type: ignore[misc]


class SiteAwareFedMedian(SiteTracking, FedMedian):
    """Flower's FedMedian that names failed sites."""


class SiteAwareFedTrimmedAvg(SiteTracking, FedTrimmedAvg):
    """Flower's FedTrimmedAvg that names failed sites."""

    def summary(self) -> None:
        if int(self.beta * self.min_train_nodes) == 0:
            log(WARNING, "FedTrimmedAvg with beta = %s and %s sites cuts no site "
                "(int(beta·N) = 0): it is an unweighted mean", self.beta, self.min_train_nodes)
        super().summary()


class SiteAwareKrum(_KrumCaveat, SiteTracking, Krum):
    """Flower's Krum that names failed sites."""


class SiteAwareMultiKrum(_KrumCaveat, SiteTracking, MultiKrum):
    """Flower's MultiKrum that names failed sites."""


class SiteAwareBulyan(SiteTracking, Bulyan):
    """Flower's Bulyan that names failed sites."""
