"""Tests for cocam.losses: soft IoU, loss_g and the guided objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cocam.gradcam import grad_cam, normalize_cams
from cocam.losses import (
    CAM_LOSSES,
    DEAD_CAM_MAX,
    DEFAULT_GUIDANCE_WEIGHTS,
    GUIDANCE_LOSSES,
    REVIVE_TEMPERATURE,
    GuidedLoss,
    energy_loss,
    guided_loss,
    guided_objective,
    input_gradients,
    iou_loss,
    dead_cams,
    positive_sample_weight,
    region_loss,
    revive_term,
    rrr_cam_loss,
    rrr_input_loss,
    soft_iou,
)
from cocam.model import SplitModel


def test_soft_iou_hand_computation() -> None:
    cam = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    binary = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # I = 0.5;  U = (0.5+1-0.5) + 1 + 1 + 0.25 = 3.25
    assert soft_iou(cam, binary).item() == pytest.approx(0.5 / 3.25)
    fractional = torch.tensor([[0.5, 1.0], [0.0, 0.0]])
    # I = 0.25 + 1 = 1.25;  U = (0.5+0.5-0.25) + (1+1-1) + 0 + 0.25 = 2.0
    assert soft_iou(cam, fractional).item() == pytest.approx(0.625)
    assert soft_iou(fractional, fractional).item() < 1.0  # soft sets: not idempotent
    assert soft_iou(binary, binary).item() == pytest.approx(1.0)


def test_soft_iou_equals_crisp_iou_on_binary_sets() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(5, 6, 7, generator=gen) > 0.5
    s = torch.rand(5, 6, 7, generator=gen) > 0.4
    expected = (g & s).sum(dim=(1, 2)).double() / (g | s).sum(dim=(1, 2)).double()
    torch.testing.assert_close(soft_iou(g.double(), s.double()), expected)


def test_soft_iou_broadcasts_one_mask_per_target() -> None:
    gen = torch.Generator().manual_seed(1)
    cam = torch.rand(2, 3, 4, 5, generator=gen)
    mask = (torch.rand(3, 4, 5, generator=gen) > 0.5).float()
    out = soft_iou(cam, mask)
    assert out.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            assert out[b, t].item() == pytest.approx(soft_iou(cam[b, t], mask[t]).item())
    assert soft_iou(cam, mask[0]).shape == (2, 3)
    with pytest.raises(ValueError, match="spatial size"):
        soft_iou(cam, torch.ones(4, 4))


def test_soft_iou_empty_sets_and_gradient_formula() -> None:
    zeros = torch.zeros(3, 3)
    assert soft_iou(zeros, zeros).item() == 0.0
    gen = torch.Generator().manual_seed(2)
    cam = torch.rand(4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(4, 4, generator=gen, dtype=torch.float64)
    iou = soft_iou(cam, mask)
    (grad,) = torch.autograd.grad(iou, cam)
    union = (cam + mask - cam * mask).sum().detach()
    expected = (mask - iou.detach() * (1 - mask)) / union  # smooth: every pixel gets a signal
    torch.testing.assert_close(grad, expected)
    assert (grad != 0).all()


def test_iou_loss_values_and_reductions() -> None:
    cam = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    per = iou_loss(cam, mask, reduction="none")
    torch.testing.assert_close(per, torch.tensor([-math.log(0.5 / 3.25), 0.0]))
    assert iou_loss(cam, mask).item() == pytest.approx(-math.log(0.5 / 3.25) / 2)
    assert iou_loss(cam, mask, reduction="sum").item() == pytest.approx(-math.log(0.5 / 3.25))
    with pytest.raises(ValueError, match="reduction"):
        iou_loss(cam, mask, reduction="max")


def test_iou_loss_empty_cam_is_bounded_with_finite_gradient() -> None:
    mask = torch.zeros(6, 6)
    mask[2:4, 2:4] = 1
    cam = torch.zeros(6, 6, requires_grad=True)
    loss = iou_loss(cam, mask, eps=1e-6)
    # without a raw map the CAM is the evidence: μ = 0, so -ln(eps) + softplus(0)
    assert loss.item() == pytest.approx(-math.log(1e-6) + math.log(2))
    (grad,) = torch.autograd.grad(loss, cam)
    # d softplus(-μ/τ)/dg = -σ(0)/τ · s/Σs: raises the CAM inside the region, leaves the rest
    torch.testing.assert_close(grad, -0.5 / REVIVE_TEMPERATURE * mask / mask.sum())


def test_iou_loss_full_mask_and_full_cam_have_finite_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    cam = torch.rand(5, 5, generator=gen).requires_grad_(True)
    full = torch.ones(5, 5)
    loss = iou_loss(cam, full)
    assert loss.item() == pytest.approx(-math.log(cam.detach().mean().item()), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, cam)
    assert torch.isfinite(grad).all() and (grad < 0).all()  # more G everywhere is better
    ones = torch.ones(5, 5, requires_grad=True)
    mask = torch.zeros(5, 5)
    mask[0, 0] = 1
    loss = iou_loss(ones, mask)
    assert loss.item() == pytest.approx(math.log(25))
    (grad,) = torch.autograd.grad(loss, ones)
    assert torch.isfinite(grad).all() and grad[0, 0] < 0 and (grad.flatten()[1:] > 0).all()


def test_iou_loss_rejects_empty_mask() -> None:
    cam = torch.rand(2, 2, 4, 4)
    masks = torch.zeros(2, 4, 4)
    masks[0, 1, 1] = 1.0  # second mask is empty
    with pytest.raises(ValueError, match="no positive pixel"):
        iou_loss(cam, masks)
    masks[1, 0, 0] = 0.3
    assert torch.isfinite(iou_loss(cam, masks))


def _bce_by_hand(logits: torch.Tensor, y: torch.Tensor) -> float:
    p = 1 / (1 + np.exp(-logits.detach().double().numpy()))
    y = y.double().numpy()
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def test_guided_loss_equals_hand_computation() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 40, generator=gen)
    labels = (torch.rand(3, 40, generator=gen) > 0.5).float()
    cam = torch.rand(3, 2, 6, 6, generator=gen)
    mask = torch.zeros(2, 6, 6)
    mask[0, 3:5, 1:5] = 1
    mask[1, 1:3, 1:3] = 0.5
    out = guided_loss(logits, labels, cam, mask, w_a=0.7, w_g=2.0)
    assert isinstance(out, GuidedLoss)
    per = [[-math.log(soft_iou(cam[b, t], mask[t]).item()) for t in range(2)] for b in range(3)]
    assert out.bce.item() == pytest.approx(_bce_by_hand(logits, labels), rel=1e-5)
    assert out.guidance.item() == pytest.approx(np.mean(per), rel=1e-5)
    assert out.total.item() == pytest.approx(0.7 * out.bce.item() + 2.0 * np.mean(per), rel=1e-5)
    torch.testing.assert_close(out.per_sample, torch.tensor(per))

    weight = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # guide 3 of the 6 pairs
    selected = guided_loss(logits, labels, cam, mask, sample_weight=weight)
    expected = (per[0][0] + per[2][0] + per[2][1]) / 3
    assert selected.guidance.item() == pytest.approx(expected, rel=1e-5)
    shared = guided_loss(logits, labels, cam, mask[0])  # one (H, W) mask for both targets
    assert shared.per_sample.shape == (3, 2)


def test_guided_loss_with_a_loss_and_weight_per_target_equals_hand_computation() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 40, generator=gen)
    labels = (torch.rand(4, 40, generator=gen) > 0.5).float()
    cam = torch.rand(4, 3, 8, 8, generator=gen)
    mask = torch.zeros(3, 8, 8)
    mask[0, 5:7, 2:6] = 1
    mask[1, 2:4, 1:3] = 1
    mask[2, 6:8, 3:5] = 1
    weight = torch.tensor([[1.0, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    out = guided_loss(logits, labels, cam, mask, w_a=0.5, w_g=(3.0, 1.0, 10.0), loss=("iou", "energy", "rrr_cam"),
                      sample_weight=weight)
    funcs = (lambda c, m: -math.log(soft_iou(c, m).item()),
             lambda c, m: -math.log(((c * m).sum() / c.sum()).item()),
             lambda c, m: ((c * (1 - m)) ** 2).mean().item())
    per = torch.tensor([[funcs[t](cam[b, t], mask[t]) for t in range(3)] for b in range(4)])
    torch.testing.assert_close(out.per_sample, per, rtol=1e-5, atol=1e-6)
    n = weight.sum().item()
    assert out.guidance.item() == pytest.approx((weight * per).sum().item() / n, rel=1e-5)
    w = torch.tensor([3.0, 1.0, 10.0])
    expected = 0.5 * out.bce.item() + (weight * per * w).sum().item() / n
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    # equal per-target values are the scalar case
    same = guided_loss(logits, labels, cam, mask, w_g=(2.0, 2.0, 2.0), loss=("iou",) * 3)
    scalar = guided_loss(logits, labels, cam, mask, w_g=2.0, loss="iou")
    assert same.total.item() == pytest.approx(scalar.total.item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss has 2 values for 3 guided targets"):
        guided_loss(logits, labels, cam, mask, loss=("iou", "energy"))
    with pytest.raises(ValueError, match="w_g has 4 values"):
        guided_loss(logits, labels, cam, mask, w_g=(1.0, 1.0, 1.0, 1.0))


def test_guided_loss_without_guided_samples_is_zero_and_differentiable() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 40, generator=gen, requires_grad=True)
    labels = torch.zeros(4, 40)
    cam = torch.rand(4, 5, 5, generator=gen, requires_grad=True)  # (B, H, W): T = 1
    mask = torch.zeros(5, 5)
    mask[1:3, 1:4] = 1
    weight = positive_sample_weight(labels, [36])
    assert weight.shape == (4, 1) and weight.sum() == 0
    out = guided_loss(logits, labels, cam, mask, sample_weight=weight)
    assert out.guidance.item() == 0.0 and out.total.item() == pytest.approx(out.bce.item())
    out.total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert cam.grad is not None and torch.equal(cam.grad, torch.zeros_like(cam))
    flat = guided_loss(logits, labels, cam, mask, sample_weight=torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert flat.guidance.item() == pytest.approx(flat.per_sample[1, 0].item())


def test_positive_sample_weight() -> None:
    labels = torch.tensor([[1, -1, 1], [-1, 1, -1]])
    assert positive_sample_weight(labels, [0, 1]).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert positive_sample_weight((labels + 1) // 2, (2,)).tolist() == [[1.0], [0.0]]
    celeba = torch.zeros(2, 40)
    celeba[1, 36] = 1
    assert positive_sample_weight(celeba, "Wearing_Lipstick").tolist() == [[0.0], [1.0]]


def test_guided_loss_validation() -> None:
    logits = torch.zeros(2, 40)
    cam = torch.rand(2, 1, 4, 4)
    mask = torch.ones(4, 4)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match=r"\(y \+ 1\) / 2"):
        guided_loss(logits, -torch.ones(2, 40), cam, mask)
    with pytest.raises(ValueError, match="differ in shape"):
        guided_loss(logits, torch.zeros(2, 39), cam, mask)
    with pytest.raises(ValueError, match="cam must be"):
        guided_loss(logits, torch.zeros(2, 40), torch.rand(3, 1, 4, 4), mask)
    with pytest.raises(ValueError, match="mask must be"):
        guided_loss(logits, torch.zeros(2, 40), cam, torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="sample_weight"):
        guided_loss(logits, torch.zeros(2, 40), cam, mask, sample_weight=torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        guided_loss(logits, torch.zeros(2, 40), cam, mask, sample_weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="no positive pixel"):
        guided_loss(logits, torch.zeros(2, 40), cam, torch.zeros(4, 4))


def _tiny_model() -> SplitModel:
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(32, 40))
    return SplitModel(trunk, head, num_outputs=40, arch="tiny")


@pytest.mark.parametrize("create_graph", [False, True])
def test_one_sgd_step_reduces_guidance_loss(create_graph: bool) -> None:
    torch.manual_seed(0)
    model = _tiny_model()
    x = torch.randn(8, 3, 24, 24)
    labels = (torch.rand(8, 40) > 0.5).float()
    labels[:, 36] = 1.0
    mask = torch.zeros(2, 24, 24)
    mask[0, 14:22, 6:18] = 1.0  # "mouth"
    mask[1, 4:10, 2:22] = 1.0  # "eyes"
    targets = ["Wearing_Lipstick", "Smiling"]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)

    def evaluate() -> tuple[GuidedLoss, torch.Tensor]:
        result = grad_cam(model, x, targets, create_graph=create_graph, output_size=24)
        weight = positive_sample_weight(labels, result.targets)
        return guided_loss(result.logits, labels, result.cams, mask, w_a=0.5, sample_weight=weight), weight

    before, weight = evaluate()
    guided = weight.bool()
    manual = (before.per_sample * weight).sum() / weight.sum()
    assert before.guidance.item() == pytest.approx(manual.item(), rel=1e-6)
    assert before.guidance.item() == pytest.approx(before.per_sample[guided].mean().item(), rel=1e-6)
    optimiser.zero_grad()
    before.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trunk.parameters())
    optimiser.step()
    after, _ = evaluate()
    assert after.guidance.item() < before.guidance.item() - 1e-4
    assert after.total.item() < before.total.item()


# --------------------------------------------------------------------------------------------
# Other guidance losses, selected by name
# --------------------------------------------------------------------------------------------


def test_energy_loss_hand_computation() -> None:
    cam = torch.tensor([[0.5, 1.0], [0.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # inside = 0.5, total = 2.0: share 0.25
    assert energy_loss(cam, mask).item() == pytest.approx(-math.log(0.25))
    # a CAM entirely inside the region has loss 0, whatever its extent
    assert energy_loss(cam * mask, mask).item() == pytest.approx(0.0, abs=1e-7)
    # an all-zero CAM has share 0: the revive branch -ln(eps) + softplus(0), not NaN
    assert energy_loss(torch.zeros(2, 2), mask).item() == pytest.approx(-math.log(1e-6) + math.log(2))


def test_rrr_cam_loss_hand_computation() -> None:
    cam = torch.tensor([[0.5, 1.0], [0.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    # outside: g·(1-s) = [[0, 1], [0, 0.5]] -> squares 1 + 0.25, mean over 4 pixels
    assert rrr_cam_loss(cam, mask).item() == pytest.approx(1.25 / 4)
    assert rrr_cam_loss(cam * mask, torch.ones(2, 2) * (mask > 0)).item() == 0.0


def test_region_loss_selects_by_name_and_rejects_unknown_names() -> None:
    gen = torch.Generator().manual_seed(3)
    cam = torch.rand(4, 2, 6, 6, generator=gen)
    mask = (torch.rand(2, 6, 6, generator=gen) > 0.5).float()
    torch.testing.assert_close(region_loss(cam, mask, "iou", reduction="none"), iou_loss(cam, mask, reduction="none"))
    torch.testing.assert_close(region_loss(cam, mask, "energy"), energy_loss(cam, mask))
    torch.testing.assert_close(region_loss(cam, mask, "rrr_cam"), rrr_cam_loss(cam, mask))
    with pytest.raises(ValueError, match="iou, energy, rrr_cam, rrr_input"):
        region_loss(cam, mask, "dice")
    with pytest.raises(ValueError, match="input gradients"):
        region_loss(cam, mask, "rrr_input")
    assert set(GUIDANCE_LOSSES) == set(DEFAULT_GUIDANCE_WEIGHTS)
    with pytest.raises(ValueError, match="no positive pixel"):
        region_loss(cam, torch.zeros(2, 6, 6), "energy")


@pytest.mark.parametrize("name", ["iou", "energy", "rrr_cam"])
def test_cam_losses_have_finite_gradients_for_degenerate_maps(name: str) -> None:
    mask = torch.zeros(5, 5)
    mask[1:3, 1:3] = 1
    for cam in (torch.zeros(5, 5), torch.ones(5, 5), mask.clone()):
        cam = cam.requires_grad_(True)
        loss = region_loss(cam, mask, name)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(cam.grad).all()


@pytest.mark.parametrize("name", ["iou", "energy", "rrr_cam"])
def test_cam_losses_prefer_the_cam_inside_the_region(name: str) -> None:
    mask = torch.zeros(8, 8)
    mask[2:5, 2:5] = 1
    inside, outside = mask.clone(), torch.zeros(8, 8)
    outside[6:, 6:] = 1
    half = (inside + outside) / 2
    values = [region_loss(c, mask, name).item() for c in (inside, half, outside)]
    assert values[0] < values[1] < values[2]


def test_guided_loss_with_one_mask_per_image_equals_per_image_calls() -> None:
    gen = torch.Generator().manual_seed(4)
    cam = torch.rand(3, 2, 6, 6, generator=gen)
    masks = (torch.rand(3, 2, 6, 6, generator=gen) > 0.5).float()
    logits = torch.randn(3, 40, generator=gen)
    y = (torch.rand(3, 40, generator=gen) > 0.5).float()
    for name in ("iou", "energy", "rrr_cam"):
        out = guided_loss(logits, y, cam, masks, loss=name)
        expected = torch.stack([region_loss(cam[b], masks[b], name, reduction="none") for b in range(3)])
        torch.testing.assert_close(out.per_sample, expected)
        torch.testing.assert_close(out.guidance, expected.mean())
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        guided_loss(logits, y, cam, masks[:2])


def test_guided_objective_combines_like_guided_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    cam = torch.rand(4, 1, 5, 5, generator=gen)
    mask = (torch.rand(1, 5, 5, generator=gen) > 0.4).float()
    logits = torch.randn(4, 40, generator=gen)
    y = (torch.rand(4, 40, generator=gen) > 0.5).float()
    weight = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    a = guided_loss(logits, y, cam, mask, w_a=0.5, w_g=2.0, sample_weight=weight)
    per = iou_loss(cam, mask, reduction="none")
    b = guided_objective(logits, y, per, w_a=0.5, w_g=2.0, sample_weight=weight)
    torch.testing.assert_close(a.total, b.total)
    assert b.guidance.item() == pytest.approx((per[0, 0] + per[2, 0]).item() / 2)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_input_gradients_match_the_chain_rule_and_a_per_target_reference() -> None:
    """∂(log σ(z) + log σ(−z))/∂x = (1 − 2σ(z)) · ∂z/∂x, each target on its own."""
    net = _TinyNet().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    targets = [2, 17]
    grads, logits = input_gradients(net, x, targets, create_graph=False)
    assert grads.shape == (3, 2, 3, 6, 6)
    torch.testing.assert_close(logits, net(x))
    for j, t in enumerate(targets):
        xr = x.clone().requires_grad_(True)
        z = net(xr)[:, t]
        (dz,) = torch.autograd.grad(z.sum(), xr)
        expected = (1 - 2 * torch.sigmoid(z.detach()))[:, None, None, None] * dz
        torch.testing.assert_close(grads[:, j], expected)
    single, _ = input_gradients(net, x, [17], create_graph=False)
    torch.testing.assert_close(single[:, 0], grads[:, 1])
    summed, _ = input_gradients(net, x, targets, create_graph=False, summed=True)  # linearity of ∂
    assert summed.shape == (3, 1, 3, 6, 6)
    torch.testing.assert_close(summed[:, 0], grads.sum(dim=1))
    assert all(p.grad is None for p in net.parameters())  # hygiene: no .grad touched


def test_rrr_input_loss_hand_computation_and_training_signal() -> None:
    grads = torch.zeros(1, 1, 3, 2, 2)
    grads[0, 0, :, 0, 1] = torch.tensor([1.0, 2.0, 2.0])  # outside the region: 1 + 4 + 4
    grads[0, 0, :, 0, 0] = 5.0  # inside: not penalised
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert rrr_input_loss(grads, mask).item() == pytest.approx(9.0)
    per_image = mask[None].expand(1, 1, 2, 2)
    assert rrr_input_loss(grads, per_image).item() == pytest.approx(9.0)

    net = _TinyNet().double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    region = torch.zeros(1, 6, 6, dtype=torch.float64)
    region[:, :3] = 1
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    values = []
    for _ in range(5):
        grads, _ = input_gradients(net, x, [5], create_graph=True)
        loss = rrr_input_loss(grads, region)
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < values[0]


# --------------------------------------------------------------------------------------------
# Degenerate maps: no guidance loss is minimised, or trapped, by a dead CAM
# --------------------------------------------------------------------------------------------

#: The largest value each CAM loss takes on an alive CAM (eps = 1e-6): a dead CAM must score above it.
ALIVE_BOUND = {"iou": -math.log(1e-6), "energy": -math.log(1e-6), "rrr_cam": 1.0}


def _cam_of(raw: torch.Tensor, size: int) -> torch.Tensor:
    """Grad-CAM's last steps (cocam.gradcam): ReLU, per-map min–max, bilinear upsampling."""
    cam = normalize_cams(torch.relu(raw))
    return torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)


