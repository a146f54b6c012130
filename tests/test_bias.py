"""Tests for cocam.bias: model-side bias discovery over attribute pairs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cocam.attributes import CELEBA_ATTRIBUTES, UnknownAttributeError, attribute_index
from cocam.bias import BIAS_COLUMNS, rank_biases

A, B = "Wearing_Lipstick", "Heavy_Makeup"

# (A label, B label, logit of A) for 12 images: the four groups of the hand computation below
HAND = [
    (1, 1, 2.0), (1, 1, 1.0), (1, 1, -1.0), (1, 1, 3.0),  # A∧B: predicted 1, 1, 0, 1
    (1, 0, -2.0), (1, 0, 0.5), (1, 0, -0.5),  # A∧¬B: predicted 0, 1, 0
    (0, 1, 1.0), (0, 1, -1.0), (0, 1, -2.0),  # ¬A∧B: predicted 1, 0, 0
    (0, 0, -3.0), (0, 0, -1.0),  # ¬A∧¬B: predicted 0, 0
]


def _hand_example() -> tuple[np.ndarray, pd.DataFrame]:
    labels = pd.DataFrame(0, index=range(len(HAND)), columns=list(CELEBA_ATTRIBUTES), dtype=np.uint8)
    logits = np.full((len(HAND), 40), -5.0)
    for i, (a, b, z) in enumerate(HAND):
        labels.loc[i, A], labels.loc[i, B] = a, b
        logits[i, attribute_index(A)] = z
    return logits, labels


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_hand_computed_pair() -> None:
    logits, labels = _hand_example()
    out = rank_biases(logits, labels, attributes=[A], candidates=[B], min_group=1, n_boot=0)
    assert list(out.columns) == list(BIAS_COLUMNS) and len(out) == 1
    row = out.iloc[0]
    assert (row["a"], row["b"]) == (A, B)
    assert (row["n_ab"], row["n_a_not_b"], row["n_not_a_b"], row["n_not_a_not_b"]) == (4, 3, 3, 2)
    assert row["acc_ab"] == pytest.approx(3 / 4)
    assert row["acc_a_not_b"] == pytest.approx(1 / 3)
    assert row["gap"] == pytest.approx(3 / 4 - 1 / 3)
    assert row["acc_not_a_b"] == pytest.approx(2 / 3)
    assert row["acc_not_a_not_b"] == pytest.approx(1.0)
    assert row["reverse_gap"] == pytest.approx(1 - 2 / 3)
    mean_ab = sum(map(_sigmoid, [2.0, 1.0, -1.0, 3.0])) / 4
    mean_a_not_b = sum(map(_sigmoid, [-2.0, 0.5, -0.5])) / 3
    assert row["mean_p_ab"] == pytest.approx(mean_ab)
    assert row["mean_p_a_not_b"] == pytest.approx(mean_a_not_b)
    assert row["bias_score"] == pytest.approx(mean_ab / mean_a_not_b)
    assert row["p_b_given_a"] == pytest.approx(4 / 7)
    assert np.isnan(row["gap_low"]) and np.isnan(row["gap_high"])  # n_boot=0: no interval


def test_inputs_in_other_forms_give_the_same_result() -> None:
    logits, labels = _hand_example()
    ref = rank_biases(logits, labels, attributes=[A], candidates=[B], min_group=1, seed=3)
    shuffled = labels[list(reversed(labels.columns))]  # columns are read by name
    celeba_signs = labels.astype(np.int64) * 2 - 1  # CelebA's -1/1 encoding
    for lg, lb in ((torch.from_numpy(logits).float(), labels), (logits, shuffled), (logits, celeba_signs)):
        pd.testing.assert_frame_equal(rank_biases(lg, lb, attributes=A, candidates=B, min_group=1, seed=3), ref,
                                      check_exact=False, rtol=1e-6)


def test_min_group_filters_pairs_and_reverse_columns() -> None:
    logits, labels = _hand_example()
    kept = rank_biases(logits, labels, attributes=[A], candidates=[B], min_group=3, n_boot=0)
    assert len(kept) == 1  # A∧B = 4 and A∧¬B = 3 images
    assert np.isnan(kept.loc[0, "acc_not_a_not_b"]) and np.isnan(kept.loc[0, "reverse_gap"])  # ¬A∧¬B = 2 < 3
    assert kept.loc[0, "gap"] == pytest.approx(3 / 4 - 1 / 3)
    assert rank_biases(logits, labels, attributes=[A], candidates=[B], min_group=4, n_boot=0).empty
    # every other B has no positive at all in this example: never reported, nor B = A
    every = rank_biases(logits, labels, attributes=[A], min_group=1, n_boot=0)
    assert list(every["b"]) == [B]


def test_bootstrap_interval_matches_resampling_within_groups() -> None:
    rng = np.random.default_rng(5)
    n = 400
    labels = pd.DataFrame(0, index=range(n), columns=list(CELEBA_ATTRIBUTES), dtype=np.uint8)
    labels[A] = (rng.random(n) < 0.6).astype(np.uint8)
    labels[B] = (rng.random(n) < 0.5).astype(np.uint8)
    logits = rng.normal(size=(n, 40)) + 0.8 * labels[B].to_numpy()[:, None]
    row = rank_biases(logits, labels, attributes=[A], candidates=[B], n_boot=4000, seed=1).iloc[0]

    # brute force: resample the images of each group with replacement, recompute both recalls
    hit = logits[:, attribute_index(A)] > 0
    ya, yb = labels[A].to_numpy() > 0, labels[B].to_numpy() > 0
    g1, g2 = hit[ya & yb], hit[ya & ~yb]
    boot = np.random.default_rng(2)
    gaps = (g1[boot.integers(0, g1.size, (4000, g1.size))].mean(1)
            - g2[boot.integers(0, g2.size, (4000, g2.size))].mean(1))
    low, high = np.quantile(gaps, [0.025, 0.975])
    assert row["gap"] == pytest.approx(g1.mean() - g2.mean())
    assert row["gap_low"] == pytest.approx(low, abs=0.02) and row["gap_high"] == pytest.approx(high, abs=0.02)
    assert row["gap_low"] < row["gap"] < row["gap_high"]
    again = rank_biases(logits, labels, attributes=[A], candidates=[B], n_boot=4000, seed=1).iloc[0]
    assert (again["gap_low"], again["gap_high"]) == (row["gap_low"], row["gap_high"])  # seeded


def test_injected_shortcut_ranks_first() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random((n, 40)) < rng.uniform(0.15, 0.6, 40)).astype(np.uint8)
    labels = pd.DataFrame(y, columns=list(CELEBA_ATTRIBUTES))
    logits = 3.0 * (2.0 * y - 1.0) + rng.normal(0, 1.0, (n, 40))  # a good, unbiased model ...
    logits[:, attribute_index(A)] = 4.0 * (2.0 * y[:, attribute_index(B)] - 1.0)  # ... but A is predicted as B
    out = rank_biases(logits, labels)
    assert len(out) == 40 * 39  # every pair is large enough here
    top = out.iloc[0]
    assert (top["a"], top["b"]) == (A, B)
    assert top["acc_ab"] == 1.0 and top["acc_a_not_b"] == 0.0 and top["gap"] == 1.0
    assert top["acc_not_a_b"] == 0.0 and top["reverse_gap"] == 1.0
    assert top["bias_score"] == pytest.approx(_sigmoid(4.0) / _sigmoid(-4.0))  # = e^4
    assert out["gap"].is_monotonic_decreasing
    assert out.iloc[1]["gap"] < 0.2  # nothing else comes close


def test_errors_name_the_problem() -> None:
    logits, labels = _hand_example()
    with pytest.raises(UnknownAttributeError, match="Did you mean 'Wearing_Lipstick'"):
        rank_biases(logits, labels, attributes=["Wearing_Lipstik"])
    with pytest.raises(UnknownAttributeError):
        rank_biases(logits, labels, candidates=["Heavy Makeup"])
    with pytest.raises(ValueError, match=r"\(N, 40\)"):
        rank_biases(logits[:, :39], labels)
    with pytest.raises(ValueError, match="12 rows of logits but 11 label rows"):
        rank_biases(logits, labels.iloc[:11])
    with pytest.raises(ValueError, match="no column 'Heavy_Makeup'"):
        rank_biases(logits, labels.drop(columns=[B]))
    bad = labels.copy()
    bad.loc[0, A] = 2
    with pytest.raises(ValueError, match="0/1"):
        rank_biases(logits, bad)
    with pytest.raises(ValueError, match="min_group"):
        rank_biases(logits, labels, min_group=0)
