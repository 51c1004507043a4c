"""Flower ClientApp of a hospital: train on its own images, evaluate on its own held-out set.

Personalized layers (named by the server's ``personalized-layers`` config entry) are
restored from the site's own weights on its disk and never sent back: the reply holds
exactly the keys the server sent. The work is done by :class:`client_app.site.Site`;
this module only reads and writes messages.

The site's weights are not kept in ``context.state``: deployed, Flower ships the context
to every ClientApp process and back (a whole model each way, per message), while the
site's disk has them anyway, for a restart.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client_app import IMPORT_STARTED
from client_app.attack import poison_update
from client_app.site import Site, apply_thread_setting, site_name
from client_app.training import confusion_matrix
from fedlsc_common.classes import CLASSES
from fedlsc_flwr.calibration import MIN_CLASS_COUNT_KEY, STATISTICS_RECORD_KEY
from fedlsc_flwr.metrics import classification_metrics
from fedlsc_flwr.packing import packed_arrays_mod
from fedlsc_flwr.wire import (
    CLASS_COUNTS_KEY,
    CLASS_COUNTS_METRIC,
    CLASS_TOTALS_KEY,
    PERSONALIZED_LAYERS_KEY,
    PROXIMAL_MU_KEY,
    SITE_RECORD_KEY,
    TIMING_RECORD_KEY,
    UPDATE_DTYPE_KEY,
    UPDATE_SCALE_KEY,
    array_from_numpy,
    array_view,
    encode_update,
    is_personalized,
    site_record,
)

if TYPE_CHECKING:
    import torch

app = ClientApp(mods=[packed_arrays_mod])  # a model travels as one Array
IMPORTED = time.time()
_first_message = True  # the first message this process handles pays its start-up


def process_started() -> float:
    """Wall time at which this process started (Linux /proc), else when the ClientApp
    package began importing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return IMPORT_STARTED
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


class Timeline:
    """Wall-clock marks of one message's handling, in order, for the deployment's cost
    breakdown: logged as one ``timing`` line and sent back in the reply (ConfigRecord
    :data:`TIMING_RECORD_KEY`). A process's first message also carries when the process
    started and when the ClientApp's imports ended."""

    def __init__(self) -> None:
        global _first_message
        self.marks: dict[str, float] = {}
        if _first_message:
            self.marks = {"process-start": process_started(),
                          "app-import-start": IMPORT_STARTED, "imported": IMPORTED}
            _first_message = False
        self.mark("handler-start")

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def finish(self, site: str, server_round: int, phase: str) -> ConfigRecord:
        self.mark("reply-ready")
        names = list(self.marks)
        steps = {f"{a}>{b}": round(self.marks[b] - self.marks[a], 3)
                 for a, b in zip(names, names[1:])}
        log(INFO, "%s round %s %s timing %s", site, server_round, phase,
            json.dumps({"marks": self.marks, "seconds": steps}))
        return ConfigRecord(dict(self.marks))


class SiteFailure(RuntimeError):
    """This site could not do its part of a round. Flower sends the message to the server
    as an error reply (the round goes on without the site), so it starts with the site's
    name; the full traceback is in the SuperNode's log."""


def _named_failures(handler: Callable[[Message, Context], Message]
                    ) -> Callable[[Message, Context], Message]:
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            name = site_name(context.node_config)
            raise SiteFailure(f"site '{name}': {type(err).__name__}: {err}") from err

    return wrapper


def _site(context: Context) -> Site:
    apply_thread_setting(context.node_config)  # before any torch work of this process
    return Site.for_run(context.run_config, context.node_config, context.run_id)


def _round(msg: Message) -> int:
    config = msg.content["config"]
    return int(config["server-round"]) + int(config.get("round-offset", 0))


