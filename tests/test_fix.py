"""Tests for cocam.fix: choosing each attribute's guidance on validation, one model guiding all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cocam.compare import CONTROL, ComparisonConfig, summarize_comparison
from cocam.fix import FIXED, choose_per_attribute, fix_biases, fix_table, verdict

PAIRS = (("Wearing_Lipstick", "Heavy_Makeup"), ("High_Cheekbones", "Smiling"))
CANDIDATES = {"iou": {"loss": "iou", "target": "positive"}, "energy": {"loss": "energy", "target": "both", "w_g": 2.0}}


def _summary(valid_gain: dict, test_gain: dict, drop: dict | None = None) -> pd.DataFrame:
    """A summary with per-(setting, attribute) worst-group gains on each split."""
    rows = []
    for split, gains in (("valid", valid_gain), ("test", test_gain)):
        for (setting, attribute), gain in gains.items():
            rows.append(dict(split=split, setting=setting, attribute=attribute, seeds=3, worst_group=50 + gain,
                             gain=gain, gain_worst_group=gain, test_change=(drop or {}).get((setting, attribute), 0.0)))
        for attribute in ("A1", "A2"):
            rows.append(dict(split=split, setting=CONTROL, attribute=attribute, seeds=3, worst_group=50.0,
                             gain=np.nan, gain_worst_group=np.nan, test_change=np.nan))
            for peer, wg in (("group-balanced", 60.0 if split == "valid" else 40.0), ("last layer (DFR)", 55.0)):
                rows.append(dict(split=split, setting=peer, attribute=attribute, seeds=3, worst_group=wg,
                                 gain=wg - 50, gain_worst_group=wg - 50, test_change=0.0))
    return pd.DataFrame(rows)


def test_the_choice_reads_only_the_validation_split() -> None:
    cands = {"iou": {}, "energy": {"loss": "energy"}}
    cands["iou"] = {"loss": "iou", "target": "positive"}
    valid = {("iou", "A1"): 5.0, ("energy", "A1"): 9.0, ("iou", "A2"): 4.0, ("energy", "A2"): 1.0}
    test = {k: -v for k, v in valid.items()}  # the test split says the opposite: it must not matter
    choice = choose_per_attribute(_summary(valid, test), ("A1", "A2"), cands).set_index("attribute")
    assert choice.setting.to_dict() == {"A1": "energy", "A2": "iou"}
    assert (choice.chosen_on == "valid").all()
    assert choice.loc["A1", "gain_worst_group"] == 9.0
    assert choice.best_peer.tolist() == ["group-balanced"] * 2  # highest valid worst group (test says DFR)
    # the same valid numbers with other test numbers: the same choice
    again = choose_per_attribute(_summary(valid, {k: 100.0 for k in valid}), ("A1", "A2"), cands)
    pd.testing.assert_frame_equal(again, choice.reset_index())
    # a setting that costs more than the budget is not eligible; none eligible → the paper's setting
    costly = choose_per_attribute(_summary(valid, test, drop={("energy", "A1"): -2.0}), ("A1", "A2"), cands)
    assert costly.set_index("attribute").loc["A1", "setting"] == "iou"
    none = choose_per_attribute(_summary(valid, test, drop={k: -5.0 for k in valid}), ("A1", "A2"), cands)
    assert (none.chosen_on == "default").all() and (none.loss == "iou").all() and (none.target == "positive").all()


def test_verdict_follows_the_intervals() -> None:
    row = dict(best_peer="group-balanced", gain_vs_control=12.0, gain_vs_control_low=3.0, gain_vs_control_high=21.0,
               gain_vs_peer=-1.0, gain_vs_peer_low=-8.0, gain_vs_peer_high=6.0)
    assert verdict(row) == "better than the control; not distinguishable from group-balanced"
    row |= dict(gain_vs_peer_low=-8.0, gain_vs_peer_high=-0.5)
    assert verdict(row).endswith("worse than group-balanced")
    assert "too few runs" in verdict(dict(row, gain_vs_control_low=np.nan))


def test_fix_end_to_end_on_tiny_data(synthetic_root: Path, tmp_path: Path, one_thread) -> None:
    config = ComparisonConfig(root=synthetic_root, out=tmp_path / "fix", seeds=(0, 1), pairs=PAIRS, image_size=64,
                              hidden=32, baseline_epochs=1, finetune_epochs=1, batch_size=32, device="cpu",
                              peers=("group-balanced", "last layer (DFR)"))
    result = fix_biases(config, CANDIDATES, max_test_drop=100.0, log=None)
    attrs = [a for a, _ in PAIRS]
    choice = result.choice.set_index("attribute")
    assert list(choice.index) == attrs and set(choice.setting) <= set(CANDIDATES)
    # the choice is the valid split's largest worst-group gain, recomputed here from the runs
    valid = result.runs[result.runs.split == "valid"]
    for a in attrs:
        gains = {}
        for name in CANDIDATES:
            mine = valid[(valid.setting == name) & (valid.attribute == a)].set_index(["baseline", "seed"])
            ctl = valid[(valid.setting == CONTROL) & (valid.attribute == a)].set_index(["baseline", "seed"])
            gains[name] = (mine.worst_group - ctl.worst_group).mean()
        assert choice.loc[a, "setting"] == max(gains, key=gains.get)
    # one model guides every attribute with its own choice; it took the control's steps
    for (b, s), path in result.checkpoints.items():
        assert path.is_file()
        info = json.loads((path.parent / "run.json").read_text())
        assert json.dumps(info["guidance"]) and info["guidance"] is not None
        ctl = pd.read_csv(config.out / f"control_seed{s}" / "history.csv").step.iloc[-1]
        assert pd.read_csv(path.parent / "history.csv").step.iloc[-1] == ctl
    guided = json.loads(next(iter(result.checkpoints.values())).parent.joinpath("run.json").read_text())["guidance"]
    text = json.dumps(guided)
    for a in attrs:
        assert CANDIDATES[choice.loc[a, "setting"]]["loss"] in text
    # the report's gains are the per-run differences on the test split
    test = result.runs[result.runs.split == "test"]
    report = result.report.set_index("attribute")
    for a in attrs:
        mine = test[(test.setting == FIXED) & (test.attribute == a)].set_index(["baseline", "seed"]).worst_group
        ctl = test[(test.setting == CONTROL) & (test.attribute == a)].set_index(["baseline", "seed"]).worst_group
        peer = test[(test.setting == report.loc[a, "best_peer"]) & (test.attribute == a)]
        peer = peer.set_index(["baseline", "seed"]).worst_group
        assert report.loc[a, "gain_vs_control"] == pytest.approx((mine - ctl).mean())
        assert report.loc[a, "gain_vs_peer"] == pytest.approx((mine - peer).mean())
        assert report.loc[a, "fixed"] == pytest.approx(mine.mean()) and report.loc[a, "runs"] == 2
    table = fix_table(result.report)
    assert list(table.attribute) == attrs and table["verdict"].str.len().gt(0).all()
    # resuming retrains nothing
    mtimes = {p: p.stat().st_mtime_ns for p in config.out.rglob("last.pt")}
    fix_biases(config, CANDIDATES, max_test_drop=100.0, log=None)
    assert {p: p.stat().st_mtime_ns for p in config.out.rglob("last.pt")} == mtimes

    with pytest.raises(ValueError, match="valid split and reports on test"):
        fix_biases(ComparisonConfig(root=synthetic_root, out=tmp_path / "x", splits=("valid",), pairs=PAIRS), log=None)
    with pytest.raises(ValueError, match="names the final model"):
        fix_biases(config, {FIXED: {"loss": "iou"}}, log=None)


def test_gains_against_another_reference() -> None:
    runs = pd.DataFrame([dict(setting=s, seed=k, split="test", attribute="A", test=90.0, conflict=v, worst_group=v)
                         for s, vals in ((CONTROL, (10, 20)), ("peer", (30, 34)), ("x", (40, 40)))
                         for k, v in enumerate(vals)])
    summary = summarize_comparison(runs, reference="peer").set_index("setting")
    assert summary.loc["x", "gain_worst_group"] == pytest.approx(8.0)  # (10 + 6) / 2
    assert summary.loc[CONTROL, "gain_worst_group"] == pytest.approx(-17.0)
    assert pd.isna(summary.loc["peer", "gain_worst_group"])
