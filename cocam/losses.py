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
* A mask ``S`` without any positive pixel is a user error (nothing to point at): the losses
  raise :class:`ValueError`.

The dead state, and why every CAM loss has a revive branch
----------------------------------------------------------
Grad-CAM is ``G = minmax(ReLU(m))`` with ``m = Σ_k w_k A_k`` the signed ("raw") map
(:mod:`cocam.gradcam`). When ``m ≤ 0`` everywhere the CAM is all zero — *dead* — and the ReLU
passes no gradient back to ``m``. The same holds, for the region, when the CAM's only mass lies
outside ``S``: nothing on ``S`` can move. Taken literally, the paper's ``-ln IoU`` (clamped at
``eps`` to stay finite) is then a constant with zero gradient: a trap the optimiser never leaves.
``rrr_cam`` was worse: a dead CAM has no energy outside ``S`` and scored 0, as well as a perfect
CAM. Measured (``benchmarks/dead_cam.py``: a random AlexNet, 64 px, guidance alone, Adam 3e-4,
24 steps), the share of dead guided CAMs ended at 100 % for ``rrr_cam`` and about 50 % for
``iou`` and ``energy`` (96–100 % with gradient clipping at 1); with the branch below, 0 %
(9–14 % with clipping). Every CAM loss here therefore has two branches, chosen per (image, target)::

    loss_g = L(G, S)                             if r(G, S) ≥ eps   (alive)
    loss_g = L_max + softplus(−μ / τ)            otherwise          (dead for S)

    μ = Σ s·m / (Σ s · max|m|)    (the raw map's mean over S, in units of its largest
                                   magnitude; max|m| is a constant for the gradient)

with ``r`` the loss's ratio (IoU for ``iou``; the share of the CAM's mass inside ``S``,
``Σ g·s / Σ g``, for ``energy`` and ``rrr_cam``), ``L_max`` the largest value ``L`` takes on an
alive CAM (``-ln eps`` for ``iou`` and ``energy``, 1 for ``rrr_cam``) and ``τ`` =
:data:`REVIVE_TEMPERATURE`. Consequences:

* a dead CAM scores **strictly worse than every alive one** (``softplus > 0``), so no loss is
  minimised by killing the CAM;
* its gradient is ``∂loss/∂m_ij = −σ(−μ/τ) · s_ij / (τ · Σ s · max|m|)``: negative on ``S``
  (descent raises the raw evidence inside the region until the CAM has mass there), zero
  away from it, never zero as a whole, and scale-free (``m`` of an untrained AlexNet is ~1e-4);
