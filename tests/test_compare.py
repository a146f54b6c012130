"""Tests for cocam.compare: the side-by-side comparison of guidance settings and the control."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cocam.compare import (
    CONTROL,
    METHODS,
    PRE_TRAINED,
    ComparisonConfig,
    compare_guidance,
    comparison_table,
    select_settings,
    summarize_comparison,
    t_interval,
)
from cocam.attributes import attribute_index
from cocam.losses import GUIDANCE_LOSSES


def test_t_interval_hand_computation() -> None:
    lo, hi = t_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) · s / √n with s = 1
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert all(math.isnan(v) for v in t_interval([5.0]))
    assert t_interval([1.0, np.nan, 3.0]) == pytest.approx(t_interval([1.0, 3.0]))


def _row(setting: str, seed: int, split: str, test: float, conflict: float, reverse: float) -> dict:
    """One run's numbers; the two other groups are at 95 %, so the worst group is a conflict group."""
    return dict(setting=setting, seed=seed, split=split, attribute="A", test=test, conflict=conflict,
                reverse=reverse, worst_group=min(conflict, reverse, 95.0), conflict_mean=(conflict + reverse) / 2,
                n_conflict=50, n_reverse=60)


def _runs() -> pd.DataFrame:
    rows = []
    for split in ("valid", "test"):
        rows.append(_row(PRE_TRAINED, -1, split, 90.0, 20.0, 72.0))
        for seed, (ctl, good, bad, gamed) in enumerate([(30, 50, 60, 90), (32, 46, 64, 92), (28, 48, 62, 94)]):
            rows.append(_row(CONTROL, seed, split, 90.0, ctl, 70.0))
            rows.append(_row("good", seed, split, 90.5, good, 68.0))
            # "greedy" wins the worst group but costs 5 points of accuracy
            rows.append(_row("greedy", seed, split, 85.0, bad, 66.0))
            # "gamer" predicts A almost always: the paper's A∧¬B soars, the reverse group collapses
            rows.append(_row("gamer", seed, split, 90.0, gamed, 10.0))
    return pd.DataFrame(rows)


def test_summary_gains_are_per_seed_differences_to_the_control() -> None:
    summary = summarize_comparison(_runs())
    good = summary[(summary.split == "test") & (summary.setting == "good")].iloc[0]
    assert good.conflict == pytest.approx(48.0)
    assert good.gain == pytest.approx(18.0)  # (20 + 14 + 20) / 3
    lo, hi = t_interval([20.0, 14.0, 20.0])
    assert (good.gain_low, good.gain_high) == pytest.approx((lo, hi))
    assert good.gain_worst_group == pytest.approx(18.0)  # its worst group is A∧¬B
    assert (good.gain_worst_group_low, good.gain_worst_group_high) == pytest.approx((lo, hi))
    assert good.gain_reverse == pytest.approx(-2.0)
    assert good.gain_conflict_mean == pytest.approx((18.0 - 2.0) / 2)
    assert good.test_change == pytest.approx(0.5)
    gamer = summary[(summary.split == "test") & (summary.setting == "gamer")].iloc[0]
    assert gamer.gain == pytest.approx(62.0)  # the paper's column: a large "gain" ...
    assert gamer.gain_worst_group == pytest.approx(10.0 - 30.0)  # ... the worst group: a loss
    control = summary[(summary.split == "test") & (summary.setting == CONTROL)].iloc[0]
    assert pd.isna(control.gain) and pd.isna(control.gain_worst_group) and control.seeds == 3
    assert control.n_reverse == 60
    table = comparison_table(summary, "test")
    shown = table.set_index("setting")
    assert list(table.columns[4:8]) == ["worst group %", "worst group gain vs control", "conflict mean %",
                                        "conflict mean gain"]
    assert shown.loc["good", "worst group gain vs control"].startswith("+18.0 [")
    assert shown.loc["gamer", "worst group gain vs control"].startswith("-20.0 [")
    assert shown.loc["gamer", "conflict gain vs control"].startswith("+62.0 [")
    assert shown.loc["gamer", "reverse ¬A∧B %"] == "10.0 [10.0, 10.0]"
    assert shown.loc[CONTROL, "worst group gain vs control"] == ""


