"""Training: the baseline classifier, Grad-CAM guided fine-tuning, and the BCE-only control.

One loop, :func:`fit`, serves all three:

* **baseline** — ``fit(spec.build(), train, valid, config)``: BCE over the 40 attributes, early
  stopping on the validation BCE, best and last checkpoints;
* **guided fine-tuning** — ``fit(model, train, valid, config, guidance=Guidance(...))``: the
  paper's objective ``w_a · BCE + w_g · loss_g`` with ``loss_g = -ln(soft IoU(Grad-CAM, mask))``
  for each guided attribute;
* **control** — the same call without ``guidance``, from the same checkpoint, with the same
  seed and the same number of steps, so any difference is due to the guidance term alone.

Guidance targets (:attr:`Guidance.target`):

* ``"positive"`` (the default) — the paper's variant: the CAM of the attribute's logit, on
  images that have the attribute;
* ``"both"`` — every image, with the CAM of ``sign(y) · logit``: the evidence for the *true*
  label must lie in the region, so "bare eyes ⇒ no lipstick" is penalised as well as
  "made-up eyes ⇒ lipstick".

The loss, the target and ``w_g`` may also be given per attribute (``Guidance(("A", "B"), masks,
loss=("iou", "energy"), target=("positive", "both"), w_g=(3.0, 1.0))``): the best setting
often differs between biases, and all of them then train in one run, from one forward pass.

Every epoch writes ``last.pt`` (and ``best.pt`` when the validation BCE improved) and
``history.csv`` atomically into the run folder; ``resume=True`` continues from ``last.pt`` to
the same result as an uninterrupted run (same seed, CPU). A non-finite loss stops training
with :class:`TrainingDivergedError` naming the step and the term; the last good checkpoint is
kept.

Under ``torchrun`` (or in any initialised process group of several processes) :func:`fit`
trains data-parallel with :class:`~torch.nn.parallel.DistributedDataParallel`:
``config.batch_size`` is the global batch, split evenly over the processes, and the result does
not depend on their number. See :mod:`cocam.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cocam.attributes import attribute_index, validate_attributes
from cocam.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from cocam.dataset import BatchLoader, CelebADataset
from cocam.distributed import (
    DistributedContext,
    check_global_batch,
    init_from_env,
    sharded_weighted_mean,
)
from cocam.errors import CocamError
from cocam.evaluate import predict
from cocam.gradcam import grad_cam
from cocam.io import LockedError, atomic_write_text, exclusive_lock
from cocam.losses import (
    CAM_LOSSES,
    DEFAULT_GUIDANCE_WEIGHTS,
    GuidedLoss,
    check_guidance_loss,
    guided_loss,
    guided_objective,
    input_gradients,
    per_target,
    rrr_input_loss,
)
from cocam.masks import MASK_TRANSFERS, mask_to_feature, mask_to_input, masks_for_batch
from cocam.model import SplitModel

__all__ = ["FitResult", "Guidance", "RunLockedError", "TrainConfig", "TrainingDivergedError", "fit"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: maximum number of epochs.
        max_steps: stop after this many optimisation steps (``None``: no limit). Fine-tuning
            and its control use it to get exactly the same budget.
        batch_size: images per step; in data-parallel training (:mod:`cocam.distributed`) the
            global batch over all processes, which must be divisible by their number.
        lr, weight_decay: Adam's learning rate and (decoupled) weight decay.
        patience: early stopping — stop after this many epochs without a better validation
            BCE (``None``: never stop early).
        seed: seeds dropout and the shuffle order (``fit`` receives a built model: call
            ``torch.manual_seed`` before building it to fix the initial weights too; the CLI does).
            Data-parallel rank ``r`` seeds its dropout with ``seed + r``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …; when
            data-parallel, ``"auto"``/``"cuda"`` mean ``cuda:LOCAL_RANK``.
        amp: bf16 autocast; ``None`` = on for CUDA, off on the CPU.
        channels_last: NHWC memory format; ``None`` = on for CUDA.
        clip_grad_norm: rescale the gradients so that their global L2 norm is at most this
            (after the backward, before the optimiser step; under DDP on the gradients already
            averaged over the ranks, so every rank clips alike; bf16 autocast has no loss
            scaling to undo). ``None``: no clipping. The epoch's mean pre-clip norm is logged
            either way (``grad_norm`` in the history): near a dead CAM the gradient of
            ``-ln IoU`` grows like ``1/IoU`` (see :mod:`cocam.losses`).
    """

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-5
    patience: int | None = 3
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool | None = None
    clip_grad_norm: float | None = None

    @classmethod
    def fine_tuning(cls, n_train: int, epochs: int = 2, *, batch_size: int = 64, **kwargs: Any) -> TrainConfig:
        """Fine-tuning (guided or control) on ``n_train`` images: a fixed step budget, no early stop.

        ``max_steps = epochs × ⌊n_train / batch_size⌋`` is recorded in the config, so two runs
        (the guided one and its control) provably take the same number of steps.
        """
        steps = max(1, epochs * (n_train // batch_size))
        return cls(epochs=epochs, max_steps=steps, batch_size=batch_size, patience=None, **kwargs)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1 (or None).")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be a positive number (or None), got {self.clip_grad_norm}.")


@dataclass(frozen=True)
class Guidance:
    """What to guide and how.

    Attributes:
        attributes: the guided attributes (several at once are fine).
        masks: one region per attribute, each a ``(218, 178)`` bool array in template
            coordinates (see :mod:`cocam.masks`: :func:`~cocam.masks.load_mask`,
            :func:`~cocam.masks.default_mask`).
        w_a, w_g: weights of the BCE and the guidance term (``w_g`` may be one per attribute).
        target: ``"positive"`` (the paper's, the default) or ``"both"`` (see the module
            docstring), or one per attribute.
        exact: differentiate through the Grad-CAM weights (double backprop, gives the
            classifier head a gradient from ``loss_g``); ``False`` detaches them (first order).
        resolution: compare CAM and mask at the model ``"input"`` size (the CAM is upsampled;
            the paper's setting) or at the CAM's native ``"feature"`` size (the mask is
            area-averaged down; cheaper).
        loss: the guidance loss, one of :data:`cocam.losses.GUIDANCE_LOSSES`: ``"iou"`` (the
            paper's ``-ln IoU``), ``"energy"`` (share of CAM mass inside the region),
            ``"rrr_cam"`` (CAM energy outside the region) or ``"rrr_input"`` (input gradients
            outside the region; Ross et al.). See :mod:`cocam.losses`. One per attribute
            mixes the CAM-based losses (``rrr_input`` is computed from input gradients and
            cannot be mixed with them).
        transfer: how the template mask reaches each image: ``"template"`` (the same pixels
            for every image, the paper's) or ``"landmarks"`` (moved by the similarity
            transform from the template's five landmarks to the image's; see
            :mod:`cocam.masks`).

    ``w_g=None`` takes the loss's default weight (:data:`cocam.losses.DEFAULT_GUIDANCE_WEIGHTS`:
    1 for ``iou``, the paper's setting). Per-attribute values that are all equal are stored as
    the single value, so such a ``Guidance`` is the same (and has the same fingerprint) as one
    given that value; :attr:`losses`, :attr:`targets` and :attr:`weights` always list one per
    attribute.
    """

    attributes: tuple[str, ...]
    masks: tuple[np.ndarray, ...] = field(repr=False)
    w_a: float = 1.0
    w_g: float | None | tuple[float | None, ...] = None
    target: str | tuple[str, ...] = "positive"
    exact: bool = True
    resolution: str = "input"
    loss: str | tuple[str, ...] = "iou"
    transfer: str = "template"

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(validate_attributes(self.attributes)))
        if not self.attributes:
            raise ValueError("Guidance needs at least one attribute (and its mask); "
                             "train without guidance for the BCE-only control.")
        if len(self.masks) != len(self.attributes):
            raise ValueError(f"{len(self.attributes)} guided attributes but {len(self.masks)} masks: one each.")
        n = len(self.attributes)
        targets = per_target(self.target, n, "target")
        for t in targets:
            if t not in ("positive", "both"):
                raise ValueError(f"target must be 'positive' (the paper) or 'both', not {t!r}.")
        if self.resolution not in ("input", "feature"):
            raise ValueError(f"resolution must be 'input' or 'feature', not {self.resolution!r}.")
        losses = tuple(check_guidance_loss(x) for x in per_target(self.loss, n, "loss"))
        if "rrr_input" in losses and len(set(losses)) > 1:
            raise ValueError("rrr_input penalises input gradients and cannot be mixed with the CAM-based losses "
                             "in one Guidance: give every attribute rrr_input, or none.")
        if losses[0] not in CAM_LOSSES and (self.resolution != "input" or not self.exact):
            raise ValueError(f"loss {losses[0]!r} penalises input gradients: it needs resolution='input' and "
                             f"exact=True (the penalty is trained through the gradients).")
        if self.transfer not in MASK_TRANSFERS:
            raise ValueError(f"transfer must be one of {', '.join(MASK_TRANSFERS)}, not {self.transfer!r}.")
        weights = tuple(DEFAULT_GUIDANCE_WEIGHTS[x] if w is None else float(w)
                        for x, w in zip(losses, per_target(self.w_g, n, "w_g")))
        for name, values in (("target", targets), ("loss", losses), ("w_g", weights)):
            object.__setattr__(self, name, values[0] if len(set(values)) == 1 else values)

    @property
    def losses(self) -> tuple[str, ...]:
        """The guidance loss of each guided attribute."""
        return per_target(self.loss, len(self.attributes), "loss")

    @property
    def targets(self) -> tuple[str, ...]:
        """The target (``"positive"`` or ``"both"``) of each guided attribute."""
        return per_target(self.target, len(self.attributes), "target")

    @property
    def weights(self) -> tuple[float, ...]:
        """``w_g`` of each guided attribute."""
        return per_target(self.w_g, len(self.attributes), "w_g")

    def fingerprint(self) -> str:
        """10 hex digits naming these settings and masks: a new drawing, attribute or weight gives a new one.

        Run folders are named by it (notebooks, :mod:`cocam.compare`), so a resumed run is never
        one trained with other settings.
        """
        digest = hashlib.sha256(repr(sorted((k, v) for k, v in self.describe().items()
                                            if k != "mask_pixels")).encode())
        for mask in self.masks:
            digest.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
        return digest.hexdigest()[:10]

    def describe(self) -> dict[str, Any]:
        """The JSON-able settings (masks summarised by their area)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "masks"}
        d["attributes"] = list(self.attributes)
        d["mask_pixels"] = [int(np.asarray(m).sum()) for m in self.masks]
        return d


class TrainingDivergedError(CocamError, RuntimeError):
    """The loss became NaN or infinite."""


class RunLockedError(LockedError):
    """Another process is writing to the same run folder."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model and where its record lives."""

    model: SplitModel
    history: pd.DataFrame
    steps: int
    run_dir: Path | None
    best_path: Path | None
    last_path: Path | None


