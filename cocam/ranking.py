"""What to correct next: rank a split's images for a user to look at, and maybe fix.

A user who draws the region ``S`` of an attribute A (the lips for Wearing_Lipstick) has many
images and little time. :func:`rank_for_correction` scores every image of a dataset once — one
eval-mode forward and one Grad-CAM of A per batch — and returns a tidy frame sorted by the
chosen ranking, with the scores of all the others beside it, so rankings can be compared on
the same images. Higher score = look at it sooner.

The rankings (:data:`RANKINGS`, one function each, name → function of the per-image frame):

* ``"outside_energy"`` — the share of the image's CAM mass **outside** ``S``::

      outside = 1 − Σ_ij g_ij · s_ij / Σ_ij g_ij

  with ``g`` the Grad-CAM of A's *predicted* class (the score ``sign · logit_A``, ``sign = +1``
  where the model predicts A, i.e. ``logit_A > 0``, else ``−1``: the evidence for what the model
  decided), computed as in training and in :func:`cocam.evaluate.attention_metrics` — min–max
  normalised per image at feature resolution, upsampled bilinearly to the input size — and ``s``
  the template mask at input size (:func:`cocam.masks.mask_to_input`: the same crop, fractional
  at the region's border). 0: all the evidence lies in ``S``; 1: none does. A dead CAM (all zero:
  no positive evidence anywhere, flagged in ``dead_cam``) has no mass in ``S`` and scores 1.
* ``"uncertainty"`` — how close the predicted probability ``p = σ(logit_A)`` is to ½:
  ``1 − |2p − 1|`` (1 at ``p = ½``, 0 at ``p ∈ {0, 1}``): the images the decision hangs on.
* ``"worst_group"`` — needs the shortcut B: ``1 − accuracy`` of the image's (A, B) group
  (:func:`cocam.evaluate.pair_metrics` on the same predictions; groups from
  :func:`cocam.groups.group_index`), so the images of the current worst group come first, then
  those of the next worst group; groups of equal accuracy rank together.
* ``"random"`` — the baseline any ranking must beat: the order is
  ``numpy.random.default_rng(seed).permutation(n)``; the score of the image at position ``k`` of
  that permutation is ``1 − k / n``.

Ties (equal scores) are broken by ``outside_energy`` (larger first), then by the index in the
dataset (smaller first), so every ranking is a total, reproducible order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from cocam.dataset import LabelledImages, iterate_batches
from cocam.evaluate import pair_metrics, resolve_device
from cocam.gradcam import grad_cam
from cocam.groups import GROUPS, group_index
from cocam.losses import dead_cams
from cocam.masks import mask_to_input
from cocam.model import SplitModel

__all__ = [
    "RANKINGS",
    "RANKINGS_NEEDING_SHORTCUT",
    "outside_energy_score",
    "random_score",
    "rank_for_correction",
    "uncertainty_score",
    "worst_group_score",
]


def outside_energy_score(frame: pd.DataFrame, *, seed: int = 0) -> np.ndarray:
    """The share of the CAM's mass outside ``S``, measured in the Grad-CAM pass (see the module docstring)."""
    return frame["outside_energy"].to_numpy(dtype=np.float64)


def uncertainty_score(frame: pd.DataFrame, *, seed: int = 0) -> np.ndarray:
    """``1 − |2p − 1|``: 1 where the model is undecided (``p = ½``), 0 where it is certain."""
    p = frame["p"].to_numpy(dtype=np.float64)
    return 1.0 - np.abs(2.0 * p - 1.0)


def worst_group_score(frame: pd.DataFrame, *, seed: int = 0) -> np.ndarray:
    """``1 − accuracy`` of the image's (A, B) group (``frame.group_accuracy``): the worst group first."""
    if "group_accuracy" not in frame.columns:
        raise ValueError("the worst_group ranking needs the shortcut B: pass shortcut= (CLI: --shortcut).")
    return 1.0 - frame["group_accuracy"].to_numpy(dtype=np.float64)


def random_score(frame: pd.DataFrame, *, seed: int = 0) -> np.ndarray:
    """The order ``default_rng(seed).permutation(n)``, as scores ``1 − k/n`` (position ``k``)."""
    n = len(frame)
    order = np.random.default_rng(seed).permutation(n)
    score = np.empty(n, dtype=np.float64)
    score[order] = 1.0 - np.arange(n, dtype=np.float64) / max(n, 1)
    return score


#: The rankings, name → score function of the per-image frame (higher: look at it sooner).
RANKINGS: dict[str, Callable[..., np.ndarray]] = {
    "outside_energy": outside_energy_score,
    "uncertainty": uncertainty_score,
    "worst_group": worst_group_score,
    "random": random_score,
}

#: The rankings that need the shortcut attribute B.
RANKINGS_NEEDING_SHORTCUT: frozenset[str] = frozenset({"worst_group"})


