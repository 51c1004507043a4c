"""Local training and evaluation of one site, torch only (no Flower here).

The proximal term (μ/2)·||w − w_g||² of FedProx/FedLSC (Eq. 7) is applied through its
gradient μ·(w − w_g), added to the parameters' gradients with fused ``_foreach`` ops:
the same update as putting the term in the loss, without a second autograd graph.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlsc_flwr.model import autocast_context, early_layers, inputs_to_device

logger = logging.getLogger("flwr")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the site's GPU when it has one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{spec}' asked for, but this site has no CUDA GPU")
    return device


def lr_for_round(base_lr: float, server_round: int, step_rounds: int, gamma: float) -> float:
    """StepLR over server rounds (``training.lr-step-unit = 'round'``): lr·γ^⌊(round−1)/step⌋,
    from the round number, so a restarted site picks up the same schedule."""
    return base_lr * gamma ** ((max(server_round, 1) - 1) // step_rounds)


def cosine_factor(server_round: int, num_rounds: int) -> float:
    """(1 + cos(π·(round − 1)/rounds)) / 2: 1 in round 1, decreasing to near 0 in the
    last round; from the round number, so a restarted site picks up the same value."""
    progress = (min(max(server_round, 1), num_rounds) - 1) / max(num_rounds, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainStats:
    loss: float
    accuracy: float
    examples: int
    seconds: float
    proximal: float  # (μ/2)·||w − w_g||² at the end of training
    started: float = 0.0  # wall clock (time.time()) when the first batch was asked for

    @property
    def images_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def proximal_value(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor],
                   mu: float) -> float:
    """(μ/2)·||w − w_g||² over the given parameter/anchor pairs."""
    params, anchors = list(params), list(anchors)
    if not params or mu == 0:
        return 0.0
    diffs = torch._foreach_sub(params, anchors)
    norms = torch._foreach_norm(diffs)
    return float(0.5 * mu * sum(float(n) ** 2 for n in norms))


def add_proximal_gradient(params: list[torch.Tensor], anchors: list[torch.Tensor],
                          mu: float) -> None:
    """grad += μ·(w − w_g): the gradient of (μ/2)·||w − w_g||², in two fused ops."""
    pairs = [(p, a) for p, a in zip(params, anchors) if p.grad is not None]
    if mu > 0 and pairs:
        with_grad, anchored = [p for p, _ in pairs], [a for _, a in pairs]
        torch._foreach_add_([p.grad for p in with_grad],
                            torch._foreach_sub(with_grad, anchored), alpha=mu)


#: ``training.frozen-layers`` entry that stands for the backbone's early layers.
EARLY = "early"


def frozen_layer_prefixes(setting: str, backbone: str, pretrained: bool | str) -> tuple[str, ...]:
    """``training.frozen-layers`` (comma-separated state_dict prefixes) as a tuple, with
    "early" replaced by the backbone's stem and first stage(s)
    (:func:`fedlsc_flwr.model.early_layers`) when the model starts from pretrained weights,
    and by nothing when it starts untrained: fixing random filters would only cripple it."""
    prefixes: list[str] = []
    for entry in (p.strip() for p in setting.split(",")):
        if entry == EARLY:
            if pretrained:
                prefixes += [p for p in early_layers(backbone) if p not in prefixes]
        elif entry and entry not in prefixes:
            prefixes.append(entry)
    return tuple(prefixes)


def freeze_layers(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Stop the parameters under ``prefixes`` (state_dict names: "classifier" is the
    layer, "backbone.blocks.0" a block) from training; returns their names. A prefix that
    names no parameter is an error, so a typo does not silently train everything."""
    prefixes = [p for p in prefixes if p]
    frozen = []
    for prefix in prefixes:
        names = [n for n, _ in model.named_parameters()
                 if n == prefix or n.startswith(prefix + ".")]
        if not names:
            raise ValueError(f"training.frozen-layers: {prefix!r} names no parameter of the "
                             f"model (state_dict names, e.g. 'classifier')")
        frozen += names
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def make_optimizer(name: str, params: list[torch.nn.Parameter], *, lr: float,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer ``name``: "adam", "adamw" or "sgd" (``momentum``, not Nesterov)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: expected 'adam', 'adamw' or 'sgd'")


def optimizer_snapshot(optimizer: torch.optim.Optimizer, name: str,
                       parameter_names: list[str]) -> dict[str, Any]:
    """The optimizer's state, with what it was made for (its kind and the names of the
    parameters it trains, in order), to carry to the next round's optimizer."""
    return {"optimizer": name, "parameters": list(parameter_names),
            "state_dict": optimizer.state_dict()}


def restore_optimizer(optimizer: torch.optim.Optimizer, snapshot: Mapping[str, Any],
                      name: str, parameter_names: list[str], label: str = "site") -> bool:
    """Load ``snapshot`` (:func:`optimizer_snapshot`) into ``optimizer`` keeping its
    learning rates; returns whether it did. A snapshot of another optimizer kind or of
    other parameters is not loaded (training starts afresh) and the reason is logged."""
    if not snapshot:
        return False
    if snapshot.get("optimizer") != name or snapshot.get("parameters") != parameter_names:
        logger.warning("%s: the kept optimizer state is of %s over %d parameter tensors, "
                       "this round trains %s over %d: starting the optimizer afresh", label,
                       snapshot.get("optimizer"), len(snapshot.get("parameters") or []),
                       name, len(parameter_names))
        return False
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(snapshot["state_dict"])
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return True


def train_local(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    class_weights: torch.Tensor | None = None,
    logit_offsets: torch.Tensor | None = None,
    max_batches: int = 0,
    equal_steps: bool = False,
    frozen_bn_statistics: bool = False,
    lr_step_epochs: int = 0,
    lr_gamma: float = 0.1,
    optimizer_name: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    frozen_layers: tuple[str, ...] = (),
    optimizer_state: dict[str, Any] | None = None,
    log_every_seconds: float = 30.0,
    label: str = "site",
) -> TrainStats:
    """``optimizer_name`` (Adam by default, see :func:`make_optimizer`) on cross-entropy (with
    ``label_smoothing``) + the proximal term towards ``anchor`` = w_g, by name.

    ``logit_offsets`` (the logit-adjusted loss: τ·log prior per class) are added to the
    logits inside the loss only; the model and its predictions stay unadjusted.
    ``max_batches`` > 0 caps a local epoch at that many batches; with ``equal_steps`` a
    shorter loader is passed over again until the epoch has run exactly that many.
    ``frozen_bn_statistics``: BatchNorm layers normalise with their running statistics
    and do not update them (their affine weights still train).
    ``frozen_layers``: parameters under these state_dict prefixes (e.g. "classifier") do
    not train: they keep the values the round started from.
    ``lr_step_epochs`` > 0: StepLR of this round's local optimizer, lr·γ^⌊(epoch−1)/step⌋
    (the paper's StepLR(10, 0.1) as we read it: see the README).
    ``optimizer_state``: the optimizer carries over between calls. A dict from an earlier
    call (:func:`optimizer_snapshot`) is loaded before training, when it holds the same
    optimizer over the same trainable parameters (else training starts afresh), with this
    call's lr; afterwards the dict holds the optimizer's new state. ``None``: afresh.
    """
    model.train()
    if frozen_bn_statistics:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    freeze_layers(model, frozen_layers)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable_names = [n for n, _ in trainable]
    optimizer = make_optimizer(optimizer_name, [p for _, p in trainable],
                               lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer_state is not None:
        restore_optimizer(optimizer, optimizer_state, optimizer_name, trainable_names, label)
    criterion = nn.CrossEntropyLoss(
        weight=None if class_weights is None else class_weights.to(device),
        label_smoothing=label_smoothing)
    offsets = None if logit_offsets is None else logit_offsets.to(device).float()
    named = dict(model.named_parameters())
    prox_names = [n for n in (anchor or {}) if n in named and named[n].requires_grad]
    prox_params = [named[n] for n in prox_names]
    prox_anchors = [anchor[n].to(device) for n in prox_names] if anchor else []

    total_loss, correct, seen, batches = 0.0, 0, 0, 0
    started = time.time()
    start = last_log = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if lr_step_epochs:
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_gamma ** ((epoch - 1) // lr_step_epochs)
        batches_of_epoch = _passes(loader, max_batches) if equal_steps and max_batches \
            else loader
        for step, (images, labels) in enumerate(batches_of_epoch, start=1):
            images = inputs_to_device(images, device)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device):
                logits = model(images)
                scores = logits.float() if offsets is None else logits.float() + offsets
                loss = criterion(scores, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            add_proximal_gradient(prox_params, prox_anchors, proximal_mu)
            optimizer.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{label}: training loss became {loss_value} "
                                         f"at epoch {epoch}, batch {step}")
            n = labels.numel()
            total_loss += loss_value * n
            correct += int((logits.argmax(1) == labels).sum())
            seen += n
            batches += 1
            now = time.perf_counter()
            if now - last_log >= log_every_seconds:
                logger.info("%s: epoch %d/%d, batch %d, loss %.4f, %.1f images/s", label,
                            epoch, epochs, step, total_loss / seen, seen / (now - start))
                last_log = now
            if max_batches and step >= max_batches:
                break
    seconds = time.perf_counter() - start
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(optimizer_snapshot(optimizer, optimizer_name, trainable_names))
    stats = TrainStats(
        loss=total_loss / max(seen, 1), accuracy=correct / max(seen, 1), examples=seen,
        seconds=seconds, proximal=proximal_value(prox_params, prox_anchors, proximal_mu),
        started=started)
    logger.info("%s: trained %d epoch(s), %d images in %.1f s (%.1f images/s), loss %.4f, "
                "accuracy %.3f", label, epochs, seen, seconds, stats.images_per_second,
                stats.loss, stats.accuracy)
    return stats


def _passes(loader: Iterable, batches: int) -> Iterable:
    """``batches`` batches from ``loader``, passing over it again as often as needed."""
    taken = 0
    while taken < batches:
        before = taken
        for batch in loader:
            yield batch
            taken += 1
            if taken >= batches:
                return
        if taken == before:
            raise ValueError("equal local steps asked for, but the site's loader is empty")


@torch.no_grad()
def confusion_matrix(model: nn.Module, loader: Iterable, device: torch.device,
                     num_classes: int) -> tuple[np.ndarray, float]:
    """Rows = true class, columns = predicted class; and the mean cross-entropy."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    total_loss, seen = 0.0, 0
    for images, labels in loader:
        images = inputs_to_device(images, device)
        with autocast_context(device):
            logits = model(images).float()
        labels_dev = labels.to(device)
        total_loss += float(nn.functional.cross_entropy(logits, labels_dev, reduction="sum"))
        seen += labels.numel()
        pred = logits.argmax(1).cpu()
        matrix += torch.bincount(labels * num_classes + pred,
                                 minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return matrix.numpy(), total_loss / max(seen, 1)


def head_inputs(model: nn.Module, loader: Iterable, device: torch.device,
                head: str = "classifier") -> tuple[np.ndarray, np.ndarray]:
    """What the model's ``head`` layer receives for every image of ``loader`` (N×D, float32;
    for the SA models the pooled features), and the labels, in loader order."""
    layer = model.get_submodule(head)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(
        lambda _module, inputs, _output: seen.append(inputs[0].detach().float().cpu()))
    labels: list[torch.Tensor] = []
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_labels in loader:
                with autocast_context(device):
                    model(inputs_to_device(images, device))
                labels.append(batch_labels)
    finally:
        handle.remove()
    if not seen:
        raise ValueError("head_inputs: the loader is empty")
    return torch.cat(seen).flatten(1).numpy(), torch.cat(labels).numpy()