def test_selection_uses_the_worst_group_on_the_validation_split_and_the_accuracy_budget() -> None:
    runs = _runs()
    chosen = select_settings(summarize_comparison(runs))
    # "gamer" has the largest A∧¬B gain, "greedy" the largest worst-group gain but loses 5 points
    assert list(chosen.setting) == ["good"]
    assert list(select_settings(summarize_comparison(runs), max_test_drop=10).setting) == ["greedy"]
    # the choice reads the valid split only: making the others look best on test changes nothing
    runs.loc[(runs.split == "test") & (runs.setting == "greedy"), "test"] = 95.0
    runs.loc[(runs.split == "test") & (runs.setting == "gamer"), ["worst_group", "conflict_mean"]] = 99.0
    assert list(select_settings(summarize_comparison(runs)).setting) == ["good"]
    # ... and removing the test rows altogether gives the same choice
    valid_only = summarize_comparison(runs[runs.split == "valid"])
    pd.testing.assert_frame_equal(select_settings(valid_only), chosen)
    with pytest.raises(ValueError, match="eligible"):
        select_settings(summarize_comparison(runs), split="train")
    with pytest.raises(ValueError, match="never on test"):
        select_settings(summarize_comparison(runs), split="test")
    old = summarize_comparison(runs.drop(columns=["worst_group", "conflict_mean", "reverse"]))
    with pytest.raises(ValueError, match="worst-group"):
        select_settings(old)


def test_methods_cover_every_guidance_loss() -> None:
    assert {m["loss"] for m in METHODS.values()} == set(GUIDANCE_LOSSES)
    assert METHODS["iou, positives (paper)"] == {"loss": "iou", "target": "positive"}


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        ComparisonConfig(root=tmp_path, out=tmp_path, seeds=())
    with pytest.raises(ValueError, match="splits"):
        ComparisonConfig(root=tmp_path, out=tmp_path, splits=("dev",))
    with pytest.raises(ValueError, match="Wearing_Lipstick"):
        ComparisonConfig(root=tmp_path, out=tmp_path, pairs=(("Wearing_Lipstik", "Heavy_Makeup"),))


