"""Co-occurrence statistics of attribute labels: the data side of bias discovery.

For every ordered pair (A, B) of attributes and every split this gives the counts and the
rates that reveal a co-occurrence shortcut: P(B|A), P(B|¬A), lift, the phi coefficient and
the size of the conflict subset A∧¬B the model is later evaluated on. The statistics of real
CelebA ship with cocam (:func:`celeba_reference`), so a dataset — the synthetic default or a
user's own — can be compared with them.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

from cocam.labels import LabelSpace

__all__ = [
    "celeba_reference",
    "cooccurrence",
    "derive_rates",
    "pair_summary",
    "rank_pairs",
    "suggest_pairs",
]

_COUNT_COLUMNS = ["split", "a", "b", "n_images", "n_a", "n_b", "n_ab"]


def _with_all_splits(counts: pd.DataFrame) -> pd.DataFrame:
    """``counts`` plus split ``"all"``: the per-pair counts summed over the splits (counts add up)."""
    total = counts.groupby(["a", "b"], sort=False, as_index=False)[["n_images", "n_a", "n_b", "n_ab"]].sum()
    total.insert(0, "split", "all")
    return pd.concat([counts[_COUNT_COLUMNS], total[_COUNT_COLUMNS]], ignore_index=True)


def celeba_reference(*, include_all: bool = False) -> pd.DataFrame:
    """Counts of real CelebA per split and ordered attribute pair, with derived rates.

    Columns: ``split, a, b, n_images, n_a, n_b, n_ab`` plus those of :func:`derive_rates`.
    With ``include_all`` the rows of split ``"all"`` (all 202,599 images: the numbers usually
    quoted for CelebA) follow those of train, valid and test.
    """
    with resources.files("cocam.data").joinpath("celeba_cooccurrence.csv").open("r") as fh:
        counts = pd.read_csv(fh)
    return derive_rates(_with_all_splits(counts) if include_all else counts)


def cooccurrence(attributes: pd.DataFrame, split: pd.Series | None = None, *,
                 include_all: bool = False) -> pd.DataFrame:
    """Counts and rates for every ordered attribute pair, per split.

    Args:
        attributes: 0/1 labels, one row per image, one column per attribute (any names: CelebA's
            40, or the labels of a folder dataset, :mod:`cocam.folder`; distinct, non-empty).
        split: optional split name per image (same index); without it every row counts as
            split ``"all"``.
        include_all: with ``split``, also the rows of split ``"all"`` (every image), after the
            per-split rows.

    Returns:
        One row per (split, a, b) with the columns of :func:`celeba_reference`.
    """
    names = list(LabelSpace(attributes.columns).names)  # any labels: CelebA's 40 or a folder dataset's columns
    if split is None:
        groups = [("all", attributes)]
    else:
        split = split.reindex(attributes.index)
        groups = [(str(s), attributes[split == s]) for s in pd.unique(split.dropna())]
    frames = []
    for split_name, frame in groups:
        x = frame.to_numpy(dtype=np.int64)
        n_ab = x.T @ x  # joint positives for every pair, one matrix product
        n_a = np.diag(n_ab)
        k = len(names)
        frames.append(
            pd.DataFrame(
                {
                    "split": split_name,
                    "a": np.repeat(names, k),
                    "b": np.tile(names, k),
                    "n_images": len(frame),
                    "n_a": np.repeat(n_a, k),
                    "n_b": np.tile(n_a, k),
                    "n_ab": n_ab.reshape(-1),
                }
            )
        )
    counts = pd.concat(frames, ignore_index=True)
    if include_all and split is not None:
        counts = _with_all_splits(counts)
    return derive_rates(counts)


def derive_rates(counts: pd.DataFrame) -> pd.DataFrame:
    """Add rates to a frame holding ``n_images, n_a, n_b, n_ab``.

    Added columns: ``p_a`` = P(A), ``p_b_given_a`` = P(B|A), ``p_b_given_not_a`` = P(B|¬A),
    ``p_a_given_b`` = P(A|B), ``lift`` = P(A∧B) / (P(A)P(B)), ``phi`` (the Pearson correlation
    of the two 0/1 labels), ``n_conflict`` = |A∧¬B| and ``n_reverse_conflict`` = |¬A∧B|.
    Undefined rates (empty conditioning sets) are NaN.
    """
    out = counts.copy()
    n = out["n_images"].astype(float)
    na, nb, nab = (out[c].astype(float) for c in ("n_a", "n_b", "n_ab"))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["p_a"] = na / n
        out["p_b_given_a"] = (nab / na).where(na > 0)
        out["p_b_given_not_a"] = ((nb - nab) / (n - na)).where(n - na > 0)
        out["p_a_given_b"] = (nab / nb).where(nb > 0)
        out["lift"] = (nab * n / (na * nb)).where((na > 0) & (nb > 0))
        denom = np.sqrt(na * (n - na) * nb * (n - nb))
        out["phi"] = ((n * nab - na * nb) / denom).where(denom > 0)
    out["n_conflict"] = (out["n_a"] - out["n_ab"]).astype(np.int64)
    out["n_reverse_conflict"] = (out["n_b"] - out["n_ab"]).astype(np.int64)
    return out


def rank_pairs(stats: pd.DataFrame, *, split: str | None = None, by: str = "phi", top: int | None = 20,
               min_conflict: int = 0) -> pd.DataFrame:
    """The most co-occurring unordered pairs, strongest first.

    Args:
        stats: output of :func:`cooccurrence` or :func:`celeba_reference`.
        split: keep only this split (default: the first split present).
        by: ``"phi"`` (default), ``"lift"`` or ``"p_b_given_a"``.
        top: how many rows to keep (``None`` for all).
        min_conflict: drop pairs whose conflict subset A∧¬B has fewer images.

    Each unordered pair appears once, oriented so that A is the rarer attribute (its conflict
    subset A∧¬B is the one a shortcut through B hurts most).
    """
    if by not in {"phi", "lift", "p_b_given_a"}:
        raise ValueError(f"by must be 'phi', 'lift' or 'p_b_given_a', not {by!r}.")
    split = split if split is not None else stats["split"].iloc[0]
    s = stats[(stats["split"] == split) & (stats["a"] != stats["b"])]
    s = s[(s["n_a"] < s["n_b"]) | ((s["n_a"] == s["n_b"]) & (s["a"] < s["b"]))]
    s = s[s["n_conflict"] >= min_conflict]
    s = s.sort_values(by, ascending=False, kind="stable")
    cols = ["split", "a", "b", "n_images", "n_a", "n_ab", "p_b_given_a", "p_b_given_not_a", "lift", "phi",
            "n_conflict"]
    s = s[cols].reset_index(drop=True)
    return s if top is None else s.head(top)


def pair_summary(stats: pd.DataFrame, pairs, *, reference: pd.DataFrame | None = None,
                 brief: bool = False) -> pd.DataFrame:
    """Per split and (A, B) pair: P(B|A), P(A|B), conflict size; next to CelebA's if given.

    The names are checked against the labels of ``stats`` (a misspelling names the closest).
    ``brief`` keeps ``split, a, b, n_a, p_b_given_a`` (and CelebA's, with a ``reference``) and
    ``n_conflict``: the columns a reader compares.
    """
    keep = ["split", "a", "b", "n_images", "n_a", "n_ab", "p_b_given_a", "p_a_given_b", "phi", "n_conflict"]
    labels = LabelSpace(pd.unique(stats["a"]))
    rows = []
    for a, b in pairs:
        a, b = labels.validate([a, b])
        rows.append(stats[(stats["a"] == a) & (stats["b"] == b)][keep])
    out = pd.concat(rows, ignore_index=True)
    if reference is not None:
        ref = reference[["split", "a", "b", "p_b_given_a", "p_a_given_b"]].rename(
            columns={"p_b_given_a": "celeba_p_b_given_a", "p_a_given_b": "celeba_p_a_given_b"})
        out = out.merge(ref, on=["split", "a", "b"], how="left")
    if brief:
        out = out[["split", "a", "b", "n_a", "p_b_given_a"]
                  + (["celeba_p_b_given_a"] if reference is not None else []) + ["n_conflict"]]
    return out


def suggest_pairs(attributes: pd.DataFrame, split: pd.Series | None = None, *, top: int = 3,
                  on: str = "train") -> list[tuple[str, str]]:
    """The ``top`` pairs a shortcut could come from, for a dataset without pairs of its own.

    The pairs of labels with the largest positive correlation φ on split ``on`` (every image
    when ``split`` is ``None``) that have at least one A∧¬B image, oriented as in
    :func:`rank_pairs` (A the rarer label). These are what ``cocam evaluate``/``compare`` and the
    notebooks examine on a folder dataset when no pairs are given; CelebA keeps the paper's.

    Raises:
        ValueError: no two labels co-occur so (the message says to give the pairs).
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}: it is how many pairs to suggest.")
    stats = cooccurrence(attributes, split)
    ranked = rank_pairs(stats, split=on if split is not None else "all", top=None)
    ranked = ranked[(ranked["phi"] > 0) & (ranked["n_conflict"] > 0)]
    if ranked.empty:
        raise ValueError(f"no two labels co-occur (a positive φ with an A∧¬B image on the {on} split) among "
                         f"{', '.join(map(str, attributes.columns[:6]))}: give the pairs to examine (A:B).")
    return [(str(a), str(b)) for a, b in ranked[["a", "b"]].head(top).itertuples(index=False)]
