"""Batched, differentiable Grad-CAM (and Grad-CAM++, LayerCAM) for :class:`~cocam.model.SplitModel`.

For an image ``x``, target ``t`` and target activation ``A = trunk(x)`` (``K`` channels,
``h×w``), Grad-CAM is::

    score_t = sign_t · logit_t(x)                      (sign = 1 unless ``signs`` is given)
    G_t     = ∂score_t / ∂A                            (K × h × w per-position gradients)
    w_k     = mean_{i,j} G_t[k, i, j]                  (one weight per channel)
    raw     = ReLU(Σ_k w_k · A_k)                      (``relu=False`` keeps the signed map)
    cam     = upsample(minmax(raw))                    (optional, in this order)

``method=`` picks how ``(A, G)`` become the map (:data:`cocam.cams.CAM_METHODS`): ``"gradcam"``
(above, the default), ``"gradcam++"`` (Grad-CAM++ weights) or ``"layercam"`` (LayerCAM's
per-position weights); see :mod:`cocam.cams`. Everything else here — one forward, the gradients
of all targets, the modes, normalisation and upsampling — is shared by all methods.

All images and all ``T`` targets are handled in one forward pass; per-image gradients come
from a single backward of ``Σ_b score_t[b]``, which equals ``∂score_t[b]/∂A[b]`` for each
image because the head processes images independently (true for every head built by
:func:`~cocam.model.build_model` with the default target layers; a head containing BatchNorm
in training mode would mix images).

**Normalisation order** (as in pytorch-grad-cam): each map is min–max normalised per image
and target *at feature resolution*, ``(raw - min) / max(max - min, eps)``, and only then
upsampled bilinearly (``align_corners=False``), which keeps values in ``[0, 1]``. The
``eps`` floor (:data:`NORMALIZE_EPS`) makes a constant map, e.g. an all-zero CAM after the
ReLU, normalise to all zeros instead of NaN.

**Two gradient modes.** ``create_graph=True`` is exact: the gradients ``G``, and so the channel
weights ``w``, are themselves differentiable (double backprop), so a loss on the CAM sends
gradients to the trunk *and* the head. ``create_graph=False`` (default, cheaper) treats ``G``
(for Grad-CAM: ``w``) as constants: the CAM is still differentiable through ``A``, so a loss on
it trains the trunk, but the head receives no gradient from that loss (it still learns from any
loss on ``logits``).

**Hygiene.** :func:`grad_cam` uses :func:`torch.autograd.grad` only: it never calls
``zero_grad``, never reads or writes a parameter's ``.grad``, never changes
``model.training`` and registers no hooks. It works under :func:`torch.no_grad` (gradients
are re-enabled locally and the returned tensors are then detached); images need not require
grad. A call is one ordinary forward pass: in training mode dropout is sampled once (logits
and CAMs share it) and BatchNorm running statistics update as in any forward.

``eps`` is absolute: CAM ranges of an untrained AlexNet are ~1e-4, far above it; lower it
for models whose CAMs are smaller still.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cocam.attributes import attribute_index
from cocam.cams import DEFAULT_CAM_METHOD, CamMethod, get_cam_method
from cocam.model import SplitModel

__all__ = [
    "BATCHED_TARGET_GRADS",
    "NORMALIZE_EPS",
    "GradCAMResult",
    "grad_cam",
    "normalize_cams",
    "overlay",
    "resolve_targets",
    "signs_from_labels",
]

#: Floor of the min–max range in :func:`normalize_cams`; maps flatter than this become ~0.
NORMALIZE_EPS: float = 1e-7

#: Compute the gradients of several targets in one vmapped backward rather than a loop over
#: targets: the head's forward runs under :func:`torch.func.vjp` and its pullback is
#: :func:`torch.func.vmap`-ed over the ``T`` one-hot cotangents (functorch has batching rules
#: for the pooling backward ops of AlexNet/VGG heads; ``torch.autograd.grad(...,
#: is_grads_batched=True)``, used before, ran those ops in a per-target loop plus a ``cat``).
#: Measured on the shared 2-core CPU, AlexNet (classifier width 512), eval, CAMs of all 40
#: attributes vs one, at feature resolution (median of 3): with 2 threads 2.9× at batch 64,
#: 128² and 2.3× at batch 16, 224² (``is_grads_batched``: 5.2× and 5.3×; loop: 7.0× and 6.5×);
#: with 1 thread 3.4× and 2.1× (all three paths alike). See ``benchmarks/cam_libraries.py``.
#: For T=1 a single ordinary backward is used either way. If functorch cannot trace the head,
#: or vmap fails for some op, the ordinary per-target loop is used.
BATCHED_TARGET_GRADS: bool = True

#: Targets per vmapped pullback chunk: the ``(chunk, B, K, h, w)`` gradients are reduced to
#: channel weights (or, for LayerCAM, to the map: :meth:`cocam.cams.CamMethod.reduce`) chunk by chunk (``torch.func.vmap(chunk_size=...)``), which bounds memory
#: (all 40 attributes, batch 64, 224²: 44 MB of gradients instead of 443 MB) and was ~10 %
#: faster than a single chunk on the 2-core CPU (1 thread, batch 64, 128²).
TARGET_CHUNK: int = 10

Target = str | int


@dataclass(frozen=True)
class GradCAMResult:
    """Output of :func:`grad_cam` (``B`` images, ``T`` targets).

    Attributes:
        cams: ``(B, T, H, W)`` final maps: normalised to ``[0, 1]`` if requested, then
            upsampled to ``output_size`` if given (else ``H, W = h, w``).
        raw: ``(B, T, h, w)`` maps at feature resolution before normalisation/upsampling
            (after the ReLU when ``relu=True``).
        logits: ``(B, num_outputs)`` from the same forward pass (reuse them for the BCE loss).
        activations: ``(B, K, h, w)`` the target activation ``A``.
        weights: ``(B, T, K)`` the channel weights (Grad-CAM: spatial mean of the gradients;
            Grad-CAM++: its α-weighted sum), or ``None`` for a method without them (LayerCAM).
        targets: the ``T`` output indices.
        method: the CAM method's name (:data:`cocam.cams.CAM_METHODS`).
        pre_relu: ``(B, T, h, w)`` the map before the ReLU, as computed (``None`` if not kept).
    """

    cams: Tensor
    raw: Tensor
    logits: Tensor
    activations: Tensor
    weights: Tensor | None
    targets: tuple[int, ...]
    method: str = DEFAULT_CAM_METHOD
    pre_relu: Tensor | None = None

    @property
    def signed(self) -> Tensor:
        """``(B, T, h, w)`` the signed map (``Σ_k w_k · A_k``) *before* the ReLU (equal to ``raw`` when ``relu=False``).

        Where it is ≤ 0 everywhere the CAM is all zero and the ReLU passes no gradient; the
        guidance losses use it to give such a dead CAM a way out (:mod:`cocam.losses`).
        With channel weights it is recomputed from :attr:`weights` and :attr:`activations`
        (attached to the graph like them, as a separate branch of it); without, it is :attr:`pre_relu`.
        """
        if self.weights is not None:
            return torch.einsum("btk,bkhw->bthw", self.weights, self.activations)
        if self.pre_relu is None:
            raise ValueError(f"this {self.method} result has neither channel weights nor its pre-ReLU map: "
                             f"make it with grad_cam, which keeps them.")
        return self.pre_relu


def resolve_targets(targets: Target | Sequence[Target], num_outputs: int) -> list[int]:
    """Turn an attribute name, an output index or a sequence of them into output indices."""
    items = [targets] if isinstance(targets, (str, int, np.integer)) else list(targets)
    if not items:
        raise ValueError("targets is empty: give at least one attribute name or output index.")
    out = []
    for item in items:
        if isinstance(item, Tensor) and item.ndim == 0 and not item.is_floating_point():
            item = int(item)
        if isinstance(item, str):
            if num_outputs != 40:
                raise ValueError(
                    f"attribute name {item!r} needs a 40-output CelebA model; this model has "
                    f"{num_outputs} outputs, pass output indices instead."
                )
            out.append(attribute_index(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < num_outputs:
                raise ValueError(f"target index {item} out of range for {num_outputs} outputs.")
            out.append(int(item))
        else:
            raise TypeError(f"a target must be an attribute name or an int index, got {item!r}.")
    return out


def signs_from_labels(labels: Tensor, targets: Target | Sequence[Target]) -> Tensor:
    """``(B, T)`` signs ``+1``/``-1`` for the true label of each target, for ``grad_cam(signs=)``.

    ``labels`` is ``(B, num_outputs)`` with ``{0, 1}`` (or CelebA's ``{-1, 1}``) values; a
    positive label gives ``+1`` and anything else ``-1``, so the CAM shows the evidence for the
    image's true class (presence or absence of the attribute).
    """
    idx = resolve_targets(targets, labels.shape[1])
    sel = labels[:, idx].float()
    return torch.where(sel > 0, 1.0, -1.0).to(sel)


def normalize_cams(raw: Tensor, eps: float = NORMALIZE_EPS) -> Tensor:
    """Min–max normalise each map over its last two dims: ``(x - min) / max(max - min, eps)``.

    Works for any ``(..., h, w)``; a constant map gives zeros (never NaN). Differentiable.
    """
    flat = raw.flatten(-2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(raw)


def _grads_loop(scores: Tensor, acts: Tensor, create_graph: bool, method: CamMethod) -> Tensor:
    """``(B, T, ...)`` the method's reduction of each target's gradients, one backward per target."""
    out = []
    for t in range(scores.shape[1]):
        (g,) = torch.autograd.grad(
            scores[:, t].sum(), acts, retain_graph=True, create_graph=create_graph
        )
        out.append(method.reduce(acts, g[:, None]))  # (B, 1, ...)
    return torch.cat(out, dim=1)


def _cotangents(idx: Sequence[int], signs: Tensor | None, b: int, num_outputs: int, like: Tensor) -> Tensor:
    """``(T, B, num_outputs)`` cotangents: row ``t`` selects output ``idx[t]`` (times its sign)."""
    t = len(idx)
    go = torch.zeros(t, b, num_outputs, dtype=like.dtype, device=like.device)
    rows = torch.arange(t, device=like.device)
    cols = torch.as_tensor(idx, device=like.device)
    if signs is None:
        go[rows, :, cols] = 1.0
    else:
        go[rows, :, cols] = signs.to(like.dtype).t()
    return go


def _grads_batched(
    head: torch.nn.Module, acts: Tensor, idx: Sequence[int], signs: Tensor | None, create_graph: bool,
    method: CamMethod,
) -> tuple[Tensor, Tensor]:
    """Logits and the method's ``(B, T, ...)`` reduction of ``T`` targets' gradients: one head forward, one vmapped pullback.

    The head's forward is the call's only head forward (its logits are returned, dropout is
    sampled once). Its pullback is vmapped over the ``T`` cotangents; under ``create_graph``
    the gradients stay attached to the autograd graph (double backprop), otherwise they are
    computed without recording one (first order: they are constants). The method's reduction
    (:meth:`cocam.cams.CamMethod.reduce`) runs per target inside the vmap, in the caller's grad
    mode, so it stays differentiable through ``A``.
    """
    logits, pullback = torch.func.vjp(head, acts)
    go = _cotangents(idx, signs, acts.shape[0], logits.shape[1], logits)

    def reduced_grad(cotangent: Tensor) -> Tensor:  # (B, ...): never keeps all T full-size gradients
        with torch.set_grad_enabled(create_graph):
            g = pullback(cotangent)[0]
        return method.reduce(acts, g[:, None])[:, 0]

    try:
        w = torch.func.vmap(reduced_grad, chunk_size=TARGET_CHUNK)(go)  # (T, B, ...)
    except (RuntimeError, NotImplementedError):  # an op without a vmap rule: loop the pullback
        w = torch.stack([reduced_grad(go[t]) for t in range(go.shape[0])])
    return logits, w.transpose(0, 1)  # (T, B, ...) -> (B, T, ...)


def _rng_states(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def grad_cam(
    model: SplitModel,
    images: Tensor,
    targets: Target | Sequence[Target],
    *,
    signs: Tensor | None = None,
    create_graph: bool = False,
    output_size: int | tuple[int, int] | None = None,
    relu: bool = True,
    normalize: bool = True,
    eps: float = NORMALIZE_EPS,
    batched: bool | None = None,
    method: str | CamMethod = DEFAULT_CAM_METHOD,
) -> GradCAMResult:
    """Grad-CAM (or another gradient CAM, ``method``) of ``T`` targets for a batch of images, in one forward pass.

    Args:
        model: a :class:`~cocam.model.SplitModel` (its mode, train or eval, is used as is).
        images: ``(B, 3, S, S)``.
        targets: an attribute name, an output index, or a sequence of them (``T`` targets).
        signs: optional ``(B, T)`` (or ``(B,)`` when ``T == 1``) factors for the score,
            ``score = signs * logit``; with ``signs_from_labels`` this is the "both classes"
            target ``sign(y) · logit``, the evidence for the true label.
        create_graph: exact double-backprop mode (see the module docstring).
        output_size: ``S`` or ``(H, W)`` to upsample the maps to; ``None`` keeps ``(h, w)``.
        relu: apply the CAM's final ReLU (``False`` keeps the signed map).
        normalize: per-image, per-target min–max normalisation to ``[0, 1]`` (before
            upsampling); ``False`` leaves the maps unnormalised (then only upsampled).
        eps: floor of the min–max range (:data:`NORMALIZE_EPS`).
        batched: compute the ``T`` gradients with one vmapped backward; ``None`` uses
            :data:`BATCHED_TARGET_GRADS`.
        method: the CAM method, a name in :data:`cocam.cams.CAM_METHODS` (``"gradcam"``,
            ``"gradcam++"``, ``"layercam"``) or a :class:`cocam.cams.CamMethod`.

    Returns:
        :class:`GradCAMResult` with ``cams (B, T, H, W)``, ``raw (B, T, h, w)``,
        ``logits (B, num_outputs)``, ``activations (B, K, h, w)`` and ``weights (B, T, K)``
        (``None`` for LayerCAM). When called with grad enabled, all of them stay attached to
        the autograd graph.
    """
    cam_method = get_cam_method(method)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}.")
    idx = resolve_targets(targets, model.num_outputs)
    b, t = images.shape[0], len(idx)
    if signs is not None:
        signs = torch.as_tensor(signs, device=images.device)
        if signs.ndim == 1 and t == 1:
            signs = signs[:, None]
        if tuple(signs.shape) != (b, t):
            raise ValueError(f"signs must have shape (B, T) = {(b, t)}, got {tuple(signs.shape)}.")
    use_batched = BATCHED_TARGET_GRADS if batched is None else batched
    grad_was_enabled = torch.is_grad_enabled()

    with torch.enable_grad():
        acts = _trunk_forward(model, images)
        logits = None
        if use_batched and t > 1:
            rng = _rng_states(acts.device)
            try:
                logits, reduced = _grads_batched(model.head, acts, idx, signs, create_graph, cam_method)
            except (RuntimeError, NotImplementedError):
                _set_rng_states(rng, acts.device)  # functorch could not trace the head: redo it plainly
                logits = None
        if logits is None:
            logits = model.head(acts)
            scores = logits[:, idx]
            if signs is not None:
                scores = scores * signs.to(scores.dtype)
            reduced = _grads_loop(scores, acts, create_graph, cam_method)  # (B, T, ...)
        signed = cam_method.signed_map(acts, reduced)  # (B, T, h, w)
        weights = cam_method.reported_weights(reduced)  # (B, T, K) or None
        raw = F.relu(signed) if relu else signed
        cams = normalize_cams(raw, eps) if normalize else raw
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)

    if not grad_was_enabled:
        cams, raw, logits, acts, signed = (v.detach() for v in (cams, raw, logits, acts, signed))
        weights = weights.detach() if weights is not None else None
    return GradCAMResult(cams, raw, logits, acts, weights, tuple(idx), cam_method.name, signed)


def _trunk_forward(model: SplitModel, images: Tensor) -> Tensor:
    model.check_input(images)
    acts = model.trunk(images)
    if not acts.requires_grad:  # frozen trunk and plain images: differentiate w.r.t. A itself
        acts = acts.detach().requires_grad_(True)
    return acts


def overlay(image: Tensor | np.ndarray, cam: Tensor | np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a CAM over an image for figures.

    Args:
        image: ``(H, W, 3)`` array (float in ``[0, 1]`` or uint8) or ``(3, H, W)`` tensor in
            ``[0, 1]`` (un-normalise ImageNet-normalised inputs first).
        cam: ``(h, w)`` map in ``[0, 1]``; resized bilinearly to ``H×W`` if needed.
        alpha: weight of the colour-mapped CAM.
        cmap: a matplotlib colormap name.

    Returns:
        ``(H, W, 3)`` float array in ``[0, 1]``.
    """
    import matplotlib

    if isinstance(image, Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    img = np.asarray(image)
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) or a (3, H, W) tensor, got shape {img.shape}.")
    c = torch.as_tensor(np.asarray(cam.detach().cpu() if isinstance(cam, Tensor) else cam), dtype=torch.float64)
    if c.ndim != 2:
        raise ValueError(f"cam must be (h, w), got shape {tuple(c.shape)}.")
    if tuple(c.shape) != img.shape[:2]:
        c = F.interpolate(c[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    colours = matplotlib.colormaps[cmap](c.clamp(0, 1).numpy())[..., :3]
    return np.clip((1 - alpha) * np.clip(img, 0, 1) + alpha * colours, 0.0, 1.0)
