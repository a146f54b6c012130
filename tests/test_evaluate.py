"""Tests for cocam.evaluate: predictions, subset accuracies, intervals, the table and attention."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cocam import CELEBA_ATTRIBUTES, UnknownAttributeError, attribute_index
from cocam.checkpoint import ModelSpec
from cocam.dataset import CelebADataset
from cocam.evaluate import (
    attention_metrics,
    attention_scores,
    METRIC_COLUMNS,
    auc_interval,
    bootstrap_interval,
    mann_whitney_auc,
    metrics_long,
    metrics_table,
    pair_accuracy,
    pair_metrics,
    paper_table,
    predict,
)
from cocam.model import SplitModel

A, B = "Wearing_Lipstick", "Heavy_Makeup"


pytestmark = pytest.mark.usefixtures("one_thread")
A2, B2 = "Double_Chin", "Chubby"


def _labels(rows: list[dict[str, int]]) -> pd.DataFrame:
    df = pd.DataFrame(0, index=[f"{i:06d}.jpg" for i in range(len(rows))], columns=list(CELEBA_ATTRIBUTES))
    for i, row in enumerate(rows):
        for k, v in row.items():
            df.iloc[i, df.columns.get_loc(k)] = v
    return df.astype(np.uint8)


# (A, B, logit of A) for eight images; a logit of exactly 0 is a negative prediction.
TABLE = [
    (1, 1, 2.0),   # A∧B    correct
    (1, 1, -1.0),  # A∧B    wrong
    (1, 0, 3.0),   # A∧¬B   correct
    (1, 0, 0.0),   # A∧¬B   wrong (0 is not > 0)
    (1, 0, -2.0),  # A∧¬B   wrong
    (0, 1, 1.0),   # ¬A∧B   wrong
    (0, 1, -1.0),  # ¬A∧B   correct
    (0, 0, -5.0),  # ¬A∧¬B  correct
]


@pytest.fixture
def hand_case() -> tuple[np.ndarray, pd.DataFrame]:
    labels = _labels([{A: a, B: b} for a, b, _ in TABLE])
    logits = np.full((len(TABLE), 40), -3.0, dtype=np.float32)
    logits[:, attribute_index(A)] = [z for _, _, z in TABLE]
    return logits, labels


# --------------------------------------------------------------------------------------------
# pair_accuracy
# --------------------------------------------------------------------------------------------


def test_pair_accuracy_matches_hand_computation(hand_case) -> None:
    logits, labels = hand_case
    df = pair_accuracy(logits, labels, [(A, B)], n_boot=500)
    assert list(df["subset"]) == ["all", "A∧¬B", "¬A∧B", "A∧B", "¬A∧¬B", "worst group", "conflict mean"]
    assert (df["a"] == A).all() and (df["b"] == B).all()
    s = df.set_index("subset")
    expected = {"all": (8, 4 / 8), "A∧¬B": (3, 1 / 3), "¬A∧B": (2, 1 / 2), "A∧B": (2, 1 / 2), "¬A∧¬B": (1, 1.0),
                "worst group": (3, 1 / 3)}
    for subset, (n, acc) in expected.items():
        assert s.loc[subset, "n"] == n, subset
        assert s.loc[subset, "accuracy"] == pytest.approx(acc), subset
        assert s.loc[subset, "ci_low"] <= s.loc[subset, "accuracy"] <= s.loc[subset, "ci_high"], subset
    assert s.loc["worst group", "group"] == "A∧¬B"
    assert (s.loc["¬A∧¬B", "ci_low"], s.loc["¬A∧¬B", "ci_high"]) == (1.0, 1.0)  # one correct image
    # The worst group repeats the size and accuracy of the group it names; its interval is that of
    # the minimum over the groups of each resample, so it lies at or below the named group's.
    assert s.loc["worst group", ["n", "accuracy"]].tolist() == s.loc["A∧¬B", ["n", "accuracy"]].tolist()
    assert s.loc["worst group", "ci_low"] <= s.loc["A∧¬B", "ci_low"]
    assert s.loc["worst group", "ci_high"] <= s.loc["A∧¬B", "ci_high"]
    assert s.loc["conflict mean", "n"] == 5
    assert s.loc["conflict mean", "accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_pair_accuracy_threshold_and_other_logits_are_ignored(hand_case) -> None:
    logits, labels = hand_case
    s = pair_accuracy(logits, labels, [(A, B)], threshold=-1.5, n_boot=100).set_index("subset")
    # Predicted positive now: 2, -1(no), 3, 0, -2(no), 1, -1(no), -5(no) -> correct: 1,0,1,1,0,0,1,1
    assert s.loc["all", "accuracy"] == pytest.approx(5 / 8)
    assert s.loc["A∧¬B", "accuracy"] == pytest.approx(2 / 3)
    # The B logit plays no part in accuracy on A.
    other = logits.copy()
    other[:, attribute_index(B)] = 10.0
    pd.testing.assert_frame_equal(pair_accuracy(other, labels, [(A, B)], n_boot=100),
                                  pair_accuracy(logits, labels, [(A, B)], n_boot=100))


def test_pair_accuracy_several_pairs_and_empty_groups(hand_case) -> None:
    logits, labels = hand_case
    labels = labels.copy()
    labels[A2] = [1, 1, 1, 1, 0, 0, 0, 0]
    labels[B2] = 1  # every image has B2: A2∧¬B2 and ¬A2∧¬B2 are empty
    logits[:, attribute_index(A2)] = [1, 1, -1, -1, -1, -1, -1, 1]
    df = pair_accuracy(logits, labels, [(A, B), (A2, B2)], n_boot=100)
    assert len(df) == 14
    s = df[df["a"] == A2].set_index("subset")
    assert s.loc["A∧¬B", "n"] == 0 and math.isnan(s.loc["A∧¬B", "accuracy"])
    assert math.isnan(s.loc["A∧¬B", "ci_low"]) and math.isnan(s.loc["A∧¬B", "ci_high"])
    assert s.loc["¬A∧¬B", "n"] == 0
    assert s.loc["A∧B", "accuracy"] == pytest.approx(0.5)     # 1, 1, -1, -1 on positives
    assert s.loc["¬A∧B", "accuracy"] == pytest.approx(0.75)   # -1, -1, -1, 1 on negatives
    assert s.loc["worst group", "group"] == "A∧B"  # empty groups are never the worst
    assert s.loc["worst group", "accuracy"] == pytest.approx(0.5)
    assert math.isnan(s.loc["conflict mean", "accuracy"])  # one conflict group is empty: no mean


def test_pair_accuracy_empty_input_gives_nan_not_an_error() -> None:
    df = pair_accuracy(np.zeros((0, 40), np.float32), _labels([]), [(A, B)])
    s = df.set_index("subset")
    assert (s["n"] == 0).all()
    assert s["accuracy"].isna().all()


def test_pair_accuracy_errors(hand_case) -> None:
    logits, labels = hand_case
    with pytest.raises(ValueError, match="predictions"):
        pair_accuracy(logits[:5], labels, [(A, B)])
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        pair_accuracy(logits, labels, [("Wearing_Lipstik", B)])


def test_pair_accuracy_is_deterministic(hand_case) -> None:
    logits, labels = hand_case
    pd.testing.assert_frame_equal(pair_accuracy(logits, labels, [(A, B)], seed=3),
                                  pair_accuracy(logits, labels, [(A, B)], seed=3))


# --------------------------------------------------------------------------------------------
# bootstrap_interval
# --------------------------------------------------------------------------------------------


def _bernoulli(n: int, p: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.int64)


@pytest.mark.parametrize("n", [7, 50, 400, 6000])
def test_bootstrap_interval_contains_the_mean(n: int) -> None:
    x = _bernoulli(n, 0.7)
    lo, hi = bootstrap_interval(x)
    assert 0.0 <= lo <= x.mean() <= hi <= 1.0
    assert lo < hi


def test_bootstrap_interval_shrinks_with_n() -> None:
    widths = []
    for n in (20, 200, 2000, 20000):
        x = np.r_[np.ones(int(0.7 * n)), np.zeros(n - int(0.7 * n))]  # exactly 70 % at every n
        lo, hi = bootstrap_interval(x, n_boot=1000)
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    # ~ 2 * 1.96 * sqrt(p (1 - p) / n) for large n
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 20000), rel=0.15)


def test_bootstrap_interval_level() -> None:
    x = _bernoulli(300, 0.4)
    lo95, hi95 = bootstrap_interval(x, level=0.95)
    lo50, hi50 = bootstrap_interval(x, level=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95
    assert hi50 - lo50 < hi95 - lo95


def test_bootstrap_interval_empty_and_constant() -> None:
    lo, hi = bootstrap_interval(np.array([]))
    assert math.isnan(lo) and math.isnan(hi)
    assert bootstrap_interval(np.ones(30)) == (1.0, 1.0)
    assert bootstrap_interval(np.zeros(30, dtype=bool)) == (0.0, 0.0)


@pytest.mark.parametrize("n", [100, 8000])
def test_bootstrap_interval_deterministic_by_seed(n: int) -> None:
    x = _bernoulli(n, 0.5, seed=1)
    assert bootstrap_interval(x, seed=5) == bootstrap_interval(x, seed=5)
    assert any(bootstrap_interval(x, seed=5) != bootstrap_interval(x, seed=s) for s in range(6, 12))
    assert bootstrap_interval(list(x), seed=5) == bootstrap_interval(x, seed=5)


# --------------------------------------------------------------------------------------------
# paper_table
# --------------------------------------------------------------------------------------------

PAPER_COLUMNS = ["attribute", "shortcut", "model", "worst group %", "worst group 95% CI", "worst group",
                 "conflict mean %", "conflict mean 95% CI", "test %", "conflict A∧¬B %", "conflict 95% CI",
                 "n conflict", "reverse ¬A∧B %", "reverse 95% CI", "n reverse", "AUC within B", "AUC within ¬B",
                 "n test"]


def test_paper_table_layout(hand_case) -> None:
    logits, labels = hand_case
    labels = labels.copy()
    labels[A2] = [1, 0, 1, 0, 1, 0, 1, 0]
    labels[B2] = [1, 1, 0, 0, 1, 1, 0, 0]
    before = pair_metrics(logits, labels, [(A, B), (A2, B2)], n_boot=200)
    better = logits.copy()
    better[:, attribute_index(A)] = [1, 1, 1, 1, 1, -1, -1, -1]  # all correct
    after = pair_metrics(better, labels, [(A, B), (A2, B2)], n_boot=200)
    table = paper_table({"pre-trained": before, "fine-tuned": after})
    assert list(table.columns) == PAPER_COLUMNS
    assert list(zip(table["attribute"], table["model"])) == [
        (A, "pre-trained"), (A, "fine-tuned"), (A2, "pre-trained"), (A2, "fine-tuned")]
    assert list(table["shortcut"]) == [B, B, B2, B2]
    row = table.iloc[0]
    assert row["test %"] == pytest.approx(50.0)
    assert row["conflict A∧¬B %"] == pytest.approx(100 / 3)
    assert row["reverse ¬A∧B %"] == pytest.approx(50.0)
    assert row["worst group %"] == pytest.approx(100 / 3) and row["worst group"] == "A∧¬B"
    assert row["conflict mean %"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert row["AUC within B"] == pytest.approx(0.625) and row["AUC within ¬B"] == 1.0
    assert row["n conflict"] == 3 and row["n reverse"] == 2 and row["n test"] == 8
    lo, hi = before.set_index("a").loc[A, ["acc_a_not_b_low", "acc_a_not_b_high"]]
    assert row["conflict 95% CI"] == f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    lo, hi = before.set_index("a").loc[A, ["acc_worst_group_low", "acc_worst_group_high"]]
    assert row["worst group 95% CI"] == f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    fine = table.iloc[1]
    assert fine["test %"] == 100.0 and fine["worst group %"] == 100.0
    assert fine["conflict 95% CI"] == "[100.0, 100.0]" and fine["worst group 95% CI"] == "[100.0, 100.0]"
    # The same view from the tidy frame of numbers.
    pd.testing.assert_frame_equal(paper_table(metrics_table({"pre-trained": before, "fine-tuned": after})), table)
    # pair_accuracy's long format gives the same view, without the AUCs it does not hold.
    from_long = paper_table({"pre-trained": pair_accuracy(logits, labels, [(A, B), (A2, B2)], n_boot=200)})
    auc = ["AUC within B", "AUC within ¬B"]
    assert from_long[auc].isna().all().all()
    pd.testing.assert_frame_equal(from_long.drop(columns=auc), table.iloc[[0, 2]].drop(columns=auc).reset_index(drop=True))
    with pytest.raises(ValueError, match="model"):
        metrics_table(before)


# --------------------------------------------------------------------------------------------
# pair_metrics: the headline that cannot be gamed, AUC, intervals
# --------------------------------------------------------------------------------------------


def _brute_force_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, ½ on a tie."""
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_pair_metrics_hand_computation(hand_case) -> None:
    logits, labels = hand_case
    m = pair_metrics(logits, labels, [(A, B)], n_boot=500)
    assert list(m.columns) == list(METRIC_COLUMNS)
    r = m.iloc[0]
    assert (r["a"], r["b"]) == (A, B)
    for key, (n, acc) in {"ab": (2, 1 / 2), "a_not_b": (3, 1 / 3), "not_a_b": (2, 1 / 2),
                          "not_a_not_b": (1, 1.0), "all": (8, 4 / 8)}.items():
        assert r[f"n_{key}"] == n and r[f"acc_{key}"] == pytest.approx(acc), key
        assert r[f"acc_{key}_low"] <= r[f"acc_{key}"] <= r[f"acc_{key}_high"], key
    assert r["worst_group"] == "a_not_b" and r["acc_worst_group"] == pytest.approx(1 / 3)
    assert r["acc_conflict_mean"] == pytest.approx(5 / 12)
    # Within B: positives A∧B score 2, -1; negatives ¬A∧B 1, -1 → (1 + 1 + 0 + ½) / 4.
    assert r["auc_within_b"] == pytest.approx(0.625)
    # Within ¬B: positives 3, 0, -2 all above the one negative -5.
    assert r["auc_within_not_b"] == 1.0
    assert r["auc_within_b_low"] <= r["auc_within_b"] <= r["auc_within_b_high"]
    # Numbers, not strings: every metric column is a float or an int.
    numeric = [c for c in METRIC_COLUMNS if c not in ("a", "b", "worst_group")]
    assert all(pd.api.types.is_numeric_dtype(m[c]) for c in numeric)
    assert not any("%" in c or " " in c for c in METRIC_COLUMNS)