def _region(size: int = 16) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, 4:8, 4:8] = 1.0  # exactly one cell of a 4x4 feature map
    return mask


def test_every_registered_loss_is_covered_by_the_degenerate_map_tests() -> None:
    """The loops below run over CAM_LOSSES; a new loss that is not CAM-based needs its own test here."""
    assert set(ALIVE_BOUND) == set(CAM_LOSSES)
    assert set(GUIDANCE_LOSSES) - set(CAM_LOSSES) == {"rrr_input"}


@pytest.mark.parametrize("name", CAM_LOSSES)
def test_a_dead_cam_scores_worse_than_every_alive_cam(name: str) -> None:
    gen = torch.Generator().manual_seed(8)
    mask = _region()
    dead_raws = [-torch.rand(1, 1, 4, 4, generator=gen), torch.zeros(1, 1, 4, 4),
                 -torch.rand(1, 1, 4, 4, generator=gen) * 1e-4]  # an untrained AlexNet's scale
    dead = [region_loss(_cam_of(r, 16), mask, name, raw=r).item() for r in dead_raws]
    dead.append(region_loss(torch.zeros(1, 1, 16, 16), mask, name).item())  # no raw map given
    assert all(_cam_of(r, 16).abs().max() == 0 for r in dead_raws)  # these CAMs are all zero

    inside = region_loss(mask[None], mask, name).item()
    alive_raw = torch.randn(64, 1, 4, 4, generator=gen)
    alive_raw[:, :, 1, 1] = alive_raw.abs().amax(dim=(-2, -1)) + 0.1  # each map peaks inside S: mass there
    alive = region_loss(_cam_of(alive_raw, 16), mask, name, raw=alive_raw, reduction="none")
    assert alive.max().item() <= ALIVE_BOUND[name]
    # where the raw map is ≤ 0 on S (μ ≤ 0) the revive branch adds at least softplus(0) = ln 2
    assert min(dead) >= ALIVE_BOUND[name] + math.log(2) * (1 - 1e-6)
    assert ALIVE_BOUND[name] >= max(inside, alive.max().item())


