"""Tests for cocam.protocol: the paper's experiment end to end on a tiny synthetic CelebA."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from cocam import PAPER_PAIRS
from cocam.attributes import UnknownAttributeError
from cocam.celeba import DatasetNotFoundError
from cocam.checkpoint import load_checkpoint
from cocam.masks import default_mask, save_mask
from cocam.protocol import (
    PAPER_RESULTS,
    ProtocolConfig,
    ProtocolError,
    add_protocol_arguments,
    config_from_args,
    estimate_minutes,
    format_protocol_table,
    requirements_report,
    run_from_args,
    run_protocol,
)
from cocam.train import RunLockedError

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "seed-paper.txt"
TINY = {"image_size": 64, "hidden": 32, "baseline_epochs": 1, "finetune_epochs": 1, "batch_size": 16,
        "device": "cpu"}


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    """A user mask for Wearing_Lipstick only: the other attributes fall back to the built-in region."""
    folder = tmp_path_factory.mktemp("masks")
    save_mask(folder / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))
    return folder


@pytest.fixture(scope="module")
def config(synthetic_root: Path, masks: Path, tmp_path_factory) -> ProtocolConfig:
    return ProtocolConfig(root=synthetic_root, out=tmp_path_factory.mktemp("protocol") / "runs", mask_dir=masks,
                          **TINY)


@pytest.fixture(scope="module")
def first_run(config: ProtocolConfig) -> pd.DataFrame:
    return run_protocol(config, progress=False)


# --------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------


def test_paper_results_hold_the_papers_numbers_in_the_right_cells() -> None:
    t = PAPER_RESULTS.set_index("attribute")
    assert list(t.index) == [a for a, _ in PAPER_PAIRS]
    assert list(t["shortcut"]) == [b for _, b in PAPER_PAIRS]
    expected = {  # (pre-trained test, pre-trained conflict, fine-tuned test, fine-tuned conflict)
        "Wearing_Lipstick": (92.9, 82.17, 93.25, 83.31),
        "High_Cheekbones": (63.53, 47.41, 65.56, 61.33),
        "Double_Chin": (84.18, 81.77, 84.79, 86.45),
    }
    cols = ["pre-trained test %", "pre-trained conflict %", "fine-tuned test %", "fine-tuned conflict %"]
    for a, values in expected.items():
        assert tuple(t.loc[a, cols]) == pytest.approx(values)


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not next to the project")
def test_paper_results_match_the_paper_text() -> None:
    """Each table of the paper: 'Pre-trained' row (test, conflict), then 'Fine-tuned' row (test, conflict)."""
    text = PAPER_TEXT.read_text(encoding="utf-8")
    sections = re.split(r"“(Wearing Lipstick|High Cheekbones|Double Chin)”", text)[1:]
    found = {}
    for name, body in zip(sections[::2], sections[1::2]):
        pre = re.search(r"Pre-trained network.*?([\d.]+)% ([\d.]+)%", body).groups()
        fine = re.search(r"Fine-tuned network\s+([\d.]+)% ([\d.]+)%", body).groups()
        found[name.replace(" ", "_")] = tuple(float(v) for v in (*pre, *fine))
    t = PAPER_RESULTS.set_index("attribute")
    cols = ["pre-trained test %", "pre-trained conflict %", "fine-tuned test %", "fine-tuned conflict %"]
    assert set(found) == set(t.index)
    for a, values in found.items():
        assert tuple(t.loc[a, cols]) == pytest.approx(values)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_config_defaults_follow_the_paper_or_cocam(tmp_path: Path) -> None:
    c = ProtocolConfig(root=tmp_path)
    assert (c.arch, c.image_size, c.hidden, c.target, c.pairs, c.control) == (
        "alexnet", 224, None, "positive", PAPER_PAIRS, True)
    assert c.spec().hidden is None and c.spec().image_size == 224
    ft = c.finetune_config(6400)
    assert ft.max_steps == 2 * 100 and ft.patience is None and ft.lr == c.finetune_lr
    json.dumps(c.to_dict())  # JSON-able


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_size": 32}, "at least 63"),
    ({"target": "negative"}, "positive"),
    ({"pairs": (("Wearing_Lipstick", "Heavy_Makeup"), ("Wearing_Lipstick", "Attractive"))}, "once"),
    ({"pairs": (("Smiling", "Smiling"),)}, "itself"),
    ({"pairs": ()}, "at least one"),
    ({"batch_size": 0}, "batch_size"),
    ({"hidden": 0}, "positive width"),
    ({"arch": "resnet18", "hidden": 512}, "positive width for alexnet/vgg11.*resnet18 takes only None"),
    ({"arch": "resnet50"}, "not supported: use one of alexnet, resnet18, vgg11, vit_tiny"),
])
def test_config_errors_name_the_problem(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        ProtocolConfig(root=tmp_path, **kwargs)


def test_misspelled_pair_is_an_unknown_attribute(tmp_path: Path) -> None:
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        ProtocolConfig(root=tmp_path, pairs=(("Wearing_Lipstik", "Heavy_Makeup"),))


# --------------------------------------------------------------------------------------------
# Requirements and estimate
# --------------------------------------------------------------------------------------------


def test_requirements_report_on_a_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_celeba_here"
    with pytest.raises(DatasetNotFoundError) as err:
        requirements_report(ProtocolConfig(root=missing, **TINY))
    message = str(err.value)
    assert str(missing) in message and "celeba/" in message and "cocam generate" in message
    (tmp_path / "empty" / "celeba").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="list_attr_celeba.txt"):
        requirements_report(ProtocolConfig(root=tmp_path / "empty", **TINY))
    with pytest.raises(DatasetNotFoundError):
        run_protocol(ProtocolConfig(root=missing, out=tmp_path / "runs", **TINY), progress=False)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_requirements_report_on_a_dataset(synthetic_root: Path, tmp_path: Path) -> None:
    report = requirements_report(ProtocolConfig(root=synthetic_root, out=tmp_path, mask_dir=None, **TINY),
                                 measure_steps=1)
    assert "train 96, valid 32, test 64" in report
    assert "every listed image is present" in report
    for a, b in PAPER_PAIRS:
        assert f"{a} ∧ ¬{b}" in report and f"{a}: built-in" in report
    assert "Device:" in report and "Time estimate on cpu" in report and "total" in report
    assert "Plan: baseline ≤ 1 epochs (6 steps at most" in report and "4 × 6 steps" in report


def test_estimate_minutes_gives_a_positive_time_per_stage(synthetic_root: Path) -> None:
    minutes = estimate_minutes(ProtocolConfig(root=synthetic_root, **TINY), measure_steps=1)
    stages = ["decode cache", "baseline", *(f"guided {a}" for a, _ in PAPER_PAIRS), "control", "evaluation"]
    assert list(minutes) == stages
    assert minutes["decode cache"] >= 0
    assert all(math.isfinite(v) and v > 0 for k, v in minutes.items() if k != "decode cache")
    # The guided runs have the same budget (and here the same measured step), so the same estimate.
    assert len({round(minutes[f"guided {a}"], 12) for a, _ in PAPER_PAIRS}) == 1


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


def test_run_protocol_gives_the_papers_table_next_to_cocams(first_run: pd.DataFrame, config: ProtocolConfig,
                                                            masks: Path) -> None:
    df = first_run
    assert list(df["attribute"]) == [a for a, _ in PAPER_PAIRS]
    assert list(df["shortcut"]) == [b for _, b in PAPER_PAIRS]
    paper = PAPER_RESULTS.set_index("attribute")
    for _, row in df.iterrows():
        for col in ("pre-trained test %", "pre-trained conflict %", "fine-tuned test %", "fine-tuned conflict %"):
            assert row[f"paper {col}"] == paper.loc[row["attribute"], col]
        assert row["paper conflict change"] == pytest.approx(
            paper.loc[row["attribute"], "fine-tuned conflict %"] - paper.loc[row["attribute"], "pre-trained conflict %"])
        assert row["n test"] == 64
        for model in ("pre-trained", "fine-tuned", "control"):
            assert 0 <= row[f"cocam {model} test %"] <= 100
            assert row[f"cocam {model} test 95% CI"].startswith("[")
            conflict = row[f"cocam {model} conflict %"]
            assert (0 <= conflict <= 100) if row["n conflict"] > 0 else math.isnan(conflict)
            # the headline beside the paper's columns: never above any group it is the minimum of
            worst, reverse = row[f"cocam {model} worst group %"], row[f"cocam {model} reverse %"]
            assert 0 <= worst <= min(v for v in (conflict, reverse, 100.0) if not math.isnan(v))
            assert row[f"cocam {model} worst group 95% CI"].startswith("[")
    assert df.set_index("attribute").loc["Wearing_Lipstick", "mask"] == str(masks / "Wearing_Lipstick.png")
    assert df.set_index("attribute").loc["Double_Chin", "mask"] == "built-in"

    # The CSV on disk is the returned table; the sidecar holds the provenance.
    on_disk = pd.read_csv(config.out / "protocol.csv", keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(on_disk.drop(columns=[c for c in on_disk if "CI" in c or c == "mask"]),
                                  df.drop(columns=[c for c in df if "CI" in c or c == "mask"]), check_dtype=False)
    record = json.loads((config.out / "protocol.json").read_text())
    assert "torch" in record["versions"] and record["protocol"]["image_size"] == 64
    assert set(record["checkpoints"]) == {"pre-trained", "BCE-only control",
                                          *(f"fine-tuned ({a})" for a, _ in PAPER_PAIRS)}
    assert record["mask_sources"]["High_Cheekbones"] == "built-in"
    assert len(record["paper_results"]) == 3
    details = pd.read_csv(config.out / "protocol_details.csv")
    assert len(details) == 5 * 3  # every model on every pair
    assert "Wearing_Lipstick" in format_protocol_table(df) and "paper pre-trained" in format_protocol_table(df)
    assert "worst group %" in format_protocol_table(df)


def test_each_guided_run_guides_exactly_its_pairs_attribute(first_run: pd.DataFrame, config: ProtocolConfig) -> None:
    steps = set()
    for a, _ in PAPER_PAIRS:
        run = json.loads((config.out / f"guided_{a}" / "run.json").read_text())
        assert run["guidance"]["attributes"] == [a]
        assert run["guidance"]["target"] == "positive" and run["guidance"]["w_g"] == 1.0
        steps.add(run["config"]["max_steps"])
        assert load_checkpoint(config.out / f"guided_{a}" / "last.pt")["guidance"]["attributes"] == [a]
    control = json.loads((config.out / "control" / "run.json").read_text())
    assert control["guidance"] is None
    steps.add(control["config"]["max_steps"])
    assert steps == {96 // 16}  # one epoch of the training split, the same budget for all
    base = load_checkpoint(config.out / "baseline" / "best.pt")
    assert base["guidance"] is None
    sources = {json.loads((config.out / d / "protocol_source.json").read_text())["baseline_sha256"]
               for d in [f"guided_{a}" for a, _ in PAPER_PAIRS] + ["control"]}
    assert len(sources) == 1  # all from the same baseline checkpoint


def test_resume_reuses_every_stage_without_training(first_run: pd.DataFrame, config: ProtocolConfig,
                                                    monkeypatch) -> None:
    files = sorted(config.out.glob("*/*.pt")) + sorted(config.out.glob("*/history.csv"))
    assert len([f for f in files if f.suffix == ".pt"]) == 2 + 2 * 4  # best+last of the baseline and 4 runs
    before = {f: f.stat().st_mtime_ns for f in files}
    steps = []
    original = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    again = run_protocol(config, progress=False)
    assert steps == []  # no optimisation step at all
    assert {f: f.stat().st_mtime_ns for f in files} == before
    pd.testing.assert_frame_equal(again, first_run)  # deterministic evaluation of the same checkpoints


def test_the_evaluation_is_redone_when_a_checkpoint_changes(first_run: pd.DataFrame, config: ProtocolConfig,
                                                            monkeypatch) -> None:
    import cocam.evaluate

    calls = []
    original = cocam.evaluate.evaluate_checkpoints

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cocam.evaluate, "evaluate_checkpoints", counting)
    run_protocol(config, progress=False)
    assert calls == []  # reused
    control = config.out / "control" / "last.pt"
    os.utime(control, ns=(control.stat().st_atime_ns, control.stat().st_mtime_ns + 1_000_000))
    again = run_protocol(config, progress=False)
    assert calls == [1]
    pd.testing.assert_frame_equal(again, first_run)


def test_resume_refuses_a_folder_made_with_other_settings(first_run: pd.DataFrame, config: ProtocolConfig) -> None:
    from dataclasses import replace

    with pytest.raises(ProtocolError, match=r"other settings \(config\.lr: 0\.0003 → 0\.001\).*resume=False"):
        run_protocol(replace(config, finetune_lr=1e-3), progress=False)
    with pytest.raises(ProtocolError, match=r"baseline.*other settings.*epochs"):
        run_protocol(replace(config, baseline_epochs=2), progress=False)


def test_resume_refuses_a_run_folder_the_protocol_did_not_start(first_run: pd.DataFrame, config: ProtocolConfig,
                                                                tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    shutil.copytree(config.out / "baseline", tmp_path / "runs" / "baseline")
    (tmp_path / "runs" / "baseline" / "protocol_source.json").unlink()
    with pytest.raises(ProtocolError, match="did not start"):
        run_protocol(replace(config, out=tmp_path / "runs"), progress=False)


def test_a_second_protocol_in_the_same_folder_is_refused(config: ProtocolConfig, first_run: pd.DataFrame) -> None:
    lock = config.out / ".protocol.lock"
    lock.write_text(str(os.getppid()))  # a live process (pytest's parent) holds it
    try:
        with pytest.raises(RunLockedError, match="in use by process"):
            run_protocol(config, progress=False)
    finally:
        lock.unlink()


def test_one_pair_without_control(synthetic_root: Path, tmp_path: Path) -> None:
    config = ProtocolConfig(root=synthetic_root, out=tmp_path / "runs", pairs=(("High_Cheekbones", "Smiling"),),
                            control=False, mask_dir=None, **TINY)
    df = run_protocol(config, progress=False)
    assert list(df["attribute"]) == ["High_Cheekbones"]
    assert not any("control" in c for c in df.columns)
    assert df.loc[0, "paper fine-tuned conflict %"] == 61.33
    assert not (tmp_path / "runs" / "control").exists()
    assert "BCE-only control" not in format_protocol_table(df)


# --------------------------------------------------------------------------------------------
# Command-line glue
# --------------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    return add_protocol_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_arguments_make_the_config(tmp_path: Path) -> None:
    args = _parse(["--root", str(tmp_path), "--hidden", "0", "--pair", "Double_Chin:Chubby", "--no-control",
                   "--patience", "0", "--finetune-lr", "1e-4"])
    c = config_from_args(args)
    assert c.hidden is None and c.pairs == (("Double_Chin", "Chubby"),) and not c.control and c.patience is None
    assert c.finetune_lr == 1e-4 and c.target == "positive" and c.image_size == 224
    with pytest.raises(ValueError, match="Wearing_Lipstick:Heavy_Makeup"):
        config_from_args(_parse(["--root", str(tmp_path), "--pair", "Double_Chin"]))


def test_run_from_args_checks_and_runs(first_run: pd.DataFrame, config: ProtocolConfig, capsys,
                                      monkeypatch) -> None:
    import cocam.protocol

    measured = {"plain_step_s": 0.1, "guided_step_s": 0.2, "eval_image_s": 0.001, "device": "cpu"}
    monkeypatch.setattr(cocam.protocol, "_estimate", lambda c, n: ({"baseline": 1.0, "evaluation": 0.5}, measured))
    common = ["--root", str(config.root), "--out", str(config.out), "--mask-dir", str(config.mask_dir),
              "--image-size", "64", "--hidden", "32", "--epochs", "1", "--finetune-epochs", "1",
              "--batch-size", "16", "--device", "cpu"]
    assert run_from_args(_parse([*common, "--check", "--measure-steps", "1"])) == 0
    report = capsys.readouterr().out
    assert "Time estimate" in report and re.search(r"total\s+1\.5 min", report)
    mtimes = {f: f.stat().st_mtime_ns for f in config.out.rglob("*.pt")}
    assert run_from_args(_parse(common)) == 0  # everything is done: resumes and prints
    assert {f: f.stat().st_mtime_ns for f in config.out.rglob("*.pt")} == mtimes  # nothing was trained again
    out = capsys.readouterr().out
    assert "The paper's table" in out and "paper fine-tuned" in out and "cocam BCE-only control" in out
