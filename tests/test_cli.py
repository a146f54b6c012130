"""Tests for the command line: every subcommand in-process on a tiny generated dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cocam import PAPER_PAIRS
from cocam.checkpoint import load_checkpoint
from cocam.cli import main
from cocam.masks import default_mask, save_mask

PAPER_COLUMNS = ["attribute", "shortcut", "model", "acc_worst_group", "acc_worst_group_low", "acc_worst_group_high",
                 "worst_group", "acc_conflict_mean"]
TINY = ["--epochs", "1", "--batch-size", "16", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch) -> None:
    """Run from an empty folder with an empty default mask folder, so no mask of the working copy
    (the project's data/masks/, found from the project wherever a command starts) is picked up."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-masks").mkdir()
    monkeypatch.setenv("COCAM_MASK_DIR", str(tmp_path / "no-masks"))


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
    assert info["guidance"]["target"] == "positive" and info["guidance"]["exact"] is True  # the paper's default
    assert info["guidance"]["cam_method"] == "gradcam"
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
    out = capsys.readouterr().out
    assert "Wearing_Lipstick: mask built-in" in out
    assert f"masks: {tmp_path / 'no-masks'}" in out  # $COCAM_MASK_DIR, not the current folder's data/masks
    assert "guidance: loss iou, target positive, w_g " in out and "(the loss default)" in out and "transfer template" in out


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
    assert (table["n_all"] == 16).all()
    assert table["acc_all"].between(0, 1).all() and table["acc_worst_group"].between(0, 1).all()
    assert (table["acc_worst_group"] <= table[["acc_a_not_b", "acc_not_a_b"]].min(axis=1).fillna(1.0)).all()
    stdout = capsys.readouterr().out
    assert "results written to" in stdout and "worst group %" in stdout and "conflict A∧¬B %" in stdout


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


def test_train_arch_choices_are_the_registered_architectures(root: Path, tmp_path: Path, capsys) -> None:
    from cocam.archs import ARCHITECTURES

    with pytest.raises(SystemExit) as info:
        main(["train", "--root", str(root), "--arch", "resnet50"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'resnet50'" in err and all(repr(name) in err for name in ARCHITECTURES)

    # A token model through the CLI: the registry says it has no hidden layers, so --hidden is not applied.
    out = tmp_path / "vit"
    assert main(["train", "--root", str(root), "--out", str(out), "--arch", "vit_tiny", "--image-size", "64",
                 "--hidden", "32", *TINY]) == 0
    spec = load_checkpoint(out / "best.pt")["spec"]
    assert (spec["arch"], spec["image_size"], spec["hidden"]) == ("vit_tiny", 64, None)
    assert _finetune(root, out / "best.pt", tmp_path / "vit-guided", "--attribute", "Wearing_Lipstick") == 0
    guided = load_checkpoint(tmp_path / "vit-guided" / "last.pt")
    assert guided["spec"]["arch"] == "vit_tiny" and guided["step"] == 2


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
    assert "What this one run can say" in out and "cocam fix" in out  # no conclusion beyond the intervals
    for a, _ in PAPER_PAIRS:
        assert any(line.strip().startswith(f"{a}:") and line.rstrip().endswith(
            ("higher", "lower", "not distinguishable")) for line in out.splitlines())
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


def test_finetune_with_another_cam_method_records_it(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    assert _finetune(root, baseline / "best.pt", tmp_path / "run", "--attribute", "Wearing_Lipstick",
                     "--cam-method", "gradcam++", "--max-steps", "1") == 0
    assert "exact gradients, CAM gradcam++" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["guidance"]["cam_method"] == "gradcam++"
    with pytest.raises(SystemExit):
        _finetune(root, baseline / "best.pt", tmp_path / "other", "--attribute", "Wearing_Lipstick",
                  "--cam-method", "scorecam")
    err = capsys.readouterr().err
    assert "--cam-method: invalid choice" in err and all(m in err.split("choose from")[1]
                                                         for m in ("gradcam", "gradcam++", "layercam"))


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


def test_rank_prints_the_images_to_correct_first_and_writes_them(root: Path, baseline: Path, tmp_path: Path,
                                                                 capsys) -> None:
    out = tmp_path / "ranking.csv"
    args = ["rank", "--root", str(root), "--checkpoint", str(baseline / "best.pt"), "--attribute", "Wearing_Lipstick",
            "--shortcut", "Heavy_Makeup", "--by", "worst_group", "--top", "4", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "by worst_group" in text and "region built-in" in text  # the empty mask folder: the built-in region
    printed = [line for line in text.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(printed) == 4  # --top rows
    ranking = pd.read_csv(out)
    assert len(ranking) == 16 and sorted(ranking["index"]) == list(range(16))  # the whole valid split
    assert ranking["rank"].tolist() == list(range(1, 17)) and ranking.worst_group.is_monotonic_decreasing
    assert {"image", "label", "p", "group", "outside_energy", "uncertainty", "random"} <= set(ranking.columns)
    assert json.loads(out.with_suffix(".json").read_text())["checkpoints"]["model"]["spec"]["image_size"] == 64
    before = out.read_text()
    assert main([*args, "--out", str(out), "--by", "random"]) == 1  # never replaced without --overwrite
    assert "already exists" in _one_error(capsys, "rank") and out.read_text() == before
    assert main([*args, "--out", str(out), "--by", "random", "--seed", "3", "--overwrite"]) == 0
    assert pd.read_csv(out)["index"].tolist() == np.random.default_rng(3).permutation(16).tolist()
    capsys.readouterr()
    assert main(args[:7] + ["--by", "worst_group"]) == 1  # no --shortcut
    assert "--shortcut" in _one_error(capsys, "rank")
    assert main(args[:5] + ["--attribute", "Wearing_Lipstik"]) == 1
    assert "Wearing_Lipstick" in _one_error(capsys, "rank")
    with pytest.raises(SystemExit):
        main(args[:7] + ["--by", "energy"])


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


def test_fix_prints_the_choice_and_the_report(root: Path, tmp_path: Path, capsys) -> None:
    common = ["--root", str(root), "--pair", "Wearing_Lipstick:Heavy_Makeup", "--seeds", "0", "--image-size", "64",
              "--hidden", "32", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "16", "--device", "cpu",
              "--quiet"]
    assert main(["fix", "--out", str(tmp_path / "fix"), "--candidate", "iou, positives (paper)",
                 "--peers", "last layer (DFR)", *common]) == 0
    text = capsys.readouterr().out
    assert "chosen on the valid split" in text and "test split" in text and "fixed model" in text
    assert "last layer (DFR)" in text and (tmp_path / "fix" / "summary.csv").is_file()
    assert main(["fix", "--out", str(tmp_path / "x"), "--candidate", "dice", *common]) == 1
    assert "unknown candidate" in capsys.readouterr().err
    assert main(["fix", "--out", str(tmp_path / "x"), "--max-accuracy-drop", "-1", *common]) == 1
    assert "--max-accuracy-drop" in capsys.readouterr().err


def test_paper_check_reports_needs_and_time(root: Path, tmp_path: Path, capsys) -> None:
    assert main(["paper", "--root", str(root), "--out", str(tmp_path / "paper"), "--check", "--image-size", "64",
                 "--hidden", "32", "--batch-size", "8", "--measure-steps", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "min" in text and "Wearing_Lipstick" in text
    assert not (tmp_path / "paper" / "protocol.csv").exists()  # --check trains nothing


# --------------------------------------------------------------------------------------------
# Data options and real-data safety
# --------------------------------------------------------------------------------------------


def _last_line(err: str) -> str:
    """The error line: the last line of stderr, after any progress bars (which end in carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    assert lines and lines[-1].startswith("cocam "), err
    assert sum(line.startswith("cocam ") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_and_demo_never_replace_a_real_folder(tmp_path: Path, capsys) -> None:
    from _celeba_fixture import make_celeba

    real = make_celeba(tmp_path / "real", n=6, seed=1)
    before = _tree(real.root)
    assert main(["generate", "--root", str(real.root), "--overwrite", "--workers", "1"]) == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("cocam generate: error: ") 
    assert "not generated by cocam" in err and "cocam_synthetic.json" in err
    assert main(["demo", "--root", str(real.root), "--workers", "1"]) == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("cocam demo: error: ")  and "--overwrite" not in err
    assert _tree(real.root) == before  # nothing deleted, nothing written


def test_generated_folder_follows_the_umask(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "celeba").stat().st_mode & 0o777 == 0o777 & ~umask


def test_stats_has_an_all_splits_row(root: Path, capsys) -> None:
    from cocam.cooccurrence import celeba_reference

    assert main(["stats", "--root", str(root), "--pair", "Wearing_Lipstick:Heavy_Makeup"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if len(line.split()) > 3]
    splits = [r[0] for r in rows if len(r) > 2 and r[1:3] == ["Wearing_Lipstick", "Heavy_Makeup"]]
    assert splits[:4] == ["train", "valid", "test", "all"]
    all_row = next(r for r in rows if r[:3] == ["all", "Wearing_Lipstick", "Heavy_Makeup"])
    assert int(all_row[3]) == sum(int(r[3]) for r in rows if r[0] in ("train", "valid", "test")
                                  and r[1:3] == ["Wearing_Lipstick", "Heavy_Makeup"])
    ref = celeba_reference(include_all=True)
    pick = ref[(ref["a"] == "Wearing_Lipstick") & (ref["b"] == "Heavy_Makeup")].set_index("split")
    assert pick.loc["all", "n_images"] == 202_599
    assert pick.loc["all", "n_ab"] == pick.loc[["train", "valid", "test"], "n_ab"].sum()


def test_paper_check_exits_non_zero_when_the_run_cannot_proceed(tmp_path: Path, capsys) -> None:
    from _celeba_fixture import make_celeba

    d = make_celeba(tmp_path / "noimages", n=12, seed=2, images=False)
    assert main(["paper", "--root", str(d.root), "--out", str(tmp_path / "p"), "--check", "--device", "cpu",
                 "--image-size", "64", "--batch-size", "64", "--measure-steps", "1"]) == 1
    captured = capsys.readouterr()
    assert "cannot proceed" in captured.out and "listed images are missing" in captured.out
    assert _last_line(captured.err).startswith("cocam paper: error: the run cannot proceed")


def test_cache_dir_option_and_one_line_space_error(tmp_path: Path, capsys, monkeypatch) -> None:
    from _celeba_fixture import make_celeba

    import cocam.dataset as dataset_module

    d = make_celeba(tmp_path / "real", n=24, seed=3)
    caches = tmp_path / "caches"
    args = ["train", "--root", str(d.root), "--out", str(tmp_path / "run"), "--image-size", "64", "--hidden", "8",
            "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--device", "cpu", "--cache-dir", str(caches)]
    assert main(args) == 0
    assert list(caches.glob("celeba-*/train_64px.uint8")) and list(caches.glob("celeba-*/valid_64px.uint8"))
    assert "COCAM_CACHE_DIR" not in os.environ  # set for the command's run only
    assert not any(p.name.startswith(".cocam") for p in d.folder.iterdir())
    capsys.readouterr()
    monkeypatch.setattr(dataset_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    assert main([*args[:-1], str(tmp_path / "other-caches")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("cocam train: error: Not enough disk space") 


def test_landmark_transfer_without_landmarks_names_the_file(root: Path, baseline: Path, tmp_path: Path,
                                                            capsys) -> None:
    import shutil

    copy = tmp_path / "nolm"
    shutil.copytree(root / "celeba", copy / "celeba", ignore=shutil.ignore_patterns(".cocam_cache"))
    (copy / "celeba" / "list_landmarks_align_celeba.txt").unlink()
    assert main(["stats", "--root", str(copy)]) == 0  # needs no landmarks
    capsys.readouterr()
    assert _finetune(copy, baseline / "best.pt", tmp_path / "out", "--attribute", "Wearing_Lipstick",
                     "--transfer", "landmarks") == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("cocam finetune: error: --transfer landmarks needs the landmark file")
    assert "list_landmarks_align_celeba.txt" in err 


def test_mask_folder_is_resolved_from_one_documented_place(tmp_path: Path, monkeypatch) -> None:
    import cocam
    from cocam.masks import default_mask_dir, resolve_mask, resolve_mask_dir

    monkeypatch.delenv("COCAM_MASK_DIR")
    monkeypatch.delenv("COCAM_PROJECT_DIR", raising=False)
    # The current folder (tmp_path) has a data/masks of its own: it is not what is used.
    save_mask(tmp_path / "data" / "masks" / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))
    source_project = Path(cocam.__file__).resolve().parents[1]
    assert default_mask_dir() == source_project / "data" / "masks"
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    monkeypatch.chdir(project / "notebooks")  # a notebook's folder: the project above it
    assert default_mask_dir() == project / "data" / "masks"
    monkeypatch.setenv("COCAM_MASK_DIR", str(tmp_path / "data" / "masks"))
    assert default_mask_dir() == tmp_path / "data" / "masks"
    assert resolve_mask("Wearing_Lipstick")[1] == str(tmp_path / "data" / "masks" / "Wearing_Lipstick.png")
    assert resolve_mask("Wearing_Lipstick", None)[1] == "built-in"
    assert resolve_mask_dir(tmp_path / "data" / "masks") == tmp_path / "data" / "masks"
    with pytest.raises(FileNotFoundError, match=r"mask folder .*typo does not exist"):
        resolve_mask_dir(tmp_path / "typo")


# --------------------------------------------------------------------------------------------
# Nothing lost, nothing silent: each failure is one line on stderr and a non-zero exit
# --------------------------------------------------------------------------------------------


def _one_error(capsys, command: str) -> str:
    """The single stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cocam {command}: error: "), lines[0]
    return lines[0]


def _evaluate(root: Path, *extra: str) -> int:
    return main(["evaluate", "--root", str(root), "--no-attention", "--pair", "Wearing_Lipstick:Heavy_Makeup",
                 *extra])


def test_evaluate_out_never_replaces_its_sidecar_or_a_checkpoint(root: Path, baseline: Path, tmp_path: Path,
                                                                 capsys) -> None:
    ckpt = ["--checkpoint", str(baseline / "best.pt")]
    # res.json: the CSV used to be written, then replaced by its own JSON sidecar.
    assert _evaluate(root, *ckpt, "--out", str(tmp_path / "res.json")) == 1
    assert "ending in .csv" in _one_error(capsys, "evaluate")
    assert not (tmp_path / "res.json").exists()
    # a checkpoint path: refused, the checkpoint untouched (with or without --overwrite).
    before = (baseline / "last.pt").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert _evaluate(root, *ckpt, "--out", str(baseline / "last.pt"), *extra) == 1
        assert "ending in .csv" in _one_error(capsys, "evaluate")
    assert (baseline / "last.pt").read_bytes() == before
    # an existing results file (or only its sidecar) is kept unless --overwrite.
    out = tmp_path / "res.csv"
    out.write_text("mine\n")
    assert _evaluate(root, *ckpt, "--out", str(out)) == 1
    assert "already exists" in _one_error(capsys, "evaluate") and out.read_text() == "mine\n"
    out.unlink()
    (tmp_path / "res.json").write_text("{}\n")
    assert _evaluate(root, *ckpt, "--out", str(out)) == 1
    assert "--overwrite" in _one_error(capsys, "evaluate") and not out.exists()
    assert _evaluate(root, *ckpt, "--out", str(out), "--overwrite") == 0
    assert "results written to" in capsys.readouterr().out
    assert pd.read_csv(out)["model"].tolist() == ["baseline"]
    assert json.loads((tmp_path / "res.json").read_text())["results"] == "res.csv"


def test_evaluate_names_two_checkpoints_of_one_folder_apart(root: Path, baseline: Path, capsys) -> None:
    best, last = str(baseline / "best.pt"), str(baseline / "last.pt")
    assert _evaluate(root, "--checkpoint", best, "--checkpoint", last) == 0
    out = capsys.readouterr().out
    assert "baseline/best" in out and "baseline/last" in out  # both rows, neither replaced by the other
    assert _evaluate(root, "--checkpoint", f"b={best}", "--checkpoint", f"b={last}") == 1
    assert "two checkpoints are named 'b'" in _one_error(capsys, "evaluate")
    assert _evaluate(root, "--checkpoint", best, "--checkpoint", best) == 1
    assert "the same checkpoint" in _one_error(capsys, "evaluate")


def test_name_checkpoints() -> None:
    from cocam.evaluate import name_checkpoints

    assert name_checkpoints(["runs/kb/best.pt", "runs/kb/last.pt", "runs/guided/last.pt", "x=runs/a=1/b.pt"]) == {
        "kb/best": Path("runs/kb/best.pt"), "kb/last": Path("runs/kb/last.pt"),
        "guided": Path("runs/guided/last.pt"), "x": Path("runs/a=1/b.pt")}
    with pytest.raises(ValueError, match="empty name"):
        name_checkpoints(["=runs/kb/best.pt"])


@pytest.mark.parametrize("weights, problem", [(["--w-g", "-5"], "--w-g must be a finite number > 0"),
                                              (["--w-g", "nan"], "--w-g must be a finite number > 0"),
                                              (["--w-g", "inf"], "--w-g must be a finite number > 0"),
                                              (["--w-g", "0"], "--control"),
                                              (["--w-g", "1", "-1", "--attribute", "Double_Chin"], "got -1"),
                                              (["--w-a", "nan"], "--w-a must be a finite number")])
def test_guidance_weights_must_be_finite_and_positive(root: Path, baseline: Path, tmp_path: Path, capsys,
                                                      weights, problem) -> None:
    assert _finetune(root, baseline / "best.pt", tmp_path / "w", "--attribute", "Wearing_Lipstick", *weights) == 1
    assert problem in _one_error(capsys, "finetune")
    assert not (tmp_path / "w" / "last.pt").exists()


def test_control_refuses_an_attribute_it_would_ignore(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    assert _finetune(root, baseline / "best.pt", tmp_path / "c", "--control", "--attribute", "Wearing_Lipstik") == 1
    assert "Did you mean 'Wearing_Lipstick'" in _one_error(capsys, "finetune")
    assert _finetune(root, baseline / "best.pt", tmp_path / "c", "--control", "--attribute", "Wearing_Lipstick") == 1
    assert "drop --attribute for the control" in _one_error(capsys, "finetune")
    assert not (tmp_path / "c").exists()


def test_top_must_be_positive(root: Path, baseline: Path, capsys) -> None:
    for top in ("-3", "0"):
        assert main(["stats", "--root", str(root), "--top", top]) == 1
        assert "--top must be at least 1" in _one_error(capsys, "stats")
    assert main(["bias", "--root", str(root), "--checkpoint", str(baseline / "best.pt"), "--top", "-1"]) == 1
    assert "--top must be at least 1" in _one_error(capsys, "bias")


def test_a_mask_file_that_is_not_an_image_is_one_line(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "lipstick.png"
    notes.write_text("the mouth, roughly\n")
    assert _finetune(root, baseline / "best.pt", tmp_path / "m", "--attribute", "Wearing_Lipstick",
                     "--mask", str(notes)) == 1
    assert "lipstick.png: not a readable image" in _one_error(capsys, "finetune")


def test_an_inverted_mask_is_a_one_line_warning(root: Path, baseline: Path, tmp_path: Path, capsys) -> None:
    region = default_mask("Wearing_Lipstick")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray((~region).astype("uint8") * 255).save(masks / "Wearing_Lipstick.png")
    assert main(["evaluate", "--root", str(root), "--checkpoint", str(baseline / "best.pt"), "--mask-dir", str(masks),
                 "--pair", "Wearing_Lipstick:Heavy_Makeup"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert lines and lines[0].startswith("cocam evaluate: warning: ") and "inverted" in lines[0]


def test_os_errors_and_missing_packages_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    import cocam.cli
    import cocam.io

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cocam.io.os, "fsync", no_space)
    assert main(["template", "--out", str(tmp_path / "t")]) == 1
    assert "ENOSPC" in _one_error(capsys, "template")
    assert not any((tmp_path / "t").iterdir())  # nothing half-written left behind
    monkeypatch.undo()

    def failing(exc: BaseException):
        def command(args):
            raise exc
        return command

    chained = RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 128 vs 64")
    chained.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/.last.pt.tmp-1")
    cases = [(chained, ["ENOSPC", "runs/x/.last.pt.tmp-1", "free some space"]),
             (PermissionError(errno.EACCES, "Permission denied", "/data/celeba"), ["EACCES", "/data/celeba"]),
             (ModuleNotFoundError("No module named 'ipywidgets'", name="ipywidgets"), ["pip install ipywidgets"]),
             (KeyError("the checkpoint lacks 'spec'"), ["error: the checkpoint lacks 'spec'"]),
             (ValueError("two\nlines"), ["error: two lines"])]
    for exc, words in cases:
        monkeypatch.setattr(cocam.cli, "cmd_template", failing(exc))
        assert main(["template"]) == 1
        line = _one_error(capsys, "template")
        assert all(w in line for w in words), (line, words)
    for bug in (ZeroDivisionError("a bug"),  # a genuine bug keeps its traceback, also a broken cocam import
                ImportError("cannot import name 'x' from 'cocam.masks'", name="cocam.masks"),
                ModuleNotFoundError("No module named 'cocam.gone'", name="cocam.gone")):
        monkeypatch.setattr(cocam.cli, "cmd_template", failing(bug))
        with pytest.raises(type(bug)):
            main(["template"])
