"""Training: the baseline classifier, Grad-CAM guided fine-tuning, and the BCE-only control.

One loop, :func:`fit`, serves all three:

* **baseline** — ``fit(spec.build(), train, valid, config)``: BCE over the dataset's labels
  (CelebA's 40 attributes, or a folder dataset's ``label_space``: the model has one output each), early
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

The run folder (``run_dir``) holds ``last.pt``, ``best.pt`` (when the validation BCE improved),
``history.csv`` and ``run.json``. Each epoch writes them as one recoverable transaction: the
new files go under temporary names (``.last.pt.pending``, ...), then a commit marker
(``.commit.json``) is written, then the files are renamed into place. A process killed at any
point leaves a folder that the next run in it (fresh or resumed) finishes (marker present) or
rolls back (no marker) to the last complete epoch, removing every temporary file; so the four
files always describe the same epoch. ``resume=True`` continues from ``last.pt`` to the same
result as an uninterrupted run (same seed, CPU), and refuses settings that would change what
is trained (see :data:`RESUME_MAY_CHANGE`). A folder that already holds a run is never
overwritten unless ``overwrite=True``; ``run.json`` appears with the first completed epoch.

A non-finite loss stops training with :class:`TrainingDivergedError` naming the step and the
term; after each epoch the weights must be finite and the BCE below :data:`ABSURD_BCE`, else
the same error, and the diverged weights are never saved: ``last.pt`` is always the last good
checkpoint.

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

from cocam.labels import CELEBA, LabelSpace
from cocam.cams import CAM_METHODS, DEFAULT_CAM_METHOD, UnknownCamMethodError
from cocam.checkpoint import (
    CheckpointError,
    ModelSpec,
    checkpoint_spec,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from cocam.dataset import BatchLoader, CelebADataset, label_space_of_dataset
from cocam.distributed import (
    DistributedContext,
    check_global_batch,
    init_from_env,
    sharded_weighted_mean,
)
from cocam.errors import CocamError
from cocam.evaluate import predict
from cocam.gradcam import grad_cam
from cocam.io import LockedError, atomic_write_text, exclusive_lock, remove_temp_files
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

__all__ = ["ABSURD_BCE", "GUIDANCE_ADDED_DEFAULTS", "POOLS", "RESUME_MAY_CHANGE", "RUN_FILES", "DegenerateRunError",
           "DeviceUnavailableError", "FitResult", "Guidance", "ResumeMismatchError", "RunExistsError", "RunLockedError",
           "TrainConfig", "TrainingDivergedError", "fit", "guidance_masks", "guided_terms", "pool_weights"]

#: The files of a run folder, written together once per epoch.
RUN_FILES = ("last.pt", "best.pt", "history.csv", "run.json")

#: The :class:`TrainConfig` fields that may differ when a run is resumed: when to stop (``epochs``,
#: ``max_steps``, ``patience``) and where or how fast the same arithmetic runs (``device``,
#: ``amp``, ``channels_last``). Every other field, the model spec, the guidance (settings and
#: masks), the seed and the dataset sizes must equal the checkpoint's.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "patience", "device", "amp", "channels_last")

#: A BCE (mean over images and attributes, in nats) above this is divergence even when finite.
#: A constant 0.5 prediction scores ln 2 ≈ 0.693 per label, and a prediction that is wrong with
#: logit magnitude L costs ≈ L; 100·ln 2 ≈ 69 means logits around ±69 on the wrong side on
#: average, far past where float32's sigmoid saturates (|logit| ≈ 17): no model that learns
#: anything gets there, a diverging one (lr 30: 1e29) does.
ABSURD_BCE = 100 * math.log(2)


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
        if self.patience is not None and self.patience < 1:
            raise DegenerateRunError(f"patience must be at least 1 epoch (or None: no early stopping), not "
                                     f"{self.patience}: with {self.patience} the run would stop before its first step.")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be a positive number (or None), got {self.clip_grad_norm}.")


#: Guidance settings added after runs were first recorded, with the value an older record
#: (``run.json``, a checkpoint's ``guidance``) that lacks them had: compared as such on resume,
#: and left out of :meth:`Guidance.fingerprint` at that value.
GUIDANCE_ADDED_DEFAULTS: dict[str, Any] = {"cam_method": DEFAULT_CAM_METHOD, "pool": "pairs"}

#: How the guidance term averages its per-(image, attribute) losses (``Guidance.pool``).
POOLS: tuple[str, ...] = ("pairs", "attribute")


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
        cam_method: the CAM the guidance loss is computed on, one of
            :data:`cocam.cams.CAM_METHODS`: ``"gradcam"`` (the paper's, the default),
            ``"gradcam++"`` or ``"layercam"`` (see :mod:`cocam.cams`). Not used by ``rrr_input``.
        pool: how the guidance term averages over the guided (image, attribute) pairs of a
            batch: ``"pairs"`` (the default) — one mean over all pairs, ``Σ_bt m_bt ℓ_bt /
            Σ_bt m_bt``, so an attribute weighs by how many guided pairs it has (with
            ``target="positive"``, Double_Chin's ~5 % of faces against Wearing_Lipstick's ~48 %);
            ``"attribute"`` — each attribute's own mean, then the mean over the attributes that
            have a guided pair in the batch, ``(1/T') Σ_t Σ_b m_bt ℓ_bt / Σ_b m_bt``, so every
            guided attribute weighs the same (:func:`pool_weights`; in data-parallel training
            the per-attribute counts are the global batch's).
        label_space: what ``attributes`` are checked against: the dataset's
            :class:`~cocam.labels.LabelSpace` (default :data:`~cocam.labels.CELEBA`). Not part of
            the settings (:meth:`describe`, :meth:`fingerprint`): the checkpoint's spec records it.

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
    cam_method: str = DEFAULT_CAM_METHOD
    pool: str = "pairs"
    label_space: LabelSpace = field(default=CELEBA, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.label_space, LabelSpace):
            raise TypeError(f"label_space must be a cocam.labels.LabelSpace (e.g. dataset.label_space), got "
                            f"{type(self.label_space).__name__}.")
        object.__setattr__(self, "attributes", tuple(self.label_space.validate(self.attributes)))
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
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {self.pool!r}.")
        if not isinstance(self.cam_method, str) or self.cam_method not in CAM_METHODS:
            raise UnknownCamMethodError(f"cam_method must be one of {', '.join(CAM_METHODS)}, not {self.cam_method!r}.")
        if losses[0] not in CAM_LOSSES and self.cam_method != DEFAULT_CAM_METHOD:
            raise ValueError(f"loss {losses[0]!r} penalises input gradients and uses no CAM: leave cam_method at "
                             f"{DEFAULT_CAM_METHOD!r} (not {self.cam_method!r}).")
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
        one trained with other settings. ``cam_method`` counts only when it is not the default,
        so the fingerprints of Grad-CAM guidance are those from before the setting existed.
        """
        settings = sorted((k, v) for k, v in self.describe().items() if k != "mask_pixels"
                          and not (k in GUIDANCE_ADDED_DEFAULTS and GUIDANCE_ADDED_DEFAULTS[k] == v))
        digest = hashlib.sha256(repr(settings).encode())
        for mask in self.masks:
            digest.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
        return digest.hexdigest()[:10]

    def describe(self) -> dict[str, Any]:
        """The JSON-able settings (masks summarised by their area; the label space is the dataset's and the
        model spec's, recorded there)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("masks", "label_space")}
        d["attributes"] = list(self.attributes)
        d["mask_pixels"] = [int(np.asarray(m).sum()) for m in self.masks]
        return d


class TrainingDivergedError(CocamError, RuntimeError):
    """The loss or the weights became NaN or infinite, or the BCE absurd (above :data:`ABSURD_BCE`)."""


class DegenerateRunError(CocamError, ValueError):
    """A run that would train nothing or validate on nothing (empty split, zero steps, ``patience=0``)."""


class RunExistsError(CocamError, FileExistsError):
    """The run folder already holds a run, and neither ``resume`` nor ``overwrite`` was asked for."""


class ResumeMismatchError(CocamError, ValueError):
    """``resume=True`` with settings that change what is trained (other than :data:`RESUME_MAY_CHANGE`)."""


class DeviceUnavailableError(CocamError, RuntimeError):
    """The requested device does not exist on this machine (e.g. ``cuda`` without a GPU)."""


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
        terms = guided_terms(self.model, images, targets, guidance, self.target_idx, self.masks, landmarks)
        per_sample = terms.per_sample
        weight = _sample_weight(guidance, targets[:, self.target_idx])
        weight = torch.ones_like(per_sample) if weight is None else weight
        dead = None if terms.dead is None else torch.stack([(weight * terms.dead).sum(), weight.sum()]).detach()
        if not self.context.enabled:
            return terms.total, terms.bce, terms.guidance, dead
        if guidance.pool == "attribute":  # the per-attribute counts of the global batch
            weight = pool_weights(weight, self.context.all_reduce_sum(weight.sum(0)))
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


def _check_label_spaces(spec: ModelSpec, labels: LabelSpace, train: Any, valid: Any) -> None:
    """The model's outputs, the training labels and the validation labels must be one label space."""
    if tuple(spec.attributes) != labels.names:
        raise ValueError(f"the model's {len(spec.attributes)} outputs are {_names(spec.attributes)} but the dataset's "
                         f"labels are {_names(labels.names)}: train a model on this dataset (cocam train), or use "
                         f"the dataset the model was trained on.")
    if valid is not None and label_space_of_dataset(valid) != labels:
        raise ValueError(f"the validation labels {_names(label_space_of_dataset(valid).names)} are not the training "
                         f"labels {_names(labels.names)}: take both splits from one dataset.")


