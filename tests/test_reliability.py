"""Reliability: what happens on bad input, interruptions, full disks and concurrent runs.

Rows proven elsewhere (referenced, not duplicated):

* loss becomes NaN/inf — ``tests/test_train.py::test_nan_guidance_term_stops_training_and_keeps_the_checkpoint``
  (step, term, last good checkpoint bytes unchanged) and ``::test_infinite_bce_stops_training``.
* same seed → identical metrics on CPU — ``tests/test_train.py::test_same_seed_gives_identical_runs``.
* a checkpoint from elsewhere runs no code — ``tests/test_checkpoint.py::test_pickled_objects_are_refused_and_never_executed``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cocam.dataset as dataset_module
from cocam import notebook as nb
from cocam.attributes import (
    UnknownAttributeError,
    validate_attribute,
    validate_attributes,
)
from cocam.celeba import (
    ATTR_FILE,
    IMAGE_DIR,
    LANDMARKS_FILE,
    PARTITION_FILE,
    AnnotationError,
    DatasetNotFoundError,
)
from cocam.checkpoint import (
    CheckpointError,
    ModelSpec,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from cocam.cli import main
from cocam.dataset import CelebADataset, ImageReadError
from cocam.evaluate import write_results
from cocam.io import atomic_write_text, exclusive_lock
from cocam.masks import TEMPLATE_SHAPE, as_template_mask, load_mask, save_mask
from cocam.train import Guidance, RunLockedError, TrainConfig, fit

SPEC = ModelSpec(image_size=64, hidden=32)

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy_celeba(src_root: Path, dst_root: Path, *, images: bool = True) -> Path:
    """A private copy of the synthetic dataset's ``celeba/`` folder (without its image cache)."""
    src, dst = src_root / "celeba", dst_root / "celeba"
    dst.mkdir(parents=True)
    for name in (ATTR_FILE, PARTITION_FILE, LANDMARKS_FILE):
        shutil.copy(src / name, dst / name)
    if images:
        shutil.copytree(src / IMAGE_DIR, dst / IMAGE_DIR)
    else:
        (dst / IMAGE_DIR).symlink_to(src / IMAGE_DIR)
    return dst


def _config(**overrides) -> TrainConfig:
    values = {"epochs": 1, "batch_size": 32, "lr": 1e-3, "device": "cpu", "patience": None, "seed": 0}
    values.update(overrides)
    return TrainConfig(**values)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return SPEC.build()


@pytest.fixture(scope="module")
def data(synthetic_root):
    train = CelebADataset(synthetic_root, "train", image_size=SPEC.image_size, progress=False)
    valid = CelebADataset(synthetic_root, "valid", image_size=SPEC.image_size, progress=False)
    return train, valid


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------------------------
# Dataset input
# --------------------------------------------------------------------------------------------


