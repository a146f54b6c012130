"""Tests for cocam.gradcam: correctness against captum and pytorch-grad-cam, CAM methods, modes, and hygiene."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn

import _tolerance
import cocam.gradcam as gc
from cocam.attributes import UnknownAttributeError, attribute_index
from cocam.cams import CAM_METHODS, ChannelWeightedCam, UnknownCamMethodError, register_cam_method
from cocam.gradcam import grad_cam, normalize_cams, overlay, resolve_targets, signs_from_labels
from cocam.model import SplitModel, build_model


@pytest.fixture(scope="module")
def alexnet() -> SplitModel:
    torch.manual_seed(0)
    return build_model("alexnet").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 96, 96)


def tiny_model(num_outputs: int = 40, dtype: torch.dtype = torch.float32) -> SplitModel:
    """A small conv net: trunk with BatchNorm, head with Dropout and a smooth non-linearity."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(inplace=True),
    )
    head = nn.Sequential(
        nn.Conv2d(8, 8, 1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(1),
        nn.Dropout(0.1),
        nn.Linear(32, num_outputs),
    )
    return SplitModel(trunk, head, num_outputs=num_outputs, arch="tiny").to(dtype)


def _copy_by_position(src: nn.Module, dst: nn.Module) -> None:
    dst.load_state_dict(dict(zip(dst.state_dict(), src.state_dict().values())))


def _no_inplace(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return module


def _cam_chain(model: SplitModel, images: torch.Tensor) -> int:
    """Accumulation length of a CAM: trunk and head forward, head backward, spatial mean, channel sum."""
    trunk_forward, _ = _tolerance.chain_lengths(model.trunk, images)
    with torch.no_grad():
        acts = model.trunk(images)
    head_forward, head_backward = _tolerance.chain_lengths(model.head, acts)
    k, h, w = acts.shape[1:]
    return trunk_forward + head_forward + head_backward + h * w + k


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, result, j: int, n: int) -> None:
    """cocam's CAM ``j`` against another float32 implementation's, within two float32 rounding bounds.

    Both sides round along the whole chain (``n`` terms, :func:`_cam_chain`) in their own order; the
    summand magnitude is that of the last sum, ``Σ_k |w_k|·|A_k|`` (at least ``|raw|``, more where
    channels cancel). A wrong layer, sign, ReLU or spatial reduction is off by the values themselves.
    """
    scale = torch.einsum("bk,bkhw->bhw", result.weights[:, j].abs(), result.activations.abs()).max().item()
    assert scale > 0
    _tolerance.assert_near_reference(actual, expected, n=n, scale=scale, what=f"CAM of target {j}")


# --- correctness against captum (an independent implementation) -------------------------


def test_matches_captum_alexnet(alexnet: SplitModel, images: torch.Tensor) -> None:
    """Reference: a plain torchvision AlexNet (out-of-place ReLUs) with the same weights."""
    ref = _no_inplace(torchvision.models.alexnet(num_classes=40)).eval()
    _copy_by_position(alexnet, ref)
    targets = ["Wearing_Lipstick", 0, "Smiling", 20]
    result = grad_cam(alexnet, images, targets)
    assert result.raw.shape == (3, 4, 5, 5)
    torch.testing.assert_close(result.logits, ref(images))
    layer_gc = LayerGradCam(ref, ref.features[11])
    for j, target in enumerate(resolve_targets(targets, 40)):
        expected = layer_gc.attribute(images, target=target, relu_attributions=True)[:, 0]
        assert (expected > 0).any()
        _assert_close_scaled(result.raw[:, j], expected, result, j, _cam_chain(alexnet, images))


def test_matches_captum_on_trunk_output(alexnet: SplitModel, images: torch.Tensor) -> None:
    """captum pointed at the module whose output is cocam's activation (the trunk)."""
    result = grad_cam(alexnet, images, [36, 2], relu=False)
    layer_gc = LayerGradCam(alexnet, alexnet.trunk)
    for j, target in enumerate([36, 2]):
        expected = layer_gc.attribute(images, target=target, relu_attributions=False)[:, 0]
        assert (expected < 0).any()  # signed map: relu=False really keeps negatives
        _assert_close_scaled(result.raw[:, j], expected, result, j, _cam_chain(alexnet, images))


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_matches_captum_resnet18(layer: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", target_layer=layer, dropout=0.0).eval()
    ref = torchvision.models.resnet18(num_classes=40).eval()
    _copy_by_position(model, ref)
    x = torch.randn(2, 3, 64, 64)
    result = grad_cam(model, x, [5, 31, 39])
    layer_gc = LayerGradCam(ref, getattr(ref, layer))
    for j, target in enumerate([5, 31, 39]):
        expected = layer_gc.attribute(x, target=target, relu_attributions=True)[:, 0]
        _assert_close_scaled(result.raw[:, j], expected, result, j, _cam_chain(model, x))


def test_signs_match_captum_on_signed_logits(alexnet: SplitModel, images: torch.Tensor) -> None:
    labels = torch.zeros(3, 40)
    labels[0, 36] = 1
    labels[2, 36] = 1
    signs = signs_from_labels(labels, "Wearing_Lipstick")
    assert signs.tolist() == [[1.0], [-1.0], [1.0]]
    result = grad_cam(alexnet, images, "Wearing_Lipstick", signs=signs)
    factor = torch.ones(3, 40)
    factor[:, 36] = signs[:, 0]
    layer_gc = LayerGradCam(lambda x: alexnet(x) * factor, alexnet.trunk)
    expected = layer_gc.attribute(images, target=36, relu_attributions=True)[:, 0]
    _assert_close_scaled(result.raw[:, 0], expected, result, 0, _cam_chain(alexnet, images))

    plain = grad_cam(alexnet, images, 36, relu=False, normalize=False)
    flipped = grad_cam(alexnet, images, 36, relu=False, normalize=False, signs=-torch.ones(3))
    torch.testing.assert_close(flipped.raw, -plain.raw)


def test_normalised_upsampled_matches_hand_computation(alexnet: SplitModel, images: torch.Tensor) -> None:
    result = grad_cam(alexnet, images, [36, 20], output_size=96)
    raw = result.raw.detach().numpy()
    lo = raw.min(axis=(2, 3), keepdims=True)
    hi = raw.max(axis=(2, 3), keepdims=True)
    normalised = (raw - lo) / (hi - lo)
    expected = F.interpolate(torch.from_numpy(normalised), size=(96, 96), mode="bilinear", align_corners=False)
    assert result.cams.shape == (3, 2, 96, 96)
    torch.testing.assert_close(result.cams, expected, atol=1e-6, rtol=1e-5)
    assert result.cams.min() >= 0 and result.cams.max() <= 1

    rect = grad_cam(alexnet, images, 36, output_size=(40, 64), normalize=False)
    expected = F.interpolate(rect.raw, size=(40, 64), mode="bilinear", align_corners=False)
    assert rect.cams.shape == (3, 1, 40, 64)
    torch.testing.assert_close(rect.cams, expected)
    native = grad_cam(alexnet, images, 36)
    torch.testing.assert_close(native.cams, normalize_cams(native.raw))
    assert native.cams.shape == native.raw.shape == (3, 1, 5, 5)


def test_flat_cam_normalises_to_zero_not_nan() -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    with torch.no_grad():
        model.head[-1].weight[3] = 0.0  # output 3 ignores A: zero gradient, zero CAM
    x = torch.randn(2, 3, 16, 16)
    result = grad_cam(model, x, [3, 4])
    assert torch.equal(result.raw[:, 0], torch.zeros_like(result.raw[:, 0]))
    assert torch.equal(result.cams[:, 0], torch.zeros_like(result.cams[:, 0]))
    assert torch.isfinite(result.cams).all()
    torch.testing.assert_close(result.cams[:, 1].amax(dim=(-2, -1)), torch.ones(2))
    upsampled = grad_cam(model, x, [3, 4], output_size=16).cams
    assert torch.equal(upsampled[:, 0], torch.zeros(2, 16, 16))
    mask = torch.zeros(16, 16)
    mask[4:8, 4:8] = 1
    (g,) = torch.autograd.grad((upsampled[:, 0] * mask).sum(), model.trunk[0].weight, allow_unused=True)
    assert g is None or torch.isfinite(g).all()
    constant = normalize_cams(torch.full((2, 3, 4, 4), 5.0))
    assert torch.equal(constant, torch.zeros_like(constant))


# --- several targets: batched vs looped gradients -------------------------------------


@pytest.mark.parametrize("create_graph", [False, True])
def test_batched_and_looped_gradients_agree(create_graph: bool) -> None:
    """The vmapped and the looped backward give the same CAMs and the same parameter gradients.

    The two paths add the same terms in different orders, so in float32 they agree only up to
    rounding, and how much depends on the CPU's kernels. Each path is therefore compared with a
    float64 reference within the bound of :mod:`_tolerance` (a dropped term, a wrong sign or a
    mixed-up target would be off by the size of the values themselves). ``raw`` carries the
    rounding of the whole CAM chain (:func:`_cam_chain`); the parameter gradients go back through
    that chain once more and then sum over batch × positions (4 · 8 · 8 = 256 terms).
    """
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(4, 3, 16, 16)
    n_raw = _cam_chain(model, x)
    n_grad = 2 * n_raw + 4 * 8 * 8
    reference = tiny_model(dtype=torch.float64).eval()
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    params = list(model.parameters())

    exact = grad_cam(reference, x.double(), [0, 7, 36], batched=False, create_graph=create_graph)
    g_exact = torch.autograd.grad(exact.cams.square().sum(), list(reference.parameters()), allow_unused=True)
    # The CAM's ReLU and min–max pick elements; float32 rounding must not be able to change a pick
    # (that would be a different, equally right answer): every pre-ReLU value is exactly zero (an
    # all-zero activation) or farther from zero than the bound, and each map's maximum is unique.
    pre = torch.einsum("btk,bkhw->bthw", exact.weights, exact.activations).detach().flatten(-2)
    scale = torch.einsum("btk,bkhw->bthw", exact.weights.abs(), exact.activations.abs()).max().item()
    margin = 2 * (_tolerance.gamma(n_raw, torch.float32) + _tolerance.gamma(n_raw, torch.float64)) * scale
    assert ((pre == 0) | (pre.abs() > margin)).all()
    top2 = pre.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1] > margin).all()

    for batched in (False, True):
        result = grad_cam(model, x, [0, 7, 36], batched=batched, create_graph=create_graph)
        _tolerance.assert_near_reference(result.raw, exact.raw, n=n_raw, scale=scale,
                                         what=f"raw (batched={batched})")
        grads = torch.autograd.grad(result.cams.square().sum(), params, allow_unused=True)
        for (name, _), g, ref in zip(model.named_parameters(), grads, g_exact):
            assert (g is None) == (ref is None), name
            if g is not None:
                _tolerance.assert_near_reference(g, ref, n=n_grad, what=f"d/d {name} (batched={batched})")