@contextlib.contextmanager
def _run_lock(run_dir: Path | None, context: DistributedContext | None = None):
    """Hold ``run_dir``'s lock for the block (rank 0 only when data-parallel; every rank learns the outcome)."""
    held = contextlib.ExitStack()
    refused: str | None = None
    if run_dir is not None and (context is None or context.is_main):
        try:
            held.enter_context(exclusive_lock(run_dir / ".lock"))
        except LockedError as err:
            refused = str(err)
    if context is not None and context.enabled:
        refused = context.broadcast_object(refused)
    if refused is not None:
        raise RunLockedError(refused)
    with held:
        yield


class _StepLoss(torch.nn.Module):
    """One training step's loss terms as a module, so that DDP wraps the *whole* computation.

    ``forward(images, targets, landmarks)`` returns ``(total, bce, guidance, dead)``
    (``guidance`` is ``None`` without guidance; ``dead`` is ``None`` or this rank's
    ``[dead CAMs, guided pairs]`` counts, weighted like the guidance term, for the history's
    ``dead_cam`` share). Grad-CAM and the input-gradient losses call the model's trunk
    and head (or the model) directly and differentiate with ``torch.autograd.grad``; run inside
    this module's ``forward``, all of it happens within one ``DistributedDataParallel.forward``,
    and the gradients are averaged over the ranks once, in ``total.backward()``.

    When data-parallel, the guidance term is this rank's share of the global weighted mean
    (:func:`~cocam.distributed.sharded_weighted_mean`): its average over the ranks, which is
    what DDP's gradient averaging takes, is the weighted mean over the global batch.
    """

    def __init__(self, model: SplitModel, guidance: Guidance | None, target_idx: list[int],
                 masks: torch.Tensor | None, context: DistributedContext) -> None:
        super().__init__()
        self.model = model
        self.guidance = guidance
        self.target_idx = target_idx
        self.masks = masks
        self.context = context

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                  torch.Tensor | None]:
        guidance = self.guidance
        if guidance is None:
            bce = F.binary_cross_entropy_with_logits(self.model(images).float(), targets)
            return bce, bce, None, None
        terms = _guided_terms(self.model, images, targets, guidance, self.target_idx, self.masks, landmarks)
        per_sample = terms.per_sample
        weight = _sample_weight(guidance, targets[:, self.target_idx])
        weight = torch.ones_like(per_sample) if weight is None else weight
        dead = None if terms.dead is None else torch.stack([(weight * terms.dead).sum(), weight.sum()]).detach()
        if not self.context.enabled:
            return terms.total, terms.bce, terms.guidance, dead
        g = sharded_weighted_mean(per_sample, weight, self.context)
        if not isinstance(guidance.w_g, tuple):
            return guidance.w_a * terms.bce + guidance.w_g * g, terms.bce, g, dead
        # one weight per attribute: the weighted mean over the same guided pairs (g is what is reported)
        weighted = torch.stack([w * per_sample[:, t] for t, w in enumerate(guidance.w_g)], dim=1)
        return guidance.w_a * terms.bce + sharded_weighted_mean(weighted, weight, self.context), terms.bce, g, dead