def _names(names: Sequence[str]) -> str:
    return "the 40 CelebA attributes" if tuple(names) == CELEBA.names else repr(list(names))


def _spec_of(model: SplitModel, image_size: int, labels: LabelSpace = CELEBA) -> ModelSpec | None:
    """The spec of a model made by :func:`~cocam.model.build_model` (head width and dropout read off it).

    ``None`` when no spec rebuilds a model of the same shapes (e.g. a custom :class:`SplitModel`).
    """
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    dropouts = [m.p for m in model.head.modules() if isinstance(m, torch.nn.Dropout)]
    spec = ModelSpec(arch=model.arch, image_size=image_size,
                     hidden=linears[0].out_features if len(linears) > 1 else None,
                     dropout=dropouts[0] if dropouts else 0.0, attributes=labels.names)
    try:
        with torch.device("meta"):
            reference = spec.build().state_dict()
    except ValueError:
        return None
    mine = model.state_dict()
    if reference.keys() != mine.keys() or any(reference[k].shape != v.shape for k, v in mine.items()):
        return None
    return spec


def guidance_masks(guidance: Guidance, model: SplitModel, image_size: int, device: torch.device) -> torch.Tensor:
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


def pool_weights(weight: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)`` weights that turn the one weighted mean over pairs into the mean of per-attribute means.

    ``w'_bt = m_bt / (T' · n_t)`` with ``n_t = Σ_b m_bt`` (``counts``, e.g. the global batch's
    under data parallelism; default this batch's) and ``T'`` the number of attributes with
    ``n_t > 0``. Then ``Σ w' = 1`` and ``Σ_bt w'_bt ℓ_bt / Σ_bt w'_bt = (1/T') Σ_t Σ_b m_bt ℓ_bt / n_t``.
    """
    counts = weight.sum(0) if counts is None else counts.to(weight)
    present = counts > 0
    n_present = present.sum().clamp_min(1).to(weight)
    return torch.where(present, weight / (counts.clamp_min(torch.finfo(weight.dtype).tiny) * n_present),
                       torch.zeros_like(weight))


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


def guided_terms(model: SplitModel, images: torch.Tensor, targets: torch.Tensor, guidance: Guidance,
                  target_idx: list[int], masks: torch.Tensor, landmarks: torch.Tensor | None = None) -> GuidedLoss:
    """One step's loss terms: the BCE on all attributes and the guidance term on the guided ones.

    ``masks`` come from :func:`guidance_masks`; ``landmarks`` ``(B, 5, 2)`` (model-input pixels) are
    needed for ``transfer="landmarks"``. Inputs are not re-validated here (no device sync per
    step): the masks were checked once and the labels come from the dataset.
    """
    labels = targets[:, target_idx]
    weight = _sample_weight(guidance, labels)
    if guidance.pool == "attribute":
        weight = pool_weights(torch.ones_like(labels) if weight is None else weight)
    masks = masks_for_batch(masks, landmarks, guidance.transfer, images.shape[-1])
    if guidance.loss == "rrr_input":
        grads, logits = input_gradients(model, images, target_idx, create_graph=True)
        per_sample = rrr_input_loss(grads.float(), masks, reduction="none", validate=False)
        return guided_objective(logits.float(), targets, per_sample, w_a=guidance.w_a, w_g=guidance.w_g,
                                sample_weight=weight, validate=False)
    signs = _signs(guidance, labels)
    out_size = images.shape[-1] if guidance.resolution == "input" else None
    res = grad_cam(model, images, target_idx, signs=signs, create_graph=guidance.exact, output_size=out_size,
                   method=guidance.cam_method)
    return guided_loss(res.logits.float(), targets, res.cams.float(), masks, w_a=guidance.w_a, w_g=guidance.w_g,
                       sample_weight=weight, loss=guidance.loss, validate=False, raw=res.signed.float())


def validation_metrics(model: SplitModel, dataset: CelebADataset, device: torch.device,
                       batch_size: int = 256) -> dict[str, float]:
    """Validation BCE and mean accuracy over all attributes."""
    logits = torch.from_numpy(predict(model, dataset, batch_size=batch_size, device=device))
    targets = torch.from_numpy(np.array(dataset.targets, dtype=np.float32))  # a writable copy
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
    overwrite: bool = False,
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
        resume: continue from ``run_dir/last.pt`` if it exists; the settings must equal the
            checkpoint's except :data:`RESUME_MAY_CHANGE` (else :class:`ResumeMismatchError`).
        overwrite: replace a run already in ``run_dir`` (its files are deleted before training).
            Without it (and without ``resume``), a folder holding ``last.pt``, ``best.pt`` or
            ``history.csv`` is refused with :class:`RunExistsError`.
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
    _check_device(config.device)
    _check_splits(train, valid, config)
    if resume and overwrite:
        raise ValueError("resume=True continues the run in run_dir and overwrite=True replaces it: choose one.")
    context = init_from_env(config.device)
    device = context.device
    if context.enabled:
        check_global_batch(config.batch_size, context.world_size)
    show_progress = progress and context.is_main  # `progress` (the same on every rank) decides the collectives
    amp = config.amp if config.amp is not None else device.type == "cuda"
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    labels = label_space_of_dataset(train)
    if spec is None:
        spec = _spec_of(model, train.image_size, labels)
        if spec is None and run_dir is not None:
            raise ValueError("fit cannot tell which ModelSpec rebuilds this model for its checkpoints: "
                             "pass spec=ModelSpec(...).")
        spec = spec or ModelSpec(arch=model.arch, image_size=train.image_size, attributes=labels.names)
    if spec.image_size != train.image_size:
        raise ValueError(f"The model expects {spec.image_size}px inputs but the dataset gives {train.image_size}px.")
    _check_label_spaces(spec, labels, train, valid)
    if guidance is not None and guidance.transfer == "landmarks" and hasattr(train, "require_landmarks"):
        train.require_landmarks("the landmark mask transfer (transfer='landmarks')")  # not NaN landmarks
    run_path = Path(run_dir) if run_dir is not None else None

    with _run_lock(run_path, context), contextlib.ExitStack() as cleanup:
        torch.manual_seed(config.seed + context.rank)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = _adamw(model, config)
        history: list[dict[str, Any]] = []
        start_epoch, step, best, stale = 0, 0, math.inf, 0
        last_path = run_path / "last.pt" if run_path else None
        best_path = run_path / "best.pt" if run_path else None
        resuming = run_path is not None and _on_main(
            context, lambda: _prepare_run_folder(run_path, resume=resume, overwrite=overwrite))
        if resuming:
            state = _load_for_resume(last_path, device, context)
            _check_resume_settings(state, last_path, config, spec, guidance, train, valid)
            load_weights(model, state["model"], last_path, spec)
            optimizer.load_state_dict(state["optimizer"])
            _restore_rng(state, config.seed, context)
            start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
            best, stale = float(state["best_valid_bce"]), int(state["stale_epochs"])
            history = list(state["history"])
        info = {"config": dataclasses.asdict(config), "spec": spec.to_dict(),
                "guidance": guidance.describe() if guidance else None, "train_images": len(train),
                "valid_images": len(valid) if valid is not None else 0, "device": str(device)}
        if context.enabled:
            info["distributed"] = {"world_size": context.world_size, "backend": context.backend,
                                   "batch_size_per_process": config.batch_size // context.world_size}

        target_idx = labels.indices(guidance.attributes) if guidance else []
        masks = guidance_masks(guidance, model, train.image_size, device) if guidance else None
        loader = BatchLoader(train, config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
                             device=device, channels_last=channels_last, rank=context.rank,
                             num_replicas=context.world_size)
        step_loss = context.wrap(_StepLoss(model, guidance, target_idx, masks, context))
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise DegenerateRunError(f"The training set ({len(train)} images) is smaller than one batch "
                                     f"({config.batch_size}): no training step. Lower --batch-size.")
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        done = step >= total_steps or (config.patience is not None and stale >= config.patience)
        bar = tqdm(total=total_steps, initial=step, desc="fine-tuning" if guidance else "training", unit="step",
                   disable=not show_progress)
        cleanup.callback(bar.close)  # also on errors: the message starts on a line of its own
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
            _check_epoch(model, record, last_path)  # diverged weights are never saved
            rng_states = context.all_gather_object(torch.get_rng_state()) if run_path and context.enabled else None
            if run_path is not None and context.is_main:
                extra = {"config": dataclasses.asdict(config),
                         "guidance": guidance.describe() if guidance else None,
                         "guidance_fingerprint": guidance.fingerprint() if guidance else None,
                         "data": _data_sizes(train, valid),
                         "epoch": epoch, "step": step, "best_valid_bce": best, "stale_epochs": stale,
                         "history": history}
                more = {"rng_ranks": rng_states} if rng_states is not None else {}
                optimizer_state, rng = optimizer.state_dict(), torch.get_rng_state()
                writes: dict[str, Callable[[Path], Any]] = {
                    "last.pt": lambda p: save_checkpoint(p, model, spec, optimizer=optimizer_state, rng=rng,
                                                         **more, **extra)}
                if improved or valid is None:
                    writes["best.pt"] = lambda p: save_checkpoint(p, model, spec, **extra)
                writes["history.csv"] = lambda p: _write_history(p, history)
                writes["run.json"] = lambda p: atomic_write_text(p, json.dumps(info, indent=2))
                _commit_epoch(run_path, epoch, writes)
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


# --------------------------------------------------------------------------------------------
# Inputs checked before anything is written
# --------------------------------------------------------------------------------------------


def _check_device(device: str | torch.device | None) -> None:
    """Refuse a device this machine does not have, in one line (torch's own error comes later, deep in a call).

    ``"auto"`` always works; ``"cuda"``/``"cuda:i"`` need a visible GPU (of that index).
    """
    if device in (None, "auto"):
        return
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceUnavailableError(f"{device!r} is not a device: use auto, cpu, cuda or cuda:N.") from err
    if resolved.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "torch sees no GPU"
        raise DeviceUnavailableError(f"device {str(device)!r} asks for a GPU, but {why} on this machine: use "
                                     f"--device cpu (or auto, which picks a GPU only when there is one).")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise DeviceUnavailableError(f"device {str(device)!r} does not exist: this machine has {count} GPU(s) "
                                     f"(cuda:0 … cuda:{count - 1}).")


def _check_splits(train: CelebADataset, valid: CelebADataset | None, config: TrainConfig) -> None:
    """Degenerate data: an empty training set, or an empty validation split (NaN every epoch, never a best.pt)."""
    if len(train) == 0:
        raise DegenerateRunError("The training set has no images: no training step. Check the dataset's "
                                 "train split (list_eval_partition.txt).")
    if valid is not None and len(valid) == 0:
        need = " (early stopping needs it)" if config.patience is not None else ""
        raise DegenerateRunError(f"The validation split has no images{need}: its BCE would be NaN every epoch "
                                 f"and no best.pt would be chosen. Add images to the valid split, or train "
                                 f"without validation (valid=None).")


def _data_sizes(train: CelebADataset, valid: CelebADataset | None) -> dict[str, int]:
    return {"train_images": len(train), "valid_images": len(valid) if valid is not None else 0}


def _check_epoch(model: torch.nn.Module, record: dict[str, Any], last_path: Path | None) -> None:
    """Raise :class:`TrainingDivergedError` when this epoch's weights or BCE show divergence.

    The per-step check sees only the training loss *before* each step; this one sees the
    weights after the epoch's last step and the epoch's (validation and training) BCE, which
    must be finite and at most :data:`ABSURD_BCE`. It runs before the epoch is saved.
    """
    problem = None
    with torch.no_grad():
        bad = [name for name, t in model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        problem = f"{len(bad)} weight tensor(s) are not finite (e.g. {bad[0]})"
    else:
        for key in ("valid_bce", "train_bce"):
            value = record.get(key)
            if value is not None and not (math.isfinite(value) and value <= ABSURD_BCE):
                problem = (f"the {key.replace('_', ' ').replace('bce', 'BCE')} is {value:.4g}"
                           + ("" if not math.isfinite(value) else
                              f", above {ABSURD_BCE:.1f} (100·ln 2; a constant 0.5 prediction scores 0.693)"))
                break
    if problem is None:
        return
    kept = (f"the last good checkpoint is {last_path}" if last_path is not None and last_path.exists()
            else "no checkpoint was saved")
    raise TrainingDivergedError(
        f"Training diverged in epoch {record['epoch']} (step {record['step']}): {problem}. These weights were not "
        f"saved; {kept}. Train again with a lower learning rate (or w_g), into another folder or with --overwrite.")


# --------------------------------------------------------------------------------------------
# The run folder: refusing to overwrite, resuming only the same run, one transaction per epoch
# --------------------------------------------------------------------------------------------

_JOURNAL = ".commit.json"


def _pending(run_dir: Path, name: str) -> Path:
    """Where an epoch's new ``name`` waits until the epoch is committed."""
    return run_dir / f".{name}.pending"


def _on_main(context: DistributedContext, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0 only; every rank gets its result, or raises the :class:`CocamError` it raised."""
    if not context.enabled:
        return action()
    outcome: tuple[Any, str | None, type | None] = (None, None, None)
    if context.is_main:
        try:
            outcome = (action(), None, None)
        except CocamError as err:
            outcome = (None, str(err), type(err))
    value, message, kind = context.broadcast_object(outcome)
    if message is not None:
        raise kind(message)
    return value


def _commit_epoch(run_dir: Path, epoch: int, writes: dict[str, Callable[[Path], Any]]) -> None:
    """Write one epoch's files as a transaction: all of them replace the old ones, or none does.

    Each file is written (atomically) to its pending name, then the commit marker lists them,
    then they are renamed into place and the marker is removed. A crash before the marker
    leaves the previous epoch's files untouched (:func:`_recover_run_folder` deletes the pending
    ones); a crash after it is finished by the next run in the folder.
    """
    for name in writes:
        _pending(run_dir, name).unlink(missing_ok=True)
    for name, write in writes.items():
        write(_pending(run_dir, name))
    atomic_write_text(run_dir / _JOURNAL, json.dumps({"epoch": epoch, "files": list(writes)}))
    _apply_journal(run_dir)


def _apply_journal(run_dir: Path) -> None:
    """Move the committed epoch's pending files into place (idempotent: ones already moved are skipped)."""
    journal = run_dir / _JOURNAL
    try:
        names = json.loads(journal.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        names = []  # not a marker this code wrote (it writes them atomically): nothing to finish
    for name in names:
        if name not in RUN_FILES:
            continue  # only the run's own files are ever moved
        pending = _pending(run_dir, name)
        if pending.exists():
            os.replace(pending, run_dir / name)
    _fsync_folder(run_dir)
    journal.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _recover_run_folder(run_dir: Path) -> None:
    """Bring a run folder back to its last complete epoch after a crash, and remove its temporary files.

    A commit marker means the epoch was complete: its pending files are moved into place.
    Without one, pending files belong to an epoch that never finished and are deleted. The
    ``.tmp-*`` files of interrupted atomic writes of the run's files are deleted too. Only
    called while holding the folder's lock.
    """
    if not run_dir.is_dir():
        return
    if (run_dir / _JOURNAL).exists():
        _apply_journal(run_dir)
    names = [*RUN_FILES, _JOURNAL]
    for name in RUN_FILES:
        _pending(run_dir, name).unlink(missing_ok=True)
        names.append(_pending(run_dir, name).name)
    remove_temp_files(run_dir, names)


def _prepare_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Recover ``run_dir`` and decide how to use it: ``True`` to resume from its ``last.pt``, ``False`` to start.

    Raises :class:`RunExistsError` for a folder that holds a run (``last.pt``, ``best.pt`` or
    ``history.csv``) when neither ``resume`` (with a ``last.pt``) nor ``overwrite`` allows
    using it; with ``overwrite`` the old run's files are deleted.
    """
    _recover_run_folder(run_dir)
    held = [name for name in ("last.pt", "best.pt", "history.csv") if (run_dir / name).exists()]
    if resume and "last.pt" in held:
        return True
    if held and overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        return False
    if held and resume:
        raise RunExistsError(f"cannot resume {run_dir}: it holds {', '.join(held)} but no last.pt to continue "
                             f"from. Use another --out folder, or --overwrite (overwrite=True) to start it over.")
    if held:
        raise RunExistsError(f"{run_dir} already holds a run ({', '.join(held)}): continue it with --resume "
                             f"(resume=True), replace it with --overwrite (overwrite=True), or use another --out "
                             f"folder.")
    return False


def _plain(value: Any) -> Any:
    """``value`` as JSON would store it (tuples as lists), so stored and new settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_resume_settings(state: dict[str, Any], path: Path, config: TrainConfig, spec: ModelSpec,
                           guidance: Guidance | None, train: CelebADataset, valid: CelebADataset | None) -> None:
    """Refuse to resume ``path`` with settings that change what is trained (one line listing the differences).

    Compared: every :class:`TrainConfig` field except :data:`RESUME_MAY_CHANGE` (a field the
    checkpoint lacks, e.g. one added since, counts as its default), the model spec, the
    guidance settings and masks, and the sizes of the training and validation sets.
    """
    missing = [k for k in ("model", "optimizer", "rng", "epoch", "step", "best_valid_bce", "stale_epochs",
                           "history") if k not in state]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(repr(k) for k in missing)} (a best.pt "
                              f"or a checkpoint not written by fit?). Resume needs the run's own last.pt; use "
                              f"another --out folder or --overwrite to start over.")
    stored_spec = checkpoint_spec(state, path).to_dict()
    differences = []
    stored_config = state.get("config") or {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        old = stored_config.get(f.name, f.default)
        new = getattr(config, f.name)
        if _plain(old) != _plain(new):
            differences.append(f"{f.name} {_shown(old)} → {_shown(new)}")
    for k, new in spec.to_dict().items():
        if _plain(stored_spec.get(k)) != _plain(new):
            differences.append(f"{k} {_shown(stored_spec.get(k))} → {_shown(new)}")
    old_g, new_g = state.get("guidance"), guidance.describe() if guidance is not None else None
    if (old_g is None) != (new_g is None):
        differences.append(f"guidance {'none' if old_g is None else _shown(old_g.get('attributes'))} → "
                           f"{'none' if new_g is None else _shown(new_g.get('attributes'))}")
    elif old_g is not None:
        old_g, new_g = {**GUIDANCE_ADDED_DEFAULTS, **old_g}, {**GUIDANCE_ADDED_DEFAULTS, **new_g}
        for k in sorted(set(old_g) | set(new_g)):
            if _plain(old_g.get(k)) != _plain(new_g.get(k)):
                differences.append(f"{'masks' if k == 'mask_pixels' else k} {_shown(old_g.get(k))} → "
                                   f"{_shown(new_g.get(k))}")
        old_fp = state.get("guidance_fingerprint")
        if old_fp is not None and old_fp != guidance.fingerprint() and not any(
                d.startswith("masks ") for d in differences):
            differences.append("masks (another drawing of the same area)")
    stored_data = state.get("data")
    if isinstance(stored_data, dict):
        for k, new in _data_sizes(train, valid).items():
            if stored_data.get(k) is not None and stored_data.get(k) != new:
                differences.append(f"{k} {stored_data.get(k)} → {new}")
    if differences:
        raise ResumeMismatchError(
            f"cannot resume {path}: it was trained with other settings ({'; '.join(differences)}). Resume with the "
            f"same settings (only {', '.join(RESUME_MAY_CHANGE)} may change), or train into another --out folder "
            f"(or with --overwrite).")