@pytest.mark.parametrize("name", CAM_LOSSES)
def test_alive_cams_score_as_before_whatever_the_raw_map(name: str) -> None:
    """The revive branch only replaces the dead state: alive CAMs keep the published definitions."""
    gen = torch.Generator().manual_seed(9)
    cam = torch.rand(5, 2, 16, 16, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 16, 16, generator=gen, dtype=torch.float64)
    raw = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    inter = (cam * mask).sum(dim=(-2, -1))
    expected = {"iou": -torch.log(inter / (cam + mask - cam * mask).sum(dim=(-2, -1))),
                "energy": -torch.log(inter / cam.sum(dim=(-2, -1))),
                "rrr_cam": (cam * (1 - mask)).square().mean(dim=(-2, -1))}[name]
    torch.testing.assert_close(region_loss(cam, mask, name, reduction="none", raw=raw), expected)
    torch.testing.assert_close(region_loss(cam, mask, name, reduction="none"), expected)


def test_revive_branch_hand_computation() -> None:
    raw = torch.tensor([[[[-1.0, -2.0], [-4.0, -0.5]]]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    cam = _cam_of(raw, 2)
    assert cam.abs().max().item() == 0.0
    # max|m| = 4;  μ = (-1 - 4) / (2 · 4) = -0.625;  softplus(0.625 / 0.25) = ln(1 + e^2.5)
    revive = math.log1p(math.exp(2.5))
    assert revive_term(cam, mask, raw).item() == pytest.approx(revive, rel=1e-12)
    assert iou_loss(cam, mask, raw=raw).item() == pytest.approx(-math.log(1e-6) + revive, rel=1e-12)
    assert energy_loss(cam, mask, raw=raw).item() == pytest.approx(-math.log(1e-6) + revive, rel=1e-12)
    assert rrr_cam_loss(cam, mask, raw=raw).item() == pytest.approx(1.0 + revive, rel=1e-12)
    # ∂/∂m = -σ(2.5)/τ · s / (Σs · max|m|), max|m| held constant
    (grad,) = torch.autograd.grad(iou_loss(cam, mask, raw=raw), raw)
    sigma = 1 / (1 + math.exp(-2.5))
    torch.testing.assert_close(grad[0, 0], -sigma / REVIVE_TEMPERATURE * mask / (2 * 4))


def test_revive_term_resizes_the_raw_map_to_the_mask() -> None:
    gen = torch.Generator().manual_seed(10)
    raw = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    mask = (torch.rand(2, 16, 16, generator=gen) > 0.5).double()
    cam = torch.zeros(3, 2, 16, 16, dtype=torch.float64)
    up = torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(revive_term(cam, mask, raw), revive_term(cam, mask, up))
    scale = up.abs().amax(dim=(-2, -1))
    mu = (up * mask).sum(dim=(-2, -1)) / (mask.sum(dim=(-2, -1)) * scale)
    torch.testing.assert_close(revive_term(cam, mask, raw), torch.nn.functional.softplus(-mu / REVIVE_TEMPERATURE))


@pytest.mark.parametrize("name", CAM_LOSSES)
def test_gradient_descent_leaves_the_dead_state(name: str) -> None:
    """From a raw map ≤ 0 everywhere the gradient is finite, non-zero, and descent revives the CAM inside S.

    Before the revive branch the gradient here was exactly zero (the ReLU and the clamp), so the
    CAM stayed dead.
    """
    mask = _region()
    raw = (-0.2 - torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(11))).requires_grad_(True)
    loss = region_loss(_cam_of(raw, 16), mask, name, raw=raw)
    (grad,) = torch.autograd.grad(loss, raw)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad <= 0).all() and (grad[:, :, 1, 1] < 0).all()  # descent raises the evidence under S
    optimiser = torch.optim.SGD([raw], lr=0.5)
    for _ in range(10):
        optimiser.zero_grad()
        region_loss(_cam_of(raw, 16), mask, name, raw=raw).backward()
        optimiser.step()
    cam = _cam_of(raw.detach(), 16)
    assert not dead_cams(cam).any()
    share = (cam * mask).sum(dim=(-2, -1)) / cam.sum(dim=(-2, -1))
    assert (share > 0.3).all()
    assert region_loss(cam, mask, name, raw=raw.detach()).item() < ALIVE_BOUND[name]