def test_compare_end_to_end_on_tiny_data(synthetic_root: Path, tmp_path: Path, one_thread) -> None:
    config = ComparisonConfig(root=synthetic_root, out=tmp_path / "cmp", seeds=(0,),
                              pairs=(("Wearing_Lipstick", "Heavy_Makeup"),), image_size=64, hidden=32,
                              baseline_epochs=1, finetune_epochs=1, batch_size=32, splits=("valid", "test"),
                              device="cpu", peers=())
    settings = {"energy": {"loss": "energy"}, "rrr_input": {"loss": "rrr_input"}}
    lines: list[str] = []
    result = compare_guidance(config, settings, log=lines.append)
    runs = result.runs
    assert set(runs.setting) == {PRE_TRAINED, CONTROL, "energy", "rrr_input"}
    assert set(runs.split) == {"valid", "test"}
    acc = ["worst_group", "conflict_mean", "test", "conflict", "reverse"]
    assert runs[["worst_group", "test"]].notna().all().all()  # NaN only where a conflict group is empty
    assert runs[acc].apply(lambda c: c.dropna().between(0, 100).all()).all()
    assert (runs.worst_group <= runs[["conflict", "reverse"]].min(axis=1).fillna(100.0)).all()
    assert runs[["auc_within_b", "auc_within_not_b"]].apply(lambda c: c.dropna().between(0, 1).all()).all()
    assert runs.truth_iou.notna().all()  # synthetic data: scored against the true regions
    for name in ("runs.csv", "summary.csv", "comparison.json"):
        assert (config.out / name).is_file()
    # every fine-tuning run took the same number of steps from the same baseline
    steps = {p.name: pd.read_csv(p / "history.csv").step.iloc[-1] for p in config.out.glob("*_seed0")}
    assert len(steps) == 3 and len(set(steps.values())) == 1
    assert any(line.startswith("baseline:") for line in lines)

    assert len(list(config.out.glob("*/scores_*.csv"))) == 4  # the baseline, the control and two settings
    # resuming reuses every finished run and its scores: nothing is retrained or re-scored
    mtimes = {p: p.stat().st_mtime_ns for p in config.out.rglob("last.pt")}
    again = compare_guidance(config, settings, log=None)
    assert {p: p.stat().st_mtime_ns for p in config.out.rglob("last.pt")} == mtimes
    pd.testing.assert_frame_equal(again.runs, runs)

    # the same baseline on another dataset is scored there, not read from the first one's cache
    other = tmp_path / "other" / "celeba"
    other.mkdir(parents=True)
    source = synthetic_root / "celeba"
    for name in ("img_align_celeba", "list_attr_celeba.txt", "list_bbox_celeba.txt", "identity_CelebA.txt",
                 "list_landmarks_align_celeba.txt", "evidence_regions.npz", "cocam_synthetic.json"):
        if (source / name).exists():
            (other / name).symlink_to(source / name)
    swap = {"1": "2", "2": "1"}  # valid and test swapped
    lines = (source / "list_eval_partition.txt").read_bytes().decode().splitlines()
    (other / "list_eval_partition.txt").write_bytes(
        "".join(f"{f} {swap.get(k, k)}\r\n" for f, k in (line.split() for line in lines)).encode())
    moved = compare_guidance(dataclasses.replace(config, root=other.parent, out=tmp_path / "cmp2"), {},
                             baseline=result.baseline, log=None)
    key = ["split", "attribute"]
    before = runs[runs.setting == PRE_TRAINED].set_index(key).n_conflict
    after = moved.runs[moved.runs.setting == PRE_TRAINED].set_index(key).n_conflict
    assert before.loc["valid"].tolist() == after.loc["test"].tolist()
    assert before.loc["test"].tolist() == after.loc["valid"].tolist()
    assert before.loc["valid"].tolist() != before.loc["test"].tolist()  # else the check could not fail

    with pytest.raises(ValueError, match="reference row"):
        compare_guidance(config, {CONTROL: {"loss": "iou"}})
    with pytest.raises(ValueError, match="unknown guidance loss"):
        compare_guidance(config, {"x": {"loss": "dice"}})


def test_run_names_change_with_any_setting() -> None:
    from cocam.compare import run_name
    from cocam.masks import default_mask
    from cocam.train import Guidance

    mask = default_mask("Wearing_Lipstick")
    base = Guidance(("Wearing_Lipstick",), (mask,), loss="rrr_input")
    assert run_name(None) == "control"
    assert run_name(base) == run_name(Guidance(("Wearing_Lipstick",), (mask.copy(),), loss="rrr_input"))
    assert run_name(base).startswith("rrr_input_positive_")  # the default target: the paper's
    other_mask = mask.copy()
    other_mask[:, :89] = False
    for changed in (Guidance(("Wearing_Lipstick",), (mask,), loss="rrr_input", w_g=1.0),
                    Guidance(("Wearing_Lipstick",), (other_mask,), loss="rrr_input")):
        assert run_name(changed) != run_name(base)  # a changed setting never resumes an old run