def test_always_predicting_a_games_the_paper_column_but_not_the_headline(hand_case) -> None:
    """A model that says "A" for every image is perfect on the paper's A∧¬B and useless on ¬A."""
    logits, labels = hand_case
    always = logits.copy()
    always[:, attribute_index(A)] = 5.0
    r = pair_metrics(always, labels, [(A, B)], n_boot=200).iloc[0]
    assert r["acc_a_not_b"] == 1.0 and r["acc_a_not_b_low"] == 1.0
    assert r["acc_not_a_b"] == 0.0 and r["acc_not_a_not_b"] == 0.0
    assert r["acc_worst_group"] == 0.0 and r["acc_worst_group_high"] == 0.0
    assert r["worst_group"] == "not_a_b"  # the first of the tied groups in GROUPS order
    assert r["acc_conflict_mean"] == 0.5
    assert r["auc_within_b"] == 0.5 and r["auc_within_not_b"] == 0.5  # a constant score ranks nothing
    table = paper_table({"always A": pair_metrics(always, labels, [(A, B)], n_boot=200)}).iloc[0]
    assert table["conflict A∧¬B %"] == 100.0 and table["worst group %"] == 0.0
    assert table["reverse ¬A∧B %"] == 0.0 and table["conflict mean %"] == 50.0


