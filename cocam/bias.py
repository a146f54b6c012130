"""Model-side bias discovery: which attribute does the model's prediction of A lean on?

:mod:`cocam.cooccurrence` shows which attributes co-occur in the *labels*. This module asks
the *model*: for every attribute A and every other attribute B, is A recognised better when B
is present than when it is absent? A model that detects A through a co-occurring B (lipstick
through eye make-up) has a high recall of A on ``A∧B`` and a low one on the conflict subset
``A∧¬B``. :func:`rank_biases` scores every (A, B) pair and sorts the pairs by that gap:

* ``acc_ab``, ``acc_a_not_b`` — recall of A (share of A's positives predicted positive) on
  ``A∧B`` and ``A∧¬B``; ``gap = acc_ab − acc_a_not_b`` with a 95 % bootstrap interval
  (``gap_low``, ``gap_high``);
* ``acc_not_a_b``, ``acc_not_a_not_b`` — the reverse direction: accuracy on A's negatives
  (share predicted negative) on ``¬A∧B`` and ``¬A∧¬B``;
  ``reverse_gap = acc_not_a_not_b − acc_not_a_b`` is positive when B's presence makes the
  model hallucinate A;
* ``bias_score`` — the bias of Singh et al., "Don't Judge an Object by Its Context: Learning
  to Overcome Contextual Bias", CVPR 2020: the mean predicted probability of A over the images
  with ``A∧B`` divided by the mean over ``A∧¬B`` (``> 1``: B raises the model's confidence in
  A).

The interval is a stratified percentile bootstrap: the images of ``A∧B`` and of ``A∧¬B`` are
resampled with replacement within their group. The recall of a resample of ``n`` images
whose recall is ``p`` is exactly ``Binomial(n, p) / n``, so the replicates are drawn that way,
for all pairs at once (vectorised, seeded) — the same shortcut
:func:`cocam.evaluate.bootstrap_interval` takes for large subsets.

Everything is computed with a few ``(N, |A|) × (N, |B|)`` matrix products, so all 40 × 39
pairs on 20,000 images take well under a second (plus the bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.labels import CELEBA, LabelSpace

__all__ = ["BIAS_COLUMNS", "rank_biases"]

#: Columns of :func:`rank_biases`, in order.
BIAS_COLUMNS: tuple[str, ...] = (
    "a", "b", "n_ab", "n_a_not_b", "acc_ab", "acc_a_not_b", "gap", "gap_low", "gap_high", "bias_score",
    "mean_p_ab", "mean_p_a_not_b", "n_not_a_b", "n_not_a_not_b", "acc_not_a_b", "acc_not_a_not_b",
    "reverse_gap", "p_b_given_a",
)  # fmt: skip


def _as_logits(logits: np.ndarray | torch.Tensor, space: LabelSpace) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(space):
        order = ("one column per CelebA attribute in cocam.CELEBA_ATTRIBUTES order" if space == CELEBA
                 else "one column per label, in the order of the label columns")
        raise ValueError(f"logits must be (N, {len(space)}) — {order}, as cocam.evaluate.predict returns them — "
                         f"got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError("logits contain NaN or infinite values; check the model's outputs.")
    return arr


def _label_matrix(labels: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """``(N, len(names))`` bool positives from 0/1 (or CelebA's -1/1) label columns."""
    missing = [n for n in names if n not in labels.columns]
    if missing:
        raise ValueError(f"labels have no column {missing[0]!r}: pass the 0/1 label frame of the same "
                         f"images (e.g. dataset.attributes).")
    values = labels[list(names)].to_numpy()
    if not np.isin(values, (0, 1)).all() and not np.isin(values, (-1, 1)).all():
        raise ValueError("labels must be 0/1 (or CelebA's -1/1) in every column; found other values or NaN.")
    return values > 0


def _stratified_gap_interval(n1: np.ndarray, p1: np.ndarray, n2: np.ndarray, p2: np.ndarray, *, n_boot: int,
                             level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ``p1 − p2`` when each group is resampled within itself (see module doc)."""
    rng = np.random.default_rng(seed)
    draws1 = rng.binomial(n1, p1, size=(n_boot, n1.size)) / n1
    draws2 = rng.binomial(n2, p2, size=(n_boot, n2.size)) / n2
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws1 - draws2, [alpha, 1.0 - alpha], axis=0)
    return low, high


def rank_biases(
    logits: np.ndarray | torch.Tensor,
    labels: pd.DataFrame,
    *,
    attributes: Sequence[str] | None = None,
    candidates: Sequence[str] | None = None,
    min_group: int = 20,
    n_boot: int = 2000,
    level: float = 0.95,
    threshold: float = 0.0,
    seed: int = 0,
    label_space: LabelSpace | None = None,
) -> pd.DataFrame:
    """Rank (A, B) pairs by how much the model's recall of A depends on B's presence.

    Args:
        logits: ``(N, L)`` model outputs in the order of ``label_space`` (CelebA's
            :data:`~cocam.attributes.CELEBA_ATTRIBUTES` by default; :func:`cocam.evaluate.predict`);
            a NumPy array or a tensor.
        labels: the ``(N, L)`` 0/1 labels of the same images in the same order (columns by
            name, e.g. ``dataset.attributes``; CelebA's -1/1 is accepted too).
        attributes: the attributes A to examine (default: every label; one name is accepted too).
        candidates: the attributes B to pair them with (default: every label; one name is accepted
            too); ``B = A`` is skipped.
        min_group: leave out pairs where ``A∧B`` or ``A∧¬B`` has fewer images. The reverse
            columns (``acc_not_a_b``, ``acc_not_a_not_b``, ``reverse_gap``) are NaN where
            ``¬A∧B`` or ``¬A∧¬B`` is smaller than this.
        n_boot: bootstrap replicates for the interval of ``gap`` (0 skips it: NaN bounds).
        level: coverage of the interval.
        threshold: A is predicted when its logit is ``> threshold`` (0 = probability 0.5).
        seed: seed of the bootstrap; the same inputs and arguments give the same intervals.
        label_space: what the logits' columns are (:class:`~cocam.labels.LabelSpace`). Default:
            CelebA's 40 attributes when every label column is a CelebA attribute, else the label
            columns themselves, in their order (a folder dataset's ``dataset.attributes``).

    Returns:
        One row per kept pair, sorted by ``gap`` (descending; ties by ``bias_score``), with the
        columns :data:`BIAS_COLUMNS`: ``a``, ``b``, the group sizes ``n_ab``, ``n_a_not_b``,
        ``n_not_a_b``, ``n_not_a_not_b``, the recalls ``acc_ab``, ``acc_a_not_b``, ``gap`` and
        its interval ``gap_low``, ``gap_high``, ``bias_score`` with its parts ``mean_p_ab`` and
        ``mean_p_a_not_b`` (mean sigmoid of A's logit), the reverse accuracies and
        ``reverse_gap`` (see the module docstring), and ``p_b_given_a`` (how often B
        accompanies A in these labels).

    Raises:
        cocam.attributes.UnknownAttributeError: a misspelled name in ``attributes`` or
            ``candidates``.
        ValueError: shapes that do not match, labels that are not 0/1, ``min_group < 1``,
            ``n_boot < 0`` or ``level`` outside ``(0, 1)``.
    """
    if isinstance(attributes, str):
        attributes = [attributes]
    if isinstance(candidates, str):
        candidates = [candidates]
    if label_space is None:
        columns = [str(c) for c in labels.columns]
        label_space = CELEBA if set(columns) <= set(CELEBA_ATTRIBUTES) else LabelSpace(columns)
    a_names = list(label_space.names) if attributes is None else label_space.validate(attributes)
    b_names = list(label_space.names) if candidates is None else label_space.validate(candidates)
    a_names, b_names = list(dict.fromkeys(a_names)), list(dict.fromkeys(b_names))
    if int(min_group) < 1:
        raise ValueError(f"min_group must be at least 1, got {min_group}.")
    if int(n_boot) < 0:
        raise ValueError(f"n_boot must be non-negative, got {n_boot}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    scores = _as_logits(logits, label_space)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} rows of logits but {len(labels)} label rows: give both for the same images, "
                         f"in the same order.")

    cols = label_space.indices(a_names)
    z = scores[:, cols]
    y_a = _label_matrix(labels, a_names).astype(np.float64)  # (N, |A|)
    y_b = _label_matrix(labels, b_names).astype(np.float64)  # (N, |B|)
    not_b = 1.0 - y_b
    pred = z > threshold
    prob = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow warnings
    hit = (pred & (y_a > 0)).astype(np.float64)  # A's positives predicted positive
    reject = (~pred & (y_a == 0)).astype(np.float64)  # A's negatives predicted negative

    # every count is a (|A|, |B|) matrix product over the images
    n_ab, n_a_not_b = y_a.T @ y_b, y_a.T @ not_b
    n_not_a_b, n_not_a_not_b = (1.0 - y_a).T @ y_b, (1.0 - y_a).T @ not_b
    hit_ab, hit_a_not_b = hit.T @ y_b, hit.T @ not_b
    rej_not_a_b, rej_not_a_not_b = reject.T @ y_b, reject.T @ not_b
    p_ab, p_a_not_b = (prob * y_a).T @ y_b, (prob * y_a).T @ not_b

    ia, ib = np.meshgrid(np.arange(len(a_names)), np.arange(len(b_names)), indexing="ij")
    keep = (np.asarray(a_names)[ia] != np.asarray(b_names)[ib]) & (n_ab >= min_group) & (n_a_not_b >= min_group)
    ia, ib = ia[keep], ib[keep]
    sel = (ia, ib)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_ab = hit_ab[sel] / n_ab[sel]
        acc_a_not_b = hit_a_not_b[sel] / n_a_not_b[sel]
        mean_p_ab = p_ab[sel] / n_ab[sel]
        mean_p_a_not_b = p_a_not_b[sel] / n_a_not_b[sel]
        bias_score = mean_p_ab / mean_p_a_not_b
        reverse_ok = (n_not_a_b[sel] >= min_group) & (n_not_a_not_b[sel] >= min_group)
        acc_not_a_b = np.where(reverse_ok, rej_not_a_b[sel] / n_not_a_b[sel], np.nan)
        acc_not_a_not_b = np.where(reverse_ok, rej_not_a_not_b[sel] / n_not_a_not_b[sel], np.nan)
    gap = acc_ab - acc_a_not_b
    if int(n_boot) > 0 and gap.size:
        gap_low, gap_high = _stratified_gap_interval(n_ab[sel].astype(np.int64), acc_ab,
                                                     n_a_not_b[sel].astype(np.int64), acc_a_not_b,
                                                     n_boot=int(n_boot), level=level, seed=seed)
    else:
        gap_low = gap_high = np.full(gap.shape, np.nan)
    n_a = n_ab[sel] + n_a_not_b[sel]
    out = pd.DataFrame({
        "a": np.asarray(a_names, dtype=object)[ia],
        "b": np.asarray(b_names, dtype=object)[ib],
        "n_ab": n_ab[sel].astype(np.int64),
        "n_a_not_b": n_a_not_b[sel].astype(np.int64),
        "acc_ab": acc_ab,
        "acc_a_not_b": acc_a_not_b,
        "gap": gap,
        "gap_low": gap_low,
        "gap_high": gap_high,
        "bias_score": bias_score,
        "mean_p_ab": mean_p_ab,
        "mean_p_a_not_b": mean_p_a_not_b,
        "n_not_a_b": n_not_a_b[sel].astype(np.int64),
        "n_not_a_not_b": n_not_a_not_b[sel].astype(np.int64),
        "acc_not_a_b": acc_not_a_b,
        "acc_not_a_not_b": acc_not_a_not_b,
        "reverse_gap": acc_not_a_not_b - acc_not_a_b,
        "p_b_given_a": n_ab[sel] / n_a,
    }, columns=list(BIAS_COLUMNS))
    out = out.sort_values(["gap", "bias_score"], ascending=False, kind="stable", na_position="last")
    return out.reset_index(drop=True)
