"""Flower ClientApp of a hospital: train on its own images, evaluate on its own held-out set.

Personalized layers (named by the server's ``personalized-layers`` config entry) are
restored from the site's own weights (``context.state``, else its disk) and never
sent back: the reply holds exactly the keys the server sent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedlsc_flwr.config import Settings
from fedlsc_flwr.data import CLASSES, class_weights
from fedlsc_flwr.similarity import layer_of
from fedlsc_flwr.site import Site, SiteIdentity, site_name
from fedlsc_flwr.site_tracking import SITE_RECORD_KEY, site_record
from fedlsc_flwr.strategy import (
    PERSONALIZED_LAYERS_KEY,
    PROXIMAL_MU_KEY,
    UPDATE_DTYPE_KEY,
    array_from_numpy,
)
from fedlsc_flwr.training import (
    classification_metrics,
    confusion_matrix,
    lr_for_round,
    resolve_device,
    train_local,
)

app = ClientApp()
STATE_KEY = "local-state"


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
    settings = Settings.from_run_config(context.run_config)
    identity = SiteIdentity.from_node_config(dict(context.node_config), settings, context.run_id)
    return Site(settings, identity, resolve_device(settings.device))


def _is_personalized(key: str, layers: set[str]) -> bool:
    return key in layers or layer_of(key) in layers


def _local_state(site: Site, context: Context) -> dict[str, torch.Tensor] | None:
    if STATE_KEY in context.state.array_records:
        return context.state.array_records[STATE_KEY].to_torch_state_dict()
    return site.load_local_state()  # e.g. after a SuperNode restart


def _assemble(site: Site, context: Context, arrays: ArrayRecord, personalized: set[str],
              server_round: int = 1) -> torch.nn.Module:
    """The site's model: global values for what the server sent, its own for the rest.

    A site with no local weights at all (its first round in this run) starts its
    personalized layers from the initial model, which it builds itself from the same seed
    as the server; a site whose local weights lack a personalized key is an error.
    """
    model = site.new_model()
    state = model.state_dict()
    received = arrays.to_torch_state_dict()
    unknown = sorted(set(received) - set(state))
    if unknown:
        raise ValueError(f"{site.identity.name}: the server sent keys this model lacks "
                         f"({unknown[:5]}); do server and site use the same backbone?")
    own_keys = [k for k in state if k not in received]
    if own_keys:
        local = _local_state(site, context)
        if local is None:
            fresh = sorted({layer_of(k) for k in own_keys if _is_personalized(k, personalized)})
            if fresh:
                log(WARNING if server_round > 1 else INFO,
                    "%s round %s: no local weights in %s yet: personalized layers %s start "
                    "from the initial model%s", site.identity.name, server_round,
                    site.local_state_path, fresh[:5], "" if server_round <= 1 else
                    " (a site new to this run, or its output folder was lost)")
        else:
            missing = [k for k in own_keys if k not in local]
            if any(_is_personalized(k, personalized) for k in missing):
                raise RuntimeError(
                    f"{site.identity.name}: personalized weights for {missing[:5]} are not in "
                    f"its local weights ({site.local_state_path}); was it trained with "
                    "another backbone?")
            received.update({k: local[k] for k in own_keys if k in local})
    model.load_state_dict(received, strict=False)
    return model


def _encode(local: np.ndarray, sent: Array, config: ConfigRecord) -> np.ndarray:
    """What goes back for one tensor: the weights, or w_i − w_g in float16 when asked."""
    if config.get(UPDATE_DTYPE_KEY, "float32") == "float16" and local.dtype.kind == "f":
        return (local - sent.numpy()).astype(np.float16)
    return local


@app.train()
@_named_failures
def train(msg: Message, context: Context) -> Message:
    """Local training on this site's images; reply with the shared layers only."""
    site = _site(context)
    config = msg.content["config"]
    arrays = msg.content["arrays"]
    server_round = int(config["server-round"]) + int(config.get("round-offset", 0))
    personalized = set(config.get(PERSONALIZED_LAYERS_KEY, []))
    mu = float(config.get(PROXIMAL_MU_KEY, 0.0))
    site.save_personalized_list(sorted(personalized))

    train_loader = site.loader("train")
    num_train = len(train_loader.dataset)
    log(20, "%s round %s: training on %d images, %d personalized layer(s) kept on this site",
        site.identity.name, server_round, num_train, len(personalized))
    model = _assemble(site, context, arrays, personalized, server_round)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters() if k in arrays}
    lr = lr_for_round(site.settings.training.lr, server_round,
                      site.settings.training.lr_step_rounds, site.settings.training.lr_gamma)
    # Same shuffling and augmentation for this site and round whichever process runs it.
    round_seed = site.settings.seed * 1000 + server_round
    torch.manual_seed(round_seed)
    for generator in {id(g): g for g in (getattr(train_loader, "generator", None),
                                          getattr(train_loader.sampler, "generator", None))
                      if g is not None}.values():
        generator.manual_seed(round_seed)
    weights = (class_weights(train_loader.dataset.records)
               if site.settings.training.class_weighted_loss else None)
    stats = train_local(
        model, train_loader, epochs=site.settings.training.local_epochs, lr=lr,
        device=site.device, proximal_mu=mu, anchor=anchor, class_weights=weights,
        max_batches=site.settings.training.max_batches_per_epoch,
        label=f"{site.identity.name} round {server_round}")

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    context.state[STATE_KEY] = ArrayRecord(state)
    site.save_local_state(state, server_round)
    reply = ArrayRecord({k: array_from_numpy(_encode(state[k].numpy(), arrays[k], config))
                         for k in arrays})
    metrics = MetricRecord({
        "num-examples": stats.examples, "train-loss": stats.loss,
        "train-accuracy": stats.accuracy, "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second, "proximal-term": stats.proximal,
        "lr": lr, "train-set-size": num_train,
    })
    return Message(RecordDict({"arrays": reply, "metrics": metrics,
                               SITE_RECORD_KEY: site_record(site.identity.name)}), reply_to=msg)


