"""Tests for the command line: every subcommand in-process on a tiny generated dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from cocam import PAPER_PAIRS
from cocam.checkpoint import load_checkpoint
from cocam.cli import main
from cocam.masks import default_mask, save_mask

PAPER_COLUMNS = ["attribute", "shortcut", "model", "test %", "conflict A∧¬B %", "conflict 95% CI", "n conflict",
                 "reverse ¬A∧B %", "worst group %", "n test"]
TINY = ["--epochs", "1", "--batch-size", "16", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch) -> None:
    """Run from an empty folder, so no mask of the working copy (data/masks/) is picked up."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def root(workdir: Path) -> Path:
    root = workdir / "data"
    assert main(["generate", "--root", str(root), "--n-train", "48", "--n-valid", "16", "--n-test", "16",
                 "--workers", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def baseline(root: Path, workdir: Path) -> Path:
    out = workdir / "runs" / "baseline"
    assert main(["train", "--root", str(root), "--out", str(out), "--image-size", "64", "--hidden", "32", *TINY]) == 0
    return out


def _finetune(root: Path, checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "--root", str(root), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--max-steps", "2", *TINY, *extra])


@pytest.fixture(scope="module")
def guided(root: Path, baseline: Path, workdir: Path) -> Path:
    out = workdir / "runs" / "guided"
    assert _finetune(root, baseline / "best.pt", out, "--attribute", "Wearing_Lipstick") == 0
    return out


@pytest.fixture(scope="module")
def control(root: Path, baseline: Path, workdir: Path) -> Path:
    out = workdir / "runs" / "control"
    assert _finetune(root, baseline / "best.pt", out, "--control") == 0
    return out


# --------------------------------------------------------------------------------------------
# generate, stats, template
# --------------------------------------------------------------------------------------------


def test_generate_writes_a_celeba_layout(root: Path, capsys) -> None:
    celeba = root / "celeba"
    assert (celeba / "list_attr_celeba.txt").is_file()
    assert len(list((celeba / "img_align_celeba").glob("*.jpg"))) == 80
    # Generating the same dataset again is a no-op, not an error.
    assert main(["generate", "--root", str(root), "--n-train", "48", "--n-valid", "16", "--n-test", "16",
                 "--workers", "1"]) == 0
    assert "48/16/16" in capsys.readouterr().out


def test_stats(root: Path, capsys) -> None:
    assert main(["stats", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Co-occurrence of the guided pairs" in out and "Most co-occurring pairs" in out
    for a, b in PAPER_PAIRS:
        assert a in out and b in out
    assert main(["stats", "--root", str(root), "--pair", "Smiling:Mouth_Slightly_Open", "--top", "3"]) == 0
    assert "Mouth_Slightly_Open" in capsys.readouterr().out


def test_template(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tpl"
    assert main(["template", "--out", str(out)]) == 0
    with Image.open(out / "template.png") as img:
        assert img.size == (178, 218)
    landmarks = json.loads((out / "template_landmarks.json").read_text())
    assert landmarks["names"] == ["lefteye", "righteye", "nose", "leftmouth", "rightmouth"]
    assert len(landmarks["xy"]) == 5
    assert "template.png" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# train, finetune, evaluate
# --------------------------------------------------------------------------------------------


def test_train(baseline: Path) -> None:
    assert {"last.pt", "best.pt", "history.csv", "run.json"} <= {p.name for p in baseline.iterdir()}
    ckpt = load_checkpoint(baseline / "best.pt")
    assert ckpt["spec"]["image_size"] == 64 and ckpt["spec"]["hidden"] == 32
    assert ckpt["config"]["batch_size"] == 16 and ckpt["config"]["epochs"] == 1
    assert ckpt["step"] == 3  # 48 images / 16


def test_finetune_guided(guided: Path) -> None:
    info = json.loads((guided / "run.json").read_text())
    assert info["guidance"]["attributes"] == ["Wearing_Lipstick"]
    assert info["guidance"]["target"] == "both" and info["guidance"]["exact"] is True
    assert info["config"]["patience"] is None and info["config"]["max_steps"] == 2
    history = pd.read_csv(guided / "history.csv")
    assert "train_loss_g" in history.columns
    assert load_checkpoint(guided / "last.pt")["step"] == 2


def test_finetune_control(control: Path, guided: Path) -> None:
    info = json.loads((control / "run.json").read_text())
    assert info["guidance"] is None
    assert "train_loss_g" not in pd.read_csv(control / "history.csv").columns
    assert load_checkpoint(control / "last.pt")["step"] == load_checkpoint(guided / "last.pt")["step"] == 2


def test_finetune_mask_sources_and_options(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    mask_file = save_mask(tmp_path / "lips.png", default_mask("Wearing_Lipstick"))
    out = tmp_path / "with-file"
    assert _finetune(root, baseline / "best.pt", out, "--attribute", "Wearing_Lipstick", "--mask", str(mask_file),
                     "--max-steps", "1", "--target", "positive", "--first-order", "--w-g", "0.5") == 0
    assert f"Wearing_Lipstick: mask {mask_file}" in capsys.readouterr().out
    g = json.loads((out / "run.json").read_text())["guidance"]
    assert (g["target"], g["exact"], g["w_g"]) == ("positive", False, 0.5)

    mask_dir = tmp_path / "masks"
    save_mask(mask_dir / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))
    assert _finetune(root, baseline / "best.pt", tmp_path / "with-dir", "--attribute", "Wearing_Lipstick",
                     "--mask-dir", str(mask_dir), "--max-steps", "1") == 0
    assert f"mask {mask_dir / 'Wearing_Lipstick.png'}" in capsys.readouterr().out

    assert _finetune(root, baseline / "best.pt", tmp_path / "builtin", "--attribute", "Wearing_Lipstick",
                     "--max-steps", "1") == 0
    assert "Wearing_Lipstick: mask built-in" in capsys.readouterr().out


def test_evaluate_writes_the_paper_table(root: Path, baseline: Path, guided: Path, control: Path, tmp_path: Path,
                                         capsys) -> None:
    out = tmp_path / "x.csv"
    assert main(["evaluate", "--root", str(root), "--checkpoint", f"pre={baseline / 'best.pt'}",
                 "--checkpoint", f"guided={guided / 'last.pt'}", "--checkpoint", str(control / "last.pt"),
                 "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns[: len(PAPER_COLUMNS)]) == PAPER_COLUMNS
    assert {"mask soft_iou", "truth soft_iou", "n positives"} <= set(table.columns)
    assert list(dict.fromkeys(table["model"])) == ["pre", "guided", "control"]  # name from the folder
    assert list(dict.fromkeys(table["attribute"])) == [a for a, _ in PAPER_PAIRS]
    assert len(table) == 3 * len(PAPER_PAIRS)
    assert (table["n test"] == 16).all()
    assert table["test %"].between(0, 100).all()
    stdout = capsys.readouterr().out
    assert "results written to" in stdout and "conflict A∧¬B %" in stdout


def test_evaluate_options(root: Path, baseline: Path, capsys) -> None:
    assert main(["evaluate", "--root", str(root), "--checkpoint", f"b={baseline / 'best.pt'}", "--no-attention",
                 "--pair", "Wearing_Lipstick:Heavy_Makeup", "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert "Wearing_Lipstick" in out and "High_Cheekbones" not in out and "soft_iou" not in out


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_misspelled_attribute_is_an_error_with_a_suggestion(root: Path, baseline: Path, tmp_path: Path,
                                                            capsys) -> None:
    rc = _finetune(root, baseline / "best.pt", tmp_path / "typo", "--attribute", "Wearing_Lipstik")
    assert rc != 0
    err = capsys.readouterr().err
    assert "cocam finetune: error:" in err and "Did you mean 'Wearing_Lipstick'" in err
    assert "Traceback" not in err

    assert main(["stats", "--root", str(root), "--pair", "wearing lipstick:Heavy_Makeup"]) != 0
    assert "Did you mean 'Wearing_Lipstick'" in capsys.readouterr().err


def test_other_user_errors(root: Path, tmp_path: Path, capsys) -> None:
    assert main(["stats", "--root", str(root), "--pair", "Wearing_Lipstick"]) == 1
    assert "must look like Wearing_Lipstick:Heavy_Makeup" in capsys.readouterr().err
    assert main(["stats", "--root", str(tmp_path / "nowhere")]) == 1
    assert "cocam stats: error:" in capsys.readouterr().err
    assert main(["evaluate", "--root", str(root), "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert "cocam train" in capsys.readouterr().err  # the hint of a missing checkpoint
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--checkpoint", "x.pt", "--target", "negative"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_finetune_needs_an_attribute_or_control(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    assert _finetune(root, baseline / "best.pt", tmp_path / "nothing") != 0
    assert "--attribute" in capsys.readouterr().err


def test_a_locked_run_folder_is_a_clean_error(root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))
    rc = main(["train", "--root", str(root), "--out", str(out), "--image-size", "64", "--hidden", "32", *TINY])
    assert rc == 1
    assert "in use" in capsys.readouterr().err


def test_train_same_seed_same_weights(root: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["train", "--root", str(root), "--out", str(tmp_path / name), "--image-size", "64",
                     "--hidden", "32", "--seed", "3", *TINY]) == 0
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    # exact: the same computation twice in one process, at the thread count one_thread pins
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# python -m cocam
# --------------------------------------------------------------------------------------------


def test_python_m_cocam_help() -> None:
    outputs = []
    for args in (["--help"], ["finetune", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "cocam", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: cocam" in proc.stdout
        outputs.append(proc.stdout)
    top, finetune = outputs
    for cmd in ("generate", "stats", "template", "train", "finetune", "evaluate", "demo"):
        assert cmd in top
    assert all(option in finetune for option in ("--attribute", "--control", "--mask", "--checkpoint"))


def test_demo_end_to_end_smoke(tmp_path: Path, capsys, monkeypatch) -> None:
    """The README's main job on tiny data: dataset, baseline, guided, control, before/after table."""
    monkeypatch.chdir(tmp_path)  # the demo reads data/masks relative to the working folder
    rc = main(["demo", "--preset", "smoke", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
               "--epochs", "1", "--image-size", "64", "--hidden", "32", "--batch-size", "32", "--workers", "1",
               "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Before/after" in out and "stage times" in out
    table = pd.read_csv(tmp_path / "runs" / "results.csv")
    assert set(table["model"]) == {"pre-trained", "BCE-only control", "fine-tuned (guided)"}
    assert set(table["attribute"]) == {a for a, _ in PAPER_PAIRS}
    guided = load_checkpoint(tmp_path / "runs" / "guided" / "last.pt")
    control = load_checkpoint(tmp_path / "runs" / "control" / "last.pt")
    assert guided["step"] == control["step"] > 0  # equal-step control
    assert guided["guidance"]["attributes"] == [a for a, _ in PAPER_PAIRS] and control["guidance"] is None
    provenance = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert set(provenance["checkpoints"]) == set(table["model"]) and "torch" in provenance["versions"]
    assert provenance["checkpoints"]["fine-tuned (guided)"]["guidance"]["attributes"] == [a for a, _ in PAPER_PAIRS]


# --------------------------------------------------------------------------------------------
# loss / transfer options, bias, compare
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [("--loss", "rrr_cam"), ("--loss", "energy", "--transfer", "landmarks"),
                                   ("--loss", "rrr_input", "--w-g", "50")])
def test_finetune_with_another_loss_records_it(root: Path, baseline: Path, tmp_path: Path, extra) -> None:
    assert _finetune(root, baseline / "best.pt", tmp_path / "run", "--attribute", "Wearing_Lipstick", *extra) == 0
    guidance = json.loads((tmp_path / "run" / "run.json").read_text())["guidance"]
    options = dict(zip(extra[::2], extra[1::2]))
    assert guidance["loss"] == options["--loss"]
    assert guidance["transfer"] == options.get("--transfer", "template")
    from cocam.losses import DEFAULT_GUIDANCE_WEIGHTS

    assert guidance["w_g"] == float(options.get("--w-g", DEFAULT_GUIDANCE_WEIGHTS[options["--loss"]]))


def test_finetune_with_a_setting_per_attribute(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    assert _finetune(root, baseline / "best.pt", tmp_path / "run", "--attribute", "Wearing_Lipstick",
                     "--attribute", "High_Cheekbones", "--loss", "iou", "energy", "--target", "positive", "both",
                     "--w-g", "3", "1") == 0
    guidance = json.loads((tmp_path / "run" / "run.json").read_text())["guidance"]
    assert (guidance["loss"], guidance["target"], guidance["w_g"]) == (["iou", "energy"], ["positive", "both"],
                                                                       [3.0, 1.0])
    assert _finetune(root, baseline / "best.pt", tmp_path / "bad", "--attribute", "Wearing_Lipstick",
                     "--loss", "iou", "energy") == 1
    assert "loss has 2 values for 1 guided target " in capsys.readouterr().err


def test_bias_ranks_pairs_and_writes_the_ranking(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bias.csv"
    assert main(["bias", "--root", str(root), "--checkpoint", str(baseline / "best.pt"), "--split", "train",
                 "--min-group", "2", "--top", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bias score" in text and "gap" in text
    ranking = pd.read_csv(out)
    assert len(ranking) > 0 and ranking.gap.is_monotonic_decreasing
    assert (ranking[["n_ab", "n_a_not_b"]] >= 2).all().all()
    assert json.loads(out.with_suffix(".json").read_text())["checkpoints"]["model"]["spec"]["image_size"] == 64
    assert main(["bias", "--root", str(root), "--checkpoint", str(baseline / "best.pt"),
                 "--attribute", "Wearing_Lipstik"]) == 1
    assert "Wearing_Lipstick" in capsys.readouterr().err


def test_compare_prints_both_splits_and_the_choice(root: Path, tmp_path: Path, capsys) -> None:
    assert main(["compare", "--root", str(root), "--out", str(tmp_path / "cmp"), "--method", "energy",
                 "--pair", "Wearing_Lipstick:Heavy_Makeup", "--seeds", "0", "--image-size", "64", "--hidden", "32",
                 "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "16", "--device", "cpu",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "valid split" in text and "test split" in text and "chosen on the valid split" in text
    assert (tmp_path / "cmp" / "summary.csv").is_file()
    # --baseline: start from a given checkpoint, train none
    base = tmp_path / "cmp" / "baseline" / "best.pt"
    assert main(["compare", "--root", str(root), "--out", str(tmp_path / "cmp2"), "--method", "energy",
                 "--pair", "Wearing_Lipstick:Heavy_Makeup", "--seeds", "0", "--image-size", "64", "--hidden", "32",
                 "--finetune-epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
                 "--baseline", str(base)]) == 0
    assert not (tmp_path / "cmp2" / "baseline").exists()
    assert str(base) in capsys.readouterr().out
    assert main(["compare", "--root", str(root), "--out", str(tmp_path / "x"), "--method", "dice"]) == 1
    assert "unknown method" in capsys.readouterr().err


def test_paper_check_reports_needs_and_time(root: Path, tmp_path: Path, capsys) -> None:
    assert main(["paper", "--root", str(root), "--out", str(tmp_path / "paper"), "--check", "--image-size", "64",
                 "--hidden", "32", "--batch-size", "8", "--measure-steps", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "min" in text and "Wearing_Lipstick" in text
    assert not (tmp_path / "paper" / "protocol.csv").exists()  # --check trains nothing
