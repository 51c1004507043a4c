"""Which hospital each Flower node is, and which of them failed a round.

Flower knows sites only by node id, and a SuperNode that restarts may come back under a
new one. Each ClientApp reply carries its site name (``ConfigRecord`` "site"), so the
server learns the names as replies arrive and can say *which hospital* failed: an error
reply (its ClientApp raised, or the SuperLink reports the node unavailable after missed
heartbeats), or no reply at all within the round timeout.

:class:`SiteTracking` is a mixin for Flower Message-API strategies; put it before the
Flower strategy in the bases. It never changes what is aggregated: it logs, records
``failures`` for the results files, and refuses to aggregate a training round with fewer
than ``min_train_replies`` usable replies (the global model is then kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fedlsc_flwr.wire import site_name_in

PHASES = ("train", "evaluate")


class SiteTracking:
    """Mixin: site names by node id, failed sites per round, a minimum of usable replies.

    It also states what every strategy of this package exposes to its ServerApp, with
    defaults for the strategies that do not personalize: the personalized layers, the
    last FedLSC similarity report, the stage-1 round and the state a checkpoint keeps.
    """

    personalized_layers: frozenset[str] = frozenset()
    #: Layers that stay on the sites from the first round: the global model never trains
    #: them, so it is no classifier to score on its own (FedAvg-FC's head, LocalOnly).
    never_shared: frozenset[str] = frozenset()
    last_report: Any = None  # FedLSC's RoundReport of the last aggregated round
    stage1_round: int | None = None

    def __init__(self, *args: Any, min_train_replies: int = 1, **kwargs: Any) -> None:
        if isinstance(min_train_replies, bool) or not isinstance(min_train_replies, int) \
                or min_train_replies < 1:
            raise ValueError(f"min_train_replies must be an integer >= 1, got "
                             f"{min_train_replies!r}")
        super().__init__(*args, **kwargs)
        self.min_train_replies = min_train_replies
        self.site_names: dict[int, str] = {}
        #: sites that failed in the current round, per phase: [{"site", "node", "reason"}]
        self.failures: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
        self._sent: dict[str, list[Message]] = {phase: [] for phase in PHASES}
        self.current_round = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this strategy (nothing, here)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def site_label(self, node_id: int) -> str:
        name = self.site_names.get(node_id)
        return f"site '{name}' (node {node_id})" if name else \
            f"node {node_id} (site name not known yet)"

    # ------------------------------------------------------------------ hooks
    def configure_train(self, server_round: int, arrays: Any, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.failures = {phase: [] for phase in PHASES}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # A new round: what was sent in an earlier one is not awaited (a round whose
        # evaluation is skipped sends no evaluate message at all).
        self._sent = {"train": messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: Any, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent["evaluate"] = messages
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Any, MetricRecord | None]:
        """Flower's aggregation, unchanged, when enough replies are usable."""
        replies = self._received("train", server_round, replies)
        if self._too_few(server_round, sum(not m.has_error() for m in replies)):
            return None, None
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._received("evaluate", server_round, replies)
        return super().aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ helpers
    def _received(self, phase: str, server_round: int,
                  replies: Iterable[Message]) -> list[Message]:
        """Learn site names; log (with the site's name) every error reply and every node
        that sent nothing back. Returns the replies as a list."""
        replies = list(replies)
        self.current_round = server_round
        sent = self._sent.get(phase, [])
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
                   if m.metadata.message_id}
        answered: set[int] = set()
        for msg in replies:
            # The SuperLink's own error replies (node unavailable) come from the SuperLink,
            # not the node: find the node through the message they answer.
            node = node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            if (name := site_name_in(msg)) is not None:
                self.site_names[node] = name
            elif msg.has_error():
                self._failed(phase, server_round, node, f"error reply: {msg.error.reason}")
        for msg in sent:
            node = msg.metadata.dst_node_id
            if node not in answered:
                self._failed(phase, server_round, node,
                             "no reply before the round timeout (round-timeout)")
        return replies

    def _failed(self, phase: str, server_round: int, node: int, reason: str) -> None:
        log(WARNING, "Round %s (%s): %s failed: %s", server_round, phase,
            self.site_label(node), reason)
        self.failures[phase].append({"site": self.site_names.get(node), "node": node,
                                     "reason": reason})

    def _too_few(self, server_round: int, usable: int) -> bool:
        """True (with a WARNING) when fewer than ``min_train_replies`` replies are usable."""
        if usable >= self.min_train_replies:
            return False
        log(WARNING, "Round %s: %s usable training repl%s, fewer than min-train-replies = %s: "
            "the global model is kept for this round", server_round, usable,
            "y" if usable == 1 else "ies", self.min_train_replies)
        return True


class SiteAwareFedAvg(SiteTracking, FedAvg):
    """Flower's own FedAvg (same aggregation) that names failed sites and honours
    ``min_train_replies``."""


class SiteAwareFedProx(SiteTracking, FedProx):
    """Flower's own FedProx (same aggregation) that names failed sites and honours
    ``min_train_replies``."""
