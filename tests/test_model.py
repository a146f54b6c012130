"""Tests for cocam.model and the architecture registry (cocam.archs): the trunk/head split of torchvision nets."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import _tolerance
from cocam import CELEBA_ATTRIBUTES, attribute_index
from cocam.archs import (
    ARCHITECTURES,
    Architecture,
    Split,
    get_architecture,
    register_architecture,
    unregister_architecture,
)
from cocam.archs.tokens import class_token_map, split_vision_transformer
from cocam.checkpoint import ModelSpec, load_model, save_checkpoint
from cocam.gradcam import grad_cam
from cocam.masks import default_mask
from cocam.model import (
    DEFAULT_TARGET_LAYERS,
    MIN_INPUT_SIZE,
    SUPPORTED_ARCHS,
    PretrainedWeightsUnavailableError,
    SplitModel,
    build_model,
    pretrained_weights_path,
)
from cocam.train import Guidance, guidance_masks, guided_terms

REGISTERED = list(ARCHITECTURES)  # the registry as the library ships it, read at collection


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


# --------------------------------------------------------------------------------------------
# The registry keeps every existing architecture's numbers
# --------------------------------------------------------------------------------------------


def _by_hand(arch: str, num_outputs: int, dropout: float, hidden: int | None) -> nn.Module:
    """The torchvision net built as cocam built it before the registry: torchvision first, then the new layers."""
    if arch == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        net.fc = nn.Linear(512, num_outputs)
        return net
    net = getattr(torchvision.models, arch)(weights=None, dropout=dropout)
    first, second, last = [i for i, m in enumerate(net.classifier) if isinstance(m, nn.Linear)]
    if hidden is not None:
        net.classifier[first] = nn.Linear(net.classifier[first].in_features, hidden)
        net.classifier[second] = nn.Linear(hidden, hidden)
    net.classifier[last] = nn.Linear(hidden or net.classifier[last].in_features, num_outputs)
    return net


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch, num_outputs, dropout, hidden, seed", [
    ("alexnet", 40, 0.5, None, 0), ("alexnet", 7, 0.25, 32, 1), ("vgg11", 3, 0.0, 16, 2),
    ("resnet18", 40, 0.5, None, 3), ("resnet18", 5, 0.0, None, 4),
])
def test_same_seed_gives_the_weights_and_outputs_of_torchvision_built_by_hand(arch, num_outputs, dropout, hidden,
                                                                             seed) -> None:
    torch.manual_seed(seed)
    model = build_model(arch, num_outputs, dropout=dropout, hidden=hidden).eval()
    torch.manual_seed(seed)
    ref = _by_hand(arch, num_outputs, dropout, hidden).eval()
    mine, theirs = list(model.state_dict().values()), list(ref.state_dict().values())
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape and torch.equal(a, b), i
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # the same kernels on the same values


def test_state_dict_keys_of_saved_checkpoints_are_unchanged() -> None:
    """Checkpoints written before the registry name their weights like this; they must still load."""
    with torch.device("meta"):
        alexnet, resnet = build_model("alexnet", hidden=32), build_model("resnet18", dropout=0.0)
    keys = list(alexnet.state_dict())
    assert keys[:2] == ["trunk.0.weight", "trunk.0.bias"] and keys[-2:] == ["head.classifier.6.weight",
                                                                           "head.classifier.6.bias"]
    keys = list(resnet.state_dict())
    assert keys[0] == "trunk.conv1.weight" and "trunk.layer4.1.bn2.running_var" in keys
    assert keys[-2:] == ["head.fc.weight", "head.fc.bias"]


# --------------------------------------------------------------------------------------------
# Every registered architecture, through the whole method
# --------------------------------------------------------------------------------------------


def _build(arch: str, image_size: int, num_outputs: int = 40, dropout: float = 0.5) -> SplitModel:
    hidden = 32 if ARCHITECTURES[arch].hidden_layers else None  # narrow, for speed
    return build_model(arch, num_outputs, dropout=dropout, hidden=hidden, image_size=image_size)


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("size", ["min", 112])
@pytest.mark.parametrize("arch", REGISTERED)
def test_every_architecture_gives_logits_activation_and_grad_cam(arch: str, size) -> None:
    entry = get_architecture(arch)
    size = entry.min_input_size if size == "min" else size
    torch.manual_seed(0)
    model = _build(arch, size, num_outputs=6).eval()
    assert model.arch == arch and model.target_layer_name == entry.default_target_layer == DEFAULT_TARGET_LAYERS[arch]
    assert model.min_input_size == entry.min_input_size == MIN_INPUT_SIZE[arch]
    x = _images(size)
    with torch.no_grad():
        act, logits = model.forward_with_activation(x)
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
    assert act.ndim == 4 and tuple(act.shape[1:]) == model.feature_shape(size)

    # A is the torchvision net's own output at the target layer (read here with a hook; cocam uses none).
    with torch.device("meta"):  # no initialisation: the weights are copied in
        net = entry.build(6, weights=None, dropout=0.5, hidden=32 if entry.hidden_layers else None, image_size=size)
    net = net.to_empty(device="cpu").eval()
    _copy_by_position(model, net)
    seen = []
    net.get_submodule(entry.default_target_layer).register_forward_hook(lambda m, i, out: seen.append(out.clone()))
    with torch.no_grad():
        out = net(x)
    expected = seen[0] if entry.to_map is None else entry.to_map(seen[0])
    assert torch.equal(act, expected)
    if entry.to_map is None:  # token models classify from the patch map instead (test_vit_*)
        assert torch.equal(logits, out)

    result = grad_cam(model, x, [0, 3], output_size=size)
    h, w = act.shape[-2:]
    assert result.raw.shape == (2, 2, h, w) and result.cams.shape == (2, 2, size, size)
    assert torch.isfinite(result.cams).all() and result.cams.min() >= 0 and result.cams.max() <= 1
    assert (result.weights != 0).any()  # the logits depend on A: a gradient reached it


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", REGISTERED)
def test_every_architecture_takes_a_guided_step_that_changes_the_trunk(arch: str) -> None:
    torch.manual_seed(0)
    model = _build(arch, 112).train()
    attribute = "Wearing_Lipstick"
    guidance = Guidance(attributes=(attribute,), masks=(default_mask(attribute),), w_a=0.0)  # the guidance term alone
    masks = guidance_masks(guidance, model, 112, torch.device("cpu"))
    labels = torch.zeros(2, 40)
    labels[:, attribute_index(attribute)] = 1  # positives: both images are guided
    terms = guided_terms(model, _images(112), labels, guidance, [attribute_index(attribute)], masks)
    assert torch.isfinite(terms.guidance) and terms.guidance > 0
    before = [p.detach().clone() for p in model.trunk.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    terms.total.backward()
    grads = [p.grad for p in model.trunk.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # loss_g reaches the trunk
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trunk.parameters()))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", REGISTERED)
def test_every_architecture_survives_a_checkpoint_round_trip(arch: str, tmp_path: Path) -> None:
    spec = ModelSpec(arch=arch, image_size=112, hidden=32 if ARCHITECTURES[arch].hidden_layers else None,
                     dropout=0.25, attributes=CELEBA_ATTRIBUTES[:5])
    torch.manual_seed(0)
    model = spec.build().eval()
    path = save_checkpoint(tmp_path / "model.pt", model, spec)
    loaded, loaded_spec, _ = load_model(path)
    assert loaded_spec == spec and loaded.arch == arch
    x = _images(112)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


@pytest.mark.parametrize("arch", REGISTERED)
def test_every_architecture_refuses_too_small_inputs_in_one_line(arch: str) -> None:
    m = get_architecture(arch).min_input_size
    with torch.device("meta"):  # the check comes before any arithmetic
        model = _build(arch, m)
        with pytest.raises(ValueError) as info:
            model(torch.zeros(1, 3, m - 1, m - 1))
    message = str(info.value)
    assert "\n" not in message and f"too small for {arch}" in message and f"at least {m}x{m}" in message


def test_unknown_architecture_is_one_line_naming_the_registered_ones() -> None:
    with pytest.raises(ValueError) as info:
        get_architecture("resnet50")
    assert "\n" not in str(info.value)
    assert all(name in str(info.value) for name in ARCHITECTURES)
    with pytest.raises(ValueError, match="Unknown architecture 'resnet50'"):
        unregister_architecture("resnet50")


def test_hidden_is_refused_by_architectures_without_hidden_layers() -> None:
    for arch in REGISTERED:
        if not ARCHITECTURES[arch].hidden_layers:
            with pytest.raises(ValueError, match=f"hidden must be a positive width for alexnet/vgg11.*{arch}"):
                build_model(arch, hidden=32, image_size=64)


# --------------------------------------------------------------------------------------------
# Token models: a vision transformer's patch tokens as a map
# --------------------------------------------------------------------------------------------


def _build_tiny_vit(num_outputs: int, *, weights, dropout: float, hidden, image_size) -> nn.Module:
    net = torchvision.models.VisionTransformer(image_size=image_size, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=num_outputs)
    net.heads.head = nn.Linear(16, num_outputs)  # torchvision's is all zeros
    return net


TINY_VIT = Architecture(name="vit_test", build=_build_tiny_vit, default_target_layer="encoder", min_input_size=8,
                        split=lambda net, layer, dropout: split_vision_transformer(net, "vit_test", layer, dropout),
                        fixed_input_size=True, to_map=class_token_map)


@pytest.fixture
def tiny_vit():
    register_architecture(TINY_VIT)
    try:
        yield TINY_VIT
    finally:
        unregister_architecture("vit_test")


def test_class_token_map_lays_patch_tokens_on_their_grid() -> None:
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)  # class token + 3×3 patches
    grid = class_token_map(tokens)
    assert grid.shape == (2, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            assert torch.equal(grid[:, :, i, j], tokens[:, 1 + 3 * i + j, :])  # row-major, class token dropped
    with pytest.raises(ValueError, match="square grid"):
        class_token_map(torch.zeros(1, 9, 3))
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        class_token_map(torch.zeros(9, 3))


@pytest.mark.usefixtures("one_thread")
def test_vit_grad_cam_is_the_class_activation_map_on_the_patch_grid(tiny_vit) -> None:
    torch.manual_seed(0)
    model = ModelSpec(arch="vit_test", image_size=32, hidden=None, dropout=0.0).build().eval()
    assert model.feature_shape(32) == (16, 4, 4)  # 32 px / 8 px patches
    x = _images(32, n=3)
    result = grad_cam(model, x, [0, 7, 39], output_size=32)
    assert result.raw.shape == (3, 3, 4, 4) and result.cams.shape == (3, 3, 32, 32)
    assert torch.isfinite(result.cams).all() and torch.isfinite(result.raw).all()

    # Reference: torchvision's own forward up to the encoder, and the head by hand in float64.
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=40).eval()
    net.conv_proj.load_state_dict(model.trunk.tokens.conv_proj.state_dict())
    net.encoder.load_state_dict(model.trunk.tokens.encoder.state_dict())
    net.class_token.data.copy_(model.trunk.tokens.class_token)
    seen = []
    net.encoder.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    net(x)  # with grad, as grad_cam runs (without it, attention takes another kernel)
    tokens = seen[0].double()  # (3, 1 + 16, 16)
    a = result.activations.double()
    for i in range(4):
        for j in range(4):  # patch (i, j) is token 1 + 4i + j: the class token dropped, row-major
            assert torch.equal(a[:, :, i, j], tokens[:, 1 + 4 * i + j])
    w, b = model.head.fc.weight.double(), model.head.fc.bias.double()
    logits = tokens[:, 1:].mean(1) @ w.T + b
    _tolerance.assert_near_reference(result.logits, logits, n=16 + 16, scale=(w.abs() @ tokens[:, 1:].abs().mean(1)
                                     .T).max().item() + b.abs().max().item(), what="logits")
    # mean pool + linear: ∂logit_t/∂A_k[i, j] = W_tk / (h·w), the same at every patch, so the
    # Grad-CAM channel weights are W_tk / 16 and the map is Zhou et al.'s CAM, relu(Σ_k W_tk A_k) / 16.
    expected_w = (w[[0, 7, 39]] / 16).expand(3, 3, 16)
    _tolerance.assert_near_reference(result.weights, expected_w, n=16 + 2, what="channel weights")
    cam = torch.relu(torch.einsum("tk,bkhw->bthw", w[[0, 7, 39]], a) / 16)
    scale = torch.einsum("tk,bkhw->bthw", w[[0, 7, 39]].abs(), a.abs()).max().item() / 16
    _tolerance.assert_near_reference(result.raw, cam, n=16 + 16 + 2, scale=scale, what="CAM")
    assert (result.raw > 0).any()


@pytest.mark.usefixtures("one_thread")
def test_vit_guidance_loss_sends_gradient_to_the_trunk(tiny_vit) -> None:
    torch.manual_seed(0)
    model = build_model("vit_test", image_size=32).train()
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    for exact in (False, True):
        model.zero_grad()
        result = grad_cam(model, _images(32), [5], create_graph=exact, output_size=32)
        loss = -torch.log((result.cams * mask).sum() / (result.cams + mask - result.cams * mask).sum())
        loss.backward()
        tokens = model.trunk.tokens
        for p in (tokens.conv_proj.weight, tokens.class_token, tokens.encoder.pos_embedding,
                  tokens.encoder.layers[0].self_attention.in_proj_weight, tokens.encoder.ln.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        head_grad = model.head.fc.weight.grad
        assert (head_grad is not None and head_grad.abs().sum() > 0) == exact  # first order: the head gets none


def test_vit_takes_exactly_the_size_it_was_built_for() -> None:
    model = build_model("vit_tiny", image_size=32)
    assert model.input_size == 32 and model.feature_shape(32) == (32, 4, 4)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(1, 3, 40, 40))
    assert "\n" not in str(info.value) and "built for 32x32 inputs" in str(info.value)
    for size in (None, 30):
        with pytest.raises(ValueError, match="multiple of its patch size 8"):
            build_model("vit_tiny", image_size=size)
    with pytest.raises(ValueError, match="only split is 'encoder'"):
        build_model("vit_tiny", image_size=32, target_layer="encoder.layers.encoder_layer_0")


def test_vit_tiny_has_no_imagenet_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailableError, match="no ImageNet weights for vit_tiny.*pretrained=False"):
        build_model("vit_tiny", image_size=32, pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailableError):
        pretrained_weights_path("vit_tiny")


# --------------------------------------------------------------------------------------------
# Adding an architecture: one definition, one registration
# --------------------------------------------------------------------------------------------


class _ToyNet(nn.Module):
    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(4, num_outputs)


def _toy_split(net: nn.Module, layer: str, dropout: float) -> Split:
    if layer != "features":
        raise ValueError(f"target_layer {layer!r} is not valid for toy: use 'features'.")
    head = nn.Sequential(OrderedDict(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), fc=net.fc))
    return Split(net.features, head, "features: conv + ReLU")


TOY = Architecture(name="toy", build=lambda num_outputs, **_: _ToyNet(num_outputs), split=_toy_split,
                   default_target_layer="features", min_input_size=3)


@pytest.fixture
def toy():
    register_architecture(TOY)
    try:
        yield TOY
    finally:
        unregister_architecture("toy")


def test_a_registered_architecture_runs_through_spec_and_grad_cam(toy) -> None:
    assert "toy" in SUPPORTED_ARCHS and DEFAULT_TARGET_LAYERS["toy"] == "features" and MIN_INPUT_SIZE["toy"] == 3
    torch.manual_seed(0)
    model = ModelSpec(arch="toy", image_size=16, hidden=None).build().eval()
    assert model.arch == "toy" and model.target_layer == "features: conv + ReLU" and model.num_outputs == 40
    x = _images(16)
    result = grad_cam(model, x, ["Smiling"])
    assert result.raw.shape == (2, 1, 16, 16)
    # GAP + linear head: the channel weights are W_tk / (h·w), the map relu(Σ_k W_tk A_k) / (h·w).
    w = model.head.fc.weight.double()[attribute_index("Smiling")]
    a = result.activations.double()
    _tolerance.assert_near_reference(result.weights[:, 0], (w / 256).expand(2, 4), n=256 + 2, what="weights")
    scale = torch.einsum("k,bkhw->bhw", w.abs(), a.abs()).max().item() / 256
    _tolerance.assert_near_reference(result.raw[:, 0], torch.relu(torch.einsum("k,bkhw->bhw", w, a) / 256),
                                     n=256 + 4 + 2, scale=scale, what="CAM")
    with pytest.raises(ValueError, match="too small for toy"):
        model(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(TOY)


def test_unregistering_removes_an_architecture_everywhere() -> None:
    register_architecture(TOY)
    assert unregister_architecture("toy") is TOY
    assert "toy" not in SUPPORTED_ARCHS and "toy" not in DEFAULT_TARGET_LAYERS and list(ARCHITECTURES) == REGISTERED
    with pytest.raises(ValueError, match="Unknown architecture 'toy'"):
        build_model("toy")


def test_architecture_entries_are_checked() -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        Architecture(name="my net", build=_ToyNet, split=_toy_split, default_target_layer="features",
                     min_input_size=1)
    with pytest.raises(ValueError, match="min_input_size"):
        Architecture(name="toy", build=_ToyNet, split=_toy_split, default_target_layer="features", min_input_size=0)
    with pytest.raises(TypeError, match="takes an Architecture"):
        register_architecture("toy")  # type: ignore[arg-type]
