import numpy as np
import pytest

from cocam.attributes import PAPER_PAIRS
from cocam.cooccurrence import celeba_reference, cooccurrence
from cocam.synthetic import PRESETS, fit_label_tree, sample_labels, synthetic_labels


@pytest.fixture(scope="module")
def default_labels():
    return synthetic_labels(PRESETS["default"])


def test_forced_pairs_are_tree_edges():
    tree = fit_label_tree("test")
    for a, b in PAPER_PAIRS:
        assert tree.parent[a] == b or tree.parent[b] == a
    assert tree.order[0] == "Male" and tree.parent["Male"] is None
    assert set(tree.order) == set(tree.parent) and len(tree.order) == 40


@pytest.mark.parametrize("split", ["valid", "test"])
def test_default_dataset_matches_celeba_rates_within_two_points(default_labels, split):
    labels, splits = default_labels
    ours = cooccurrence(labels, splits)
    ref = celeba_reference()
    for a, b in PAPER_PAIRS:
        for x, y in ((a, b), (b, a)):
            got = ours[(ours.split == split) & (ours.a == x) & (ours.b == y)].iloc[0]
            want = ref[(ref.split == split) & (ref.a == x) & (ref.b == y)].iloc[0]
            assert abs(got.p_b_given_a - want.p_b_given_a) <= 0.02, (split, x, y)
            assert abs(got.p_a - want.p_a) <= 0.02, (split, x)


def test_train_split_matches_celeba_when_unbiased():
    tree = fit_label_tree("train", train_conflict_scale=1.0)
    labels = sample_labels(tree, 5000, np.random.default_rng(0))
    ours, ref = cooccurrence(labels), celeba_reference()
    for a, b in PAPER_PAIRS:
        for x, y in ((a, b), (b, a)):
            got = ours[(ours.a == x) & (ours.b == y)].iloc[0].p_b_given_a
            want = ref[(ref.split == "train") & (ref.a == x) & (ref.b == y)].iloc[0].p_b_given_a
            assert abs(got - want) <= 0.02, (x, y)


def test_bias_strength_shrinks_training_conflicts_only(default_labels):
    labels, splits = default_labels
    scale = PRESETS["default"].train_conflict_scale
    ours, ref = cooccurrence(labels, splits), celeba_reference()
    for a, b in PAPER_PAIRS:
        got = ours[(ours.split == "train") & (ours.a == a) & (ours.b == b)].iloc[0]
        want = ref[(ref.split == "train") & (ref.a == a) & (ref.b == b)].iloc[0]
        conflict_rate = 1 - got.p_b_given_a
        assert conflict_rate == pytest.approx(scale * (1 - want.p_b_given_a), abs=0.02)


def test_sampling_is_deterministic_and_stratified():
    tree = fit_label_tree("valid")
    x = sample_labels(tree, 1000, np.random.default_rng(3))
    y = sample_labels(tree, 1000, np.random.default_rng(3))
    assert x.equals(y)
    assert x["Male"].sum() == round(1000 * tree.p_root)  # exact count, not a binomial draw


def test_the_oracle_split_removes_each_paper_pairs_co_occurrence():
    from cocam.synthetic import SyntheticConfig

    tree = fit_label_tree("train", decorrelate=True)
    labels = sample_labels(tree, 20_000, np.random.default_rng(1))
    ref = celeba_reference()
    for a, b in PAPER_PAIRS:
        pa, pb = labels[a].mean(), labels[b].mean()
        both = (labels[a] & labels[b]).mean()
        assert both == pytest.approx(pa * pb, abs=0.01), (a, b)  # independent: P(A∧B) = P(A)·P(B)
        for x in (a, b):  # the marginals stay CelebA's (training split)
            want = ref[(ref.split == "train") & (ref.a == x) & (ref.b == x)].iloc[0].p_a
            assert labels[x].mean() == pytest.approx(want, abs=0.02), x
    # only the training split changes, and the configuration of an ordinary dataset is as before
    oracle = SyntheticConfig(n_train=200, n_valid=100, n_test=100, train_decorrelated=True)
    plain = SyntheticConfig(n_train=200, n_valid=100, n_test=100)
    lo, so = synthetic_labels(oracle)
    lp, sp = synthetic_labels(plain)
    assert lo[so != "train"].equals(lp[sp != "train"]) and not lo[so == "train"].equals(lp[sp == "train"])
    assert "train_decorrelated" not in plain.to_dict() and oracle.to_dict()["train_decorrelated"] is True
    assert SyntheticConfig.from_dict(oracle.to_dict()) == oracle