def test_landed_runs_are_rescored_per_block_on_the_worst_group() -> None:
    """benchmarks/rescore_results.py: old runs rows (no split, a reverse column, two blocks) → worst-group gains."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rescore_results.py"
    spec = importlib.util.spec_from_file_location("rescore_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = _runs()
    old = old[old.split == "test"].drop(columns=["split", "conflict_mean"])
    two = pd.concat([old.assign(steps=750), old.assign(steps=1500, worst_group=old.worst_group + 1.0)])
    two.loc[(two.steps == 1500) & (two.setting == CONTROL), "worst_group"] -= 1.0  # the control unchanged
    summary = module.rescore(two).set_index(["steps", "setting"])
    assert summary.loc[(750, "good"), "gain_worst_group"] == pytest.approx(18.0)
    assert summary.loc[(1500, "good"), "gain_worst_group"] == pytest.approx(19.0)  # blocks are not mixed
    assert summary.loc[(750, "good"), "gain_conflict_mean"] == pytest.approx((18.0 - 2.0) / 2)  # from `reverse`
    assert set(summary.split) == {"test"}


def test_controls_and_peers_from_several_baselines(synthetic_root: Path, tmp_path: Path, one_thread) -> None:
    from cocam.checkpoint import load_model
    from cocam.compare import PEERS
    from cocam.dfr import split_last_linear

    pair = ("Wearing_Lipstick", "Heavy_Makeup")
    config = ComparisonConfig(root=synthetic_root, out=tmp_path / "peers", seeds=(0,), baseline_seeds=(0, 1),
                              pairs=(pair,), image_size=64, hidden=32, baseline_epochs=1, finetune_epochs=1,
                              batch_size=32, splits=("valid",), device="cpu")
    assert config.peers == PEERS
    result = compare_guidance(config, {"iou": {"loss": "iou"}}, log=None)
    runs = result.runs
    assert set(runs.setting) == {PRE_TRAINED, CONTROL, "iou", *PEERS}
    assert set(runs.baseline) == {0, 1}
    # two baselines from different initial seeds: different weights
    b0, b1 = (load_model(config.out / d / "best.pt")[0] for d in ("baseline", "baseline1"))
    assert not torch.equal(split_last_linear(b0.head)[1].weight, split_last_linear(b1.head)[1].weight)
    # every fine-tuning run of a baseline took the same steps; the random region is another guidance
    for prefix in ("", "b1_"):
        folders = [p for p in config.out.glob(f"{prefix}*_seed0") if (p / "history.csv").is_file()
                   and (prefix or not p.name.startswith("b1_"))]
        names = sorted(p.name.split("_seed")[0].removeprefix(prefix) for p in folders)
        assert names[0] == "balanced" and names[1] == "control" and any(n.startswith("random_iou") for n in names)
        assert any(n.startswith("iou") and n.endswith("_balanced") for n in names)
        assert len({pd.read_csv(p / "history.csv").step.iloc[-1] for p in folders}) == 1
    # last-layer retraining changed the guided attribute's row of the baseline only
    dfr, _, _ = load_model(config.out / "dfr_seed0" / "last.pt")
    old, new = split_last_linear(b0.head)[1], split_last_linear(dfr.head)[1]
    k = attribute_index(pair[0])
    assert not torch.equal(old.weight[k], new.weight[k])
    rest = [i for i in range(40) if i != k]
    assert torch.equal(old.weight[rest], new.weight[rest])
    # gains pair each run with the control of the same baseline and seed: two cells per setting
    summary = result.summary
    peer_rows = summary[summary.setting.isin(PEERS)]
    assert (peer_rows.seeds == 2).all() and peer_rows.gain_worst_group.notna().all()
    control = runs[runs.setting == CONTROL].set_index("baseline").worst_group
    mine = runs[runs.setting == "group-balanced"].set_index("baseline").worst_group
    row = summary[summary.setting == "group-balanced"].iloc[0]
    assert row.gain_worst_group == pytest.approx((mine - control).mean())

    with pytest.raises(ValueError, match="unknown peer"):
        ComparisonConfig(root=synthetic_root, out=tmp_path / "x", peers=("oracle?",))
    with pytest.raises(ValueError, match="reuse a guidance setting"):
        compare_guidance(dataclasses.replace(config, out=tmp_path / "y"), {}, log=None)


def test_a_resampled_dataset_serves_the_indices_with_repeats(synthetic_root: Path) -> None:
    from cocam.dataset import CelebADataset

    train = CelebADataset(synthetic_root, "train", image_size=64, progress=False)
    idx = np.array([3, 3, 0, 7, 3])
    view = train.resampled(idx)
    assert len(view) == 5
    np.testing.assert_array_equal(view.targets, train.targets[idx])
    images, _, _ = view.get_batch(np.arange(5))
    reference, _, _ = train.get_batch(idx)
    assert torch.equal(images, reference)
    with pytest.raises(ValueError, match="at least one"):
        train.resampled([])