def test_batched_falls_back_to_loop(monkeypatch) -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = grad_cam(model, x, [1, 2], batched=False)

    def fail(*args, **kwargs):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(gc, "_grads_batched", fail)
    torch.testing.assert_close(grad_cam(model, x, [1, 2], batched=True).raw, expected.raw)


# --- exact vs first-order mode ---------------------------------------------------------


def test_exact_mode_trains_head_first_order_does_not(alexnet: SplitModel, images: torch.Tensor) -> None:
    mask = torch.zeros(96, 96)
    mask[60:80, 30:70] = 1.0
    head_params = [alexnet.head.classifier[1].weight, alexnet.head.classifier[4].weight]
    trunk_params = [alexnet.trunk[0].weight, alexnet.trunk[10].weight]
    for create_graph in (False, True):
        result = grad_cam(alexnet, images[:2], 36, create_graph=create_graph, output_size=96)
        loss = -(result.cams * mask).sum() / result.cams.sum()  # a loss on the CAM only
        grads = torch.autograd.grad(loss, head_params + trunk_params, allow_unused=True)
        head_grads, trunk_grads = grads[:2], grads[2:]
        for g in trunk_grads:
            assert g is not None and g.abs().sum() > 0
        if create_graph:
            assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in head_grads)
    assert all(p.grad is None for p in alexnet.parameters())