@app.evaluate()
@_named_failures
def evaluate(msg: Message, context: Context) -> Message:
    """The global model and this site's personalized model on its own held-out images."""
    site = _site(context)
    config = msg.content["config"]
    server_round = int(config["server-round"]) + int(config.get("round-offset", 0))
    arrays = msg.content["arrays"]
    test_loader = site.loader("test")
    num_classes = site.settings.model.num_classes

    model = _assemble(site, context, arrays, set())
    global_cm, global_loss = confusion_matrix(model, test_loader, site.device, num_classes)

    personalized = set(site.load_personalized_list())
    local = _local_state(site, context) if personalized else None
    if local is not None:
        own = {k: v for k, v in local.items() if _is_personalized(k, personalized)}
        model.load_state_dict(own, strict=False)
        personal_cm, personal_loss = confusion_matrix(model, test_loader, site.device,
                                                      num_classes)
    else:
        personal_cm, personal_loss = global_cm, global_loss
    scores = classification_metrics(personal_cm, CLASSES)
    site.save_personal_model(model, server_round, scores)
    log(20, "%s round %s: held-out accuracy global %.4f, personalized %.4f (%d images)",
        site.identity.name, server_round, classification_metrics(global_cm, CLASSES)["accuracy"],
        scores["accuracy"], int(global_cm.sum()))
    metrics = MetricRecord({
        "num-examples": int(global_cm.sum()),
        "global-loss": global_loss, "personal-loss": personal_loss,
        "global-confusion": [int(v) for v in global_cm.reshape(-1)],
        "personal-confusion": [int(v) for v in personal_cm.reshape(-1)],
    })
    return Message(RecordDict({"metrics": metrics,
                               SITE_RECORD_KEY: site_record(site.identity.name)}), reply_to=msg)