def test_dead_cams_and_guided_loss_report_them() -> None:
    cam = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(12))
    cam = cam / cam.amax(dim=(-2, -1), keepdim=True)  # alive: max 1
    cam[1, 0] = 0.0
    cam[2, 1] = DEAD_CAM_MAX / 2  # flat and low: counted as dead
    expected = torch.tensor([[False, False], [True, False], [False, True]])
    assert torch.equal(dead_cams(cam), expected)
    mask = torch.zeros(2, 6, 6)
    mask[:, 1:4, 1:4] = 1
    logits, y = torch.zeros(3, 40), torch.zeros(3, 40)
    out = guided_loss(logits, y, cam, mask)
    assert torch.equal(out.dead, expected)
    with pytest.raises(ValueError, match="raw must be"):
        guided_loss(logits, y, cam, mask, raw=torch.zeros(3, 1, 2, 2))


def test_guidance_alone_revives_a_model_whose_cams_are_all_dead() -> None:
    """A tiny SplitModel whose target CAMs are all zero (negative head weights on ReLU features).

    Guidance alone (w_a = 0), exact Grad-CAM, a few dozen Adam steps: with the raw map passed
    the dead share falls to 0 and the guidance loss below the alive bound. Without it (the
    CAM's ReLU blocks the revive gradient, as it blocked every gradient of the old losses)
    nothing moves.
    """
    def run(pass_raw: bool) -> tuple[list[float], float]:
        torch.manual_seed(0)
        model = _tiny_model()
        t = 36
        with torch.no_grad():
            model.head[2].weight[t] = -0.3 * model.head[2].weight[t].abs()
        x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(13))
        labels = torch.ones(8, 40)
        mask = torch.zeros(1, 24, 24)
        mask[0, 14:22, 6:18] = 1.0
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        shares = []
        for _ in range(30):
            res = grad_cam(model, x, [t], create_graph=True, output_size=24)
            out = guided_loss(res.logits, labels, res.cams, mask, w_a=0.0, raw=res.signed if pass_raw else None)
            shares.append(out.dead.float().mean().item())
            optimiser.zero_grad()
            out.total.backward()
            optimiser.step()
        return shares, out.guidance.item()

    shares, final = run(pass_raw=True)
    assert shares[0] == 1.0  # every CAM starts dead
    assert shares[-1] == 0.0
    assert final < -math.log(1e-6)
    stuck, _ = run(pass_raw=False)
    assert stuck == [1.0] * 30


