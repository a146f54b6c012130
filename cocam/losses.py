"""Losses for Grad-CAM guided fine-tuning.

``Loss = w_a · BCE(40 attributes) + w_g · loss_g``, with ``loss_g = -ln(IoU(G, S))``, ``G`` the
Grad-CAM in ``[0, 1]`` and ``S`` the user's region (see :mod:`cocam.masks`).

Soft set operations
-------------------
``G`` is continuous and ``S`` has fractional values on its border once it is area-resized to
the CAM's resolution, so IoU needs soft ∩ and ∪. cocam uses the **product / probabilistic
sum** pair::

    |G ∩ S| = Σ g·s          |G ∪ S| = Σ (g + s − g·s)

rather than the fuzzy-set ``min`` / ``max``. Both agree with the crisp IoU on binary inputs
(and are equal to each other whenever ``S`` is binary), but ``min``/``max`` are only
piecewise linear: at each pixel the gradient goes to just one argument, and once ``g``
exceeds a fractional ``s`` the intersection stops rewarding it. The product form is smooth:
``∂IoU/∂g = (s − IoU·(1 − s)) / |G ∪ S|`` at every pixel, positive inside the region and
negative outside it, which is the signal the guidance is meant to give.

Numerical rules
---------------
* ``soft_iou`` divides by ``max(|G ∪ S|, eps)``: two empty sets have IoU 0, never NaN.
* ``iou_loss`` clamps the IoU below at ``eps`` before the log, so ``loss_g ≤ -ln(eps)``
  (13.8 for ``eps = 1e-6``) and its gradient is finite everywhere, including for an empty
  ``G`` or a full ``S``. Where the clamp is active (``G`` and ``S`` essentially disjoint) the
  loss passes no gradient; with a rectified CAM the IoU's own gradient is zero there anyway
  (the CAM is exactly 0 on ``S``).
* A mask ``S`` without any positive pixel is a user error (nothing to point at):
  ``iou_loss`` raises :class:`ValueError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cocam.gradcam import resolve_targets

__all__ = ["GuidedLoss", "guided_loss", "iou_loss", "positive_sample_weight", "soft_iou"]


def soft_iou(cam: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft IoU of ``G = cam`` and ``S = mask`` over the last two dimensions.

    Args:
        cam: ``(..., H, W)`` values in ``[0, 1]``, e.g. ``(B, T, H, W)``.
        mask: ``(..., H, W)`` values in ``[0, 1]``, broadcastable against ``cam``
            (e.g. ``(H, W)`` or ``(T, H, W)``).
        eps: floor of the union (two empty sets give 0).

    Returns:
        ``Σ g·s / max(Σ (g + s − g·s), eps)`` with shape ``broadcast(cam, mask).shape[:-2]``.
    """
    if cam.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"cam and mask must have the same spatial size, got {tuple(cam.shape[-2:])} and "
            f"{tuple(mask.shape[-2:])}; resize the mask with cocam.masks.mask_to_input / "
            f"mask_to_feature."
        )
    mask = mask.to(cam.dtype)
    inter = (cam * mask).sum(dim=(-2, -1))
    union = (cam + mask - cam * mask).sum(dim=(-2, -1))
    return inter / union.clamp_min(eps)


def _check_mask_not_empty(mask: Tensor) -> None:
    per_mask = mask.reshape(-1, *mask.shape[-2:]).flatten(1).amax(dim=1)
    if bool((per_mask <= 0).any()):
        raise ValueError(
            "a guidance mask has no positive pixel: the region S must cover part of the face "
            "(check the mask file and that the crop/resize kept it)."
        )