def test_auc_does_not_move_with_the_threshold(hand_case) -> None:
    logits, labels = hand_case
    m0 = pair_metrics(logits, labels, [(A, B)], n_boot=50).iloc[0]
    m1 = pair_metrics(logits, labels, [(A, B)], n_boot=50, threshold=-1.5).iloc[0]
    assert m1["acc_a_not_b"] > m0["acc_a_not_b"]  # more positives predicted: the paper's column rises
    for c in ("auc_within_b", "auc_within_not_b", "auc_within_b_low", "auc_within_b_high"):
        assert m1[c] == m0[c], c
    assert m1["threshold"] == -1.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_auc_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = rng.integers(-3, 4, 37).astype(float)  # small integer scores: many ties
    neg = rng.integers(-4, 3, 23).astype(float)
    assert mann_whitney_auc(pos, neg) == pytest.approx(_brute_force_auc(pos, neg), abs=1e-12)
    cont_pos, cont_neg = rng.normal(0.5, 1, 50), rng.normal(0, 1, 40)
    assert mann_whitney_auc(cont_pos, cont_neg) == pytest.approx(_brute_force_auc(cont_pos, cont_neg), abs=1e-12)
    try:  # the reference implementation, where it is installed (the brute force above always runs)
        from sklearn.metrics import roc_auc_score
    except ImportError:
        roc_auc_score = None
    if roc_auc_score is not None:
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        assert mann_whitney_auc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos, neg]), abs=1e-12)
    assert math.isnan(mann_whitney_auc(pos, []))
    assert mann_whitney_auc([1.0], [1.0]) == 0.5


