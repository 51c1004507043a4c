"""Res2Net50-SA / light backbone: shapes, parameter count, Shuffle Attention, checkpoints."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from fedlsc_flwr.model import (
    BACKBONES,
    CLASSIFIER_LAYER,
    ShuffleAttention,
    autocast_context,
    build_model,
    channel_shuffle,
    inputs_to_device,
    prepare_for_device,
    res2net50_sa,
)

LIGHT = "resnet10t_sa"


@pytest.fixture(scope="module")
def light_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(LIGHT, num_classes=7)


def test_backbones_registry() -> None:
    assert BACKBONES[0] == "res2net50_sa" and LIGHT in BACKBONES


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="res2net50_sa.*resnet10t_sa"):
        build_model("vgg16")


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_finite(light_model: torch.nn.Module, train: bool) -> None:
    light_model.train(train)
    out = light_model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_tiny_feature_map_is_finite() -> None:
    # 32 px leaves a 1x1 map after stage 4: the per-channel norm must not divide by zero.
    model = build_model(LIGHT, num_classes=3).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_state_dict_names_are_the_contract(light_model: torch.nn.Module) -> None:
    keys = list(light_model.state_dict())
    assert all(k.split(".")[0] in ("backbone", "attention", CLASSIFIER_LAYER) for k in keys)
    assert {k for k in keys if k.startswith("attention.")} == {
        "attention.cweight",
        "attention.cbias",
        "attention.sweight",
        "attention.sbias",
    }
    assert keys[-2:] == [f"{CLASSIFIER_LAYER}.weight", f"{CLASSIFIER_LAYER}.bias"]
    assert light_model.classifier.weight.shape == (7, 512)
    # Shuffle Attention is one leaf layer (FedLSC groups tensors by leaf module).
    assert not list(light_model.attention.children())


def test_res2net50_sa_parameter_count() -> None:
    model = res2net50_sa(num_classes=7)
    got = sum(p.numel() for p in model.parameters())
    backbone = sum(
        p.numel() for p in timm.create_model("res2net50_26w_4s", num_classes=0).parameters()
    )
    sa = 4 * 2048 // (2 * 64)  # cweight, cbias, sweight, sbias: one per channel of a half-group
    head = 2048 * 7 + 7
    expected = backbone + sa + head
    assert abs(got - expected) <= 0.02 * expected
    assert got == expected
    # Measured with timm 1.0.31: 23,650,120 backbone + 64 SA + 14,343 head.
    assert got == 23_664_527
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_channel_shuffle_permutes_channels() -> None:
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    y = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(y, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def _reference_sa(sa: ShuffleAttention, x: torch.Tensor) -> torch.Tensor:
    """SA-Net written out group by group, as the paper describes it."""
    b, c, h, w = x.shape
    per_group = c // sa.groups
    half = per_group // 2
    outs = []
    for g in range(sa.groups):
        xg = x[:, g * per_group : (g + 1) * per_group]
        xc, xs = xg[:, :half], xg[:, half:]
        gap = xc.mean(dim=(2, 3), keepdim=True)
        yc = xc * torch.sigmoid(sa.cweight * gap + sa.cbias)
        mu = xs.mean(dim=(2, 3), keepdim=True)
        var = xs.var(dim=(2, 3), keepdim=True, unbiased=False)
        ys = xs * torch.sigmoid(sa.sweight * (xs - mu) / torch.sqrt(var + sa.eps) + sa.sbias)
        outs.append(torch.cat([yc, ys], dim=1))
    out = torch.cat(outs, dim=1)
    # Channel shuffle with 2 groups: output channel 2i is input i, 2i+1 is input c/2 + i.
    order = [i // 2 if i % 2 == 0 else c // 2 + i // 2 for i in range(c)]
    return out[:, order]


def test_shuffle_attention_matches_reference() -> None:
    torch.manual_seed(0)
    sa = ShuffleAttention(32, groups=4)
    with torch.no_grad():
        for p in sa.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 32, 5, 3)
    out = sa(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _reference_sa(sa, x), rtol=1e-5, atol=1e-5)


def test_shuffle_attention_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ShuffleAttention(96, groups=64)


# --- local checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    """A checkpoint as timm saves it: the light backbone with its own 1000-class ``fc``."""
    torch.manual_seed(1)
    return timm.create_model("resnet10t", num_classes=1000).state_dict()


def _assert_backbone_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in model.backbone.state_dict().items():
        torch.testing.assert_close(tensor, state[key], msg=key)
    assert model.classifier.weight.shape == (7, 512)


def test_load_pt_checkpoint(tmp_path, timm_state) -> None:
    path = tmp_path / "resnet10t.pth"
    torch.save(timm_state, path)
    _assert_backbone_loaded(build_model(LIGHT, pretrained=path), timm_state)


def test_load_wrapped_pt_checkpoint(tmp_path, timm_state) -> None:
    path = tmp_path / "resnet10t.pt"
    torch.save({"state_dict": timm_state, "epoch": 3}, path)
    _assert_backbone_loaded(build_model(LIGHT, pretrained=str(path)), timm_state)


def test_load_safetensors_checkpoint(tmp_path, timm_state) -> None:
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    _assert_backbone_loaded(build_model(LIGHT, pretrained=path), timm_state)


def test_checkpoint_with_wrong_shape_names_key(tmp_path, timm_state) -> None:
    bad = dict(timm_state)
    bad["layer4.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*layer4\.0\.conv1\.weight"):
        build_model(LIGHT, pretrained=path)


def test_checkpoint_with_missing_and_unexpected_keys_names_them(tmp_path, timm_state) -> None:
    bad = {k: v for k, v in timm_state.items() if k != "layer2.0.bn1.running_var"}
    bad["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
    with pytest.raises(ValueError) as info:
        build_model(LIGHT, pretrained=path)
    assert "missing keys: layer2.0.bn1.running_var" in str(info.value)
    assert "unexpected keys: extra.weight" in str(info.value)


def test_checkpoint_of_other_model_is_rejected(tmp_path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit timm 'resnet10t'"):
        build_model(LIGHT, pretrained=path)


def test_missing_checkpoint_names_path(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(LIGHT, pretrained=path)


# --- device helpers ----------------------------------------------------------------


def test_cpu_device_helpers(light_model: torch.nn.Module) -> None:
    model = prepare_for_device(light_model, "cpu")
    assert next(model.parameters()).device.type == "cpu"
    # channels_last on CPU too: it trains EfficientNet-Lite0-SA 1.6-2x faster there.
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x = inputs_to_device(torch.randn(2, 3, 8, 8), "cpu")
    assert x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    assert isinstance(autocast_context("cpu"), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on CPU-only machines
        ctx = autocast_context("cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_channels_last_trains_like_contiguous_on_cpu() -> None:
    """channels_last only reorders float32 sums: the same logits, and gradients within
    float32 rounding of a float64 reference, as the contiguous run's."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 96, 96), torch.arange(8) % 7
    reference = build_model("efficientnet_lite0_sa", num_classes=7, pretrained=True).train()
    fast = prepare_for_device(copy.deepcopy(reference), "cpu")
    exact = copy.deepcopy(reference).double()
    logits, grads = [], []
    for model, images in ((reference, x), (fast, inputs_to_device(x, "cpu")),
                          (exact, x.double())):
        out = model(images)
        torch.nn.functional.cross_entropy(out, y).backward()
        logits.append(out.detach().double())
        grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    # Measured (relative L2 error of all gradients vs float64, 64-128 px, 2 seeds): contiguous
    # 0.001-0.6 %, channels_last 0.1-2.3 %. Single convolutions and batch norms agree to
    # 1e-6 in both layouts; 17 train-mode batch norms amplify the rounding end to end.
    for got in grads[:2]:
        assert float((got - grads[2]).norm() / grads[2].norm()) < 0.05