* on an alive CAM nothing changes: ``iou`` is exactly the paper's ``-ln(|G∩S| / |G∪S|)``
  wherever ``IoU ≥ eps`` (the old clamp's constant is what was replaced).

The raw map is the ``raw=`` argument, ``(..., h, w)`` at any resolution (bilinearly resized to
the mask's): :attr:`cocam.gradcam.GradCAMResult.signed`. Without it the losses use the CAM
itself as ``m`` (with ``max|m| = 1``): the values and the ordering are the same, but the revive
gradient then stops at the ReLU, so training passes the raw map (:mod:`cocam.train` does).
Just above the boundary the alive gradient of ``-ln r`` grows like ``1/r``; clip gradient
norms (``TrainConfig(clip_grad_norm=...)``) when training from a weak model.

Limits: the branch acts on ``m``, so it cannot reach through the network's own dead units — if
every activation under ``S`` is zero, ``μ = 0`` and no parameter receives its gradient (raising
``m`` on ``S`` can mean silencing the channels that vote against the target there, which
stops at ``μ = 0``; a tiny model with strongly negative head weights does stop there).
``rrr_input`` has no CAM and no such branch: a model whose input gradients vanish everywhere
scores 0 on it, as in Ross et al., who rely on the BCE term to rule that out.

Other guidance losses (:data:`GUIDANCE_LOSSES`, selected by name)
-----------------------------------------------------------------
The paper's IoU is one way to say "the evidence is in S". All of these take the same CAM ``G``
(per-image min–max normalised, so none can be satisfied by shrinking the map as a whole) and
the same region ``S``, and return one value per (image, target):

* ``"iou"`` — the paper's ``-ln(soft IoU(G, S))`` (:func:`iou_loss`): rewards overlap, and
  also penalises a CAM that covers only part of ``S``.
* ``"energy"`` — ``-ln(Σ g·s / Σ g)`` (:func:`energy_loss`): the share of the CAM's mass that
  lies inside ``S`` (the "energy-based pointing game"); indifferent to how much of ``S`` is
  covered, so a small focused CAM inside the region is optimal.
* ``"rrr_cam"`` — ``mean((g · (1 − s))²)`` (:func:`rrr_cam_loss`): "right for the right
  reasons" on Grad-CAM (Schramowski et al., 2020): penalises CAM energy *outside* the region.
  cocam applies it to the normalised CAM and averages over pixels, so its scale does not
  depend on the resolution. On its own it is minimised by a dead CAM (no energy anywhere);
  the revive branch above (a CAM with less than ``eps`` of its mass inside ``S`` scores
  ``1 + softplus(−μ/τ)``, above any alive CAM) is what makes it require mass inside ``S``.
* ``"rrr_input"`` — right for the right reasons on input gradients (Ross et al., 2017), the
  classic baseline: ``Σ ((1 − s) · ∂(Σ_k log p_k)/∂x)²`` over the pixels and colour channels,
  with ``Σ_k log p_k = log σ(z) + log σ(−z)`` summed over the two classes of the guided
  binary attribute. It needs the model and the images, not the CAM:
  :func:`rrr_input_loss`. Its scale depends on the model and the input normalisation; Ross
  et al. choose its weight so the two terms have similar magnitudes (see
  :data:`DEFAULT_GUIDANCE_WEIGHTS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cocam.gradcam import NORMALIZE_EPS, resolve_targets

__all__ = [
    "CAM_LOSSES",
    "DEAD_CAM_MAX",
    "LOSSES",
    "LossEntry",
    "DEFAULT_GUIDANCE_WEIGHTS",
    "GUIDANCE_LOSSES",
    "GuidedLoss",
    "REVIVE_TEMPERATURE",
    "check_guidance_loss",
    "dead_cams",
    "energy_loss",
    "guided_loss",
    "guided_objective",
    "input_gradients",
    "iou_loss",
    "per_target",
    "positive_sample_weight",
    "region_loss",
    "register_guidance_loss",
    "unregister_guidance_loss",
    "revive_term",
    "rrr_cam_loss",
    "rrr_input_loss",
    "soft_iou",
]

@dataclass(frozen=True)
class LossEntry:
    """One guidance loss of the registry (:func:`register_guidance_loss`).

    Attributes:
        fn: ``fn(cam, mask, *, eps, reduction, validate, raw) -> Tensor`` for a CAM loss (the
            signature of :func:`iou_loss`); ``None`` for ``rrr_input``, which the training step
            computes from input gradients (:func:`rrr_input_loss`).
        default_weight: the loss's starting ``w_g`` (:data:`DEFAULT_GUIDANCE_WEIGHTS`).
        uses: ``"cam"`` or ``"input_gradients"``.
    """

    fn: Any
    default_weight: float
    uses: str = "cam"


#: The guidance losses by name. Add one with :func:`register_guidance_loss`; every view below
#: (:data:`GUIDANCE_LOSSES`, :data:`CAM_LOSSES`, :data:`DEFAULT_GUIDANCE_WEIGHTS`), ``Guidance``,
#: the CLI's ``--loss`` choices and the tests that loop over the losses read it.
LOSSES: dict[str, LossEntry] = {}


class _Names:
    """A live, read-only view of the registry's names (optionally only those of one kind)."""

    def __init__(self, uses: str | None = None) -> None:
        self._uses = uses

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, e in LOSSES.items() if self._uses is None or e.uses == self._uses)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i):
        return self._names()[i]

    def __repr__(self) -> str:
        return repr(self._names())


#: Guidance losses selectable by name (``Guidance(loss=...)``, ``cocam finetune --loss``).
GUIDANCE_LOSSES = _Names()
#: The losses computed from the Grad-CAM (the others need input gradients).
CAM_LOSSES = _Names("cam")
#: A starting ``w_g`` per loss, with ``w_a = 1``, following Ross et al.'s rule: the guidance
#: term about as large as the BCE at the start of fine-tuning. Measured on the synthetic
#: benchmark's converged baseline (AlexNet, 112 px, the three paper masks; BCE ≈ 0.19):
#: ``iou`` and ``energy`` start near 1–2 (weight 1, the paper's), ``rrr_cam`` near 0.012
#: (weight 10), ``rrr_input`` near 10 (weight 0.02; its scale depends on the model and the
#: input normalisation). Check the first ``loss_g`` the training loop reports and adjust for
#: other models.
DEFAULT_GUIDANCE_WEIGHTS: dict[str, float] = {}  # filled by register_guidance_loss, at the end of this module
#: ``τ`` of the revive branch ``softplus(−μ/τ)`` (module docstring), in units of the raw map's
#: largest magnitude: at a dead CAM (``μ ∈ [−1, 0]``) the branch adds 0.69–4.0 to the loss and
#: its slope ``σ(−μ/τ)/τ`` is 2–4, a signal of the same order as an alive ``-ln IoU``'s.
REVIVE_TEMPERATURE: float = 0.25
#: A CAM whose largest value is below this is counted as dead (:func:`dead_cams`). A min–max
#: normalised CAM that is alive has maximum 1 at feature resolution (bilinear upsampling keeps
#: it near 1); one whose raw map is ≤ 0 everywhere (or flatter than
#: :data:`cocam.gradcam.NORMALIZE_EPS`) is all zero.
DEAD_CAM_MAX: float = 0.5


def check_guidance_loss(name: str) -> str:
    """``name`` if it is one of :data:`GUIDANCE_LOSSES`, else a :class:`ValueError` listing them."""
    if name not in GUIDANCE_LOSSES:
        raise ValueError(f"unknown guidance loss {name!r}; choose one of {', '.join(GUIDANCE_LOSSES)}.")
    return name


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
    _check_spatial(cam, mask)
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


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def _check_spatial(cam: Tensor, mask: Tensor) -> None:
    if cam.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"cam and mask must have the same spatial size, got {tuple(cam.shape[-2:])} and "
            f"{tuple(mask.shape[-2:])}; resize the mask with cocam.masks.mask_to_input / mask_to_feature."
        )


def dead_cams(cam: Tensor, threshold: float = DEAD_CAM_MAX) -> Tensor:
    """``(...)`` bool: which CAMs ``(..., H, W)`` are dead (largest value below ``threshold``).

    A dead CAM is all zero: its raw map has no positive value, so it points nowhere. The share
    of dead CAMs among the guided pairs is logged per epoch by :func:`cocam.train.fit`
    (``dead_cam``).
    """
    return cam.detach().flatten(-2).amax(dim=-1) < threshold


def _resize_like(raw: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(raw.shape[-2:]) == tuple(size):
        return raw
    lead = raw.shape[:-2]
    flat = raw.reshape(-1, 1, *raw.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def revive_term(cam: Tensor, mask: Tensor, raw: Tensor | None = None,
                temperature: float = REVIVE_TEMPERATURE) -> Tensor:
    """``softplus(−μ/τ)``, ``μ = Σ s·m / (Σ s · max|m|)``: the revive branch of every CAM loss.

    ``m`` is the signed raw map ``raw`` (``(..., h, w)``, any resolution: bilinearly resized to
    the mask's) or, without it, the CAM itself with ``max|m| = 1``. ``max|m|`` (floored at
    :data:`~cocam.gradcam.NORMALIZE_EPS`) is detached: it makes the term scale-free without
    giving the gradient a direction of its own. Positive everywhere; decreasing in the raw
    evidence inside ``S``. Shape ``broadcast(cam, mask).shape[:-2]``. See the module docstring.
    """
    size = tuple(mask.shape[-2:])
    if raw is None:
        evidence, scale = cam, torch.ones((), dtype=cam.dtype, device=cam.device)
    else:
        evidence = _resize_like(raw.to(cam.dtype), size)
        scale = evidence.detach().abs().flatten(-2).amax(dim=-1).clamp_min(NORMALIZE_EPS)
    mask = mask.to(evidence.dtype)
    area = mask.sum(dim=(-2, -1)).clamp_min(NORMALIZE_EPS)
    mu = (evidence * mask).sum(dim=(-2, -1)) / (area * scale)
    out = F.softplus(-mu / temperature)
    return out.expand(torch.broadcast_shapes(cam.shape[:-2], mask.shape[:-2], out.shape))


def _alive_or_revive(alive: Tensor, ratio: Tensor, bound: float, cam: Tensor, mask: Tensor,
                     raw: Tensor | None, eps: float) -> Tensor:
    """``alive`` where ``ratio ≥ eps``, else ``bound + revive_term`` (the two branches of the module docstring)."""
    return torch.where(ratio >= eps, alive, bound + revive_term(cam, mask, raw))


def _inside_share(cam: Tensor, mask: Tensor, eps: float) -> Tensor:
    return (cam * mask).sum(dim=(-2, -1)) / cam.sum(dim=(-2, -1)).clamp_min(eps)


def energy_loss(cam: Tensor, mask: Tensor, eps: float = 1e-6, reduction: str = "mean",
                validate: bool = True, *, raw: Tensor | None = None) -> Tensor:
    """``-ln(Σ g·s / Σ g)``: minus the log-share of the CAM's mass inside ``S``.

    Where the share is below ``eps`` (an all-zero CAM has share 0) the value is
    ``-ln(eps) + softplus(−μ/τ)`` (:func:`revive_term` of the raw map ``raw``): worse than any
    alive CAM, with a gradient that raises the evidence inside ``S``. Same shapes and
    reductions as :func:`iou_loss`.
    """
    _check_spatial(cam, mask)
    if validate:
        _check_mask_not_empty(mask)
    mask = mask.to(cam.dtype)
    share = _inside_share(cam, mask, eps)
    alive = -torch.log(share.clamp_min(eps))
    return _reduce(_alive_or_revive(alive, share, -math.log(eps), cam, mask, raw, eps), reduction)


def rrr_cam_loss(cam: Tensor, mask: Tensor, reduction: str = "mean", validate: bool = True, *,
                 raw: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """``mean over pixels of (g · (1 − s))²``: the CAM's energy outside the region ``S``.

    Zero when the CAM lies inside ``S``; at most 1 for an alive CAM. A CAM with less than
    ``eps`` of its mass inside ``S`` (an all-zero CAM among them, which has no energy outside
    either) scores ``1 + softplus(−μ/τ)`` (:func:`revive_term`): the loss requires mass inside
    ``S`` instead of being minimised by a dead CAM. Same shapes and reductions as
    :func:`iou_loss`.
    """
    _check_spatial(cam, mask)
    if validate:
        _check_mask_not_empty(mask)
    mask = mask.to(cam.dtype)
    alive = (cam * (1 - mask)).square().mean(dim=(-2, -1))
    share = _inside_share(cam, mask, eps)
    return _reduce(_alive_or_revive(alive, share, 1.0, cam, mask, raw, eps), reduction)


def region_loss(cam: Tensor, mask: Tensor, loss: str = "iou", *, eps: float = 1e-6, reduction: str = "mean",
                validate: bool = True, raw: Tensor | None = None) -> Tensor:
    """The CAM-based guidance loss called ``loss`` (one of :data:`CAM_LOSSES`).

    Args:
        cam: ``(..., H, W)`` Grad-CAM in ``[0, 1]``.
        mask: ``(..., H, W)`` region in ``[0, 1]``, broadcastable against ``cam``.
        loss: ``"iou"`` (the paper), ``"energy"`` or ``"rrr_cam"``.
        eps: the numerical floor of ``iou``/``energy``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        validate: check that every mask has a positive pixel (a device sync; training checks
            its masks once instead).
        raw: ``(..., h, w)`` the signed Grad-CAM map before the ReLU
            (:attr:`cocam.gradcam.GradCAMResult.signed`), for the dead-CAM branch's gradient
            (module docstring); ``None`` uses the CAM.
    """
    entry = LOSSES[check_guidance_loss(loss)]
    if entry.uses != "cam":
        raise ValueError(f"{loss!r} is computed from input gradients, not from a CAM: use rrr_input_loss.")
    return entry.fn(cam, mask, eps=eps, reduction=reduction, validate=validate, raw=raw)


def input_gradients(model: torch.nn.Module, images: Tensor, targets: Sequence[int], *,
                    create_graph: bool = True, summed: bool = False) -> tuple[Tensor, Tensor]:
    """``∂(log σ(z_t) + log σ(−z_t))/∂x`` for each target ``t``, and the logits of the same forward.

    Returns ``(grads (B, T, C, H, W), logits (B, num_outputs))``. With ``summed=True`` the one
    gradient of the sum over the targets, ``∂ Σ_t (log σ(z_t) + log σ(−z_t))/∂x``, ``(B, 1, C, H, W)``
    — Ross et al.'s penalty on a multi-class output, one backward pass instead of ``T``. With
    ``create_graph=True`` (needed to train on a penalty of the gradients) both stay attached to
    the graph. Like :func:`cocam.gradcam.grad_cam`, it only uses :func:`torch.autograd.grad`:
    parameters' ``.grad`` and the model's mode are left alone.
    """
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        logits = model(x)
        z = logits[:, list(targets)].float()
        log_probs = F.logsigmoid(z) + F.logsigmoid(-z)  # (B, T): both classes of each attribute
        t = log_probs.shape[1]
        if t == 1 or summed:
            (g,) = torch.autograd.grad(log_probs.sum(), x, create_graph=create_graph)
            grads = g[:, None]
        else:
            eye = torch.eye(t, dtype=log_probs.dtype, device=log_probs.device)
            grad_outputs = eye[:, None, :].expand(t, *log_probs.shape)
            (g,) = torch.autograd.grad(log_probs, x, grad_outputs=grad_outputs, create_graph=create_graph,
                                       is_grads_batched=True)
            grads = g.transpose(0, 1)
    return grads, logits


def rrr_input_loss(input_grads: Tensor, mask: Tensor, reduction: str = "mean", validate: bool = True) -> Tensor:
    """Ross et al.'s penalty ``Σ_{c,i,j} ((1 − s_ij) · ∂_{c,i,j})²`` per (image, target).

    Args:
        input_grads: ``(B, T, C, H, W)`` from :func:`input_gradients`.
        mask: ``(T, H, W)`` or ``(B, T, H, W)`` region at input size (``(H, W)``: shared).
    """
    if input_grads.ndim != 5:
        raise ValueError(f"input_grads must be (B, T, C, H, W), got {tuple(input_grads.shape)}.")
    _check_spatial(input_grads, mask)
    if validate:
        _check_mask_not_empty(mask)
    outside = 1 - mask.to(input_grads.dtype)
    outside = outside.unsqueeze(-3)  # broadcast over colour channels
    return _reduce((input_grads * outside).square().sum(dim=(-3, -2, -1)), reduction)


def iou_loss(cam: Tensor, mask: Tensor, eps: float = 1e-6, reduction: str = "mean",
             validate: bool = True, *, raw: Tensor | None = None) -> Tensor:
    """``loss_g = -ln(soft_iou(cam, mask))`` (the paper's) where the IoU is at least ``eps``.

    Below ``eps`` (a dead CAM, or one with no mass on ``S``) the value is
    ``-ln(eps) + softplus(−μ/τ)`` with ``μ`` the raw map's mean over ``S``
    (:func:`revive_term`): above every alive value, and with a gradient that raises the raw
    evidence inside ``S``. The old constant ``-ln(eps)`` there had zero gradient.

    Args:
        cam: ``(..., H, W)`` Grad-CAM in ``[0, 1]``.
        mask: ``(..., H, W)`` region in ``[0, 1]``, broadcastable; every mask must have at
            least one positive pixel (else :class:`ValueError`).
        eps: IoU below which the CAM counts as dead for ``S``, and union floor.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``broadcast(...).shape[:-2]``).
        validate: check that every mask has a positive pixel (one device sync).
        raw: ``(..., h, w)`` the signed map before the ReLU (see :func:`region_loss`).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if validate:
        _check_mask_not_empty(mask)
    iou = soft_iou(cam, mask, eps)
    alive = -torch.log(iou.clamp_min(eps))
    return _reduce(_alive_or_revive(alive, iou, -math.log(eps), cam, mask.to(cam.dtype), raw, eps), reduction)


@dataclass(frozen=True)
class GuidedLoss:
    """Terms of the guided objective (scalar tensors, attached to the graph).

    Attributes:
        total: ``w_a * bce + w_g * guidance`` (call ``.backward()`` on this).
        bce: mean binary cross-entropy with logits over all samples and attributes.
        guidance: weighted mean of ``loss_g`` over the guided (sample, target) pairs, 0 if none.
        per_sample: ``(B, T)`` ``loss_g`` of every pair, guided or not.
        dead: ``(B, T)`` bool, which pairs' CAMs are dead (:func:`dead_cams`); ``None`` for
            losses that have no CAM (``rrr_input``).
    """

    total: Tensor
    bce: Tensor
    guidance: Tensor
    per_sample: Tensor
    dead: Tensor | None = None


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
    w_g: float | Sequence[float] = 1.0,
    sample_weight: Tensor | None = None,
    loss: str | Sequence[str] = "iou",
    validate: bool = True,
    raw: Tensor | None = None,
) -> GuidedLoss:
    """``total = w_a · BCE(logits, targets_bce) + w_g · loss_g`` for a CAM-based ``loss_g``.

    Args:
        logits: ``(B, C)`` all attribute logits (reuse ``GradCAMResult.logits``).
        targets_bce: ``(B, C)`` labels in ``[0, 1]`` (convert CelebA's ``-1/1`` with
            ``(y + 1) / 2``).
        cam: ``(B, T, H, W)`` Grad-CAMs in ``[0, 1]`` of the ``T`` guided attributes
            (``(B, H, W)`` is read as ``T = 1``).
        mask: ``(T, H, W)`` one region per guided attribute (``(H, W)`` is shared by all), or
            ``(B, T, H, W)`` one per image (e.g. moved by landmarks, :mod:`cocam.masks`).
        w_a, w_g: weights of the two terms; ``w_g`` may also give one weight per target
            (see :func:`guided_objective`).
        sample_weight: ``(B, T)`` (or ``(B,)`` when ``T = 1``) non-negative weights selecting
            which (image, attribute) pairs are guided; ``None`` guides all. The paper's variant
            guides positives only: ``positive_sample_weight(labels, targets)``. For negatives
            the CAM of ``+logit`` shows evidence *for* an absent attribute; to guide them
            meaningfully compute the CAM with ``signs=signs_from_labels(...)``.
        loss: which of :data:`CAM_LOSSES` is ``loss_g`` (``"iou"``: the paper's), or one name
            per target (e.g. ``("iou", "energy")``: each target's column of ``per_sample`` is
            its own loss).
        validate: check the inputs' values (labels in ``[0, 1]``, non-empty masks,
            non-negative weights). Each check is a device sync; the training loop checks its
            masks once and turns this off.
        raw: ``(B, T, h, w)`` the signed Grad-CAM maps before the ReLU
            (:attr:`cocam.gradcam.GradCAMResult.signed`): they give a dead CAM the gradient
            that revives it (module docstring). ``None`` uses the CAMs (no gradient through
            the ReLU).

    Returns:
        :class:`GuidedLoss`. ``guidance = Σ w·loss_g / Σ w`` (the mean over guided pairs for
        0/1 weights); if no pair is guided it is an exact, differentiable 0.
    """
    if cam.ndim == 3:
        cam = cam[:, None]
    if raw is not None and raw.ndim == 3:
        raw = raw[:, None]
    if cam.ndim != 4 or cam.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cam must be (B, T, H, W) with B = {logits.shape[0]}, got {tuple(cam.shape)}."
        )
    if raw is not None and (raw.ndim != 4 or raw.shape[:2] != cam.shape[:2]):
        raise ValueError(f"raw must be (B, T, h, w) = ({cam.shape[0]}, {cam.shape[1]}, h, w) like cam, "
                         f"got {tuple(raw.shape)}.")
    mask = _check_mask_shape(mask, cam.shape[0], cam.shape[1]).to(cam)
    names = per_target(loss, cam.shape[1], "loss")
    if len(set(names)) == 1:
        per_sample = region_loss(cam, mask, names[0], reduction="none", validate=validate, raw=raw)  # (B, T)
    else:  # one call per loss on its targets' columns, put back in target order
        columns, parts = [], []
        for name in dict.fromkeys(names):
            idx = [t for t, n in enumerate(names) if n == name]
            m = mask[:, idx] if mask.ndim == 4 else (mask if mask.shape[0] == 1 else mask[idx])
            columns += idx
            parts.append(region_loss(cam[:, idx], m, name, reduction="none", validate=validate,
                                     raw=None if raw is None else raw[:, idx]))
        per_sample = torch.cat(parts, dim=1)[:, sorted(range(len(columns)), key=columns.__getitem__)]
    out = guided_objective(logits, targets_bce, per_sample, w_a=w_a, w_g=w_g, sample_weight=sample_weight,
                           validate=validate)
    return dataclasses.replace(out, dead=dead_cams(cam))


def per_target(value: Any, t: int, name: str) -> tuple[Any, ...]:
    """``value`` for each of ``t`` targets: a single value repeated, or a sequence of ``t`` values."""
    if isinstance(value, (str, int, float)) or value is None:
        return (value,) * t
    values = tuple(value)
    if len(values) != t:
        raise ValueError(f"{name} has {len(values)} values for {t} guided target{'s' * (t != 1)} (attributes): "
                         f"give one value, or one per target.")
    return values


def _check_mask_shape(mask: Tensor, b: int, t: int) -> Tensor:
    if mask.ndim == 2:
        mask = mask[None]
    if not ((mask.ndim == 3 and mask.shape[0] in (1, t)) or (mask.ndim == 4 and mask.shape[:2] == (b, t))):
        raise ValueError(
            f"mask must be (T, H, W) with T = {t}, (H, W), or (B, T, H, W) = ({b}, {t}, H, W); "
            f"got {tuple(mask.shape)}."
        )
    return mask


def guided_objective(
    logits: Tensor,
    targets_bce: Tensor,
    per_sample: Tensor,
    *,
    w_a: float = 1.0,
    w_g: float | Sequence[float] = 1.0,
    sample_weight: Tensor | None = None,
    validate: bool = True,
) -> GuidedLoss:
    """Combine the BCE with per-(image, target) guidance losses ``per_sample (B, T)``.

    The common last step of every guidance loss (:func:`guided_loss` for the CAM-based ones;
    ``rrr_input_loss(..., reduction="none")`` for input gradients). Arguments as in
    :func:`guided_loss`. With one weight per target, ``w_g = (w_1, …, w_T)``, the total is
    ``w_a · BCE + Σ w_t · weight · loss_g / Σ weight`` (each target's pairs weighted by its
    ``w_t`` within the one mean over guided pairs; equal weights give the scalar case), and
    ``guidance`` stays the unweighted mean.
    """
    if logits.shape != targets_bce.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets_bce {tuple(targets_bce.shape)} differ in shape."
        )
    targets_bce = targets_bce.to(logits.dtype)
    if validate and bool(((targets_bce < 0) | (targets_bce > 1)).any()):
        raise ValueError(
            "targets_bce must be in [0, 1]; CelebA's -1/1 labels convert with (y + 1) / 2."
        )
    b, t = per_sample.shape
    bce = F.binary_cross_entropy_with_logits(logits, targets_bce)
    if sample_weight is None:
        weight = torch.ones_like(per_sample)
    else:
        weight = sample_weight.to(per_sample)
        if weight.ndim == 1 and t == 1:
            weight = weight[:, None]
        if tuple(weight.shape) != (b, t):
            raise ValueError(f"sample_weight must be (B, T) = {(b, t)}, got {tuple(weight.shape)}.")
        if validate and bool((weight < 0).any()):
            raise ValueError("sample_weight must be non-negative.")
    denom = weight.sum()
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    guidance = (weight * per_sample).sum() / denom
    weights = per_target(w_g, t, "w_g")
    if len(set(weights)) == 1:
        total = w_a * bce + weights[0] * guidance
    else:
        terms = weight * per_sample  # weights as Python floats: no host-to-device copy per step
        total = w_a * bce + sum(float(w) * terms[:, i].sum() for i, w in enumerate(weights)) / denom
    return GuidedLoss(total=total, bce=bce, guidance=guidance, per_sample=per_sample)


def register_guidance_loss(name: str, fn: Any, *, default_weight: float) -> None:
    """Add a CAM-based guidance loss: ``fn(cam, mask, *, eps, reduction, validate, raw)``.

    ``fn`` returns ``-ln``-like values, one per (image, target) with ``reduction="none"``, and
    must score a dead (all-zero) CAM worse than any CAM with its mass inside the region —
    :func:`revive_term` gives a loss that property (see the module docstring); the tests loop
    over :data:`CAM_LOSSES` and check it for every registered loss. Then
    ``Guidance(loss=name)``, ``cocam finetune --loss name`` and ``cocam compare`` can use it.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a guidance loss name must be a plain identifier, got {name!r}.")
    if name in LOSSES:
        raise ValueError(f"the guidance loss {name!r} is already registered: choose another name.")
    if not callable(fn):
        raise TypeError(f"the guidance loss {name!r} needs a function, got {type(fn).__name__}.")
    if not default_weight > 0:
        raise ValueError(f"default_weight must be positive, got {default_weight}.")
    LOSSES[name] = LossEntry(fn, float(default_weight))
    DEFAULT_GUIDANCE_WEIGHTS[name] = float(default_weight)


def unregister_guidance_loss(name: str) -> None:
    """Remove a loss added with :func:`register_guidance_loss` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a built-in guidance loss and cannot be removed.")
    LOSSES.pop(check_guidance_loss(name))
    DEFAULT_GUIDANCE_WEIGHTS.pop(name, None)


for _name, _fn, _w in (("iou", iou_loss, 1.0), ("energy", energy_loss, 1.0), ("rrr_cam", rrr_cam_loss, 10.0)):
    register_guidance_loss(_name, _fn, default_weight=_w)
LOSSES["rrr_input"] = LossEntry(None, 0.02, uses="input_gradients")
DEFAULT_GUIDANCE_WEIGHTS["rrr_input"] = 0.02
_BUILT_IN = frozenset(LOSSES)