def _adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch supports it (CPU and CUDA since torch 2.4).

    Same update rule, about 4× faster optimiser steps on the CPU (measured: 34 vs 144 ms for
    AlexNet with a 512-wide head, one thread); older torch falls back to the default kernel.
    """
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this torch/device/dtype
        return torch.optim.AdamW(model.parameters(), **kwargs)


def _spec_of(model: SplitModel, image_size: int) -> ModelSpec | None:
    """The spec of a model made by :func:`~cocam.model.build_model` (head width and dropout read off it).

    ``None`` when no spec rebuilds a model of the same shapes (e.g. a custom :class:`SplitModel`).
    """
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    dropouts = [m.p for m in model.head.modules() if isinstance(m, torch.nn.Dropout)]
    spec = ModelSpec(arch=model.arch, image_size=image_size,
                     hidden=linears[0].out_features if len(linears) > 1 else None,
                     dropout=dropouts[0] if dropouts else 0.0)
    try:
        with torch.device("meta"):
            reference = spec.build().state_dict()
    except ValueError:
        return None
    mine = model.state_dict()
    if reference.keys() != mine.keys() or any(reference[k].shape != v.shape for k, v in mine.items()):
        return None
    return spec


def _masks_for(guidance: Guidance, model: SplitModel, image_size: int, device: torch.device) -> torch.Tensor:
    """The ``(T, h, w)`` template masks at the resolution the loss compares at (checked once here)."""
    if guidance.resolution == "input":
        masks = torch.stack([mask_to_input(m, image_size, device=device) for m in guidance.masks])
    else:
        _, h, w = model.feature_shape(image_size)
        if h != w:
            raise ValueError("feature resolution guidance needs a square feature map.")
        masks = torch.stack([mask_to_feature(m, h, device=device) for m in guidance.masks])
    empty = [a for a, m in zip(guidance.attributes, masks) if float(m.max()) <= 0]
    if empty:
        raise ValueError(f"the mask of {', '.join(empty)} has no pixel left at {tuple(masks.shape[1:])}: "
                         f"draw a larger region.")
    return masks


def _sample_weight(guidance: Guidance, labels: torch.Tensor) -> torch.Tensor | None:
    """``(B, T)`` which pairs are guided: the positives for ``"positive"`` targets, all for ``"both"``."""
    if guidance.target == "positive":
        return labels
    if guidance.target == "both":
        return None
    weight = labels.clone()
    for t, target in enumerate(guidance.targets):  # basic indexing: no index tensor, no device copy
        if target == "both":
            weight[:, t] = 1
    return weight


def _signs(guidance: Guidance, labels: torch.Tensor) -> torch.Tensor | None:
    """``(B, T)`` Grad-CAM score signs: ``sign(y)`` for ``"both"`` targets, ``+1`` for ``"positive"``."""
    if guidance.target == "positive":
        return None
    signs = 2 * labels - 1
    for t, target in enumerate(guidance.targets):
        if target == "positive":
            signs[:, t] = 1
    return signs


def _guided_terms(model: SplitModel, images: torch.Tensor, targets: torch.Tensor, guidance: Guidance,
                  target_idx: list[int], masks: torch.Tensor, landmarks: torch.Tensor | None = None) -> GuidedLoss:
    """One step's loss terms: the BCE on all attributes and the guidance term on the guided ones.

    ``masks`` come from :func:`_masks_for`; ``landmarks`` ``(B, 5, 2)`` (model-input pixels) are
    needed for ``transfer="landmarks"``. Inputs are not re-validated here (no device sync per
    step): the masks were checked once and the labels come from the dataset.
    """
    labels = targets[:, target_idx]
    weight = _sample_weight(guidance, labels)
    masks = masks_for_batch(masks, landmarks, guidance.transfer, images.shape[-1])
    if guidance.loss == "rrr_input":
        grads, logits = input_gradients(model, images, target_idx, create_graph=True)
        per_sample = rrr_input_loss(grads.float(), masks, reduction="none", validate=False)
        return guided_objective(logits.float(), targets, per_sample, w_a=guidance.w_a, w_g=guidance.w_g,
                                sample_weight=weight, validate=False)
    signs = _signs(guidance, labels)
    out_size = images.shape[-1] if guidance.resolution == "input" else None
    res = grad_cam(model, images, target_idx, signs=signs, create_graph=guidance.exact, output_size=out_size)
    return guided_loss(res.logits.float(), targets, res.cams.float(), masks, w_a=guidance.w_a, w_g=guidance.w_g,
                       sample_weight=weight, loss=guidance.loss, validate=False, raw=res.signed.float())


def validation_metrics(model: SplitModel, dataset: CelebADataset, device: torch.device,
                       batch_size: int = 256) -> dict[str, float]:
    """Validation BCE and mean accuracy over all attributes."""
    logits = torch.from_numpy(predict(model, dataset, batch_size=batch_size, device=device))
    targets = torch.from_numpy(np.ascontiguousarray(dataset.targets, dtype=np.float32))
    return {"valid_bce": float(F.binary_cross_entropy_with_logits(logits, targets)),
            "valid_accuracy": float(((logits > 0).float() == targets).float().mean())}


def fit(
    model: SplitModel,
    train: CelebADataset,
    valid: CelebADataset | None,
    config: TrainConfig = TrainConfig(),
    *,
    spec: ModelSpec | None = None,
    guidance: Guidance | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` (BCE, plus the guidance term when ``guidance`` is given).

    Args:
        model: a :class:`~cocam.model.SplitModel` (fresh for a baseline, loaded for fine-tuning).
        train, valid: datasets; ``valid`` drives early stopping and the best checkpoint.
        config: optimisation settings.
        spec: the model description stored in checkpoints (default: built from the model
            and the dataset's image size).
        guidance: guided fine-tuning; ``None`` trains with BCE only.
        run_dir: folder for ``last.pt``, ``best.pt``, ``history.csv`` and ``run.json``;
            ``None`` writes nothing.
        resume: continue from ``run_dir/last.pt`` if it exists.
        progress: show a progress bar.
        on_epoch: called with each epoch's record (e.g. to update a live plot); on rank 0 only
            when data-parallel.

    Returns:
        :class:`FitResult`. With ``valid`` and early stopping, ``model`` holds the *last*
        weights; the best ones are in ``best.pt``.

    Data-parallel: inside an initialised process group of several processes, or when the
    ``torchrun`` environment says so (``WORLD_SIZE > 1``: the group is then initialised by
    :func:`cocam.distributed.init_from_env`), every process calls ``fit`` with the same
    arguments; they train one model with DDP, ``config.batch_size`` being the global batch, and
    only rank 0 writes the run folder and reports. Every rank returns the same weights. See
    :mod:`cocam.distributed`.
    """
    context = init_from_env(config.device)
    device = context.device
    if context.enabled:
        check_global_batch(config.batch_size, context.world_size)
    show_progress = progress and context.is_main  # `progress` (the same on every rank) decides the collectives
    amp = config.amp if config.amp is not None else device.type == "cuda"
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    if spec is None:
        spec = _spec_of(model, train.image_size)
        if spec is None and run_dir is not None:
            raise ValueError("fit cannot tell which ModelSpec rebuilds this model for its checkpoints: "
                             "pass spec=ModelSpec(...).")
        spec = spec or ModelSpec(arch=model.arch, image_size=train.image_size)
    if spec.image_size != train.image_size:
        raise ValueError(f"The model expects {spec.image_size}px inputs but the dataset gives {train.image_size}px.")
    run_path = Path(run_dir) if run_dir is not None else None

    with _run_lock(run_path, context):
        torch.manual_seed(config.seed + context.rank)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = _adamw(model, config)
        history: list[dict[str, Any]] = []
        start_epoch, step, best, stale = 0, 0, math.inf, 0
        last_path = run_path / "last.pt" if run_path else None
        best_path = run_path / "best.pt" if run_path else None
        resuming = resume and last_path is not None and context.broadcast_object(last_path.exists())
        if resuming:
            state = _load_for_resume(last_path, device, context)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            _restore_rng(state, config.seed, context)
            start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
            best, stale = float(state["best_valid_bce"]), int(state["stale_epochs"])
            history = list(state["history"])
        if run_path is not None and context.is_main:
            info = {"config": dataclasses.asdict(config), "spec": spec.to_dict(),
                    "guidance": guidance.describe() if guidance else None, "train_images": len(train),
                    "valid_images": len(valid) if valid is not None else 0, "device": str(device)}
            if context.enabled:
                info["distributed"] = {"world_size": context.world_size, "backend": context.backend,
                                       "batch_size_per_process": config.batch_size // context.world_size}
            atomic_write_text(run_path / "run.json", json.dumps(info, indent=2))

        target_idx = [attribute_index(a) for a in guidance.attributes] if guidance else []
        masks = _masks_for(guidance, model, train.image_size, device) if guidance else None
        loader = BatchLoader(train, config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
                             device=device, channels_last=channels_last, rank=context.rank,
                             num_replicas=context.world_size)
        step_loss = context.wrap(_StepLoss(model, guidance, target_idx, masks, context))
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise ValueError(f"The training set ({len(train)} images) is smaller than one batch ({config.batch_size}).")
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        done = step >= total_steps or (config.patience is not None and stale >= config.patience)
        bar = tqdm(total=total_steps, initial=step, desc="fine-tuning" if guidance else "training", unit="step",
                   disable=not show_progress)
        epoch = start_epoch
        while not done and epoch < config.epochs:
            model.train()
            loader.set_epoch(epoch)
            sums = {"bce": 0.0, "guidance": 0.0, "grad_norm": 0.0, "dead_cams": 0.0, "guided_pairs": 0.0}
            n_batches, t0 = 0, time.perf_counter()
            for images, targets, landmarks in loader:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, bce, g, dead = step_loss(images, targets, landmarks)
                if not _all_finite(loss, context):
                    bad = "BCE" if not _all_finite(bce, context) else "guidance (loss_g)"
                    kept = f"; the last good checkpoint is {last_path}" if last_path and last_path.exists() else ""
                    raise TrainingDivergedError(
                        f"Loss became {loss.item()} at step {step + 1} (epoch {epoch}): the {bad} term is not finite"
                        f"{kept}. Lower the learning rate or w_g.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sums["grad_norm"] += _clip_gradients(model, config.clip_grad_norm)  # the pre-clip norm
                optimizer.step()
                step += 1
                n_batches += 1
                sums["bce"] += bce.detach()  # tensors: no device sync per step
                if g is not None:
                    sums["guidance"] += g.detach()
                if dead is not None:
                    sums["dead_cams"] += dead[0]
                    sums["guided_pairs"] += dead[1]
                bar.update(1)
                if progress and n_batches % 10 == 1:
                    shown = _mean_over_ranks(sums, context)
                    bar.set_postfix(bce=f"{float(shown['bce']) / n_batches:.3f}",
                                    **({"loss_g": f"{float(shown['guidance']) / n_batches:.3f}"} if g is not None else {}))
                if step >= total_steps:
                    break
            sums = _mean_over_ranks(sums, context)  # the global batch's losses
            record: dict[str, Any] = {"epoch": epoch, "step": step,
                                      "train_bce": float(sums["bce"]) / max(n_batches, 1),
                                      "grad_norm": float(sums["grad_norm"]) / max(n_batches, 1),
                                      "seconds": time.perf_counter() - t0}
            if guidance is not None:
                record["train_loss_g"] = float(sums["guidance"]) / max(n_batches, 1)
                if guidance.loss != "rrr_input":  # the share of guided pairs whose CAM was dead (all zero)
                    guided = float(sums["guided_pairs"])
                    record["dead_cam"] = float(sums["dead_cams"]) / guided if guided > 0 else math.nan
            if valid is not None:  # on rank 0, shared: every rank takes the same early-stopping decision
                metrics = validation_metrics(model, valid, device) if context.is_main else None
                record.update(context.broadcast_object(metrics))
            improved = valid is not None and record["valid_bce"] < best
            if improved:
                best, stale = record["valid_bce"], 0
            elif valid is not None:
                stale += 1
            history.append(record)
            rng_states = context.all_gather_object(torch.get_rng_state()) if run_path and context.enabled else None
            if run_path is not None and context.is_main:
                extra = {"config": dataclasses.asdict(config),
                         "guidance": guidance.describe() if guidance else None,
                         "epoch": epoch, "step": step, "best_valid_bce": best, "stale_epochs": stale,
                         "history": history}
                more = {"rng_ranks": rng_states} if rng_states is not None else {}
                save_checkpoint(last_path, model, spec, optimizer=optimizer.state_dict(), rng=torch.get_rng_state(),
                                **more, **extra)
                if improved or valid is None:
                    save_checkpoint(best_path, model, spec, **extra)
                _write_history(run_path / "history.csv", history)
            if on_epoch is not None and context.is_main:
                on_epoch(record)
            epoch += 1
            done = step >= total_steps or (config.patience is not None and valid is not None
                                           and stale >= config.patience)
        bar.close()
        del step_loss  # the DDP wrapper (its gradient hooks) ends with the run; the model stays plain
        context.barrier()  # rank 0's files are written before any rank returns
    return FitResult(model=model, history=pd.DataFrame(history), steps=step, run_dir=run_path,
                     best_path=best_path if best_path and best_path.exists() else None,
                     last_path=last_path if last_path and last_path.exists() else None)


def _clip_gradients(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients before clipping; with ``max_norm``, clip them to it.

    ``max_norm=None`` reads the gradients without writing them (the step is bit-identical to
    one without this call). Returns a tensor: no device sync per step.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    return torch.nn.utils.get_total_norm([p.grad for p in params]).detach()


def _write_history(path: Path, history: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, pd.DataFrame(history).to_csv(index=False))


def _mean_over_ranks(sums: dict[str, Any], context: DistributedContext) -> dict[str, Any]:
    """``sums`` (numbers or scalar tensors) averaged over the ranks (a collective: every rank calls it)."""
    if not context.enabled:
        return sums
    keys = list(sums)
    local = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).detach().cpu().reshape(()) for k in keys])
    totals = context.all_reduce_sum(local.to(context.device)).cpu() / context.world_size
    return dict(zip(keys, totals))


