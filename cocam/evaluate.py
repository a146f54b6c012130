"""Evaluation: accuracy on the whole test split, on the four (A, B) groups, and attention.

For a guided pair (A, B) — e.g. Wearing_Lipstick and its co-occurring shortcut Heavy_Makeup —
:func:`pair_metrics` gives, as numbers (one tidy row per pair), the model's accuracy *on
attribute A* on each of the four (A, B) groups, with its size and a 95 % stratified bootstrap
interval (conflict subsets are small: 384 images for Double_Chin∧¬Chubby in real CelebA's test
split). The headline is the **worst-group accuracy** and the **mean of the two conflict groups**
A∧¬B and ¬A∧B: the paper's column, accuracy on A∧¬B, rises when a model merely predicts A more
often, and these do not. The paper's A∧¬B, the reverse group ¬A∧B and the whole split stand
beside them, and the AUC of A's logit within B and within ¬B gives a view no threshold can move.
:func:`paper_table` (and the CLI's and notebooks' tables) are views formatting these numbers.

Attention is scored with the Grad-CAM of A on images that have A, against a region (the user's
mask, or on the synthetic benchmark the ground-truth evidence region): soft IoU, the pointing
game (is the CAM's maximum inside the region?) and the share of CAM energy inside the region.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cocam.labels import LabelSpace, labels_of_frame
from cocam.cams import get_cam_method
from cocam.dataset import CelebADataset, iterate_batches, label_space_of_dataset
from cocam.gradcam import grad_cam
from cocam.groups import CONFLICT_GROUPS, GROUPS
from cocam.losses import soft_iou
from cocam.model import SplitModel

__all__ = [
    "CONFLICT_GROUPS",
    "GROUPS",
    "METRIC_COLUMNS",
    "PAPER_TABLE_COLUMNS",
    "attention_metrics",
    "attention_scores",
    "auc_interval",
    "bootstrap_interval",
    "check_label_space",
    "evaluate_checkpoints",
    "interval_reading",
    "mann_whitney_auc",
    "metrics_long",
    "metrics_table",
    "name_checkpoints",
    "pair_accuracy",
    "pair_metrics",
    "paper_table",
    "predict",
    "resolve_device",
    "results_sidecar",
    "write_results",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict(model: SplitModel, dataset: CelebADataset, *, batch_size: int = 256,
            device: str | torch.device | None = "auto", progress: bool = False) -> np.ndarray:
    """Logits ``(N, num_outputs)`` of ``model`` on every image of ``dataset`` (in eval mode).

    The model's train/eval mode is restored afterwards.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    out = []
    try:
        batches = iterate_batches(dataset, batch_size, device=device)
        for images, _, _ in tqdm(batches, total=-(-len(dataset) // batch_size), desc="predicting",
                                 disable=not progress, leave=False):
            out.append(model(images).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_outputs), np.float32)


