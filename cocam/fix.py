"""Choose for the user: per attribute the guidance that fixes its bias, one model that guides them all.

:func:`fix_biases` is what a user with masks and no time to study the loss zoo runs
(``cocam fix``). It is two passes of :func:`cocam.compare.compare_guidance` over the same
baselines, seeds, steps, learning rate and data order:

1. **Choose, on the validation split.** Every candidate of :data:`CANDIDATES` (the loss, the
   target and the weight), the BCE-only control and the peers are run; for each guided attribute
   the candidate with the largest mean worst-group gain over the control on the *validation*
   split, among those that lose at most ``max_test_drop`` points of validation accuracy, is
   chosen (:func:`cocam.compare.select_settings`). An attribute for which no candidate is
   eligible gets the paper's setting (:data:`PAPER_SETTING`). The best **peer** of each
   attribute (the group-balanced fine-tuning or the last-layer retraining; the random region
   is a control, not a peer) is chosen the same way, by its validation worst group.
2. **One model for all.** A model guiding every attribute with its own chosen loss, target and
   weight (one run per baseline × seed: :data:`FIXED`) is trained and scored.

:func:`fix_biases` then reports, on the **test** split (read, never chosen on), the fixed
model's worst-group accuracy per attribute next to the control and the best peer, with the
per-run (baseline × seed) differences to each and their 95 % t-intervals, and the change of
whole-split accuracy. Nothing is claimed here: whether the intervals exclude zero is in the
numbers (``verdict`` is a view of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cocam.compare import (
    CONTROL,
    PEERS,
    ComparisonConfig,
    compare_guidance,
    run_name,
    select_settings,
    summarize_comparison,
)
from cocam.losses import DEFAULT_GUIDANCE_WEIGHTS
from cocam.masks import resolve_mask
from cocam.train import Guidance

__all__ = ["CANDIDATES", "FIXED", "FixResult", "PAPER_SETTING", "PEER_CHOICES", "choose_per_attribute", "fix_biases",
           "fix_table", "verdict"]

#: The paper's setting: the IoU loss on the Grad-CAM of the positives, at the paper's weight.
PAPER_SETTING: dict[str, Any] = {"loss": "iou", "target": "positive"}

#: What :func:`fix_biases` chooses among per attribute. Small on purpose (each candidate is one
#: fine-tuning run per baseline × seed): the paper's setting, the same at three times its weight
#: (the weight chosen on validation for lipstick in the earlier loss comparisons), and the energy
#: loss at three times its weight on the positives and at its weight on both classes (the target
#: that reaches negative evidence, which the earlier comparisons found cheekbones and double chin
#: respond to; see the README's Results).
CANDIDATES: dict[str, dict[str, Any]] = {
    "iou, positives (paper)": PAPER_SETTING,
    "iou, positives, w_g=3": {"loss": "iou", "target": "positive", "w_g": 3.0},
    "energy, positives, w_g=3": {"loss": "energy", "target": "positive", "w_g": 3.0},
    "energy, both classes": {"loss": "energy", "target": "both"},
}

#: The name of the model that guides every attribute with its chosen setting.
FIXED = "fixed (chosen per attribute)"

#: The peers the fixed model is compared with: what a user holding B's labels would do instead.
PEER_CHOICES: tuple[str, ...] = ("group-balanced", "last layer (DFR)")


@dataclass
class FixResult:
    """What :func:`fix_biases` returns.

    Attributes:
        choice: one row per guided attribute: ``attribute``, the chosen ``setting`` and its
            ``loss``/``target``/``w_g``, ``chosen_on`` (``"valid"``, or ``"default"`` where no
            candidate was eligible), its validation ``gain_worst_group`` and ``test_change``, and
            the ``best_peer`` chosen on validation.
        report: the test split, one row per attribute (:func:`fix_table` shows it):
            ``best_peer`` (its name); ``fixed``, ``control`` and ``peer`` worst-group means with
            ``_low``/``_high``,
            ``gain_vs_control`` and ``gain_vs_peer`` (mean of per-run differences) with intervals,
            ``test_change`` (whole-split accuracy against the control), ``runs``.
        runs, summary: every run and :func:`cocam.compare.summarize_comparison` of them.
        checkpoints: ``(baseline, seed)`` → the fixed model's checkpoint.
    """

    choice: pd.DataFrame
    report: pd.DataFrame
    runs: pd.DataFrame
    summary: pd.DataFrame
    checkpoints: dict[tuple[int, int], Any]


def choose_per_attribute(summary: pd.DataFrame, attributes: tuple[str, ...],
                         candidates: Mapping[str, Mapping[str, Any]], *, peers: tuple[str, ...] = PEER_CHOICES,
                         max_test_drop: float = 1.0) -> pd.DataFrame:
    """:attr:`FixResult.choice` from a comparison's summary: only its ``valid`` rows are read.

    Per attribute, the candidate with the largest validation worst-group gain over the control
    within the accuracy budget (else the paper's setting, ``chosen_on="default"``), and the peer
    of ``peers`` with the highest validation worst-group accuracy.
    """
    valid = summary[summary.split == "valid"]
    try:
        chosen = select_settings(valid[valid.setting.isin(list(candidates))], split="valid",
                                 max_test_drop=max_test_drop).set_index("attribute")
    except ValueError:  # no candidate eligible for any attribute
        chosen = pd.DataFrame(columns=["setting", "gain_worst_group", "test_change"])
    rows = []
    for a in attributes:
        if a in chosen.index:
            name, on = str(chosen.loc[a, "setting"]), "valid"
            gain, change = float(chosen.loc[a, "gain_worst_group"]), float(chosen.loc[a, "test_change"])
        else:
            name, on, gain, change = "iou, positives (paper)", "default", np.nan, np.nan
        kwargs = dict(candidates.get(name, PAPER_SETTING))
        mine = valid[(valid.attribute == a) & valid.setting.isin(peers)]
        best_peer = str(mine.loc[mine.worst_group.idxmax(), "setting"]) if len(mine) else None
        rows.append({"attribute": a, "setting": name, "loss": kwargs["loss"], "target": kwargs.get("target", "positive"),
                     "w_g": kwargs.get("w_g", np.nan), "chosen_on": on, "gain_worst_group": gain,
                     "test_change": change, "best_peer": best_peer})
    return pd.DataFrame(rows)


def _fixed_setting(choice: pd.DataFrame) -> dict[str, Any]:
    """The per-attribute Guidance keywords of the choice (a ``w_g`` of NaN: the loss's default)."""
    w = [DEFAULT_GUIDANCE_WEIGHTS[loss] if pd.isna(w) else float(w) for loss, w in zip(choice.loss, choice.w_g)]
    return {"loss": tuple(choice.loss), "target": tuple(choice.target), "w_g": tuple(w)}


def _paired(runs: pd.DataFrame, a: str, b: str, attribute: str, col: str = "worst_group") -> tuple[float, float, float]:
    """Mean of the per-run (baseline × seed) differences ``a − b`` on the test split, with its interval."""
    summary = summarize_comparison(runs[(runs.split == "test") & (runs.attribute == attribute)
                                        & runs.setting.isin([a, b])], reference=b)
    row = summary[summary.setting == a]
    key = {"worst_group": "gain_worst_group", "test": "test_change"}[col]
    if row.empty or key not in row:
        return np.nan, np.nan, np.nan
    r = row.iloc[0]
    return float(r[key]), float(r[f"{key}_low"]), float(r[f"{key}_high"])


def fix_biases(config: ComparisonConfig, candidates: Mapping[str, Mapping[str, Any]] | None = None, *,
               max_test_drop: float = 1.0, progress: bool = False,
               log: Callable[[str], Any] | None = print) -> FixResult:
    """Choose each attribute's guidance on validation, train one model guiding all, report it on test.

    Args:
        config: the comparison's budget (baselines, seeds, steps, pairs, masks); it must score
            the ``valid`` and ``test`` splits and run the peers of :data:`PEER_CHOICES` it should
            be compared with (``config.peers``; the random region is run too when listed).
        candidates: setting name → :class:`~cocam.train.Guidance` keywords (default
            :data:`CANDIDATES`).
        max_test_drop: the accuracy budget of the choice, in points of validation accuracy.
        progress, log: as in :func:`cocam.compare.compare_guidance`.

    Both passes resume: the first pass's runs are reused by the second, and a finished run is
    never retrained, so a larger budget can be added later.
    """
    if not {"valid", "test"} <= set(config.splits):
        raise ValueError(f"fix chooses on the valid split and reports on test: config.splits must hold both, "
                         f"got {list(config.splits)}.")
    candidates = dict(CANDIDATES if candidates is None else candidates)
    if not candidates:
        raise ValueError("fix needs at least one candidate setting to choose from.")
    if FIXED in candidates:
        raise ValueError(f"{FIXED!r} names the final model, not a candidate: rename it.")
    peer_setting = config.peer_setting if config.peer_setting in candidates else next(iter(candidates))
    config = dataclasses.replace(config, peer_setting=peer_setting)
    attrs = tuple(a for a, _ in config.pairs)
    first = compare_guidance(config, candidates, progress=progress, log=log)
    peers = tuple(p for p in PEER_CHOICES if p in config.peers)
    choice = choose_per_attribute(first.summary, attrs, candidates, peers=peers, max_test_drop=max_test_drop)
    if choice.setting.nunique() == 1 and choice.setting.iloc[0] in candidates:  # one setting for all: that run
        fixed = dict(candidates[choice.setting.iloc[0]])
    else:
        fixed = _fixed_setting(choice)
    second = compare_guidance(config, {**candidates, FIXED: fixed}, progress=progress, log=log)
    runs, summary = second.runs, second.summary

    rows = []
    test = summary[summary.split == "test"].set_index(["setting", "attribute"])
    for _, c in choice.iterrows():
        a = c.attribute
        entry: dict[str, Any] = {"attribute": a, "setting": c.setting, "chosen_on": c.chosen_on,
                                 "best_peer": c.best_peer}
        for label, name in (("fixed", FIXED), ("control", CONTROL), ("peer", c.best_peer)):
            if name is not None and (name, a) in test.index:
                r = test.loc[(name, a)]
                entry |= {label: r.worst_group, f"{label}_low": r.worst_group_low, f"{label}_high": r.worst_group_high}
        entry["runs"] = int(test.loc[(FIXED, a), "seeds"]) if (FIXED, a) in test.index else 0
        entry["gain_vs_control"], entry["gain_vs_control_low"], entry["gain_vs_control_high"] = \
            _paired(runs, FIXED, CONTROL, a)
        if c.best_peer is not None:
            entry["gain_vs_peer"], entry["gain_vs_peer_low"], entry["gain_vs_peer_high"] = \
                _paired(runs, FIXED, c.best_peer, a)
        entry["test_change"], entry["test_change_low"], entry["test_change_high"] = \
            _paired(runs, FIXED, CONTROL, a, "test")
        rows.append(entry)

    masks = tuple(resolve_mask(a, config.mask_dir)[0] for a in attrs)
    stem = run_name(Guidance(attrs, masks, **fixed))
    checkpoints = {(b, s): config.out / f"{'' if b == 0 else f'b{b}_'}{stem}_seed{s}" / "last.pt"
                   for b in config.baseline_seeds for s in config.seeds}
    return FixResult(choice=choice, report=pd.DataFrame(rows), runs=runs, summary=summary, checkpoints=checkpoints)


def _interval(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    if pd.isna(mean):
        return ""
    body = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return body if pd.isna(lo) else f"{body} [{lo:.1f}, {hi:.1f}]"


def verdict(row: Mapping[str, Any]) -> str:
    """A short reading of one report row, stated only as far as the intervals go."""
    parts = []
    for key, who in (("gain_vs_control", "the control"), ("gain_vs_peer", row.get("best_peer") or "the best peer")):
        lo, hi = row.get(f"{key}_low", np.nan), row.get(f"{key}_high", np.nan)
        if pd.isna(lo):
            parts.append(f"vs {who}: too few runs for an interval")
        elif lo > 0:
            parts.append(f"better than {who}")
        elif hi < 0:
            parts.append(f"worse than {who}")
        else:
            parts.append(f"not distinguishable from {who}")
    return "; ".join(parts)


def fix_table(report: pd.DataFrame) -> pd.DataFrame:
    """A readable view of :attr:`FixResult.report`: ``mean [low, high]`` strings and the verdict."""
    out = []
    for _, r in report.iterrows():
        out.append({
            "attribute": r.attribute, "chosen setting": r.setting, "runs": r.runs,
            "fixed worst group %": _interval(r.get("fixed"), r.get("fixed_low"), r.get("fixed_high")),
            "control %": _interval(r.get("control"), r.get("control_low"), r.get("control_high")),
            "best peer": r.best_peer or "",
            "best peer %": _interval(r.get("peer"), r.get("peer_low"), r.get("peer_high")),
            "gain vs control": _interval(r.gain_vs_control, r.gain_vs_control_low, r.gain_vs_control_high, True),
            "gain vs peer": _interval(r.get("gain_vs_peer"), r.get("gain_vs_peer_low"), r.get("gain_vs_peer_high"),
                                      True),
            "accuracy change": _interval(r.test_change, r.test_change_low, r.test_change_high, True),
            "verdict": verdict(r),
        })
    return pd.DataFrame(out)