def iou_loss(cam: Tensor, mask: Tensor, eps: float = 1e-6, reduction: str = "mean") -> Tensor:
    """``loss_g = -ln(max(soft_iou(cam, mask), eps))``.

    Args:
        cam: ``(..., H, W)`` Grad-CAM in ``[0, 1]``.
        mask: ``(..., H, W)`` region in ``[0, 1]``, broadcastable; every mask must have at
            least one positive pixel (else :class:`ValueError`).
        eps: IoU floor (bounds the loss by ``-ln(eps)``) and union floor.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``broadcast(...).shape[:-2]``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    _check_mask_not_empty(mask)
    loss = -torch.log(soft_iou(cam, mask, eps).clamp_min(eps))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@dataclass(frozen=True)
class GuidedLoss:
    """Terms of the guided objective (scalar tensors, attached to the graph).

    Attributes:
        total: ``w_a * bce + w_g * guidance`` (call ``.backward()`` on this).
        bce: mean binary cross-entropy with logits over all samples and attributes.
        guidance: weighted mean of ``loss_g`` over the guided (sample, target) pairs, 0 if none.
        per_sample: ``(B, T)`` ``loss_g`` of every pair, guided or not.
    """

    total: Tensor
    bce: Tensor
    guidance: Tensor
    per_sample: Tensor


def positive_sample_weight(labels: Tensor, targets: str | int | Sequence[str | int]) -> Tensor:
    """``(B, T)`` weights guiding only the images where the target attribute is present.

    ``labels`` is ``(B, num_outputs)`` in ``{0, 1}`` (or ``{-1, 1}``); ``targets`` are
    attribute names or output indices, e.g. :attr:`cocam.gradcam.GradCAMResult.targets`.
    """
    idx = resolve_targets(targets, labels.shape[1])
    return (labels[:, idx] > 0).to(torch.float32)


def guided_loss(
    logits: Tensor,
    targets_bce: Tensor,
    cam: Tensor,
    mask: Tensor,
    *,
    w_a: float = 1.0,
    w_g: float = 1.0,
    sample_weight: Tensor | None = None,
) -> GuidedLoss:
    """``total = w_a · BCE(logits, targets_bce) + w_g · loss_g``.

    Args:
        logits: ``(B, C)`` all attribute logits (reuse ``GradCAMResult.logits``).
        targets_bce: ``(B, C)`` labels in ``[0, 1]`` (convert CelebA's ``-1/1`` with
            ``(y + 1) / 2``).
        cam: ``(B, T, H, W)`` Grad-CAMs in ``[0, 1]`` of the ``T`` guided attributes
            (``(B, H, W)`` is read as ``T = 1``).
        mask: ``(T, H, W)`` one region per guided attribute (``(H, W)`` is shared by all).
        w_a, w_g: weights of the two terms.
        sample_weight: ``(B, T)`` (or ``(B,)`` when ``T = 1``) non-negative weights selecting
            which (image, attribute) pairs are guided; ``None`` guides all. The paper's variant
            guides positives only: ``positive_sample_weight(labels, targets)``. For negatives
            the CAM of ``+logit`` shows evidence *for* an absent attribute; to guide them
            meaningfully compute the CAM with ``signs=signs_from_labels(...)``.

    Returns:
        :class:`GuidedLoss`. ``guidance = Σ w·loss_g / Σ w`` (the mean over guided pairs for
        0/1 weights); if no pair is guided it is an exact, differentiable 0.
    """
    if logits.shape != targets_bce.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets_bce {tuple(targets_bce.shape)} differ in shape."
        )
    targets_bce = targets_bce.to(logits.dtype)
    if bool(((targets_bce < 0) | (targets_bce > 1)).any()):
        raise ValueError(
            "targets_bce must be in [0, 1]; CelebA's -1/1 labels convert with (y + 1) / 2."
        )
    if cam.ndim == 3:
        cam = cam[:, None]
    if cam.ndim != 4 or cam.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cam must be (B, T, H, W) with B = {logits.shape[0]}, got {tuple(cam.shape)}."
        )
    b, t = cam.shape[:2]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] not in (1, t):
        raise ValueError(f"mask must be (T, H, W) with T = {t} or (H, W), got {tuple(mask.shape)}.")

    bce = F.binary_cross_entropy_with_logits(logits, targets_bce)
    per_sample = iou_loss(cam, mask.to(cam), reduction="none")  # (B, T)
    if sample_weight is None:
        weight = torch.ones_like(per_sample)
    else:
        weight = sample_weight.to(per_sample)
        if weight.ndim == 1 and t == 1:
            weight = weight[:, None]
        if tuple(weight.shape) != (b, t):
            raise ValueError(f"sample_weight must be (B, T) = {(b, t)}, got {tuple(weight.shape)}.")
        if bool((weight < 0).any()):
            raise ValueError("sample_weight must be non-negative.")
    denom = weight.sum()
    guidance = (weight * per_sample).sum() / torch.where(denom > 0, denom, torch.ones_like(denom))
    total = w_a * bce + w_g * guidance
    return GuidedLoss(total=total, bce=bce, guidance=guidance, per_sample=per_sample)