@app.train()
@_named_failures
def train(msg: Message, context: Context) -> Message:
    """Local training on this site's images; reply with the shared layers only."""
    timeline = Timeline()
    site, server_round = _site(context), _round(msg)
    config, arrays = msg.content["config"], msg.content["arrays"]
    personalized = set(config.get(PERSONALIZED_LAYERS_KEY, []))
    log(INFO, "%s round %s: %d personalized layer(s) kept on this site",
        site.identity.name, server_round, len(personalized))
    site.loader("train")
    timeline.mark("data-ready")
    model = site.assemble(arrays.to_torch_state_dict(), personalized,
                          site.load_local_state(), server_round)
    # Exactly the tensors the server kept back (with a layer's or tensor's buffers, as its
    # grouping has them), and those it sent but names as the site's own (local-only's
    # round 1: the initial model): the personalized model is these local values over the
    # global. The rest is shared: trained towards the global values, and sent back.
    own = {k for k in model.state_dict()
           if k not in arrays or is_personalized(k, personalized)}
    shared = [k for k in arrays if k not in own]
    site.save_personalized_list(sorted(own))
    timeline.mark("model-ready")
    stats, lr, num_train = site.train(model, set(shared), server_round,
                                      float(config.get(PROXIMAL_MU_KEY, 0.0)),
                                      list(config.get(CLASS_TOTALS_KEY, [])) or None)
    timeline.marks["train-start"] = stats.started
    timeline.marks["train-end"] = stats.started + stats.seconds

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    site.save_local_state(state, server_round)
    timeline.mark("state-saved")
    sent_back = _poisoned(site, state, arrays)
    update_dtype = str(config.get(UPDATE_DTYPE_KEY, "float32"))
    encoded = {k: encode_update(sent_back[k].numpy(), array_view(arrays[k]), update_dtype)
               for k in shared}
    reply = ArrayRecord({k: array_from_numpy(value) for k, (value, _) in encoded.items()})
    metrics = MetricRecord({
        "num-examples": stats.examples, "train-loss": stats.loss,
        "train-accuracy": stats.accuracy, "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second, "proximal-term": stats.proximal,
        "lr": lr, "train-set-size": num_train,
    })
    if config.get(CLASS_COUNTS_KEY, False):
        metrics[CLASS_COUNTS_METRIC] = site.train_class_counts()
    content = RecordDict({"arrays": reply, "metrics": metrics,
                          SITE_RECORD_KEY: site_record(site.identity.name)})
    if update_dtype == "float16":
        content[UPDATE_SCALE_KEY] = ConfigRecord({k: e for k, (_, e) in encoded.items()})
    content[TIMING_RECORD_KEY] = timeline.finish(site.identity.name, server_round, "train")
    return Message(content, reply_to=msg)


def _poisoned(site: Site, state: dict[str, torch.Tensor],
              arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """What the site sends back: its trained weights, or, as a simulated poisoning site
    (``attack.kind = poison``), its update negated and scaled. Its own disk keeps the
    weights it trained."""
    if site.attack_kind() != "poison":
        return state
    log(WARNING, "%s: SIMULATED BAD SITE: %s", site.identity.name,
        site.settings.attack.describe())
    # the global values afresh from the message: the model may share the received tensors
    received = arrays.to_torch_state_dict()
    return {**state, **poison_update(state, received, site.settings.attack.scale)}


@app.evaluate()
@_named_failures
def evaluate(msg: Message, context: Context) -> Message:
    """The global model and this site's personalized model on its own held-out images."""
    timeline = Timeline()
    site, server_round = _site(context), _round(msg)
    test_loader = site.loader("test")
    num_classes = site.settings.model.num_classes
    timeline.mark("data-ready")

    model = site.assemble(msg.content["arrays"].to_torch_state_dict(), set(), None)
    timeline.mark("model-ready")
    global_cm, global_loss = confusion_matrix(model, test_loader, site.device, num_classes)
    timeline.mark("global-evaluated")

    personalized = set(site.load_personalized_list())  # tensor keys (older runs: layers)
    local = site.load_local_state() if personalized else None
    if local is not None:
        own = {k: v for k, v in local.items() if is_personalized(k, personalized)}
        model.load_state_dict(own, strict=False)
        personal_cm, personal_loss = confusion_matrix(model, test_loader, site.device,
                                                      num_classes)
    else:
        personal_cm, personal_loss = global_cm, global_loss
    timeline.mark("personal-evaluated")
    scores = classification_metrics(personal_cm, CLASSES)
    site.save_personal_model(model, server_round, scores)
    timeline.mark("model-saved")
    log(INFO, "%s round %s: held-out accuracy global %.4f, personalized %.4f (%d images)",
        site.identity.name, server_round, classification_metrics(global_cm, CLASSES)["accuracy"],
        scores["accuracy"], int(global_cm.sum()))
    metrics = MetricRecord({
        "num-examples": int(global_cm.sum()),
        "global-loss": global_loss, "personal-loss": personal_loss,
        "global-confusion": [int(v) for v in global_cm.reshape(-1)],
        "personal-confusion": [int(v) for v in personal_cm.reshape(-1)],
    })
    timing = timeline.finish(site.identity.name, server_round, "evaluate")
    return Message(RecordDict({"metrics": metrics,
                               SITE_RECORD_KEY: site_record(site.identity.name),
                               TIMING_RECORD_KEY: timing}), reply_to=msg)


@app.query("feature_statistics")
@_named_failures
def feature_statistics(msg: Message, context: Context) -> Message:
    """For head calibration: per class, the count, mean and covariance of the features the
    received (final global) model's head gets from this site's training images. No image
    and no single image's features leave the site."""
    timeline = Timeline()
    site, server_round = _site(context), _round(msg)
    site.loader("train")
    timeline.mark("data-ready")
    model = site.assemble(msg.content["arrays"].to_torch_state_dict(), set(), None)
    timeline.mark("model-ready")
    min_count = int(msg.content["config"].get(MIN_CLASS_COUNT_KEY, 1))
    stats = site.feature_statistics(model, min_count)
    timeline.mark("features-done")
    return Message(RecordDict({STATISTICS_RECORD_KEY: stats.to_array_record(),
                               SITE_RECORD_KEY: site_record(site.identity.name),
                               TIMING_RECORD_KEY: timeline.finish(site.identity.name,
                                                                  server_round, "query")}),
                   reply_to=msg)
