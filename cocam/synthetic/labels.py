"""Attribute labels with CelebA's co-occurrence structure.

Labels are drawn from a tree-structured model of the 40 attributes (a Chow–Liu tree: the
maximum spanning tree of the pairwise mutual information computed from real CelebA's counts,
per split), with the paper's pairs forced to be edges. Along every edge the child's rate given
its parent is CelebA's, so every tree edge — the paper's pairs included — reproduces CelebA's
2×2 table. Sampling is *stratified*: in each parent group exactly ``round(m · rate)`` images
get the attribute, so the rates hold up to rounding even for small datasets.

A bias strength can amplify the paper pairs' co-occurrence in the training split only: both
conflict cells (A∧¬B and ¬A∧B) of the pair's table are multiplied by ``train_conflict_scale``
and the mass moves to the agreeing cells, keeping the parent attribute's rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cocam.attributes import CELEBA_ATTRIBUTES, PAPER_PAIRS, validate_attributes
from cocam.cooccurrence import celeba_reference

__all__ = ["LabelTree", "fit_label_tree", "sample_labels"]


@dataclass(frozen=True)
class LabelTree:
    """A directed tree over the attributes with the conditional rates along each edge.

    Attributes:
        order: attributes in sampling order (root first; every parent precedes its children).
        parent: child → parent (the root maps to ``None``).
        p_root: P(root = 1).
        p_given_parent: child → (P(child=1 | parent=0), P(child=1 | parent=1)).
    """

    order: tuple[str, ...]
    parent: dict[str, str | None]
    p_root: float
    p_given_parent: dict[str, tuple[float, float]]


def _mutual_information(n: float, na: np.ndarray, nb: np.ndarray, nab: np.ndarray) -> np.ndarray:
    cells = [nab, na - nab, nb - nab, n - na - nb + nab]
    margins = [(na, nb), (na, n - nb), (n - na, nb), (n - na, n - nb)]
    mi = np.zeros_like(nab, dtype=float)
    for c, (pa, pb) in zip(cells, margins):
        with np.errstate(divide="ignore", invalid="ignore"):
            term = (c / n) * np.log(c * n / (pa * pb))
        mi += np.nan_to_num(term)
    return mi


def fit_label_tree(
    split: str = "train",
    *,
    forced_pairs: Sequence[tuple[str, str]] = PAPER_PAIRS,
    root: str = "Male",
    train_conflict_scale: float = 1.0,
    reference: pd.DataFrame | None = None,
    decorrelate: bool = False,
) -> LabelTree:
    """Fit the label tree to CelebA's counts of one split.

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"``.
        forced_pairs: (A, B) pairs that must be tree edges so their joint table is CelebA's.
        root: the attribute sampled first.
        train_conflict_scale: multiplier in [0, 1] on the conflict cells of ``forced_pairs``
            (1 keeps CelebA's rates; 0 makes A and B always agree).
        reference: counts as from :func:`cocam.cooccurrence.celeba_reference` (default: it).
        decorrelate: draw the child of each of ``forced_pairs`` independently of its parent, at
            the child's marginal rate (``P(child | parent) = P(child)``): the pair's co-occurrence
            is removed, every other edge of the tree is kept (the oracle's training split).
    """
    if not 0.0 <= train_conflict_scale <= 1.0:
        raise ValueError(f"train_conflict_scale must lie in [0, 1], got {train_conflict_scale}.")
    ref = celeba_reference() if reference is None else reference
    ref = ref[ref["split"] == split]
    if ref.empty:
        raise ValueError(f"No reference counts for split {split!r}; use 'train', 'valid' or 'test'.")
    names = list(CELEBA_ATTRIBUTES)
    k = len(names)
    idx = {a: i for i, a in enumerate(names)}
    n = float(ref["n_images"].iloc[0])
    nab = np.zeros((k, k))
    nab[ref["a"].map(idx).to_numpy(), ref["b"].map(idx).to_numpy()] = ref["n_ab"].to_numpy()
    na = np.diag(nab).copy()
    weight = _mutual_information(n, na[:, None], na[None, :], nab)
    forced = {frozenset(validate_attributes(p)) for p in forced_pairs}
    for pair in forced:
        i, j = (idx[a] for a in pair)
        weight[i, j] = weight[j, i] = np.inf
    np.fill_diagonal(weight, -np.inf)

    # Prim's algorithm for the maximum spanning tree, grown from the root.
    validate_attributes([root])
    in_tree = np.zeros(k, dtype=bool)
    in_tree[idx[root]] = True
    best = weight[idx[root]].copy()
    best_from = np.full(k, idx[root])
    parent: dict[str, str | None] = {root: None}
    order = [root]
    for _ in range(k - 1):
        cand = np.where(in_tree, -np.inf, best)
        j = int(np.argmax(cand))
        in_tree[j] = True
        parent[names[j]] = names[best_from[j]]
        order.append(names[j])
        better = (weight[j] > best) & ~in_tree
        best[better] = weight[j][better]
        best_from[better] = j

    p_given: dict[str, tuple[float, float]] = {}
    for child in order[1:]:
        c, p = idx[child], idx[parent[child]]
        n_pc, n_p, n_c = nab[p, c], na[p], na[c]
        # 2x2 table: rows parent 0/1, columns child 0/1
        table = np.array([[n - n_p - n_c + n_pc, n_c - n_pc], [n_p - n_pc, n_pc]])
        if frozenset((child, parent[child])) in forced and train_conflict_scale < 1.0:
            moved = (1.0 - train_conflict_scale) * np.array([table[0, 1], table[1, 0]])
            table[0, 1] -= moved[0]
            table[0, 0] += moved[0]
            table[1, 0] -= moved[1]
            table[1, 1] += moved[1]
        p_given[child] = (table[0, 1] / table[0].sum(), table[1, 1] / table[1].sum())
        if decorrelate and frozenset((child, parent[child])) in forced:
            p_given[child] = (n_c / n, n_c / n)
    return LabelTree(tuple(order), parent, na[idx[root]] / n, p_given)


def _stratified(rng: np.random.Generator, m: int, p: float) -> np.ndarray:
    """Exactly round(m·p) ones among m, in random positions."""
    out = np.zeros(m, dtype=np.uint8)
    out[rng.permutation(m)[: int(round(m * p))]] = 1
    return out


def sample_labels(tree: LabelTree, n_images: int, rng: np.random.Generator) -> pd.DataFrame:
    """Draw ``n_images`` label rows (0/1, columns in CelebA order) from ``tree``."""
    cols: dict[str, np.ndarray] = {tree.order[0]: _stratified(rng, n_images, tree.p_root)}
    for child in tree.order[1:]:
        parent_values = cols[tree.parent[child]]
        values = np.zeros(n_images, dtype=np.uint8)
        for v in (0, 1):
            where = np.flatnonzero(parent_values == v)
            values[where] = _stratified(rng, len(where), tree.p_given_parent[child][v])
        cols[child] = values
    return pd.DataFrame({a: cols[a] for a in CELEBA_ATTRIBUTES})