class _ConvWith(nn.Module):
    """A 1x1 convolution whose weight is an explicit (differentiable) input tensor."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(a, self.weight, self.bias)


def test_exact_mode_gradient_matches_finite_differences() -> None:
    """Double backprop through the CAM weights agrees with numerical differentiation."""
    torch.manual_seed(0)
    model = tiny_model(num_outputs=3, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    conv = model.head[0]

    def cam_of(weight: torch.Tensor) -> torch.Tensor:
        head = nn.Sequential(_ConvWith(weight, conv.bias.detach()), *model.head[1:])
        split = SplitModel(model.trunk, head, num_outputs=3)
        return grad_cam(split, x, [0, 2], create_graph=True, relu=False, normalize=False).raw

    w0 = conv.weight.detach().clone().requires_grad_(True)
    with torch.no_grad():
        reference = grad_cam(model, x, [0, 2], relu=False, normalize=False).raw
    torch.testing.assert_close(cam_of(w0).detach(), reference)
    assert torch.autograd.gradcheck(cam_of, (w0,), eps=1e-6, atol=1e-6)


# --- hygiene ----------------------------------------------------------------------------


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


@pytest.mark.parametrize("train", [False, True])
def test_hygiene_grad_mode_and_hooks(train: bool) -> None:
    torch.manual_seed(0)
    model = tiny_model().train(train)
    x = torch.randn(3, 3, 16, 16)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 7.0)
    sentinel = params[0].grad
    hooks = _hook_count(model)
    for create_graph in (False, True):
        result = grad_cam(model, x, ["Male", "Young"], create_graph=create_graph, output_size=16)
        assert result.cams.requires_grad and result.logits.requires_grad
    assert params[0].grad is sentinel and torch.equal(sentinel, torch.full_like(params[0], 7.0))
    assert all(p.grad is None for p in params[1:])
    assert model.training is train
    assert all(m.training is train for m in model.modules())
    assert _hook_count(model) == hooks == 0
    assert not x.requires_grad and x.grad is None


def test_works_under_no_grad(alexnet: SplitModel, images: torch.Tensor) -> None:
    expected = grad_cam(alexnet, images, [36, 1], output_size=32)
    with torch.no_grad():
        result = grad_cam(alexnet, images, [36, 1], output_size=32)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    for name in ("cams", "raw", "logits", "activations", "weights"):
        value = getattr(result, name)
        assert not value.requires_grad, name
        torch.testing.assert_close(value, getattr(expected, name).detach())
    assert all(p.grad is None for p in alexnet.parameters())


def test_frozen_model_and_input_requiring_grad() -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = grad_cam(model, x, 5).raw.detach()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(grad_cam(model, x, 5).raw, expected)
    assert all(not p.requires_grad for p in model.parameters())
    x_grad = x.clone().requires_grad_(True)
    result = grad_cam(model, x_grad, 5)
    torch.testing.assert_close(result.raw.detach(), expected)
    assert x_grad.grad is None


def test_train_mode_uses_one_forward_for_logits_and_cam() -> None:
    """With dropout active, logits and CAM come from the same pass (same dropout mask)."""
    torch.manual_seed(0)
    model = tiny_model().train()
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(5)
    result = grad_cam(model, x, 2)
    torch.manual_seed(5)
    act, logits = model.forward_with_activation(x)
    torch.testing.assert_close(result.logits, logits)
    torch.testing.assert_close(result.activations, act)


# --- targets, shapes, helpers ---------------------------------------------------------


def test_target_resolution_and_errors() -> None:
    assert resolve_targets("Wearing_Lipstick", 40) == [attribute_index("Wearing_Lipstick")] == [36]
    assert resolve_targets([3, "Male", np.int64(0)], 40) == [3, 20, 0]
    assert resolve_targets((1,), 2) == [1]
    assert resolve_targets(torch.tensor([4, 2]), 40) == [4, 2]
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        resolve_targets("wearing lipstick", 40)
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets(40, 40)
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets(-1, 40)
    with pytest.raises(ValueError, match="empty"):
        resolve_targets([], 40)
    with pytest.raises(TypeError):
        resolve_targets(True, 40)
    with pytest.raises(ValueError, match="40-output"):
        resolve_targets("Male", 3)


def test_result_shapes_and_signs_validation() -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    result = grad_cam(model, x, [0, 1, 2], output_size=(10, 12))
    assert result.cams.shape == (2, 3, 10, 12)
    assert result.raw.shape == (2, 3, 8, 8)
    assert result.logits.shape == (2, 40)
    assert result.activations.shape == (2, 8, 8, 8)
    assert result.weights.shape == (2, 3, 8)
    assert result.targets == (0, 1, 2)
    torch.testing.assert_close(result.logits, model(x))
    with pytest.raises(ValueError, match="signs"):
        grad_cam(model, x, [0, 1], signs=torch.ones(2))
    with pytest.raises(ValueError, match="B, C, H, W"):
        grad_cam(model, x[0], 0)


def test_signs_from_labels_accepts_celeba_convention() -> None:
    labels = torch.tensor([[1, -1, 1], [-1, 1, -1]])
    assert signs_from_labels(labels, [0, 1]).tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    assert signs_from_labels((labels + 1) // 2, [2]).tolist() == [[1.0], [-1.0]]


def test_overlay() -> None:
    image = np.full((8, 10, 3), 0.5)
    cam = np.zeros((4, 5))
    cam[0, 0] = 1.0
    out = overlay(image, cam, alpha=0.4)
    assert out.shape == (8, 10, 3) and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out[0, 0], out[-1, -1])  # hot and cold corners differ
    np.testing.assert_allclose(overlay(image, cam, alpha=0.0), image)
    tensor_out = overlay(torch.full((3, 8, 10), 0.5), torch.from_numpy(cam), alpha=0.4)
    np.testing.assert_allclose(tensor_out, out)
    uint8 = overlay(np.full((8, 10, 3), 255, np.uint8), np.zeros((8, 10)), alpha=0.0)
    np.testing.assert_allclose(uint8, 1.0)
    with pytest.raises(ValueError):
        overlay(np.zeros((8, 10)), cam)


# --- CAM methods (cocam.cams): each against an independent reference -------------------------


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _reference_gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``ReLU(Σ_k mean_ij(G_k) · A_k)`` for ``a, g`` of shape ``(B, K, h, w)`` (one target)."""
    return _relu(np.einsum("bk,bkhw->bhw", g.mean(axis=(2, 3)), a))


