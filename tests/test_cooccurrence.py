import numpy as np
import pandas as pd
import pytest

from cocam.attributes import CELEBA_ATTRIBUTES, UnknownAttributeError
from cocam.cooccurrence import celeba_reference, cooccurrence, pair_summary, rank_pairs, suggest_pairs


def _labels(rows):
    df = pd.DataFrame(0, index=[f"{i:06d}.jpg" for i in range(len(rows))], columns=list(CELEBA_ATTRIBUTES),
                      dtype=np.uint8)
    for i, names in enumerate(rows):
        for name in names:
            df.iloc[i, df.columns.get_loc(name)] = 1
    return df


def test_counts_and_rates_match_hand_computation():
    # 6 images: A=Wearing_Lipstick, B=Heavy_Makeup. A∧B: 2, A∧¬B: 1, ¬A∧B: 1, ¬A∧¬B: 2
    a, b = "Wearing_Lipstick", "Heavy_Makeup"
    df = _labels([[a, b], [a, b], [a], [b], [], []])
    s = cooccurrence(df)
    row = s[(s.a == a) & (s.b == b)].iloc[0]
    assert (row.n_images, row.n_a, row.n_b, row.n_ab) == (6, 3, 3, 2)
    assert row.p_b_given_a == pytest.approx(2 / 3)
    assert row.p_b_given_not_a == pytest.approx(1 / 3)
    assert row.p_a_given_b == pytest.approx(2 / 3)
    assert row.lift == pytest.approx((2 / 6) / (0.5 * 0.5))
    assert row.phi == pytest.approx(np.corrcoef(df[a], df[b])[0, 1])
    assert row.n_conflict == 1 and row.n_reverse_conflict == 1
    # an attribute that never occurs has undefined conditional rates, not a crash
    never = s[(s.a == "Bald") & (s.b == b)].iloc[0]
    assert np.isnan(never.p_b_given_a) and never.n_conflict == 0


def test_per_split_and_ranking_orientation():
    a, b = "Double_Chin", "Chubby"
    df = _labels([[a, b], [b], [b], [], [a, b], [b], [], []])
    split = pd.Series(["train"] * 4 + ["test"] * 4, index=df.index)
    s = cooccurrence(df, split)
    assert set(s.split) == {"train", "test"}
    top = rank_pairs(s, split="train", top=1).iloc[0]
    # the rarer attribute is A, so its conflict subset is the one a shortcut through B hurts
    assert (top.a, top.b) == (a, b)


def test_reference_has_celeba_numbers():
    ref = celeba_reference()
    assert len(ref) == 3 * 40 * 40
    row = ref[(ref.split == "train") & (ref.a == "Wearing_Lipstick") & (ref.b == "Heavy_Makeup")].iloc[0]
    assert (row.n_images, row.n_a, row.n_b, row.n_ab) == (162770, 76437, 62555, 61072)
    summary = pair_summary(ref, [("Double_Chin", "Chubby")])
    assert list(summary.split) == ["train", "valid", "test"]
    assert summary[summary.split == "test"].n_conflict.item() == 384  # DC∧¬C in CelebA's test split


def test_pair_names_are_validated():
    with pytest.raises(UnknownAttributeError, match="Double_Chin"):
        pair_summary(celeba_reference(), [("Double_Chinn", "Chubby")])


def test_suggested_pairs_are_the_positive_correlations_with_a_conflict_image():
    # Five labels over 8 train images and 2 test images, phi computed by hand on train:
    #   fin, water: 3 of 4 agree each way (fin∧¬water: 1)                     -> phi +0.5
    #   fin, beak:  beak is exactly fin (no fin∧¬beak image: nothing to fix)   -> phi +1, left out
    #   fin, grass: grass = ¬fin                                               -> phi −1, left out
    #   noise: independent of fin and of water (2 of 4 either way)             -> phi 0, left out
    fin = [1, 1, 1, 1, 0, 0, 0, 0]
    water = [1, 1, 1, 0, 1, 0, 0, 0]
    noise = [1, 0, 0, 1, 1, 0, 0, 1]
    train = pd.DataFrame({"fin": fin, "water": water, "beak": fin, "grass": [1 - v for v in fin], "noise": noise},
                         dtype=np.uint8)
    test = pd.DataFrame([[1, 0, 0, 0, 0], [0, 1, 0, 1, 1]], columns=train.columns, dtype=np.uint8)  # anti-correlated
    labels = pd.concat([train, test], ignore_index=True)
    split = pd.Series(["train"] * 8 + ["test"] * 2, index=labels.index)
    pairs = suggest_pairs(labels, split, top=10)
    phi = np.corrcoef(np.array(fin), np.array(water))[0, 1]
    assert phi == pytest.approx(0.5)
    # water∧¬fin and fin∧¬water: 1 each, so the pair is ordered by name (rank_pairs' tie rule)
    assert pairs[0] == ("fin", "water")
    assert ("fin", "beak") not in pairs and ("beak", "fin") not in pairs  # φ = 1 but no conflict image
    assert not {("fin", "grass"), ("grass", "fin")} & set(pairs)
    assert all(np.corrcoef(train[a], train[b])[0, 1] > 0 for a, b in pairs)
    assert suggest_pairs(labels, split, top=1) == [("fin", "water")]
    with pytest.raises(ValueError, match="give the pairs"):
        suggest_pairs(labels[["fin", "grass"]], split)  # only a negative correlation
    with pytest.raises(ValueError, match="top must be at least 1"):
        suggest_pairs(labels, split, top=0)