def _all_finite(value: torch.Tensor, context: DistributedContext) -> bool:
    """Whether ``value`` is finite on every rank (one device sync; one all-reduce when data-parallel)."""
    bad = (~torch.isfinite(value.detach())).float().sum()
    return not bool(context.all_reduce_sum(bad) > 0)


def _load_for_resume(path: Path, device: torch.device, context: DistributedContext) -> dict[str, Any]:
    try:
        return load_checkpoint(path, map_location=device)
    except FileNotFoundError as err:
        if not context.enabled:
            raise
        raise FileNotFoundError(f"rank {context.rank} cannot read {path}, which rank 0 resumes from: data-parallel "
                                f"resume needs the run folder on a file system every process sees.") from err


def _restore_rng(state: dict[str, Any], seed: int, context: DistributedContext) -> None:
    """Put back this rank's torch RNG state from a checkpoint (``map_location`` may have moved it to the GPU).

    A data-parallel checkpoint holds every rank's state (``rng_ranks``); resuming with another
    number of processes, ranks without a saved state are reseeded from ``(seed, rank, step)``.
    """
    saved = state.get("rng_ranks")
    if saved is not None and len(saved) == context.world_size:
        torch.set_rng_state(saved[context.rank].cpu())
    elif context.is_main:
        torch.set_rng_state(state["rng"].cpu())
    else:
        torch.manual_seed(hash((seed, context.rank, int(state["step"]))) & 0x7FFF_FFFF)