def test_a_new_loss_is_one_function_and_one_registration(tmp_path) -> None:
    """Register a loss, use it through Guidance and the guided step and the CLI's choices, remove it."""
    from cocam.cli import build_parser
    from cocam.losses import LOSSES, register_guidance_loss, revive_term, unregister_guidance_loss
    from cocam.masks import default_mask
    from cocam.model import build_model
    from cocam.train import Guidance, guidance_masks, guided_terms
    from cocam.attributes import attribute_index

    def outside_share(cam, mask, *, eps=1e-6, reduction="mean", validate=True, raw=None):
        """The share of the CAM's mass outside S, plus the revive branch for a dead CAM."""
        out = (cam * (1 - mask)).sum(dim=(-2, -1)) / cam.sum(dim=(-2, -1)).clamp_min(eps)
        dead = cam.amax(dim=(-2, -1)) <= 0
        value = torch.where(dead, 1.0 + revive_term(cam, mask, raw), out)
        return value if reduction == "none" else value.mean() if reduction == "mean" else value.sum()

    register_guidance_loss("outside_share", outside_share, default_weight=2.0)
    try:
        assert "outside_share" in GUIDANCE_LOSSES and "outside_share" in CAM_LOSSES
        assert DEFAULT_GUIDANCE_WEIGHTS["outside_share"] == 2.0
        mask = _region()
        assert region_loss(mask[None], mask, "outside_share").item() == 0.0  # all mass inside S
        assert region_loss(torch.zeros(1, 1, 16, 16), mask, "outside_share").item() >= 1.0 + math.log(2) * (1 - 1e-6)
        # the guided step computes it: its guidance term equals the function on the step's own CAMs
        attrs = ("Wearing_Lipstick",)
        g = Guidance(attrs, (default_mask(attrs[0]),), loss="outside_share", target="both")
        assert g.w_g == 2.0  # the registry's default weight
        torch.manual_seed(0)
        model = build_model("alexnet", num_outputs=40, hidden=16).eval()
        images = torch.rand(3, 3, 64, 64)
        targets = torch.randint(0, 2, (3, 40)).float()
        masks = guidance_masks(g, model, 64, torch.device("cpu"))
        terms = guided_terms(model, images, targets, g, [attribute_index(attrs[0])], masks)
        assert torch.isfinite(terms.total) and terms.per_sample.shape == (3, 1)
        from cocam.gradcam import grad_cam, signs_from_labels

        k = attribute_index(attrs[0])
        res = grad_cam(model, images, [k], signs=signs_from_labels(targets, [k]), output_size=64)
        expected = outside_share(res.cams, masks, reduction="none", raw=res.signed)
        torch.testing.assert_close(terms.per_sample, expected)
        torch.testing.assert_close(terms.total, terms.bce + 2.0 * expected.mean())
        assert "outside_share" in build_parser().parse_args(
            ["finetune", "--checkpoint", "x.pt", "--loss", "outside_share"]).loss
        with pytest.raises(ValueError, match="already registered"):
            register_guidance_loss("outside_share", outside_share, default_weight=1.0)
    finally:
        unregister_guidance_loss("outside_share")
    assert "outside_share" not in GUIDANCE_LOSSES and "outside_share" not in DEFAULT_GUIDANCE_WEIGHTS
    assert "outside_share" not in LOSSES
    with pytest.raises(ValueError, match="built-in"):
        unregister_guidance_loss("iou")
    with pytest.raises(ValueError, match="unknown guidance loss"):
        Guidance(("Wearing_Lipstick",), (default_mask("Wearing_Lipstick"),), loss="outside_share")