def test_pair_metrics_auc_matches_brute_force_on_random_labels() -> None:
    rng = np.random.default_rng(4)
    n = 60
    ya, yb = rng.integers(0, 2, n), rng.integers(0, 2, n)
    labels = _labels([{A: int(a), B: int(b)} for a, b in zip(ya, yb)])
    logits = np.zeros((n, 40), np.float32)
    logits[:, attribute_index(A)] = np.round(rng.normal(ya - 0.5, 1.0), 1)  # rounded: ties
    r = pair_metrics(logits, labels, [(A, B)], n_boot=100).iloc[0]
    z = logits[:, attribute_index(A)].astype(np.float64)
    for name, side in (("auc_within_b", yb == 1), ("auc_within_not_b", yb == 0)):
        assert r[name] == pytest.approx(_brute_force_auc(z[side & (ya == 1)], z[side & (ya == 0)]), abs=1e-12)


def test_auc_interval_is_delongs_from_brute_force_components() -> None:
    rng = np.random.default_rng(5)
    pos, neg = rng.integers(-2, 4, 30).astype(float), rng.integers(-3, 2, 25).astype(float)  # ties
    v10 = np.array([np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for q in neg]) for p in pos])
    v01 = np.array([np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos]) for q in neg])
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    auc = _brute_force_auc(pos, neg)
    lo, hi = auc_interval(pos, neg)
    assert (lo, hi) == pytest.approx((max(0.0, auc - 1.959963984540054 * se), min(1.0, auc + 1.959963984540054 * se)),
                                     abs=1e-12)
    assert auc_interval(pos, neg, level=0.5)[1] - auc_interval(pos, neg, level=0.5)[0] < hi - lo
    assert all(math.isnan(v) for v in auc_interval(pos[:1], neg))
    assert auc_interval(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == (1.0, 1.0)  # perfectly separated


def test_auc_interval_matches_a_stratified_bootstrap() -> None:
    """DeLong's standard error is the bootstrap's to first order. Tolerance: with 4,000 replicates the
    bootstrap's SD has a Monte Carlo error of about 1/√(2·4000) ≈ 1.1 %, and the first-order term
    differs from the exact resampling variance by O(1/n) ≈ 0.5 % here; 10 % is several times both."""
    rng = np.random.default_rng(11)
    pos, neg = rng.normal(0.8, 1.0, 200), rng.normal(0.0, 1.0, 200)
    boot = np.array([mann_whitney_auc(pos[rng.integers(0, 200, 200)], neg[rng.integers(0, 200, 200)])
                     for _ in range(4000)])
    lo, hi = auc_interval(pos, neg)
    assert (hi - lo) / (2 * 1.959963984540054) == pytest.approx(boot.std(ddof=1), rel=0.10)


def test_worst_group_interval_is_the_minimum_of_the_same_resamples() -> None:
    """Two groups of equal accuracy: the minimum of two independent draws lies below either one,
    so the worst group's interval is lower than each group's own (a per-group interval would not be)."""
    rows = [{A: 1, B: 0}] * 100 + [{A: 0, B: 1}] * 100 + [{A: 1, B: 1}] * 100 + [{A: 0, B: 0}] * 100
    labels = _labels(rows)
    logits = np.zeros((400, 40), np.float32)
    ya = labels[A].to_numpy()
    z = np.where(ya == 1, 1.0, -1.0)
    for start in (0, 100):  # half of each conflict group wrong
        z[start:start + 50] *= -1
    logits[:, attribute_index(A)] = z
    r = pair_metrics(logits, labels, [(A, B)], n_boot=2000).iloc[0]
    assert r["acc_a_not_b"] == r["acc_not_a_b"] == 0.5 == r["acc_worst_group"]
    assert r["acc_worst_group_high"] < min(r["acc_a_not_b_high"], r["acc_not_a_b_high"])
    assert r["acc_worst_group_low"] < min(r["acc_a_not_b_low"], r["acc_not_a_b_low"])
    # The conflict mean of 200 images is tighter than either group of 100.
    width = r["acc_conflict_mean_high"] - r["acc_conflict_mean_low"]
    assert width < r["acc_a_not_b_high"] - r["acc_a_not_b_low"]
    assert r["acc_conflict_mean_low"] < 0.5 < r["acc_conflict_mean_high"]


def test_pair_metrics_long_view_and_arguments(hand_case) -> None:
    logits, labels = hand_case
    m = pair_metrics(logits, labels, [(A, B)], n_boot=300, seed=2)
    long = metrics_long(m).set_index("subset")
    for subset, stem in (("A∧¬B", "a_not_b"), ("worst group", "worst_group"), ("all", "all")):
        assert long.loc[subset, "accuracy"] == m.iloc[0][f"acc_{stem}"]
        assert long.loc[subset, "ci_low"] == m.iloc[0][f"acc_{stem}_low"]
    pd.testing.assert_frame_equal(pair_accuracy(logits, labels, [(A, B)], n_boot=300, seed=2), metrics_long(m))
    none = pair_metrics(logits, labels, [(A, B)], n_boot=0).iloc[0]
    assert none["acc_a_not_b"] == pytest.approx(1 / 3) and math.isnan(none["acc_a_not_b_low"])
    with pytest.raises(ValueError, match="n_boot"):
        pair_metrics(logits, labels, [(A, B)], n_boot=-1)
    with pytest.raises(ValueError, match="level"):
        pair_metrics(logits, labels, [(A, B)], level=1.5)


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_split(synthetic_root) -> CelebADataset:
    return CelebADataset(synthetic_root, "test", image_size=64, progress=False)


@pytest.fixture(scope="module")
def small_model() -> SplitModel:
    torch.manual_seed(0)
    return ModelSpec(image_size=64, hidden=32).build()


@pytest.mark.parametrize("training", [True, False])
def test_predict_restores_mode_and_matches_the_model(test_split, small_model, training: bool) -> None:
    small_model.train(training)
    logits = predict(small_model, test_split, batch_size=24, device="cpu")
    assert small_model.training is training
    assert logits.shape == (len(test_split), 40) and logits.dtype == np.float32
    x = torch.stack([test_split[i][0] for i in range(len(test_split))])
    small_model.eval()
    with torch.no_grad():
        expected = small_model(x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # In eval mode there is no dropout: the batch size does not matter.
    np.testing.assert_allclose(predict(small_model, test_split, batch_size=5, device="cpu"), logits,
                               rtol=1e-5, atol=1e-5)


def test_predict_empty_dataset(test_split, small_model) -> None:
    empty = test_split.subset_names([])
    out = predict(small_model, empty, device="cpu")
    assert out.shape == (0, 40)


def test_predict_restores_mode_after_an_error(test_split) -> None:
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = SplitModel(Broken(), nn.Identity(), num_outputs=40)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        predict(model, test_split, device="cpu")
    assert model.training


# --------------------------------------------------------------------------------------------
# attention_metrics on a hand-built case
# --------------------------------------------------------------------------------------------

S = 8


class _PixelsAsActivation(nn.Module):
    """Undo the ImageNet normalisation of channel 0: the activation is the red channel / 255."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x[:, :1] * 0.229 + 0.485)


def _cam_model() -> SplitModel:
    """A model whose Grad-CAM of any attribute is the red channel / 255 (min is 0, max is 1).

    The head averages the single activation channel and gives it weight 1 in every logit, so
    the Grad-CAM channel weight is positive and the normalised CAM is the activation itself.
    """
    linear = nn.Linear(1, 40)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.zero_()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    return SplitModel(_PixelsAsActivation(), head, num_outputs=40)


class _FakeDataset:
    """The parts of CelebADataset that attention_metrics and iterate_batches read."""

    def __init__(self, red: np.ndarray, positive: list[int]) -> None:
        n = len(red)
        self.pixels = np.zeros((n, S, S, 3), np.uint8)
        self.pixels[..., 0] = red
        self.targets = np.zeros((n, 40), np.float32)
        self.targets[:, attribute_index(A)] = positive
        self.image_size = S

    def __len__(self) -> int:
        return len(self.pixels)

    def get_batch_numpy(self, idx):
        idx = np.asarray(idx)
        return self.pixels[idx], self.targets[idx], np.zeros((len(idx), 5, 2), np.float32)


def _hand_dataset() -> _FakeDataset:
    red = np.zeros((5, S, S), np.uint8)
    # image 0 (positive): peak 1.0 at (0, 0), 0.2 at (1, 1): both inside the region
    red[0, 0, 0], red[0, 1, 1] = 255, 51
    # image 1 (negative): peak at (7, 0)
    red[1, 7, 0], red[1, 7, 1] = 255, 51
    # image 2 (positive): peak 1.0 at (6, 6) outside, 0.2 at (2, 2) inside
    red[2, 6, 6], red[2, 2, 2] = 255, 51
    # image 3 (positive): 0.2 on rows 0-3, peak 1.0 at (3, 5) outside the region's columns
    red[3, :4, :] = 51
    red[3, 3, 5] = 255
    # image 4 (negative): peak at (0, 3) inside
    red[4, 0, 3] = 255
    return _FakeDataset(red, positive=[1, 0, 1, 1, 0])


def _region() -> torch.Tensor:
    r = torch.zeros(S, S)
    r[:4, :4] = 1.0
    return r


def test_attention_model_cam_is_the_red_channel() -> None:
    from cocam.gradcam import grad_cam

    ds = _hand_dataset()
    x = torch.from_numpy(ds.pixels).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    cams = grad_cam(_cam_model(), x, A, output_size=S).cams[:, 0]
    torch.testing.assert_close(cams, torch.from_numpy(ds.pixels[..., 0]).float() / 255, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [64, 2])
def test_attention_metrics_hand_numbers(batch_size: int) -> None:
    model = _cam_model().train()
    m = attention_metrics(model, _hand_dataset(), A, _region(), batch_size=batch_size, device="cpu")
    assert model.training  # mode restored
    # soft IoU: image 0: I=1.2, U=1.2+16-1.2=16; image 2: I=0.2, U=1.2+16-0.2=17;
    #           image 3: I=16*0.2=3.2, U=7.2+16-3.2=20
    assert m["n"] == 3
    assert m["soft_iou"] == pytest.approx((1.2 / 16 + 0.2 / 17 + 3.2 / 20) / 3, rel=1e-4)
    assert m["pointing_game"] == pytest.approx(1 / 3)
    assert m["energy_inside"] == pytest.approx((1.2 / 1.2 + 0.2 / 1.2 + 3.2 / 7.2) / 3, rel=1e-4)


def test_attention_metrics_all_images() -> None:
    m = attention_metrics(_cam_model(), _hand_dataset(), A, _region(), batch_size=3, device="cpu",
                          positives_only=False)
    # image 1: I=0, U=17.2, peak outside, energy 0; image 4: I=1, U=16, peak (0, 3) inside, energy 1
    assert m["n"] == 5
    assert m["soft_iou"] == pytest.approx((1.2 / 16 + 0 + 0.2 / 17 + 3.2 / 20 + 1 / 16) / 5, rel=1e-4)
    assert m["pointing_game"] == pytest.approx(2 / 5)
    assert m["energy_inside"] == pytest.approx((1 + 0 + 1 / 6 + 4 / 9 + 1) / 5, rel=1e-4)


@pytest.mark.parametrize("batch_size", [64, 2])
def test_attention_metrics_per_image_soft_regions(batch_size: int) -> None:
    regions = torch.zeros(5, S, S)
    regions[0, :4, :4] = 1.0
    regions[0, 0, 0] = 0.5  # the peak sits on a half-covered pixel: not "inside" (> 0.5 needed)
    regions[2, 4:, 4:] = 1.0  # around image 2's peak
    regions[3] = 1.0
    m = attention_metrics(_cam_model(), _hand_dataset(), A, regions, batch_size=batch_size, device="cpu")
    # image 0: I = 0.5 + 0.2 = 0.7, U = 1.2 + 15.5 - 0.7 = 16; energy 0.7 / 1.2; no hit
    # image 2: I = 1, U = 1.2 + 16 - 1 = 16.2; energy 1 / 1.2; hit
    # image 3: I = 7.2, U = 64; energy 1; hit
    assert m["n"] == 3
    assert m["soft_iou"] == pytest.approx((0.7 / 16 + 1 / 16.2 + 7.2 / 64) / 3, rel=1e-4)
    assert m["pointing_game"] == pytest.approx(2 / 3)
    assert m["energy_inside"] == pytest.approx((0.7 / 1.2 + 1 / 1.2 + 1) / 3, rel=1e-4)


def test_attention_scores_one_pass_equals_separate_calls(monkeypatch) -> None:
    import cocam.evaluate as ev

    calls = []
    real = ev.grad_cam
    monkeypatch.setattr(ev, "grad_cam", lambda *a, **k: calls.append(1) or real(*a, **k))
    per_image = torch.zeros(5, S, S)
    per_image[:, 4:, 4:] = 1.0
    both = attention_scores(_cam_model(), _hand_dataset(), A, {"mask": _region(), "truth": per_image},
                            batch_size=64, device="cpu")
    assert len(calls) == 1  # one Grad-CAM pass for both regions
    assert both["mask"] == attention_metrics(_cam_model(), _hand_dataset(), A, _region(), device="cpu")
    assert both["truth"] == attention_metrics(_cam_model(), _hand_dataset(), A, per_image, device="cpu")


def test_attention_metrics_no_positives_and_bad_regions() -> None:
    ds = _hand_dataset()
    ds.targets[:] = 0
    m = attention_metrics(_cam_model(), ds, A, _region(), device="cpu")
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in ("soft_iou", "pointing_game", "energy_inside"))
    with pytest.raises(ValueError, match="5 images"):
        attention_metrics(_cam_model(), _hand_dataset(), A, torch.zeros(4, S, S), device="cpu")
    with pytest.raises(UnknownAttributeError):
        attention_metrics(_cam_model(), _hand_dataset(), "Lipstick", _region(), device="cpu")


def test_attention_metrics_uses_grad_cam_of_the_attribute(monkeypatch) -> None:
    """With grad_cam replaced by a known CAM, the metrics are computed from that CAM."""
    import cocam.evaluate as ev
    from cocam.gradcam import GradCAMResult

    seen = []

    def fake_grad_cam(model, images, targets, *, output_size=None, **kwargs):
        seen.append((targets, output_size, len(images)))
        cams = torch.zeros(len(images), 1, S, S)
        cams[:, 0, 0, :] = 1.0  # the top row: 4 of its 8 pixels are in the region
        z = torch.zeros(len(images), 1)
        return GradCAMResult(cams, cams, z, z, z, (targets,))

    monkeypatch.setattr(ev, "grad_cam", fake_grad_cam)
    m = attention_metrics(_cam_model(), _hand_dataset(), A, _region(), device="cpu")
    assert seen == [(attribute_index(A), S, 3)]
    assert m["soft_iou"] == pytest.approx(4 / 20)  # I = 4, U = 8 + 16 - 4
    assert m["pointing_game"] == 1.0
    assert m["energy_inside"] == pytest.approx(0.5)


def test_interval_reading_says_only_what_the_intervals_do() -> None:
    from cocam.evaluate import interval_reading

    def row(model, attribute, acc, lo, hi):
        return dict(model=model, attribute=attribute, acc_worst_group=acc, acc_worst_group_low=lo,
                    acc_worst_group_high=hi)

    table = pd.DataFrame([row("g", "A", 0.50, 0.45, 0.55), row("c", "A", 0.30, 0.25, 0.35),   # apart: higher
                          row("g", "B", 0.20, 0.15, 0.25), row("c", "B", 0.40, 0.35, 0.45),   # apart: lower
                          row("g", "C", 0.40, 0.30, 0.50), row("c", "C", 0.35, 0.28, 0.42)])  # overlap
    reading = interval_reading(table, "g", "c").set_index("attribute")
    assert reading.reading.to_dict() == {"A": "higher", "B": "lower", "C": "not distinguishable"}
    assert reading.loc["A", "difference"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="no row for 'x'"):
        interval_reading(table, "x", "c")


def test_attention_metrics_take_the_cam_method(monkeypatch) -> None:
    """``cam_method`` reaches ``grad_cam`` (default Grad-CAM); an unknown name fails before any work."""
    import cocam.evaluate as ev
    from cocam.cams import UnknownCamMethodError

    methods = []
    real = ev.grad_cam
    monkeypatch.setattr(ev, "grad_cam", lambda *a, **k: methods.append(k.get("method")) or real(*a, **k))
    attention_metrics(_cam_model(), _hand_dataset(), A, _region(), device="cpu")
    layer = attention_metrics(_cam_model(), _hand_dataset(), A, _region(), device="cpu", cam_method="layercam")
    assert methods == ["gradcam", "layercam"] and layer["n"] == 3
    with pytest.raises(UnknownCamMethodError, match="gradcam, gradcam\\+\\+, layercam"):
        attention_metrics(_cam_model(), _hand_dataset(), A, _region(), device="cpu", cam_method="cam")
    assert len(methods) == 2