def _check_ranking(by: str, shortcut: str | None) -> None:
    if by not in RANKINGS:
        raise ValueError(f"unknown ranking {by!r}: choose one of {', '.join(RANKINGS)}.")
    if by in RANKINGS_NEEDING_SHORTCUT and shortcut is None:
        raise ValueError(f"the {by} ranking needs the shortcut attribute B: pass shortcut= (CLI: --shortcut B).")


@torch.no_grad()
def rank_for_correction(
    model: SplitModel,
    dataset: LabelledImages,
    attribute: str,
    mask: np.ndarray | torch.Tensor,
    *,
    by: str = "outside_energy",
    shortcut: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    cam_method: str = "gradcam",
) -> pd.DataFrame:
    """Every image of ``dataset``, scored by every ranking and sorted by ``by``.

    Args:
        model: the classifier (run in eval mode; its mode is restored afterwards).
        dataset: the images to rank (e.g. the validation split; keep the test split for the report).
        attribute: A, the attribute whose evidence should lie in ``S`` (a label of
            ``dataset.label_space``: CelebA's attributes, or a folder dataset's labels).
        mask: the region ``S``: a ``(218, 178)`` template mask (anything
            :func:`cocam.masks.mask_to_input` takes; a folder dataset's square-view mask goes
            through :func:`cocam.masks.load_mask` with ``view="square"`` first).
        by: a name in :data:`RANKINGS` (see the module docstring).
        shortcut: B, A's co-occurring shortcut; gives the ``group`` and ``worst_group`` columns.
        seed: the seed of the ``random`` ranking.
        batch_size: images per Grad-CAM pass.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        cam_method: the CAM (:data:`cocam.cams.CAM_METHODS`; Grad-CAM by default).

    Returns:
        One row per image, best first: ``rank`` (1 = first), ``index`` (position in
        ``dataset``), ``image`` (file name), ``label`` (A, 0/1), ``p`` (predicted probability of
        A), ``correct`` (``(p > ½) == label``), with ``shortcut``: ``group`` (a
        :data:`cocam.groups.GROUPS` key) and ``group_accuracy``; then ``dead_cam`` and one score
        column per ranking (``worst_group`` only with ``shortcut``).

    Raises:
        ValueError: an unknown ranking, ``worst_group`` without ``shortcut``, ``shortcut`` equal
            to ``attribute``, a mask with no pixel inside the model's view.
    """
    space = dataset.label_space
    attribute = space.validate_one(attribute)
    if shortcut is not None:
        shortcut = space.validate_one(shortcut)
        if shortcut == attribute:
            raise ValueError(f"the shortcut must be another attribute than {attribute}: give B of the pair (A, B).")
    _check_ranking(by, shortcut)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device = resolve_device(device)
    idx = space.index(attribute)
    region = mask_to_input(mask, dataset.image_size, device=device).float()
    was_training = model.training
    model.eval()
    model.to(device)
    logits_parts, outside_parts, dead_parts = [], [], []
    try:
        for images, _, _ in iterate_batches(dataset, int(batch_size), device=device):
            logits = model(images).float()
            signs = torch.where(logits[:, idx] > 0, 1.0, -1.0)
            res = grad_cam(model, images, idx, signs=signs, output_size=images.shape[-1], method=cam_method)
            cam = res.cams[:, 0].float()
            inside = (cam * region).sum(dim=(-2, -1)) / cam.sum(dim=(-2, -1)).clamp_min(1e-12)
            logits_parts.append(logits.cpu())
            outside_parts.append((1.0 - inside).cpu())
            dead_parts.append(dead_cams(cam).cpu())
    finally:
        model.train(was_training)
    n = len(dataset)
    logits = torch.cat(logits_parts).numpy() if n else np.zeros((0, model.num_outputs), np.float32)
    logit_a = logits[:, idx].astype(np.float64)
    labels = dataset.attributes
    label = labels[attribute].to_numpy().astype(np.int64)
    frame = pd.DataFrame({
        "index": np.arange(n, dtype=np.int64),
        "image": np.asarray(dataset.names, dtype=object),
        "label": label,
        "p": torch.sigmoid(torch.from_numpy(logit_a)).numpy(),
        "correct": (logit_a > 0) == (label > 0),
    })
    if shortcut is not None:
        keys = list(GROUPS)
        group = np.asarray([keys[g] for g in group_index(labels, attribute, shortcut)], dtype=object)
        row = pair_metrics(logits, labels, [(attribute, shortcut)], n_boot=0, label_space=space).iloc[0]
        frame["group"] = group
        frame["group_accuracy"] = [float(row[f"acc_{g}"]) for g in group]
    frame["dead_cam"] = torch.cat(dead_parts).numpy() if n else np.zeros(0, bool)
    frame["outside_energy"] = torch.cat(outside_parts).numpy().astype(np.float64) if n else np.zeros(0)
    scores = {name: fn(frame, seed=seed) for name, fn in RANKINGS.items()
              if shortcut is not None or name not in RANKINGS_NEEDING_SHORTCUT}
    for name, score in scores.items():
        frame[name] = score
    order = np.lexsort((frame["index"].to_numpy(), -frame["outside_energy"].to_numpy(), -frame[by].to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, n + 1, dtype=np.int64))
    return frame
