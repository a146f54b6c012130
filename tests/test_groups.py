"""Groups of an attribute pair and group-balanced data: hand computations on small label tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cocam.groups import GROUPS, balanced_resample, balanced_subset, balancing_weights, group_counts, group_index

A, B = "Wearing_Lipstick", "Heavy_Makeup"
C, D = "High_Cheekbones", "Smiling"


def _labels(ab, cd=None):
    """Rows of (a, b) (and (c, d)) as 0/1 columns."""
    frame = pd.DataFrame(ab, columns=[A, B])
    if cd is not None:
        frame[[C, D]] = np.asarray(cd)
    return frame


def test_group_index_follows_groups_order_and_accepts_plus_minus_one():
    labels = _labels([(1, 1), (1, 0), (0, 1), (0, 0)])
    assert group_index(labels, A, B).tolist() == [0, 1, 2, 3]
    assert [list(GROUPS.values())[i] for i in group_index(labels, A, B)] == ["A∧B", "A∧¬B", "¬A∧B", "¬A∧¬B"]
    pm = labels.replace({0: -1})
    assert group_index(pm, A, B).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="0/1 or -1/1"):
        group_index(labels.replace({1: 2}), A, B)


def test_balancing_weights_give_every_group_the_same_total_weight():
    # 5 × A∧B, 1 × A∧¬B, 2 × ¬A∧B, 2 × ¬A∧¬B: N = 10, G = 4 → w = 10 / (4 n_g)
    labels = _labels([(1, 1)] * 5 + [(1, 0)] + [(0, 1)] * 2 + [(0, 0)] * 2)
    w = balancing_weights(labels, [(A, B)])
    assert w[:5] == pytest.approx([0.5] * 5)
    assert w[5] == pytest.approx(2.5)
    assert w[6:] == pytest.approx([1.25] * 4)
    g = group_index(labels, A, B)
    totals = np.bincount(g, weights=w)
    assert totals == pytest.approx([2.5] * 4)
    assert w.mean() == pytest.approx(1.0)


def test_an_empty_group_gives_its_share_to_the_others():
    labels = _labels([(1, 1)] * 6 + [(0, 1)] * 2 + [(0, 0)] * 1)  # no A∧¬B image
    w = balancing_weights(labels, [(A, B)])
    totals = np.bincount(group_index(labels, A, B), weights=w, minlength=4)
    assert totals == pytest.approx([3, 0, 3, 3])
    counts = group_counts(labels, [(A, B)])
    assert counts.set_index("group")["n"].to_dict() == {"A∧B": 6, "A∧¬B": 0, "¬A∧B": 2, "¬A∧¬B": 1}


def test_several_pairs_average_their_weights():
    ab = [(1, 1), (1, 1), (1, 0), (0, 0)]
    cd = [(1, 1), (0, 0), (0, 0), (0, 0)]
    labels = _labels(ab, cd)
    one = balancing_weights(labels, [(A, B)])
    two = balancing_weights(labels, [(C, D)])
    both = balancing_weights(labels, [(A, B), (C, D)])
    assert both == pytest.approx((one + two) / 2)
    # by hand: pair (A, B) has groups of sizes 2, 1, 0, 1 (G = 3) → 4/6, 4/6, 4/3, 4/3
    assert one == pytest.approx([2 / 3, 2 / 3, 4 / 3, 4 / 3])
    # pair (C, D): groups 1, 0, 0, 3 (G = 2) → 2, 2/3, 2/3, 2/3
    assert two == pytest.approx([2, 2 / 3, 2 / 3, 2 / 3])


def test_balanced_resample_is_deterministic_and_follows_the_weights():
    labels = _labels([(1, 1)] * 90 + [(1, 0)] * 10)
    w = balancing_weights(labels, [(A, B)])
    first = balanced_resample(w, 20_000, seed=3)
    assert np.array_equal(first, balanced_resample(w, 20_000, seed=3))
    assert not np.array_equal(first, balanced_resample(w, 20_000, seed=4))
    share = (first >= 90).mean()  # the 10 conflict images carry half of the weight
    # binomial standard deviation sqrt(0.25 / 20000) ≈ 0.0035: five of them
    assert abs(share - 0.5) < 5 * np.sqrt(0.25 / 20_000)
    with pytest.raises(ValueError, match="non-negative"):
        balanced_resample(np.array([1.0, -1.0]), 3, seed=0)


def test_balanced_subset_takes_the_smallest_group_size_from_every_group():
    labels = _labels([(1, 1)] * 30 + [(1, 0)] * 3 + [(0, 1)] * 7 + [(0, 0)] * 40)
    idx = balanced_subset(labels, [(A, B)], seed=0)
    counts = np.bincount(group_index(labels, A, B)[idx], minlength=4)
    assert counts.tolist() == [3, 3, 3, 3]
    assert np.array_equal(idx, np.unique(idx))
    assert np.array_equal(idx, balanced_subset(labels, [(A, B)], seed=0))
    fixed = balanced_subset(labels, [(A, B)], seed=1, per_group=5)
    assert np.bincount(group_index(labels, A, B)[fixed], minlength=4).tolist() == [5, 3, 5, 5]
