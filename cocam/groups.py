"""The four groups of an attribute pair, and the group-balanced data a user with B's labels can build.

For a guided attribute A and its co-occurring shortcut B every image falls in one of four
groups (:data:`GROUPS`): ``A∧B`` and ``¬A∧¬B`` (the majority: the shortcut agrees with the
label) and the two conflict groups ``A∧¬B`` and ``¬A∧B`` (the shortcut disagrees). A model that
uses B in place of A fails on the conflict groups, which is why worst-group accuracy over the
four is the field's measure of a shortcut, and why the standard remedy, when B's labels are
known, is to make the four groups count equally in training.

Two ways to do that, both here and both deterministic from a seed:

* **re-weighting / re-sampling** (:func:`balancing_weights`, :func:`balanced_resample`): image
  i of group g gets the weight ``w_i = N / (G · n_g)``, with ``n_g`` the size of its group and
  ``G`` the number of non-empty groups. Then every non-empty group carries the same total
  weight ``N / G`` and the weights average to 1, so a loss weighted by ``w`` is the mean of the
  per-group mean losses (the objective of group-balanced ERM). An empty group cannot be
  balanced: its share goes to the others, and :func:`group_counts` shows it. With several pairs,
  an image's weight is the **mean** of its per-pair weights (each pair's balance is kept on
  average; a product of the weights would explode for images rare in several pairs).
  :func:`balanced_resample` draws ``n`` indices with replacement with probabilities ∝ ``w``.
* **a balanced subset** (:func:`balanced_subset`): for each pair, the same number of images from
  every non-empty group, drawn without replacement (as many as the smallest group has, or
  ``per_group``), the union over pairs. This is what last-layer retraining (DFR) fits on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cocam.labels import labels_of_frame

__all__ = [
    "CONFLICT_GROUPS",
    "GROUPS",
    "balanced_resample",
    "balanced_subset",
    "balancing_weights",
    "group_counts",
    "group_index",
]

#: The four (A, B) groups: tidy key → the label shown in tables, in the order of :func:`group_index`'s
#: values. ``a_not_b`` is the paper's conflict subset, ``not_a_b`` the reverse conflict (B without A).
GROUPS: dict[str, str] = {"ab": "A∧B", "a_not_b": "A∧¬B", "not_a_b": "¬A∧B", "not_a_not_b": "¬A∧¬B"}

#: The two conflict groups, where A and B disagree: the only groups a shortcut through B gets wrong.
CONFLICT_GROUPS: tuple[str, str] = ("a_not_b", "not_a_b")


def _binary(labels: pd.DataFrame, name: str) -> np.ndarray:
    values = labels[name].to_numpy()
    if not np.isin(values, (-1, 0, 1)).all():
        raise ValueError(f"labels of {name} must be 0/1 or -1/1, got values {sorted(set(values.tolist()))[:5]}.")
    return values > 0


def group_index(labels: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """``(N,)`` int array: the position in :data:`GROUPS` of each image's (A, B) group.

    ``labels`` holds 0/1 (or ±1) columns named by the attributes.
    """
    labels_of_frame(labels.columns).validate([a, b])
    ya, yb = _binary(labels, a), _binary(labels, b)
    return np.where(ya, np.where(yb, 0, 1), np.where(yb, 2, 3)).astype(np.int64)


def group_counts(labels: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Tidy counts: one row per (a, b, group) with ``n`` — to see which groups are empty or tiny."""
    rows = []
    for a, b in pairs:
        counts = np.bincount(group_index(labels, a, b), minlength=len(GROUPS))
        rows += [{"a": a, "b": b, "group": g, "n": int(n)} for g, n in zip(GROUPS.values(), counts)]
    return pd.DataFrame(rows)


def balancing_weights(labels: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """``(N,)`` float64 weights that make the four groups of each pair count equally (mean 1).

    See the module docstring for the rule (``N / (G · n_g)`` per pair, the mean over pairs).
    """
    if not pairs:
        raise ValueError("balancing needs at least one (A, B) pair.")
    n = len(labels)
    if n == 0:
        raise ValueError("cannot balance an empty set of images.")
    total = np.zeros(n, dtype=np.float64)
    for a, b in pairs:
        g = group_index(labels, a, b)
        counts = np.bincount(g, minlength=len(GROUPS))
        nonempty = int((counts > 0).sum())
        total += n / (nonempty * counts[g])
    return total / len(pairs)


def balanced_resample(weights: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn with replacement, image i with probability ``weights[i] / Σ weights``.

    Deterministic for a given ``seed``; sorted so that a data loader's own shuffle decides the order.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0 or not np.isfinite(weights).all() or (weights < 0).any() \
            or weights.sum() <= 0:
        raise ValueError("weights must be a non-empty 1-D array of finite, non-negative numbers with a positive sum.")
    if n < 1:
        raise ValueError(f"the resample needs at least one image, got n={n}.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(weights.size, size=n, replace=True, p=weights / weights.sum()))


def balanced_subset(labels: pd.DataFrame, pairs: Sequence[tuple[str, str]], seed: int, *,
                    per_group: int | None = None) -> np.ndarray:
    """Sorted indices of a group-balanced subset: per pair, ``per_group`` images of every non-empty group.

    ``per_group`` defaults to the size of the pair's smallest non-empty group; a group with fewer
    images contributes all it has. The subset is the union over the pairs (an image chosen for
    two pairs appears once). Deterministic for a given ``seed``.
    """
    if not pairs:
        raise ValueError("a balanced subset needs at least one (A, B) pair.")
    if per_group is not None and per_group < 1:
        raise ValueError(f"per_group must be at least 1, got {per_group}.")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for a, b in pairs:
        g = group_index(labels, a, b)
        members = [np.flatnonzero(g == k) for k in range(len(GROUPS))]
        sizes = [m.size for m in members if m.size]
        take = per_group if per_group is not None else min(sizes)
        for m in members:
            if m.size:
                chosen.append(rng.choice(m, size=min(take, m.size), replace=False))
    return np.unique(np.concatenate(chosen))
