"""Tests for cocam.model: the trunk/head split of torchvision CNNs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cocam.model import (
    DEFAULT_TARGET_LAYERS,
    SUPPORTED_ARCHS,
    PretrainedWeightsUnavailableError,
    SplitModel,
    build_model,
    pretrained_weights_path,
)


@pytest.fixture(scope="module")
def alexnet() -> SplitModel:
    torch.manual_seed(0)
    return build_model("alexnet").eval()


def _copy_by_position(src: nn.Module, dst: nn.Module) -> None:
    """Load ``src``'s state into ``dst`` matching entries by order (names differ)."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert len(src_sd) == len(dst_sd)
    new = {}
    for (k, v), (k2, v2) in zip(src_sd.items(), dst_sd.items()):
        assert v.shape == v2.shape, (k, k2)
        new[k2] = v
    dst.load_state_dict(new)


def test_alexnet_split_is_post_relu_conv5(alexnet: SplitModel) -> None:
    assert alexnet.arch == "alexnet"
    assert alexnet.num_outputs == 40
    assert alexnet.target_layer_name == "features.11"
    assert "post-ReLU" in alexnet.target_layer
    assert isinstance(alexnet.trunk[-1], nn.ReLU)
    assert isinstance(alexnet.trunk[-2], nn.Conv2d) and alexnet.trunk[-2].out_channels == 256
    assert isinstance(alexnet.head.features[0], nn.MaxPool2d)
    assert alexnet.head.classifier[-1].out_features == 40
    assert alexnet.feature_shape(224) == (256, 13, 13)

    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        pre = alexnet.trunk[:-1](x)
        act, logits = alexnet.forward_with_activation(x)
        assert (pre < 0).any()  # the ReLU does something
        torch.testing.assert_close(act, torch.relu(pre))
        torch.testing.assert_close(logits, alexnet.head(act))
        torch.testing.assert_close(alexnet(x), logits)
    assert logits.shape == (2, 40)


def test_alexnet_equals_torchvision(alexnet: SplitModel) -> None:
    ref = torchvision.models.alexnet(num_classes=40).eval()
    _copy_by_position(alexnet, ref)
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        act, logits = alexnet.forward_with_activation(x)
        torch.testing.assert_close(logits, ref(x))
        torch.testing.assert_close(act, ref.features[:12](x))


def test_build_is_deterministic_under_seed(alexnet: SplitModel) -> None:
    torch.manual_seed(0)
    again = build_model("alexnet")
    for (k, a), b in zip(alexnet.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(1)
    other = build_model("resnet18")
    torch.manual_seed(1)
    same = build_model("resnet18")
    torch.manual_seed(2)
    different = build_model("resnet18")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), same.state_dict().values()))
    assert not torch.equal(other.trunk.conv1.weight, different.trunk.conv1.weight)


@pytest.mark.parametrize("layer, shape", [("layer4", (512, 7, 7)), ("layer3", (256, 14, 14))])
def test_resnet18_split_equals_torchvision(layer: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", target_layer=layer, dropout=0.0).eval()
    assert model.target_layer_name == layer
    assert model.feature_shape(224) == shape
    ref = torchvision.models.resnet18(num_classes=40).eval()
    _copy_by_position(model, ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        act, logits = model.forward_with_activation(x)
        torch.testing.assert_close(logits, ref(x))
        stem = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = ref.layer3(ref.layer2(ref.layer1(stem)))
        if layer == "layer4":
            expected = ref.layer4(expected)
        torch.testing.assert_close(act, expected)


def test_resnet18_dropout_before_fc() -> None:
    model = build_model("resnet18", dropout=0.3)
    assert isinstance(model.head.dropout, nn.Dropout) and model.head.dropout.p == 0.3
    assert list(model.head._modules)[-2:] == ["dropout", "fc"]
    assert "dropout" not in build_model("resnet18", dropout=0.0).head._modules


def test_vgg11_split() -> None:
    torch.manual_seed(0)
    model = build_model("vgg11", num_outputs=7, dropout=0.2)
    assert model.target_layer_name == DEFAULT_TARGET_LAYERS["vgg11"] == "features.19"
    assert isinstance(model.trunk[-1], nn.ReLU) and isinstance(model.trunk[-2], nn.Conv2d)
    assert isinstance(model.head.features[0], nn.MaxPool2d) and len(model.head.features) == 1
    assert model.feature_shape(224) == (512, 14, 14)
    assert [m.p for m in model.head.classifier if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_split_before_inplace_relu_does_not_overwrite_activation(alexnet: SplitModel) -> None:
    model = build_model("alexnet", target_layer="features.10")  # conv5 output, pre-ReLU
    first = model.head.features[0]
    assert isinstance(first, nn.ReLU) and first.inplace is False
    with torch.no_grad():
        act, _ = model.forward_with_activation(torch.randn(2, 3, 64, 64))
    assert (act < 0).any()  # the head's ReLU did not rectify A in place


def test_unknown_arch_lists_supported() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet50")
    for arch in SUPPORTED_ARCHS:
        assert arch in str(info.value)


@pytest.mark.parametrize(
    "arch, layer", [("alexnet", "features.13"), ("alexnet", "conv5"), ("resnet18", "layer5"), ("resnet18", "fc")]
)
def test_invalid_target_layer(arch: str, layer: str) -> None:
    with pytest.raises(ValueError, match="target_layer"):
        build_model(arch, target_layer=layer)


def test_invalid_dropout_and_outputs() -> None:
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet18", dropout=1.0)
    with pytest.raises(ValueError, match="num_outputs"):
        SplitModel(nn.Identity(), nn.Identity(), num_outputs=0)


def test_input_checks(alexnet: SplitModel) -> None:
    with pytest.raises(ValueError, match="at least 63x63"):
        alexnet(torch.randn(1, 3, 62, 62))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        alexnet(torch.randn(3, 64, 64))
    with torch.no_grad():
        assert alexnet(torch.randn(1, 3, 63, 63)).shape == (1, 40)


def test_feature_shape_does_not_touch_model() -> None:
    model = build_model("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.feature_shape((64, 96)) == (512, 2, 3)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pretrained_missing_raises_without_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    expected = tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert pretrained_weights_path("alexnet") == str(expected)
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        build_model("alexnet", pretrained=True)
    message = str(info.value)
    assert str(expected) in message and "pretrained=False" in message
    assert isinstance(info.value, FileNotFoundError)


def test_pretrained_loads_from_hub_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    torch.manual_seed(123)
    source = torchvision.models.resnet18()
    path = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=True)
    torch.manual_seed(0)
    scratch = build_model("resnet18", pretrained=False)
    assert torch.equal(model.trunk.conv1.weight, source.conv1.weight)
    assert torch.equal(model.trunk.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert not torch.equal(scratch.trunk.conv1.weight, source.conv1.weight)
    assert model.head.fc.out_features == 40