def _reference_gradcam_pp(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM++: ``α = G² / (2G² + Σ_ab A_ab · G³)`` (``0`` where the denominator is ``0``), ``w = Σ α ReLU(G)``."""
    s = a.sum(axis=(2, 3), keepdims=True)
    den = 2 * g**2 + s * g**3
    alpha = np.divide(g**2, den, out=np.zeros_like(g), where=den != 0)
    return _relu(np.einsum("bk,bkhw->bhw", (alpha * _relu(g)).sum(axis=(2, 3)), a))


def _reference_layercam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """LayerCAM: ``ReLU(Σ_k ReLU(G_kij) · A_kij)``."""
    return _relu((_relu(g) * a).sum(axis=1))


#: An independent float64 formula for every registered method: a new method needs one here.
REFERENCE_CAMS = {"gradcam": _reference_gradcam, "gradcam++": _reference_gradcam_pp, "layercam": _reference_layercam}


def _summand_scale(method: str, a: np.ndarray, g: np.ndarray) -> float:
    """The summand magnitude of the map's last sums, for the rounding bound of :mod:`_tolerance`.

    Grad-CAM sums ``w_k · A_k`` with ``|w_k| ≤ mean|G_k|``. A Grad-CAM++ weight is a sum over
    positions of ``G·α(G)`` with ``0 ≤ G·α ≤ G/2`` and ``|d(G·α)/dG| ≤ 1/2`` for ``G > 0`` and
    ``Σ A ≥ 0``, so its error is at most that of ``Σ_ij |G_kij|``. LayerCAM sums ``|G_kij| · A_kij``.
    """
    a, g = np.abs(a), np.abs(g)
    if method == "gradcam":
        return float(np.einsum("bk,bkhw->bhw", g.mean(axis=(2, 3)), a).max())
    if method == "gradcam++":
        return float(np.einsum("bk,bkhw->bhw", g.sum(axis=(2, 3)), a).max())
    return float((g * a).sum(axis=1).max())


def _activation_and_grads(split: nn.Module, rest: nn.Module, x: torch.Tensor, targets: list[int]):
    """``A`` and ``[∂logit_t/∂A for t in targets]`` by plain autograd, one backward per target."""
    a = split(x).detach().requires_grad_(True)
    logits = rest(a)
    grads = [torch.autograd.grad(logits[:, t].sum(), a, retain_graph=True)[0] for t in targets]
    return a.detach(), grads


def _alexnet_tail(ref: nn.Module) -> nn.Module:
    return nn.Sequential(*ref.features[12:], ref.avgpool, nn.Flatten(1), ref.classifier)


def test_every_method_has_a_reference() -> None:
    assert {"gradcam", "gradcam++", "layercam"} <= set(CAM_METHODS)
    assert set(CAM_METHODS) == set(REFERENCE_CAMS), "add the new method's formula to REFERENCE_CAMS"


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_methods_match_float64_formulas_alexnet(method: str, alexnet: SplitModel, images: torch.Tensor) -> None:
    """Each method on cocam's AlexNet against its formula applied to float64 gradients of a torchvision copy."""
    ref = _no_inplace(torchvision.models.alexnet(num_classes=40)).eval()
    _copy_by_position(alexnet, ref)
    ref = ref.double()
    targets = [36, 2]
    result = grad_cam(alexnet, images, targets, method=method)
    assert result.method == method and result.raw.shape == (3, 2, 5, 5)
    a, grads = _activation_and_grads(ref.features[:12], _alexnet_tail(ref), images.double(), targets)
    for j, g in enumerate(grads):
        expected = REFERENCE_CAMS[method](a.numpy(), g.numpy())
        assert (expected > 0).any()
        _tolerance.assert_near_reference(result.raw[:, j], torch.from_numpy(expected), n=_cam_chain(alexnet, images) + 8,
                                         scale=_summand_scale(method, a.numpy(), g.numpy()), what=f"{method} {j}")


def test_methods_match_pytorch_grad_cam(alexnet: SplitModel, images: torch.Tensor) -> None:
    """Grad-CAM, Grad-CAM++ and LayerCAM against pytorch-grad-cam's on the same layer, at feature resolution.

    pytorch-grad-cam hooks the layer, runs one backward per target and applies its own formula;
    its map before min–max scaling and resizing (``get_cam_image`` on the gradients it recorded,
    then its ReLU) is compared with cocam's ``raw``. Its Grad-CAM++ adds ``1e-6`` to the
    denominator of ``α``: per position that lowers ``G·α`` by exactly ``G·α · 1e-6 / (D + 1e-6)``
    (``D = 2G² + S·G³ > 0`` for ``G > 0``), a bias added to the rounding bound. The last layer is
    scaled by 1000 so that the gradients (~1e-3 for the untrained AlexNet) are far above that
    ``1e-6`` and the comparison stays sharp.
    """
    pgc = pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam is not installed (pip install 'cocam[bench]')")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = copy.deepcopy(alexnet)
    with torch.no_grad():
        model.head.classifier[-1].weight.mul_(1000.0)
        model.head.classifier[-1].bias.mul_(1000.0)
    ref = _no_inplace(torchvision.models.alexnet(num_classes=40)).eval()
    _copy_by_position(model, ref)
    layer = ref.features[11]
    n = _cam_chain(model, images) + 8
    targets = [36, 2]
    for method, cls in {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM}.items():
        result = grad_cam(model, images, targets, method=method)
        with cls(ref, [layer]) as cam:
            for j, t in enumerate(targets):
                cam(images, [ClassifierOutputTarget(t)] * len(images))
                a = cam.activations_and_grads.activations[0].numpy()
                g = cam.activations_and_grads.gradients[0].numpy()
                expected = np.maximum(cam.get_cam_image(images, layer, None, a, g, False), 0)
                assert (expected > 0).any()
                a64, g64 = a.astype(np.float64), g.astype(np.float64)
                bound = 2 * _tolerance.sum_error_bound(n, _summand_scale(method, a64, g64), torch.float32)
                if method == "gradcam++":
                    den = 2 * g64**2 + a64.sum(axis=(2, 3), keepdims=True) * g64**3
                    term = np.divide(g64**3, den, out=np.zeros_like(g64), where=(g64 > 0) & (den > 0))
                    bias = np.einsum("bk,bkhw->bhw", (term * 1e-6 / (den + 1e-6)).sum(axis=(2, 3)), a64)
                    assert bias.max() < 1e-4 * expected.max()  # the 1e-6 is negligible here
                    bound = bound + bias
                err = np.abs(result.raw[:, j].detach().double().numpy() - expected)
                assert (err <= bound).all(), f"{method} target {t}: {err.max():.3e} > {np.max(bound):.3e}"
        assert all(p.grad is None for p in model.parameters())


def test_methods_by_hand() -> None:
    """One channel, 2×2 positions: ``A = [[1, 2], [0, 3]]``, ``G = [[1, -1], [0, 2]]`` (so ``Σ A = 6``).

    Grad-CAM ``w = (1 - 1 + 0 + 2)/4 = 1/2``. Grad-CAM++ ``α = 1/(2 + 6G)`` where ``G ≠ 0``:
    ``1/8`` at ``G = 1``, ``1/14`` at ``G = 2`` (the ``G = -1`` term has ``ReLU(G) = 0``, the
    ``G = 0`` one is ``0/0 := 0``), ``w = 1/8 + 2/14 = 15/56``. LayerCAM ``ReLU(G) · A = [[1, 0], [0, 6]]``.
    """
    a = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]]], dtype=torch.float64)
    g = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]], dtype=torch.float64)[:, None]  # (B=1, T=1, K=1, 2, 2)
    torch.testing.assert_close(CAM_METHODS["gradcam"](a, g), 0.5 * a, rtol=0, atol=1e-15)
    torch.testing.assert_close(CAM_METHODS["gradcam++"](a, g), 15 / 56 * a, rtol=0, atol=1e-15)
    expected = torch.tensor([[[[1.0, 0.0], [0.0, 6.0]]]], dtype=torch.float64)
    assert torch.equal(CAM_METHODS["layercam"](a, g), expected)
    # Two channels at one position: a negative gradient drops its channel (3·1 + 0·2), it does not subtract.
    two = torch.tensor([[[[1.0]], [[2.0]]]], dtype=torch.float64)
    assert CAM_METHODS["layercam"](two, torch.tensor([[[[[3.0]], [[-1.0]]]]], dtype=torch.float64)).item() == 3.0
    # A vanishing denominator 2 + S·G = 0 (S = -2, G = 1) also contributes 0, and nothing is NaN,
    # not even the double-backprop gradient at G = 0.
    a_neg = torch.tensor([[[[-1.0, -1.0]]]], dtype=torch.float64)
    g_deg = torch.tensor([[[[[1.0, 0.0]]]]], dtype=torch.float64, requires_grad=True)
    weights = CAM_METHODS["gradcam++"].channel_weights(a_neg, g_deg)
    assert torch.equal(weights, torch.zeros(1, 1, 1, dtype=torch.float64))
    g_var = torch.tensor([[[[[1.0, 0.0], [0.0, 2.0]]]]], dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(CAM_METHODS["gradcam++"].channel_weights(a, g_var).sum(), g_var)
    assert torch.isfinite(d).all() and d[0, 0, 0, 0, 1] == 0 == d[0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="activations must be"):
        CAM_METHODS["gradcam"](a, g[:, 0])


def _margin_ok(values: torch.Tensor, n: int, scale: float) -> bool:
    """Every value exactly zero or farther from zero than two float32+float64 rounding bounds."""
    margin = 2 * (_tolerance.gamma(n, torch.float32) + _tolerance.gamma(n, torch.float64)) * scale
    return bool(((values == 0) | (values.abs() > margin)).all())


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_methods_batched_and_looped_agree(method: str, create_graph: bool) -> None:
    """For every method, the vmapped and the looped gradients give the same maps and parameter gradients.

    As in :func:`test_batched_and_looped_gradients_agree`, each float32 path is compared with a
    float64 run within the bound of :mod:`_tolerance`. The loss is ``Σ raw²``, whose gradient is
    continuous at the CAM's ReLU; the methods' ``ReLU(G)`` is not (in exact mode it passes
    ``[G > 0]``), so every gradient must be zero or clear of rounding, as every pre-ReLU value.
    """
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(4, 3, 16, 16)
    targets = [0, 7, 36]
    n_raw = _cam_chain(model, x) + 8
    n_grad = 2 * n_raw + 4 * 8 * 8
    reference = tiny_model(dtype=torch.float64).eval()
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    exact = grad_cam(reference, x.double(), targets, batched=False, create_graph=create_graph, method=method)
    g_exact = torch.autograd.grad(exact.raw.square().sum(), list(reference.parameters()), allow_unused=True)
    a, grads = _activation_and_grads(reference.trunk, reference.head, x.double(), targets)
    scale = max(_summand_scale(method, a.numpy(), g.numpy()) for g in grads)
    assert _margin_ok(exact.pre_relu.detach(), n_raw, scale)
    if create_graph:
        assert _margin_ok(torch.stack(grads), n_raw, max(g.abs().max().item() for g in grads))
    for batched in (False, True):
        result = grad_cam(model, x, targets, batched=batched, create_graph=create_graph, method=method)
        _tolerance.assert_near_reference(result.raw, exact.raw, n=n_raw, scale=scale, what=f"{method} raw ({batched=})")
        got = torch.autograd.grad(result.raw.square().sum(), list(model.parameters()), allow_unused=True)
        for (name, _), g, ref in zip(model.named_parameters(), got, g_exact):
            assert (g is None) == (ref is None), name
            if g is not None:
                _tolerance.assert_near_reference(g, ref, n=n_grad, what=f"{method} d/d {name} ({batched=})")


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_methods_hygiene_and_differentiable(method: str, alexnet: SplitModel, images: torch.Tensor) -> None:
    """Every method keeps mode and ``.grad`` untouched, registers no hook, and trains through its CAM.

    A loss on the CAM alone reaches the trunk in both modes and the head only in exact mode
    (first order holds the gradients ``G`` constant).
    """
    mask = torch.zeros(96, 96)
    mask[60:80, 30:70] = 1.0
    head_params = [alexnet.head.classifier[1].weight, alexnet.head.classifier[4].weight]
    trunk_params = [alexnet.trunk[0].weight, alexnet.trunk[10].weight]
    for train in (True, False):
        alexnet.train(train)
        for create_graph in (False, True):
            torch.manual_seed(3)
            result = grad_cam(alexnet, images[:2], [36, 2], create_graph=create_graph, output_size=96, method=method)
            assert result.method == method and result.cams.shape == (2, 2, 96, 96)
            assert 0 <= result.cams.min() and result.cams.max() <= 1
            torch.testing.assert_close(result.raw, F.relu(result.signed))
            loss = -(result.cams * mask).sum() / result.cams.sum()
            grads = torch.autograd.grad(loss, head_params + trunk_params, allow_unused=True)
            assert all(g is not None and g.abs().sum() > 0 for g in grads[2:])
            if create_graph:
                assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
            else:
                assert all(g is None or g.abs().sum() == 0 for g in grads[:2])
        assert alexnet.training is train and all(m.training is train for m in alexnet.modules())
    alexnet.eval()
    assert all(p.grad is None for p in alexnet.parameters())
    assert _hook_count(alexnet) == 0
    expected = grad_cam(alexnet, images, 36, method=method)
    with torch.no_grad():
        detached = grad_cam(alexnet, images, 36, method=method)
    for name in ("cams", "raw", "logits", "activations", "weights", "pre_relu"):
        value = getattr(detached, name)
        if value is None:
            assert getattr(expected, name) is None, name
            continue
        assert not value.requires_grad, name
        torch.testing.assert_close(value, getattr(expected, name).detach())


def test_unknown_method_and_registering_one() -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(UnknownCamMethodError, match=r"unknown CAM method 'gradcam\+': choose one of gradcam, gradcam\+\+, layercam\."):
        grad_cam(model, x, 0, method="gradcam+")

    class AbsGradCAM(ChannelWeightedCam):  # a new method: one class, one registration
        name = "absgrad"

        def channel_weights(self, activations, grads):
            return grads.abs().mean(dim=(-2, -1))

    try:
        register_cam_method(AbsGradCAM)
        result = grad_cam(model, x, [1, 2], method="absgrad")
        _, grads = _activation_and_grads(model.trunk, model.head, x, [1, 2])
        torch.testing.assert_close(result.weights, torch.stack([g.abs().mean(dim=(-2, -1)) for g in grads], dim=1))
        assert result.method == "absgrad"
        torch.testing.assert_close(result.raw, torch.einsum("btk,bkhw->bthw", result.weights, result.activations))
        with pytest.raises(ValueError, match="already taken"):
            register_cam_method(type("Other", (ChannelWeightedCam,), {"name": "absgrad"}))
    finally:
        CAM_METHODS.pop("absgrad", None)
    with pytest.raises(ValueError, match="class attribute name"):
        register_cam_method(type("Nameless", (ChannelWeightedCam,), {}))