def test_dataset_folder_missing_or_annotation_file_missing_or_truncated(synthetic_root, tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="Expected the CelebA layout") as info:
        CelebADataset(tmp_path / "nowhere", "train", image_size=32, progress=False)
    assert str(tmp_path / "nowhere") in str(info.value)
    assert not (tmp_path / "nowhere").exists()

    folder = _copy_celeba(synthetic_root, tmp_path / "a", images=False)
    (folder / PARTITION_FILE).unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        CelebADataset(tmp_path / "a", "train", image_size=32, progress=False)
    assert PARTITION_FILE in str(info.value) and "Expected the CelebA layout" in str(info.value)
    assert not (folder / ".cocam_cache").exists()

    folder = _copy_celeba(synthetic_root, tmp_path / "b", images=False)
    data = (folder / ATTR_FILE).read_bytes()
    (folder / ATTR_FILE).write_bytes(data[: len(data) // 2])  # cut mid-row
    with pytest.raises(AnnotationError) as info:
        CelebADataset(tmp_path / "b", "train", image_size=32, progress=False)
    assert ATTR_FILE in str(info.value) and info.value.line is not None
    assert not (folder / ".cocam_cache").exists()


def test_annotation_rows_disagree(synthetic_root, tmp_path) -> None:
    # tests/test_celeba.py::test_image_missing_from_partition and ::test_wrong_column_count cover the
    # parsers on a hand-made folder; here the same on the dataset constructor.
    folder = _copy_celeba(synthetic_root, tmp_path / "a", images=False)
    lines = (folder / PARTITION_FILE).read_text().splitlines(keepends=True)
    missing = lines[4].split()[0]
    (folder / PARTITION_FILE).write_text("".join(lines[:4] + lines[5:]))
    with pytest.raises(AnnotationError, match=rf"{ATTR_FILE}: line \d+: image '{missing}' is not listed") as info:
        CelebADataset(tmp_path / "a", "train", image_size=32, progress=False)
    assert info.value.line is not None

    folder = _copy_celeba(synthetic_root, tmp_path / "b", images=False)
    lines = (folder / ATTR_FILE).read_text().splitlines(keepends=True)
    lines[5] = lines[5].rstrip("\r\n").rsplit(" ", 1)[0] + lines[5][len(lines[5].rstrip("\r\n")):]  # one value short
    (folder / ATTR_FILE).write_text("".join(lines))
    with pytest.raises(AnnotationError, match=r"line 6") as info:
        CelebADataset(tmp_path / "b", "train", image_size=32, progress=False)
    assert info.value.line == 6


def test_corrupt_or_missing_jpeg_during_cache_build(synthetic_root, tmp_path) -> None:
    root = tmp_path / "data"
    folder = _copy_celeba(synthetic_root, root)
    names = CelebADataset(synthetic_root, "train", image_size=32, progress=False).names.tolist()
    corrupt, gone = names[3], names[10]
    (folder / IMAGE_DIR / corrupt).write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / IMAGE_DIR / gone).unlink()
    cache = tmp_path / "cache"

    with pytest.raises(ImageReadError, match=corrupt):
        CelebADataset(root, "train", image_size=32, cache_dir=cache, num_workers=0, progress=False)
    assert not (cache / "train_32px.json").exists() and _no_temp_files(cache)

    with pytest.warns(UserWarning) as record:
        ds = CelebADataset(root, "train", image_size=32, cache_dir=cache, num_workers=0, progress=False,
                           skip_unreadable=True)
    message = " ".join(str(w.message) for w in record)
    assert corrupt in message and gone in message
    assert len(ds) == len(names) - 2
    assert ds.names.tolist() == [n for n in names if n not in (corrupt, gone)]
    assert len(ds.targets) == len(ds) and len(ds.attributes) == len(ds)
    reference = CelebADataset(synthetic_root, "train", image_size=32, progress=False)
    keep = [n for n in names if n not in (corrupt, gone)]
    np.testing.assert_array_equal(ds.get_batch_numpy(np.arange(len(ds)))[0],
                                  reference.subset_names(keep).get_batch_numpy(np.arange(len(keep)))[0])

    # Same cache again: nothing is decoded, the same images are left out (and named again).
    def no_decode(*_args, **_kwargs):
        raise AssertionError("the cache should have been reused")

    orig = dataset_module._decode_image
    dataset_module._decode_image = no_decode
    try:
        with pytest.warns(UserWarning, match=corrupt):
            again = CelebADataset(root, "train", image_size=32, cache_dir=cache, progress=False,
                                  skip_unreadable=True)
    finally:
        dataset_module._decode_image = orig
    assert again.names.tolist() == ds.names.tolist()
    with pytest.warns(UserWarning):
        chosen = CelebADataset(root, "train", image_size=32, cache_dir=cache, progress=False,
                               skip_unreadable=True, images=[names[0], corrupt, names[1]])
    assert chosen.names.tolist() == [names[0], names[1]]

    # Without the opt-in, a cache with holes is not served: it is rebuilt, which names the file.
    with pytest.raises((ImageReadError, DatasetNotFoundError), match=corrupt):
        CelebADataset(root, "train", image_size=32, cache_dir=cache, num_workers=0, progress=False)


def test_unknown_attribute_name() -> None:
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        validate_attribute("Wearing_Lipstik")
    with pytest.raises(UnknownAttributeError, match="Heavy_Makeup"):
        validate_attributes(["Smiling", "Heavy_Make"])
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        Guidance(("Wearing_Lipstic",), (np.ones(TEMPLATE_SHAPE, bool),))


def test_mask_empty_full_wrong_size_dtype_rgba_nonbinary(tmp_path) -> None:
    # tests/test_masks.py covers each rule in depth; this is the row's checklist in one place.
    region = np.zeros(TEMPLATE_SHAPE, bool)
    region[150:180, 60:120] = True
    with pytest.raises(ValueError, match="empty"):
        as_template_mask(np.zeros(TEMPLATE_SHAPE, np.uint8))
    with pytest.raises(ValueError, match="whole template"):
        as_template_mask(np.ones(TEMPLATE_SHAPE, bool))
    # Double resolution: resized by area averaging back to the template.
    big = np.repeat(np.repeat(region, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(as_template_mask(big), region)
    with pytest.raises(ValueError, match="aspect"):
        as_template_mask(np.ones((100, 100), bool))
    # dtypes: uint8 /255, uint16 /65535, float in [0, 1]; region is > 0.5.
    np.testing.assert_array_equal(as_template_mask(region.astype(np.uint8) * 255), region)
    np.testing.assert_array_equal(as_template_mask(region.astype(np.uint16) * 65535), region)
    soft = region * 0.6 + 0.1  # 0.7 inside, 0.1 outside
    np.testing.assert_array_equal(as_template_mask(soft), region)
    with pytest.raises(ValueError):
        as_template_mask(region.astype(np.float32) * 3.0)  # floats must already be in [0, 1]
    with pytest.raises(ValueError):
        as_template_mask(region.astype(np.int8) - 1)  # negative values: not a mask
    # RGBA PNG with a meaningful alpha: the alpha channel is the region.
    rgba = np.zeros((*TEMPLATE_SHAPE, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = region * 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgba.png"), region)


# --------------------------------------------------------------------------------------------
# Interruptions and failures
# --------------------------------------------------------------------------------------------


def test_process_killed_mid_epoch(data, tmp_path, monkeypatch) -> None:
    train, valid = data
    full = fit(_model(0), train, valid, _config(epochs=2), spec=SPEC, run_dir=tmp_path / "full", progress=False)
    assert full.steps == 6

    run = tmp_path / "killed"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second step of epoch 1
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(0), train, valid, _config(epochs=2), spec=SPEC, run_dir=run, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert not (run / ".lock").exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 0

    torch.manual_seed(4321)
    resumed = fit(_model(7), train, valid, _config(epochs=2), spec=SPEC, run_dir=run, resume=True, progress=False)
    assert resumed.steps == full.steps
    drop = ["seconds"]
    pd.testing.assert_frame_equal(resumed.history.drop(columns=drop), full.history.drop(columns=drop),
                                  check_exact=False, atol=1e-6, rtol=0)
    # exact: the resumed run replays the uninterrupted one's computation from the last epoch's
    # checkpoint (same weights, optimizer state, RNG and batches, same kernels, thread count pinned)
    for (k, a), b in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_process_killed_mid_save(tmp_path, monkeypatch) -> None:
    model = _model(0)
    last = tmp_path / "last.pt"
    save_checkpoint(last, model, SPEC, epoch=1)
    before = last.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(last, model, SPEC, epoch=2)
    monkeypatch.undo()
    assert last.read_bytes() == before and load_checkpoint(last)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file to mistake for a checkpoint

    region = np.zeros(TEMPLATE_SHAPE, bool)
    region[150:180, 60:120] = True
    mask_path = save_mask(tmp_path / "masks" / "m.png", region)
    mask_bytes = mask_path.read_bytes()

    def broken_png(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_png)
    with pytest.raises(KeyboardInterrupt):
        save_mask(mask_path, ~region, overwrite=True)
    monkeypatch.undo()
    assert mask_path.read_bytes() == mask_bytes
    assert [p.name for p in mask_path.parent.iterdir()] == ["m.png"]

    csv = tmp_path / "results.csv"
    atomic_write_text(csv, "a,b\n1,2\n")

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(csv, "a,b\n3,4\n")
    monkeypatch.undo()
    assert csv.read_text() == "a,b\n1,2\n" and _no_temp_files(tmp_path)


def test_checkpoint_from_elsewhere(tmp_path) -> None:
    # Code execution on load is ruled out in tests/test_checkpoint.py::test_pickled_objects_are_refused_and_never_executed.
    path = save_checkpoint(tmp_path / "ok.pt", _model(0), SPEC)
    with pytest.raises(CheckpointError, match="other attributes"):
        load_model(path, attributes=("Smiling",))
    # Weights of another architecture width under this spec.
    other = ModelSpec(image_size=64, hidden=16)
    payload = torch.load(path, weights_only=True)
    payload["model"] = other.build().state_dict()
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "mismatch.pt")
    # A plain state dict saved by another program.
    torch.save(_model(0).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a cocam checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_disk_full_while_saving(tmp_path, monkeypatch) -> None:
    target = tmp_path / "results.csv"
    atomic_write_text(target, "old\n")

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "new\n" * 1000)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "results.csv.pt", _model(0), SPEC)
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_two_runs_writing_to_the_same_output_folder(data, tmp_path) -> None:
    # Also tests/test_train.py::test_a_live_lock_is_refused and ::test_a_concurrent_run_in_the_same_folder_is_refused.
    train, _ = data
    run = tmp_path / "run"
    with exclusive_lock(run / ".lock"):  # a live holder (this very process)
        with pytest.raises(RunLockedError, match="in use"):
            fit(_model(0), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
        assert not (run / "last.pt").exists()


def _one_error_line(capsys, command: str) -> str:
    """The single ``cocam <command>: error: ...`` line on stderr (progress bars aside), never a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(f"cocam {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_never_overwrites_a_run_and_refuses_in_one_line(synthetic_root, tmp_path, capsys) -> None:
    base = tmp_path / "base"
    common = ["--root", str(synthetic_root), "--image-size", "64", "--hidden", "32", "--batch-size", "96",
              "--device", "cpu", "--epochs", "1"]
    assert main(["train", *common, "--out", str(base)]) == 0
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    capsys.readouterr()

    assert main(["train", *common, "--out", str(base)]) == 1
    line = _one_error_line(capsys, "train")
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line

    finetune = ["finetune", "--root", str(synthetic_root), "--checkpoint", str(base / "best.pt"), "--batch-size",
                "96", "--max-steps", "1", "--device", "cpu", "--control"]
    for extra in ([], ["--overwrite"]):  # the checkpoint it starts from is never replaced
        assert main([*finetune, "--out", str(base), *extra]) == 1
        assert "is the folder of the checkpoint it starts from" in _one_error_line(capsys, "finetune")

    assert main(["train", *common, "--out", str(base), "--resume", "--arch", "resnet18"]) == 1
    line = _one_error_line(capsys, "train")
    assert "cannot resume" in line and "arch 'alexnet' → 'resnet18'" in line
    assert main(["train", *common, "--out", str(base), "--resume", "--lr", "0.01"]) == 1
    assert "lr 0.0003 → 0.01" in _one_error_line(capsys, "train")

    assert main(["train", *common, "--out", str(tmp_path / "p0"), "--patience", "0"]) == 1
    assert "patience must be at least 1" in _one_error_line(capsys, "train")
    if not torch.cuda.is_available():
        assert main(["train", *common, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 1
        assert "asks for a GPU" in _one_error_line(capsys, "train")
    assert not (tmp_path / "p0").exists() and not (tmp_path / "gpu").exists()

    payload = torch.load(base / "best.pt", weights_only=True)
    del payload["spec"]
    torch.save(payload, tmp_path / "nospec.pt")
    assert main([*finetune, "--checkpoint", str(tmp_path / "nospec.pt"), "--out", str(tmp_path / "ft")]) == 1
    assert "no model description ('spec')" in _one_error_line(capsys, "finetune")

    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # every refusal left the run alone
    assert main(["train", *common, "--out", str(base), "--seed", "1", "--overwrite"]) == 0
    assert json.loads((base / "run.json").read_text())["config"]["seed"] == 1


def test_notebook_rerun_out_of_order(synthetic_root, tmp_path) -> None:
    with pytest.raises(nb.NotebookOrderError, match="run the training cell first"):
        nb.require(False, "run the training cell first")
    nb.require(True, "never shown")
    ws = nb.Workspace.create(synthetic_root, tmp_path / "runs", settings=nb.default_settings(True), progress=False)
    with pytest.raises(ValueError, match="No checkpoints to evaluate"):
        nb.evaluate_models(ws, {})
    with pytest.raises(FileNotFoundError, match="Train one"):
        nb.evaluate_models(ws, {"fine-tuned": tmp_path / "runs" / "missing" / "last.pt"})
    with pytest.raises(ValueError, match="masks"):  # fine-tuning without a mask
        Guidance(("Wearing_Lipstick",), ())


# --------------------------------------------------------------------------------------------
# Provenance of results
# --------------------------------------------------------------------------------------------


def test_results_file_carries_configuration_and_versions(synthetic_root, tmp_path) -> None:
    region = np.zeros(TEMPLATE_SHAPE, bool)
    region[150:180, 60:120] = True
    guidance = Guidance(("Wearing_Lipstick",), (region,))
    ckpt = save_checkpoint(tmp_path / "g" / "last.pt", _model(0), SPEC, config={"lr": 0.001, "seed": 3},
                           guidance=guidance.describe())
    table = pd.DataFrame({"model": ["g"], "test %": [50.0]})
    csv, sidecar = write_results(tmp_path / "out" / "table.csv", table, {"g": ckpt})
    assert sidecar == tmp_path / "out" / "table.json"
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
    record = json.loads(sidecar.read_text())
    assert set(record["versions"]) >= {"cocam", "torch", "torchvision", "python"}
    entry = record["checkpoints"]["g"]
    assert entry["path"] == str(ckpt) and entry["spec"] == SPEC.to_dict()
    assert entry["config"] == {"lr": 0.001, "seed": 3}
    assert entry["guidance"]["attributes"] == ["Wearing_Lipstick"]
    assert _no_temp_files(tmp_path / "out")

    # The command line writes the same sidecar next to --out.
    out = tmp_path / "cli" / "x.csv"
    assert main(["evaluate", "--root", str(synthetic_root), "--checkpoint", f"g={ckpt}", "--no-attention",
                 "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["checkpoints"]["g"]["config"] == {"lr": 0.001, "seed": 3}
    assert record["versions"]["torch"] == str(torch.__version__)


def test_a_results_file_never_replaces_its_sidecar_or_a_checkpoint(tmp_path) -> None:
    ckpt = save_checkpoint(tmp_path / "g" / "last.pt", _model(0), SPEC)
    before = ckpt.read_bytes()
    table = pd.DataFrame({"model": ["g"], "test %": [50.0]})
    # res.json used to be written as CSV, then replaced by its own sidecar (res.json as well).
    with pytest.raises(ValueError, match=r"ending in \.csv"):
        write_results(tmp_path / "res.json", table, {"g": ckpt})
    with pytest.raises(ValueError, match=r"ending in \.csv"):
        write_results(ckpt, table, {"g": ckpt})
    assert ckpt.read_bytes() == before and not (tmp_path / "res.json").exists()
    csv, sidecar = write_results(tmp_path / "res.csv", table, {"g": ckpt})
    assert (csv.suffix, sidecar.name) == (".csv", "res.json")
    mine = pd.DataFrame({"model": ["other"], "test %": [1.0]})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_results(csv, mine, {"g": ckpt}, overwrite=False)
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
    csv.unlink()  # only the sidecar left: still refused, and nothing written
    with pytest.raises(FileExistsError, match="res.json already exists"):
        write_results(csv, mine, {"g": ckpt}, overwrite=False)
    assert json.loads(sidecar.read_text())["results"] == "res.csv" and not csv.exists()
    assert _no_temp_files(tmp_path)