def bootstrap_interval(correct: np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (NaN for an empty one)."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.binomial(correct.size, correct.mean(), size=n_boot) / correct.size \
        if correct.size > 5000 else correct[rng.integers(0, correct.size, (n_boot, correct.size))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))




def _metric_columns() -> list[str]:
    cols = ["a", "b"]
    for name in ("acc_worst_group", "acc_conflict_mean"):
        cols += [name, f"{name}_low", f"{name}_high"]
    cols.insert(5, "worst_group")
    for key in ("a_not_b", "not_a_b", "ab", "not_a_not_b", "all"):
        cols += [f"acc_{key}", f"acc_{key}_low", f"acc_{key}_high", f"n_{key}"]
    for name in ("auc_within_b", "auc_within_not_b"):
        cols += [name, f"{name}_low", f"{name}_high"]
    return cols + ["threshold"]


#: Columns of :func:`pair_metrics`, in order: the headline (worst group, mean of the two conflict
#: groups), the paper's conflict group, the reverse one, the other two groups, the whole split,
#: the threshold-free AUCs. Accuracies and AUCs are fractions in [0, 1]; ``_low``/``_high`` are
#: the bounds of the bootstrap interval; ``worst_group`` names the group (a :data:`GROUPS` key).
METRIC_COLUMNS: tuple[str, ...] = tuple(_metric_columns())


def mann_whitney_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve of a score: the probability that a random positive scores above a
    random negative, ties counted half (the Mann–Whitney U statistic over ``n₊·n₋``).

    It does not depend on a decision threshold, so a model cannot raise it by predicting one class
    more often. NaN when either side is empty. ``O((n₊ + n₋) log n₋)``.
    """
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.sort(np.asarray(negatives, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (pos.size * neg.size))


def auc_interval(positives: np.ndarray, negatives: np.ndarray, *, level: float = 0.95) -> tuple[float, float]:
    """DeLong's interval of :func:`mann_whitney_auc`: ``AUC ± z·se``, clipped to [0, 1].

    The variance is DeLong et al.'s (Biometrics 1988): ``var(V₁₀)/n₊ + var(V₀₁)/n₋``, where
    ``V₁₀(i)`` is the share of negatives below positive ``i`` (ties half) and ``V₀₁(j)`` the share
    of positives above negative ``j`` — the variance of the AUC when the positives and the
    negatives are each resampled within themselves, to first order, without resampling: a
    bootstrap of a rank statistic over CelebA's 20,000 test images costs seconds per pair and
    model. NaN when either side has fewer than two images.
    """
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size < 2 or neg.size < 2:
        return float("nan"), float("nan")
    sneg, spos = np.sort(neg), np.sort(pos)
    v10 = (np.searchsorted(sneg, pos, "left") + np.searchsorted(sneg, pos, "right")) / (2.0 * neg.size)
    v01 = ((pos.size - np.searchsorted(spos, neg, "right")) + (pos.size - np.searchsorted(spos, neg, "left"))) \
        / (2.0 * pos.size)
    auc = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)
    z = float(NormalDist().inv_cdf(0.5 + level / 2))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def pair_metrics(logits: np.ndarray, labels: pd.DataFrame, pairs: Sequence[tuple[str, str]], *,
                 threshold: float = 0.0, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                 label_space: LabelSpace | None = None) -> pd.DataFrame:
    """The metrics of attribute A for every pair (A, B), as numbers: one row per pair.

    Why these: a model that predicts A more often raises its accuracy on the paper's conflict
    subset A∧¬B while it loses the reverse conflict ¬A∧B — predicting A for every image scores
    100 % on A∧¬B and 0 % on ¬A∧B. So the headline is the **worst-group accuracy** over the four
    (A, B) groups (:data:`GROUPS`) and the **mean of the two conflict groups**; the paper's A∧¬B
    and the reverse group stand beside them, and the **AUC** of A's logit within B and within ¬B
    (:func:`mann_whitney_auc`; positives A, negatives ¬A) shows whether the *ranking* improved —
    a moved threshold leaves it unchanged.

    Intervals are a stratified percentile bootstrap over images: each resample redraws the
    images of each of the four groups with replacement within their group. A group's accuracy
    in a resample of ``n`` images whose accuracy is ``p`` is exactly ``Binomial(n, p) / n``
    (drawn that way, as :func:`cocam.bias.rank_biases` does); the worst group, the conflict mean
    and the whole-split accuracy of each resample are computed from the *same* draws, so the
    worst group's interval is that of the minimum, not of whichever group is lowest on the
    full data. The AUCs' intervals are DeLong's (:func:`auc_interval`), the first-order variance of
    the same resampling within A and ¬A.

    Args:
        logits: ``(N, L)`` model outputs (:func:`predict`), one column per label of ``label_space``.
        labels: the ``(N, L)`` 0/1 labels of the same images, in the same order.
        pairs: (A, B) pairs: A is the guided attribute, B its co-occurring shortcut.
        threshold: A is predicted when its logit is ``> threshold`` (0 = probability 0.5).
        n_boot: bootstrap replicates (0: NaN bounds).
        level: coverage of the intervals.
        seed: seed of the bootstrap; the same inputs give the same intervals.
        label_space: the model's outputs (``dataset.label_space``); default: CelebA's 40 when
            every column of ``labels`` is a CelebA attribute, else the columns of ``labels`` in order.

    Returns:
        A DataFrame with the columns :data:`METRIC_COLUMNS`. Empty groups have ``n = 0`` and NaN
        accuracy; they are never the worst group. ``acc_conflict_mean`` is NaN unless both
        conflict groups have images; an AUC is NaN where its side of B lacks A or ¬A.
    """
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions but {len(labels)} label rows: give both for the same images, "
                         f"in the same order.")
    if int(n_boot) < 0:
        raise ValueError(f"n_boot must be non-negative, got {n_boot}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    n_boot = int(n_boot)
    alpha = (1.0 - level) / 2.0
    logits = np.asarray(logits)
    space = labels_of_frame(labels.columns) if label_space is None else label_space
    rows = []
    for a, b in pairs:
        space.validate([a, b])
        rng = np.random.default_rng(seed)
        ya = labels[a].to_numpy().astype(bool)
        yb = labels[b].to_numpy().astype(bool)
        score = logits[:, space.index(a)].astype(np.float64) if len(logits) else np.zeros(0)
        correct = (score > threshold) == ya
        masks = {"ab": ya & yb, "a_not_b": ya & ~yb, "not_a_b": ~ya & yb, "not_a_not_b": ~ya & ~yb}
        n = {k: int(m.sum()) for k, m in masks.items()}
        hits = {k: int(correct[m].sum()) for k, m in masks.items()}
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = {k: hits[k] / n[k] if n[k] else float("nan") for k in masks}
            # (n_boot, 4) group accuracies of the same resamples; NaN columns for empty groups
            draws = np.stack([rng.binomial(n[k], acc[k], n_boot) / n[k] if n[k] else np.full(n_boot, np.nan)
                              for k in masks], axis=1)
        keys = list(masks)
        filled = [k for k in keys if n[k]]
        row: dict[str, Any] = {"a": a, "b": b}

        def put(name: str, value: float, replicates: np.ndarray) -> None:
            row[name] = value
            ok = replicates[np.isfinite(replicates)] if n_boot else replicates[:0]
            lo, hi = (np.quantile(ok, [alpha, 1 - alpha]) if ok.size and np.isfinite(value)
                      else (float("nan"), float("nan")))
            row[f"{name}_low"], row[f"{name}_high"] = float(lo), float(hi)

        if filled:
            cols = [keys.index(k) for k in filled]
            worst = min(filled, key=lambda k: acc[k])  # ties: the first in GROUPS order
            put("acc_worst_group", acc[worst], draws[:, cols].min(1))
            row["worst_group"] = worst
        else:
            put("acc_worst_group", float("nan"), np.full(n_boot, np.nan))
            row["worst_group"] = None
        c1, c2 = (keys.index(k) for k in CONFLICT_GROUPS)
        put("acc_conflict_mean", 0.5 * (acc["a_not_b"] + acc["not_a_b"]), 0.5 * (draws[:, c1] + draws[:, c2]))
        for k in ("a_not_b", "not_a_b", "ab", "not_a_not_b"):
            put(f"acc_{k}", acc[k], draws[:, keys.index(k)])
            row[f"n_{k}"] = n[k]
        total = sum(n.values())
        weights = np.array([n[k] for k in keys], dtype=np.float64)
        all_draws = (np.nan_to_num(draws) * weights).sum(1) / total if total else np.full(n_boot, np.nan)
        put("acc_all", sum(hits.values()) / total if total else float("nan"), all_draws)
        row["n_all"] = total
        for name, side in (("auc_within_b", yb), ("auc_within_not_b", ~yb)):
            pos, neg = score[side & ya], score[side & ~ya]
            row[name] = mann_whitney_auc(pos, neg)
            row[f"{name}_low"], row[f"{name}_high"] = auc_interval(pos, neg, level=level)
        row["threshold"] = float(threshold)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


#: The subsets of :func:`pair_accuracy`'s long format → the :func:`pair_metrics` column stem.
_LONG_SUBSETS: dict[str, str] = {"all": "all", "A∧¬B": "a_not_b", "¬A∧B": "not_a_b", "A∧B": "ab",
                                 "¬A∧¬B": "not_a_not_b", "worst group": "worst_group",
                                 "conflict mean": "conflict_mean"}


def metrics_long(metrics: pd.DataFrame) -> pd.DataFrame:
    """:func:`pair_metrics` in long format: one row per (a, b, subset) with ``n``, ``accuracy``,
    ``ci_low``, ``ci_high`` and, for ``worst group``, the ``group`` it is (its label in :data:`GROUPS`).

    Takes :func:`pair_metrics` or :func:`metrics_table` output; a ``model`` column is carried along.
    """
    metrics = metrics.rename(columns={"attribute": "a", "shortcut": "b"})
    ident = ["model"] if "model" in metrics.columns else []
    rows = []
    for _, r in metrics.iterrows():
        for subset, stem in _LONG_SUBSETS.items():
            key = f"acc_{stem}"
            if stem == "worst_group":
                n = r[f"n_{r['worst_group']}"] if isinstance(r["worst_group"], str) else 0
            elif stem == "conflict_mean":
                n = r["n_a_not_b"] + r["n_not_a_b"]
            else:
                n = r[f"n_{stem}"]
            row = {c: r[c] for c in ident} | {"a": r["a"], "b": r["b"], "subset": subset, "n": int(n),
                                              "accuracy": r[key], "ci_low": r[f"{key}_low"],
                                              "ci_high": r[f"{key}_high"]}
            row["group"] = GROUPS.get(r["worst_group"]) if stem == "worst_group" else None
            rows.append(row)
    return pd.DataFrame(rows, columns=[*ident, "a", "b", "subset", "n", "accuracy", "ci_low", "ci_high", "group"])


def pair_accuracy(logits: np.ndarray, labels: pd.DataFrame, pairs: Sequence[tuple[str, str]], *,
                  threshold: float = 0.0, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Accuracy on attribute A for every subset of every pair (A, B), in long format.

    The numbers of :func:`pair_metrics` (the same resamples), one row per (a, b, subset) with
    ``n``, ``accuracy``, ``ci_low``, ``ci_high`` (:func:`metrics_long`); the subsets are ``all``,
    ``A∧¬B`` (conflict), ``¬A∧B`` (reverse conflict), ``A∧B``, ``¬A∧¬B``, ``worst group`` (the
    lowest of the four; ``group`` names it) and ``conflict mean`` (the mean of A∧¬B and ¬A∧B).
    """
    return metrics_long(pair_metrics(logits, labels, pairs, threshold=threshold, n_boot=n_boot, seed=seed))


def _from_long(long: pd.DataFrame) -> pd.DataFrame:
    """:func:`metrics_long`'s rows back as :func:`pair_metrics` columns (the AUCs, absent there, NaN)."""
    rows = []
    for (a, b), g in long.groupby(["a", "b"], sort=False):
        s = g.set_index("subset")
        row: dict[str, Any] = {c: float("nan") for c in METRIC_COLUMNS} | {"a": a, "b": b}
        for subset, stem in _LONG_SUBSETS.items():
            if subset not in s.index:
                continue
            row[f"acc_{stem}"], row[f"acc_{stem}_low"], row[f"acc_{stem}_high"] = (
                float(s.loc[subset, k]) for k in ("accuracy", "ci_low", "ci_high"))
            if f"n_{stem}" in row:
                row[f"n_{stem}"] = int(s.loc[subset, "n"])
        label = s.loc["worst group", "group"] if "worst group" in s.index and "group" in s.columns else None
        row["worst_group"] = {v: k for k, v in GROUPS.items()}.get(label)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def _pct(value: Any) -> float:
    return 100.0 * float(value) if pd.notna(value) else float("nan")


def _count(value: Any) -> Any:
    return int(value) if pd.notna(value) else pd.NA


def _ci(row: pd.Series, name: str, scale: float = 100.0, digits: int = 1) -> str:
    lo, hi = row.get(f"{name}_low", np.nan), row.get(f"{name}_high", np.nan)
    if pd.isna(lo) or pd.isna(hi):
        return ""
    return f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def metrics_table(results: Mapping[str, pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """One tidy frame of numbers: a ``model`` column, then :data:`METRIC_COLUMNS` (``a``, ``b``
    renamed ``attribute``, ``shortcut``), one row per (attribute, model), attributes in their
    first-seen order.

    Args:
        results: model name → :func:`pair_metrics` output (or :func:`pair_accuracy`'s long
            format, which has no AUC: those columns are NaN), or a frame that already has a
            ``model`` column (returned as is, reordered).
    """
    if isinstance(results, pd.DataFrame):
        df = results.copy()
        if "model" not in df.columns:
            raise ValueError("the metrics frame has no 'model' column: pass {model name: pair_metrics(...)}.")
    else:
        parts = [(_from_long(m) if "subset" in m.columns else m).assign(model=name) for name, m in results.items()]
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["model", *METRIC_COLUMNS])
    df = df.rename(columns={"a": "attribute", "b": "shortcut"})
    for c in METRIC_COLUMNS[2:]:  # a frame of some metrics only: the others are unknown
        if c not in df.columns:
            df[c] = None if c == "worst_group" else float("nan")
    first = ["attribute", "shortcut", "model"]
    df = df[first + [c for c in df.columns if c not in first]]
    order = {a: i for i, a in enumerate(dict.fromkeys(df["attribute"]))}
    return df.sort_values(["attribute"], key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


#: Columns of :func:`paper_table`: the headline first, then the paper's columns and the reverse group.
PAPER_TABLE_COLUMNS: tuple[str, ...] = (
    "attribute", "shortcut", "model", "worst group %", "worst group 95% CI", "worst group", "conflict mean %",
    "conflict mean 95% CI", "test %", "conflict A∧¬B %", "conflict 95% CI", "n conflict", "reverse ¬A∧B %",
    "reverse 95% CI", "n reverse", "AUC within B", "AUC within ¬B", "n test",
)  # fmt: skip


def paper_table(results: Mapping[str, pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """The before/after table for people: a view of :func:`metrics_table`'s numbers.

    Args:
        results: model name (e.g. ``"pre-trained"``, ``"BCE-only control"``, ``"fine-tuned"``)
            → :func:`pair_metrics` for that model, or :func:`metrics_table`'s frame.

    Returns:
        One row per (attribute A, model) with the columns :data:`PAPER_TABLE_COLUMNS`: the
        worst-group accuracy and the mean of the two conflict groups (the headline, which a moved
        threshold cannot improve), then the paper's columns — ``test`` (the whole split) and
        ``A∧¬B`` (its conflict subset) — and the reverse conflict ``¬A∧B``, in percent with 95 %
        interval strings, and the two AUCs. Extra columns of the metrics (attention) follow.
    """
    df = metrics_table(results)
    rows = []
    for _, r in df.iterrows():
        rows.append({
            "attribute": r["attribute"], "shortcut": r["shortcut"], "model": r["model"],
            "worst group %": _pct(r["acc_worst_group"]), "worst group 95% CI": _ci(r, "acc_worst_group"),
            "worst group": GROUPS.get(r["worst_group"], ""),
            "conflict mean %": _pct(r["acc_conflict_mean"]), "conflict mean 95% CI": _ci(r, "acc_conflict_mean"),
            "test %": _pct(r["acc_all"]),
            "conflict A∧¬B %": _pct(r["acc_a_not_b"]), "conflict 95% CI": _ci(r, "acc_a_not_b"),
            "n conflict": _count(r["n_a_not_b"]),
            "reverse ¬A∧B %": _pct(r["acc_not_a_b"]), "reverse 95% CI": _ci(r, "acc_not_a_b"),
            "n reverse": _count(r["n_not_a_b"]),
            "AUC within B": float(r["auc_within_b"]), "AUC within ¬B": float(r["auc_within_not_b"]),
            "n test": _count(r["n_all"]),
        } | {c: r[c] for c in df.columns if c not in METRIC_COLUMNS and c not in ("attribute", "shortcut", "model")})
    return pd.DataFrame(rows, columns=list(PAPER_TABLE_COLUMNS) + [
        c for c in df.columns if c not in METRIC_COLUMNS and c not in ("attribute", "shortcut", "model")])


def attention_metrics(model: SplitModel, dataset: CelebADataset, attribute: str, region: torch.Tensor, *,
                      batch_size: int = 64, device: str | torch.device | None = "auto",
                      positives_only: bool = True, cam_method: str = "gradcam") -> dict[str, float]:
    """How well the Grad-CAM (or ``cam_method``'s CAM) of ``attribute`` falls inside ``region``.

    Args:
        region: ``(S, S)`` one region for every image (e.g. the user's mask at input size) or
            ``(N, S, S)`` one per image of ``dataset`` (e.g. ground-truth evidence regions).
        positives_only: score only images that have the attribute (the CAM of an absent
            attribute shows evidence *for* it, which is not what the region marks).
        cam_method: a name in :data:`cocam.cams.CAM_METHODS` (``grad_cam(method=...)``).

    Returns:
        ``{"soft_iou", "pointing_game", "energy_inside", "n"}`` averaged over the scored images.
    """
    return attention_scores(model, dataset, attribute, {"region": region}, batch_size=batch_size, device=device,
                            positives_only=positives_only, cam_method=cam_method)["region"]


def attention_scores(model: SplitModel, dataset: CelebADataset, attribute: str,
                     regions: Mapping[str, torch.Tensor], *, batch_size: int = 64,
                     device: str | torch.device | None = "auto",
                     positives_only: bool = True, cam_method: str = "gradcam") -> dict[str, dict[str, float]]:
    """:func:`attention_metrics` against several regions at once, from one Grad-CAM pass.

    Returns one ``{"soft_iou", "pointing_game", "energy_inside", "n"}`` dict per region name.
    """
    get_cam_method(cam_method)  # an unknown name fails before any work
    device = resolve_device(device)
    idx = label_space_of_dataset(dataset).index(attribute)
    regions = {name: torch.as_tensor(r, dtype=torch.float32) for name, r in regions.items()}
    for name, r in regions.items():
        if r.ndim == 3 and r.shape[0] != len(dataset):
            raise ValueError(f"region {name!r} has {r.shape[0]} masks for {len(dataset)} images.")
    labels = torch.tensor(np.asarray(dataset.targets)[:, idx])  # a copy: targets may be a read-only view
    was_training = model.training
    model.eval()
    model.to(device)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {name: {"iou": [], "point": [], "energy": []}
                                                      for name in regions}
    n = 0
    try:
        start = 0
        for images, _, _ in iterate_batches(dataset, batch_size, device=device):
            stop = start + len(images)
            keep = labels[start:stop] > 0 if positives_only else torch.ones(stop - start, dtype=torch.bool)
            if keep.any():
                res = grad_cam(model, images[keep.to(device)], idx, output_size=images.shape[-1], method=cam_method)
                cam = res.cams[:, 0].detach().float().cpu()
                flat = cam.flatten(1)
                for name, region in regions.items():
                    r = region[start:stop][keep] if region.ndim == 3 else region.expand_as(cam)
                    parts[name]["iou"].append(soft_iou(cam, r))
                    parts[name]["point"].append(r.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0] > 0.5)
                    parts[name]["energy"].append((flat * r.flatten(1)).sum(1) / flat.sum(1).clamp_min(1e-12))
                n += int(keep.sum())
            start = stop
    finally:
        model.train(was_training)
    if n == 0:
        empty = {"soft_iou": float("nan"), "pointing_game": float("nan"), "energy_inside": float("nan"), "n": 0}
        return {name: dict(empty) for name in regions}
    return {name: {"soft_iou": float(torch.cat(p["iou"]).mean()),
                   "pointing_game": float(torch.cat(p["point"]).float().mean()),
                   "energy_inside": float(torch.cat(p["energy"]).mean()), "n": n}
            for name, p in parts.items()}


def check_label_space(spec: Any, space: LabelSpace, checkpoint: str | os.PathLike, root: str | os.PathLike) -> None:
    """Stop with a one-line error when the model of ``checkpoint`` (its :class:`~cocam.checkpoint.ModelSpec`
    ``spec``) predicts other labels than ``space``, the labels of the dataset at ``root``."""
    if tuple(spec.attributes) != space.names:
        raise ValueError(f"checkpoint {checkpoint} predicts {len(spec.attributes)} labels "
                         f"({', '.join(spec.attributes[:4])}{', …' if len(spec.attributes) > 4 else ''}), not the "
                         f"labels of {root}: use it on the dataset it was trained on.")


def evaluate_checkpoints(root: str | os.PathLike, checkpoints: Mapping[str, str | os.PathLike],
                         pairs: Sequence[tuple[str, str]], *, split: str = "test", attention: bool = True,
                         mask_dir: str | os.PathLike | None = "data/masks",
                         device: str | torch.device | None = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The before/after table of several checkpoints on one split of the dataset at ``root``.

    Args:
        checkpoints: model name (e.g. ``"pre-trained"``, ``"fine-tuned"``) → checkpoint path.
        pairs: (A, B) pairs to report.
        attention: add Grad-CAM attention metrics of A on the images with A: against the
            user's mask (``mask …`` columns, from ``mask_dir`` or the built-in region) and, on
            the synthetic dataset, against each image's true evidence region (``truth …``).

    Returns:
        ``(table, long)``: the numbers, :func:`metrics_table` (plus attention columns; format it
        for people with :func:`paper_table`), and their long format (:func:`metrics_long`) with a
        ``model`` column.
    """
    from cocam.checkpoint import load_model
    from cocam.folder import open_dataset
    from cocam.masks import mask_to_input, resolve_mask

    if not checkpoints:
        raise ValueError("No checkpoints to evaluate: train the baseline and fine-tune first "
                         "(or pass at least one name → checkpoint path).")
    try:
        from cocam.synthetic import EvidenceRegions

        regions = EvidenceRegions(root) if attention else None
    except FileNotFoundError:  # real CelebA: no ground truth
        regions = None
    results, attn = {}, []
    dataset: CelebADataset | None = None
    for name, path in checkpoints.items():
        model, spec, _ = load_model(path)
        if dataset is None or dataset.image_size != spec.image_size:
            dataset = open_dataset(root, split, image_size=spec.image_size)
        space = dataset.label_space
        check_label_space(spec, space, path, root)
        results[name] = pair_metrics(predict(model, dataset, device=device), dataset.attributes, pairs,
                                     label_space=space)
        if not attention:
            continue
        for a, _ in pairs:
            positives = dataset.subset({a: 1})
            if len(positives) == 0:
                continue
            mask, _ = resolve_mask(a, mask_dir, view=dataset.mask_view)
            targets = {"mask": mask_to_input(mask, spec.image_size)}
            if regions is not None:
                targets["truth"] = regions.masks(list(positives.names), a, spec.image_size).float()
            scores = attention_scores(model, positives, a, targets, device=device)
            row: dict = {"model": name, "attribute": a}
            for kind, m in scores.items():
                row.update({f"{kind} {k}": v for k, v in m.items() if k != "n"})
            row["n positives"] = scores["mask"]["n"]
            attn.append(row)
    table = metrics_table(results)
    if attn:
        table = table.merge(pd.DataFrame(attn), on=["model", "attribute"], how="left")
    long = metrics_long(table)
    return table, long


def name_checkpoints(items: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Name each checkpoint given as ``NAME=PATH`` or ``PATH`` (the names of the rows of the table).

    ``NAME=PATH`` splits at the first ``=`` (a path that exists as given is never split). A
    bare ``PATH`` is named after its folder (``runs/guided/last.pt`` → ``guided``), the name
    a run folder is known by. When that name is shared — ``runs/kb/best.pt`` and
    ``runs/kb/last.pt`` — each of those checkpoints is named ``<folder>/<file stem>`` instead
    (``kb/best``, ``kb/last``), so no checkpoint replaces another in the table. A name given
    twice, or the same checkpoint given twice, is an error: the table would silently hold one
    of them.
    """
    parsed = []
    for item in items:
        text = os.fspath(item)
        # NAME=PATH splits at the first "=", unless the whole text is an existing file (runs/lr=0.1/last.pt)
        name, sep, path = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        if sep and not name:
            raise ValueError(f"checkpoint {text!r} has an empty name: write NAME=PATH, or just PATH to name it "
                             f"after its folder.")
        if not path:
            raise ValueError(f"checkpoint {text!r} has no path: write NAME=PATH (e.g. guided=runs/guided/last.pt).")
        parsed.append((name or None, Path(path)))
    folders = [p.parent.name or p.stem for n, p in parsed if n is None]
    shared = {f for f in folders if folders.count(f) > 1}
    named: dict[str, Path] = {}
    for name, path in parsed:
        if name is None:
            folder = path.parent.name or path.stem
            name = f"{folder}/{path.stem}" if folder in shared else folder
        if name in named:
            what = "the same checkpoint" if named[name] == path else f"both {named[name]} and {path}"
            raise ValueError(f"two checkpoints are named {name!r} ({what}): give each its own name with "
                             f"NAME=PATH, e.g. {name}-2={path}.")
        named[name] = path
    return named


def results_sidecar(path: str | os.PathLike) -> Path:
    """The provenance file of the results file ``path``: ``<name>.csv`` → ``<name>.json``.

    Raises :class:`ValueError` unless ``path`` ends in ``.csv``: the sidecar must never be the
    results file itself (``res.json``), and a results file must not take another kind of file's
    name (``best.pt``).
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"results are written as CSV: give a file name ending in .csv (e.g. "
                         f"{path.with_suffix('.csv').name}), not {path.name!r}; its provenance goes next to it "
                         f"as <name>.json.")
    return path.with_suffix(".json")


def write_results(path: str | os.PathLike, table: pd.DataFrame,
                  checkpoints: Mapping[str, str | os.PathLike], *, overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``table`` as CSV to ``path`` and its provenance as JSON next to it (``<name>.json``).

    The JSON sidecar holds the library versions (:func:`cocam.checkpoint.versions`) and, for
    each checkpoint, its path and the ``spec``, ``config`` and ``guidance`` it stores. Both files
    are written atomically. ``path`` must end in ``.csv`` (:func:`results_sidecar`), so neither
    file can replace the other. With ``overwrite=False`` an existing results file or sidecar is
    a :class:`FileExistsError` and nothing is written. Returns ``(csv_path, json_path)``.
    """
    import json

    from cocam.checkpoint import load_checkpoint, versions
    from cocam.io import atomic_write_text

    path = Path(path)
    sidecar = results_sidecar(path)
    if not overwrite:
        for existing in (path, sidecar):
            if existing.exists():
                raise FileExistsError(f"{existing} already exists: choose another file name, or pass "
                                      f"overwrite=True to replace it.")
    record: dict = {"results": path.name, "versions": versions(), "checkpoints": {}}
    for name, ckpt in checkpoints.items():
        payload = load_checkpoint(ckpt)
        record["checkpoints"][str(name)] = {"path": os.fspath(ckpt), "spec": payload.get("spec"),
                                            "config": payload.get("config"), "guidance": payload.get("guidance")}
    text = json.dumps(record, indent=2, default=str) + "\n"  # validate before writing anything
    atomic_write_text(path, table.to_csv(index=False))
    atomic_write_text(sidecar, text)
    return path, sidecar


def interval_reading(table: pd.DataFrame, model: str, reference: str, metric: str = "acc_worst_group") -> pd.DataFrame:
    """What one scored model's intervals say against another's, per attribute — and no more.

    ``table`` is :func:`evaluate_checkpoints`' table (one row per model and attribute, with
    ``metric`` and its ``_low``/``_high`` bootstrap bounds over the split's images). The reading
    is ``"higher"`` or ``"lower"`` only when the two 95 % intervals do not overlap, else
    ``"not distinguishable"``. These intervals cover the sampling of the *test images*; they say
    nothing about the randomness of training (initial weights, data order), which only several
    baselines × seeds measure (:func:`cocam.fix.fix_biases`). Returns ``attribute, model,
    reference, difference`` (points) and ``reading``.
    """
    needed = {"model", "attribute", metric, f"{metric}_low", f"{metric}_high"}
    if missing := needed - set(table.columns):
        raise ValueError(f"the table lacks {sorted(missing)}: pass evaluate_checkpoints' table.")
    rows = []
    for attribute, g in table.groupby("attribute", sort=False):
        mine, ref = g[g.model == model], g[g.model == reference]
        if mine.empty or ref.empty:
            raise ValueError(f"the table has no row for {model if mine.empty else reference!r} and {attribute}: "
                             f"models in it are {sorted(set(table.model))}.")
        m, r = mine.iloc[0], ref.iloc[0]
        if m[f"{metric}_low"] > r[f"{metric}_high"]:
            reading = "higher"
        elif m[f"{metric}_high"] < r[f"{metric}_low"]:
            reading = "lower"
        else:
            reading = "not distinguishable"
        rows.append({"attribute": attribute, "model": model, "reference": reference,
                     "difference": 100.0 * (m[metric] - r[metric]), "reading": reading})
    return pd.DataFrame(rows)
