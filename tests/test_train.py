"""Tests for cocam.train: the baseline, guided fine-tuning, the control, resuming and safety nets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import _tolerance
import cocam.train as train_module
from cocam import UnknownAttributeError, attribute_index
from cocam.checkpoint import ModelSpec, load_checkpoint, load_model
from cocam.dataset import CelebADataset, normalize_uint8
from cocam.gradcam import grad_cam
from cocam.io import pid_alive
from cocam.losses import DEFAULT_GUIDANCE_WEIGHTS, guided_loss, iou_loss
from cocam.masks import default_mask, mask_to_feature, mask_to_input
from cocam.train import (
    ABSURD_BCE,
    DegenerateRunError,
    DeviceUnavailableError,
    FitResult,
    Guidance,
    ResumeMismatchError,
    RunExistsError,
    RunLockedError,
    TrainConfig,
    TrainingDivergedError,
    fit,
)

SPEC = ModelSpec(image_size=64, hidden=32)
LIPSTICK = "Wearing_Lipstick"
RUN_FILES = {"last.pt", "best.pt", "history.csv", "run.json"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(synthetic_root) -> tuple[CelebADataset, CelebADataset]:
    train = CelebADataset(synthetic_root, "train", image_size=SPEC.image_size, progress=False)
    valid = CelebADataset(synthetic_root, "valid", image_size=SPEC.image_size, progress=False)
    assert (len(train), len(valid)) == (96, 32)
    return train, valid


@pytest.fixture(scope="module")
def lipstick_mask():
    return default_mask(LIPSTICK)


@pytest.fixture(scope="module")
def base_checkpoint(data, tmp_path_factory) -> Path:
    """A baseline trained for one epoch: the starting point of every fine-tuning test."""
    train, valid = data
    result = fit(_model(), train, valid, _config(), spec=SPEC, run_dir=tmp_path_factory.mktemp("base"),
                 progress=False)
    return result.last_path


def _model(seed: int = 0, spec: ModelSpec = SPEC):
    torch.manual_seed(seed)
    return spec.build()


def _load(path: Path, spec: ModelSpec = SPEC):
    model = spec.build()
    model.load_state_dict(load_checkpoint(path)["model"])
    return model


def _config(**overrides) -> TrainConfig:
    values = dict(epochs=1, batch_size=32, lr=1e-3, device="cpu", patience=None, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def _guidance(mask, **kwargs) -> Guidance:
    return Guidance(attributes=(LIPSTICK,), masks=(mask,), **kwargs)


def _history(history: pd.DataFrame | list) -> pd.DataFrame:
    """The history without its wall-clock column."""
    return pd.DataFrame(history).drop(columns=["seconds"]).reset_index(drop=True)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """``atol=0`` where both sides are one computation (a checkpoint of the returned model, the
    same seed twice or a resumed run, in one process at the thread count ``one_thread`` pins):
    the same kernels on the same numbers round the same way, so any difference is a bug."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(prefix))


# --------------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------------


def test_baseline_writes_the_run_and_bce_decreases(data, tmp_path: Path) -> None:
    train, valid = data
    run = tmp_path / "run"
    config = _config(epochs=4)
    seen = []
    result = fit(_model(), train, valid, config, spec=SPEC, run_dir=run, progress=False, on_epoch=seen.append)
    assert isinstance(result, FitResult)
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no lock, no temporary file left
    assert result.run_dir == run and result.last_path == run / "last.pt" and result.best_path == run / "best.pt"
    assert result.steps == 12  # 96 images / 32 = 3 steps per epoch

    h = result.history
    assert list(h["epoch"]) == [0, 1, 2, 3] and list(h["step"]) == [3, 6, 9, 12]
    assert {"train_bce", "valid_bce", "valid_accuracy", "seconds"} <= set(h.columns)
    assert "train_loss_g" not in h.columns
    assert h[["train_bce", "valid_bce", "valid_accuracy"]].notna().all().all()
    assert h["train_bce"].iloc[-1] < h["train_bce"].iloc[0]
    assert h["valid_bce"].iloc[-1] < h["valid_bce"].iloc[0]
    assert [r["epoch"] for r in seen] == [0, 1, 2, 3]

    on_disk = pd.read_csv(run / "history.csv")
    pd.testing.assert_frame_equal(on_disk, h, check_dtype=False)

    info = json.loads((run / "run.json").read_text())
    assert info["config"] == dataclasses.asdict(config)
    assert info["spec"] == SPEC.to_dict()
    assert info["guidance"] is None
    assert (info["train_images"], info["valid_images"], info["device"]) == (96, 32, "cpu")

    last = load_checkpoint(run / "last.pt")
    assert (last["epoch"], last["step"]) == (3, 12)
    assert last["config"] == dataclasses.asdict(config)
    pd.testing.assert_frame_equal(pd.DataFrame(last["history"]), h)
    assert last["best_valid_bce"] == pytest.approx(h["valid_bce"].min())
    assert isinstance(last["rng"], torch.Tensor) and "state" in last["optimizer"]
    _assert_same_params(last["model"], _params(result.model), atol=0)

    best_model, best_spec, best = load_model(run / "best.pt")
    assert best_spec == SPEC
    assert best["epoch"] == int(h["valid_bce"].idxmin())
    assert "optimizer" not in best


def test_without_run_dir_nothing_is_written(data, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    train, _ = data
    result = fit(_model(), train, None, _config(max_steps=1), spec=SPEC, progress=False)
    assert (result.run_dir, result.best_path, result.last_path) == (None, None, None)
    assert result.steps == 1 and list(result.history.columns) == ["epoch", "step", "train_bce", "grad_norm",
                                                                       "seconds"]
    assert list(tmp_path.iterdir()) == []


def _scripted_validation(monkeypatch, values: list[float]) -> None:
    it = iter(values)
    monkeypatch.setattr(train_module, "validation_metrics",
                        lambda model, dataset, device, batch_size=256: {"valid_bce": next(it), "valid_accuracy": 0.5})


def test_early_stopping_with_patience(data, tmp_path: Path, monkeypatch) -> None:
    train, valid = data
    _scripted_validation(monkeypatch, [0.50, 0.40, 0.45, 0.41, 0.30, 0.20])
    run = tmp_path / "run"
    result = fit(_model(), train, valid, _config(epochs=10, patience=2, batch_size=96), spec=SPEC, run_dir=run,
                 progress=False)
    # epoch 0 and 1 improve, 2 and 3 do not: two stale epochs = patience -> stop
    assert list(result.history["valid_bce"]) == [0.50, 0.40, 0.45, 0.41]
    assert result.steps == 4
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["epoch"] == 1 and best["best_valid_bce"] == 0.40
    assert (last["epoch"], last["stale_epochs"], last["best_valid_bce"]) == (3, 2, 0.40)
    # The returned model holds the last weights (not the best ones).
    _assert_same_params(last["model"], _params(result.model), atol=0)

    # Resuming an early-stopped run trains no further.
    again = fit(_model(5), train, valid, _config(epochs=10, patience=2, batch_size=96), spec=SPEC, run_dir=run,
                resume=True, progress=False)
    assert again.steps == 4
    pd.testing.assert_frame_equal(again.history, result.history)
    _assert_same_params(_params(again.model), last["model"], atol=0)


def test_no_early_stopping_without_patience(data, monkeypatch) -> None:
    train, valid = data
    _scripted_validation(monkeypatch, [0.5, 0.6, 0.7, 0.8, 0.9])
    result = fit(_model(), train, valid, _config(epochs=5, patience=None, batch_size=96), spec=SPEC, progress=False)
    assert len(result.history) == 5 and result.steps == 5


def test_max_steps_is_respected_exactly(data, tmp_path: Path) -> None:
    train, _ = data
    run = tmp_path / "run"
    result = fit(_model(), train, None, _config(epochs=5, max_steps=4), spec=SPEC, run_dir=run, progress=False)
    assert result.steps == 4
    assert list(result.history["step"]) == [3, 4]  # one full epoch, then one step of the next
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 4
    assert all(int(s["step"]) == 4 for s in last["optimizer"]["state"].values())  # optimizer steps taken
    # Without a validation split, every epoch's weights are the "best" ones.
    assert load_checkpoint(run / "best.pt")["epoch"] == 1


def test_configuration_errors(data, lipstick_mask) -> None:
    train, _ = data
    for bad in (dict(epochs=0), dict(batch_size=0), dict(max_steps=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="smaller than one batch"):
        fit(_model(), train, None, _config(batch_size=97), spec=SPEC, progress=False)
    with pytest.raises(ValueError, match="72px"):
        fit(_model(), train, None, _config(), spec=ModelSpec(image_size=72, hidden=32), progress=False)
    with pytest.raises(ValueError, match="one each"):
        Guidance(attributes=(LIPSTICK, "High_Cheekbones"), masks=(lipstick_mask,))
    with pytest.raises(ValueError, match="positive"):
        _guidance(lipstick_mask, target="negative")
    with pytest.raises(ValueError, match="resolution"):
        _guidance(lipstick_mask, resolution="output")
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        Guidance(attributes=("Wearing_Lipstik",), masks=(lipstick_mask,))
    described = _guidance(lipstick_mask, w_g=2.0).describe()
    assert described["attributes"] == [LIPSTICK] and described["w_g"] == 2.0
    assert described["mask_pixels"] == [int(lipstick_mask.sum())]
    json.dumps(described)


def test_guidance_needs_at_least_one_attribute() -> None:
    with pytest.raises(ValueError, match="attribute"):
        Guidance(attributes=(), masks=())


def test_default_spec_describes_the_model(data, tmp_path: Path) -> None:
    train, _ = data
    model = ModelSpec(image_size=64, hidden=32, dropout=0.25).build()
    result = fit(model, train, None, _config(max_steps=1), run_dir=tmp_path / "run", progress=False)
    loaded, spec, _ = load_model(result.last_path)
    assert (spec.hidden, spec.dropout) == (32, 0.25)
    _assert_same_params(_params(loaded), _params(result.model), atol=0)


# --------------------------------------------------------------------------------------------
# Determinism and resuming
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_runs(data, tmp_path: Path) -> None:
    train, valid = data
    first = fit(_model(0), train, valid, _config(), spec=SPEC, progress=False)
    # resume=True on a folder without last.pt is an ordinary fresh start
    second = fit(_model(0), train, valid, _config(), spec=SPEC, run_dir=tmp_path / "new", resume=True,
                 progress=False)
    pd.testing.assert_frame_equal(_history(first.history), _history(second.history))
    _assert_same_params(_params(first.model), _params(second.model), atol=0)
    # Another seed (same initial weights): another shuffle order and other dropout masks.
    other = fit(_model(0), train, valid, _config(seed=1), spec=SPEC, progress=False)
    assert other.history["train_bce"].iloc[0] != first.history["train_bce"].iloc[0]


def test_resume_equals_an_uninterrupted_run(data, tmp_path: Path) -> None:
    train, valid = data
    full = fit(_model(0), train, valid, _config(epochs=2), spec=SPEC, run_dir=tmp_path / "full", progress=False)

    part = tmp_path / "part"
    first = fit(_model(0), train, valid, _config(epochs=1), spec=SPEC, run_dir=part, progress=False)
    assert first.steps == 3
    torch.manual_seed(1234)  # the global RNG state of the resuming process does not matter
    resumed = fit(_model(99), train, valid, _config(epochs=2), spec=SPEC, run_dir=part, resume=True,
                  progress=False)  # other initial weights: they are replaced by last.pt's

    assert resumed.steps == full.steps == 6
    pd.testing.assert_frame_equal(_history(resumed.history), _history(full.history))
    # exact: resuming replays the uninterrupted run's computation (same weights, optimizer state,
    # RNG and batches, same kernels and thread count), it does not approximate it
    _assert_same_params(_params(resumed.model), _params(full.model), atol=0)
    a, b = load_checkpoint(part / "last.pt"), load_checkpoint(tmp_path / "full" / "last.pt")
    for key in ("epoch", "step", "best_valid_bce", "stale_epochs"):
        assert a[key] == b[key], key
    assert torch.equal(a["rng"], b["rng"])
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, b["optimizer"]["state"][i][k], atol=0, rtol=0)
    pd.testing.assert_frame_equal(_history(pd.read_csv(part / "history.csv")),
                                  _history(pd.read_csv(tmp_path / "full" / "history.csv")), check_dtype=False)


# --------------------------------------------------------------------------------------------
# Guided fine-tuning and the control
# --------------------------------------------------------------------------------------------


def _loss_g(model, images, targets, mask, resolution: str = "input") -> float:
    """loss_g of the "both" target on one batch, with the public Grad-CAM and loss functions."""
    i = attribute_index(LIPSTICK)
    signs = 2 * targets[:, [i]] - 1
    if resolution == "input":
        region = mask_to_input(mask, images.shape[-1])
        res = grad_cam(model, images, [i], signs=signs, output_size=images.shape[-1])
    else:
        region = mask_to_feature(mask, model.feature_shape(images.shape[-1])[1])
        res = grad_cam(model, images, [i], signs=signs)
    return guided_loss(res.logits, targets, res.cams, region[None], raw=res.signed).guidance.item()


@pytest.mark.parametrize("exact, resolution", [(True, "input"), (False, "input"), (True, "feature")])
def test_one_guided_step_reduces_loss_g_on_a_fixed_batch(data, base_checkpoint, lipstick_mask, exact,
                                                         resolution) -> None:
    """Pure guidance (w_a = 0), no dropout, one batch: one step of fit lowers that batch's loss_g.

    The first-order mode (exact=False) detaches the Grad-CAM weights, so the classifier head gets
    no gradient and does not move; the exact mode trains the head too.
    """
    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)  # train mode == eval mode: loss_g is deterministic
    model = _load(base_checkpoint, spec)
    batch = train.subset_names(train.names[:32])
    images_u8, targets, _ = batch.get_batch(range(len(batch)))
    images = normalize_uint8(images_u8)
    before, params = _loss_g(model, images, targets, lipstick_mask, resolution), _params(model)
    assert before < -math.log(1e-6) - 1e-3  # the CAMs are not degenerate: there is a gradient

    guidance = _guidance(lipstick_mask, w_a=0.0, target="both", exact=exact, resolution=resolution)
    result = fit(model, batch, None, _config(lr=1e-4, weight_decay=0.0), spec=spec, guidance=guidance,
                 progress=False)
    assert result.steps == 1
    # fit's guidance term is the same loss_g (the batch order is shuffled, the mean is not): the
    # same per-image values, averaged in another order; a mean of 32 positive terms in float32
    # moves by at most γ_32 of itself either way
    assert result.history["train_loss_g"].iloc[0] == pytest.approx(before, rel=2 * _tolerance.gamma(32, torch.float32))
    after = _loss_g(model, images, targets, lipstick_mask, resolution)
    assert after < before
    after_params = _params(model)
    assert _changed(params, after_params, "trunk.")
    assert _changed(params, after_params, "head.") is exact


def test_control_and_guided_from_the_same_checkpoint(data, base_checkpoint, lipstick_mask, tmp_path: Path) -> None:
    """Same start, seed and steps: the control and w_g = 0 coincide; only the guidance term differs."""
    train, _ = data
    config = _config(epochs=2, max_steps=2, batch_size=16)
    runs = {}
    for name, guidance in (("control", None), ("zero", _guidance(lipstick_mask, w_g=0.0)),
                           ("guided", _guidance(lipstick_mask))):
        runs[name] = fit(_load(base_checkpoint), train, None, config, spec=SPEC, guidance=guidance,
                         run_dir=tmp_path / name, progress=False)
    assert {r.steps for r in runs.values()} == {2}
    assert "train_loss_g" not in runs["control"].history.columns
    assert runs["guided"].history["train_loss_g"].notna().all()

    control_json = json.loads((tmp_path / "control" / "run.json").read_text())
    guided_json = json.loads((tmp_path / "guided" / "run.json").read_text())
    assert control_json["guidance"] is None
    assert guided_json["guidance"]["attributes"] == [LIPSTICK]
    assert guided_json["guidance"]["w_g"] == 1.0 and guided_json["guidance"]["target"] == "positive"  # the paper's
    assert control_json["config"] == guided_json["config"]
    assert load_checkpoint(tmp_path / "guided" / "last.pt")["guidance"] == guided_json["guidance"]

    # Same batches, same dropout masks, same BCE: w_g = 0 is the control, exactly (the same forward
    # and BCE kernels; the guidance term adds exact zeros to the gradients, and x + 0 = x).
    assert list(runs["zero"].history["train_bce"]) == list(runs["control"].history["train_bce"])
    _assert_same_params(_params(runs["zero"].model), _params(runs["control"].model), atol=0)
    # The guidance term changes the trunk.
    assert _changed(_params(runs["control"].model), _params(runs["guided"].model), "trunk.")


def test_target_positive_and_both(data, base_checkpoint, lipstick_mask) -> None:
    """"positive" guides only images with the attribute (CAM of +logit); "both" every image (sign(y)·logit)."""
    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)
    model = _load(base_checkpoint, spec).train()
    images_u8, targets, _ = train.get_batch(range(32))
    images = normalize_uint8(images_u8)
    i = attribute_index(LIPSTICK)
    positive, both = _guidance(lipstick_mask, target="positive"), _guidance(lipstick_mask, target="both")
    masks = train_module.guidance_masks(positive, model, 64, torch.device("cpu"))

    def terms(guidance, y):
        return train_module.guided_terms(model, images, y, guidance, [i], masks)

    mixed_pos, mixed_both = terms(positive, targets), terms(both, targets)
    has = targets[:, i] > 0
    assert 0 < int(has.sum()) < 32
    # positive: the mean loss_g over the images that have the attribute
    assert mixed_pos.guidance.item() == pytest.approx(mixed_pos.per_sample[has].mean().item(), rel=1e-6)
    # on those images both targets compute the same CAM (sign +1)
    torch.testing.assert_close(mixed_pos.per_sample[has], mixed_both.per_sample[has])
    assert mixed_both.guidance.item() == pytest.approx(mixed_both.per_sample.mean().item(), rel=1e-6)
    torch.testing.assert_close(mixed_pos.bce, mixed_both.bce)

    none = targets.clone()
    none[:, i] = 0
    assert terms(positive, none).guidance.item() == 0.0  # nobody to guide
    assert terms(both, none).guidance.item() > 0.0
    everyone = targets.clone()
    everyone[:, i] = 1
    torch.testing.assert_close(terms(positive, everyone).total, terms(both, everyone).total)

    # Both run end to end and record the guidance term.
    for guidance in (positive, both):
        result = fit(_load(base_checkpoint), train, None, _config(max_steps=1, batch_size=16), spec=SPEC,
                     guidance=guidance, progress=False)
        assert result.steps == 1 and math.isfinite(result.history["train_loss_g"].iloc[0])


def test_settings_per_attribute_equal_each_attribute_guided_alone(data, base_checkpoint) -> None:
    """A loss, target and weight per attribute: each column is what that attribute alone would get."""
    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)
    model = _load(base_checkpoint, spec).train()
    images_u8, targets, _ = train.get_batch(range(32))
    images = normalize_uint8(images_u8)
    attrs = (LIPSTICK, "High_Cheekbones")
    masks = tuple(default_mask(a) for a in attrs)
    mixed = Guidance(attrs, masks, loss=("iou", "energy"), target=("positive", "both"), w_g=(3.0, None))
    assert mixed.losses == ("iou", "energy") and mixed.targets == ("positive", "both")
    assert mixed.weights == (3.0, DEFAULT_GUIDANCE_WEIGHTS["energy"])
    idx = [attribute_index(a) for a in attrs]
    out = train_module.guided_terms(model, images, targets, mixed, idx,
                                     train_module.guidance_masks(mixed, model, 64, torch.device("cpu")))
    # Two targets take the vmapped pullback, one target the plain backward: the CAMs agree to the
    # rounding of the sums that differ (the head's backward, the spatial mean, the channel sum),
    # which the normalised CAM and the losses' 64×64 pixel sums pass on one to one (-ln of a ratio of
    # pixel sums moves by the ratio's relative change): 2 γ_n of float32, n the length of that chain.
    with torch.no_grad():
        acts = model.trunk(images[:1])
    n = _tolerance.chain_lengths(model.head, acts)[1] + acts.shape[2] * acts.shape[3] + acts.shape[1] + 64 * 64
    per_sample_tol = 2 * _tolerance.gamma(n, torch.float32)
    alone = []
    for t, (a, m) in enumerate(zip(attrs, masks)):
        g = Guidance((a,), (m,), loss=mixed.losses[t], target=mixed.targets[t])
        alone.append(train_module.guided_terms(model, images, targets, g, [idx[t]],
                                                train_module.guidance_masks(g, model, 64, torch.device("cpu"))))
        torch.testing.assert_close(out.per_sample[:, t], alone[t].per_sample[:, 0], rtol=per_sample_tol,
                                   atol=per_sample_tol)
    torch.testing.assert_close(out.bce, alone[0].bce)
    # the total: each attribute's guided pairs weighted by its w_g, in one mean over all guided pairs
    guided = torch.stack([targets[:, idx[0]], torch.ones(32)], dim=1)
    expected = out.bce + (guided * out.per_sample * torch.tensor(mixed.weights)).sum() / guided.sum()
    # the same non-negative terms (64 weighted pairs and the BCE) summed in another order
    torch.testing.assert_close(out.total, expected, rtol=2 * _tolerance.gamma(65, torch.float32), atol=0)
    assert math.isfinite(fit(_load(base_checkpoint), train, None, _config(max_steps=1, batch_size=16), spec=SPEC,
                             guidance=mixed, progress=False).history["train_loss_g"].iloc[0])


def test_per_attribute_settings_are_validated_and_equal_values_collapse(lipstick_mask) -> None:
    attrs = (LIPSTICK, "High_Cheekbones")
    masks = (lipstick_mask, default_mask("High_Cheekbones"))
    same = Guidance(attrs, masks, loss=["energy", "energy"], target=("both", "both"), w_g=(2.0, 2.0))
    plain = Guidance(attrs, masks, loss="energy", target="both", w_g=2.0)
    assert (same.loss, same.target, same.w_g) == ("energy", "both", 2.0)
    assert same.fingerprint() == plain.fingerprint()  # existing run folders keep their names
    mixed = Guidance(attrs, masks, loss=("iou", "energy"))
    assert mixed.fingerprint() != plain.fingerprint() and mixed.describe()["loss"] == ("iou", "energy")
    from cocam.compare import run_name
    assert run_name(mixed).startswith("mixed_") and run_name(plain).startswith("energy_both_")
    with pytest.raises(ValueError, match="loss has 3 values for 2 guided targets"):
        Guidance(attrs, masks, loss=("iou", "energy", "iou"))
    with pytest.raises(ValueError, match="not 'negative'"):
        Guidance(attrs, masks, target=("both", "negative"))
    with pytest.raises(ValueError, match="unknown guidance loss 'dice'"):
        Guidance(attrs, masks, loss=("iou", "dice"))
    with pytest.raises(ValueError, match="cannot be mixed"):
        Guidance(attrs, masks, loss=("rrr_input", "iou"))


# --------------------------------------------------------------------------------------------
# Divergence and the run lock
# --------------------------------------------------------------------------------------------


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def test_nan_guidance_term_stops_training_and_keeps_the_checkpoint(data, base_checkpoint, lipstick_mask,
                                                                   tmp_path: Path, monkeypatch) -> None:
    train, _ = data
    run = tmp_path / "run"
    guidance = _guidance(lipstick_mask)
    fit(_load(base_checkpoint), train, None, _config(epochs=1), spec=SPEC, guidance=guidance, run_dir=run,
        progress=False)
    before = _snapshot(run)
    assert set(before) == RUN_FILES

    real = train_module.guided_loss

    def nan_guidance(*args, **kwargs):  # the guidance term turns NaN from the next step on
        terms = real(*args, **kwargs)
        nan = torch.tensor(float("nan"))
        return dataclasses.replace(terms, total=terms.total + nan, guidance=terms.guidance + nan)

    monkeypatch.setattr(train_module, "guided_loss", nan_guidance)
    with pytest.raises(TrainingDivergedError) as info:
        fit(_load(base_checkpoint), train, None, _config(epochs=2), spec=SPEC, run_dir=run, resume=True,
            guidance=guidance, progress=False)
    message = str(info.value)
    assert "step 4" in message and "epoch 1" in message  # the first step after the 3 good ones
    assert "guidance (loss_g)" in message and "BCE" not in message
    assert str(run / "last.pt") in message
    assert _snapshot(run) == before  # nothing was overwritten, run.json included
    assert load_checkpoint(run / "last.pt")["step"] == 3


def test_infinite_bce_stops_training(data, tmp_path: Path, monkeypatch) -> None:
    train, _ = data
    fake_f = SimpleNamespace(binary_cross_entropy_with_logits=lambda *a, **k: torch.tensor(float("inf")))
    monkeypatch.setattr(train_module, "F", fake_f)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"step 1 \(epoch 0\): the BCE term") as info:
        fit(_model(), train, None, _config(), spec=SPEC, run_dir=run, progress=False)
    assert "inf" in str(info.value) and "last good checkpoint" not in str(info.value)
    assert not (run / "last.pt").exists() and not (run / ".lock").exists()
    assert not (run / "run.json").exists()  # no record of a run that never took a step


def _poison_step(monkeypatch, at_step: int) -> None:
    """From optimiser step ``at_step`` on (counted over the process), the step leaves a NaN in the weights."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= at_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_weights_that_diverge_on_an_epochs_last_step_are_never_saved(data, tmp_path: Path, monkeypatch) -> None:
    train, _ = data
    run = tmp_path / "run"
    fit(_model(), train, None, _config(epochs=1), spec=SPEC, run_dir=run, progress=False)  # steps 1-3
    before = _snapshot(run)
    _poison_step(monkeypatch, at_step=3)  # the last step of the resumed epoch (step 6): no loss sees it
    with pytest.raises(TrainingDivergedError, match=r"epoch 1 \(step 6\): 1 weight tensor\(s\) are not finite") as info:
        fit(_model(), train, None, _config(epochs=2), spec=SPEC, run_dir=run, resume=True, progress=False)
    assert f"the last good checkpoint is {run / 'last.pt'}" in str(info.value)
    assert _snapshot(run) == before  # last.pt is still the good epoch 0, and resuming from it works
    monkeypatch.undo()
    again = fit(_model(), train, None, _config(epochs=2), spec=SPEC, run_dir=run, resume=True, progress=False)
    assert again.steps == 6 and all(torch.isfinite(p).all() for p in again.model.parameters())


def test_divergence_with_max_steps_is_an_error(data, tmp_path: Path, monkeypatch) -> None:
    train, _ = data
    _poison_step(monkeypatch, at_step=1)
    with pytest.raises(TrainingDivergedError, match="no checkpoint was saved"):
        fit(_model(), train, None, _config(max_steps=1), spec=SPEC, run_dir=tmp_path / "run", progress=False)
    assert not [p.name for p in (tmp_path / "run").iterdir()]  # nothing saved, run.json included


def test_a_finite_but_absurd_validation_bce_is_divergence(data, tmp_path: Path, monkeypatch) -> None:
    train, valid = data
    assert math.isclose(ABSURD_BCE, 100 * math.log(2))
    _scripted_validation(monkeypatch, [0.5, 1.2e29])  # lr 30 gives such numbers
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"epoch 1 .*valid BCE is 1\.2e\+29, above 69\.3"):
        fit(_model(), train, valid, _config(epochs=2, batch_size=96), spec=SPEC, run_dir=run, progress=False)
    assert load_checkpoint(run / "last.pt")["epoch"] == 0 and len(pd.read_csv(run / "history.csv")) == 1
    _scripted_validation(monkeypatch, [0.5, 0.9 * ABSURD_BCE])  # bad but below the bound: an ordinary epoch
    fit(_model(), train, valid, _config(epochs=2, batch_size=96), spec=SPEC, run_dir=tmp_path / "ok", progress=False)


def test_degenerate_runs_are_errors(data, tmp_path: Path) -> None:
    train, valid = data
    empty = valid.subset_names([])
    assert len(empty) == 0
    for patience in (2, None):
        with pytest.raises(DegenerateRunError, match="validation split has no images"):
            fit(_model(), train, empty, _config(patience=patience), spec=SPEC, run_dir=tmp_path / "run",
                progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DegenerateRunError, match="patience must be at least 1"):
        _config(patience=0)
    with pytest.raises(DegenerateRunError, match="smaller than one batch"):
        fit(_model(), train, None, _config(batch_size=97), spec=SPEC, run_dir=tmp_path / "run", progress=False)
    assert not [p.name for p in (tmp_path / "run").iterdir()]  # no run.json for a run without a step


def test_a_device_this_machine_lacks_is_refused(data) -> None:
    train, _ = data
    bad = ["gpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(DeviceUnavailableError, match=repr(device)):
            fit(_model(), train, None, _config(device=device, max_steps=1), spec=SPEC, progress=False)


# --------------------------------------------------------------------------------------------
# The run folder: never overwritten, resumed only with the same settings
# --------------------------------------------------------------------------------------------


def test_an_existing_run_is_not_overwritten_without_overwrite(data, tmp_path: Path) -> None:
    train, _ = data
    run = tmp_path / "run"
    fit(_model(0), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
    before = _snapshot(run)
    with pytest.raises(RunExistsError, match=r"already holds a run \(last.pt, best.pt, history.csv\).*--resume"):
        fit(_model(1), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
    assert _snapshot(run) == before
    (run / "last.pt").unlink()  # what is left is still somebody's run
    with pytest.raises(RunExistsError, match="no last.pt to continue from"):
        fit(_model(1), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, resume=True, progress=False)
    with pytest.raises(ValueError, match="choose one"):
        fit(_model(1), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, resume=True, overwrite=True,
            progress=False)
    fresh = fit(_model(1), train, None, _config(max_steps=1, seed=3), spec=SPEC, run_dir=run, overwrite=True,
                progress=False)
    assert {p.name for p in run.iterdir()} == RUN_FILES
    _assert_same_params(load_checkpoint(run / "last.pt")["model"], _params(fresh.model), atol=0)
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 3


def test_resume_refuses_settings_that_change_what_is_trained(data, lipstick_mask, tmp_path: Path) -> None:
    train, valid = data
    run = tmp_path / "run"
    fit(_model(), train, valid, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
    before = _snapshot(run)
    narrow = ModelSpec(image_size=64, hidden=16)
    refused = [
        (dict(config=_config(max_steps=2, lr=1e-2)), r"lr 0\.001 → 0\.01"),
        (dict(config=_config(max_steps=2, batch_size=48, seed=1)), r"batch_size 32 → 48; seed 0 → 1"),
        (dict(guidance=_guidance(lipstick_mask)), r"guidance none → \['Wearing_Lipstick'\]"),
        (dict(spec=narrow, model=_model(0, narrow)), r"hidden 32 → 16"),
        (dict(valid=valid.subset_names(valid.names[:16])), r"valid_images 32 → 16"),
    ]
    for change, expected in refused:
        kwargs = dict(model=_model(), config=_config(max_steps=2), spec=SPEC, valid=valid) | change
        with pytest.raises(ResumeMismatchError, match=expected) as info:
            fit(kwargs["model"], train, kwargs["valid"], kwargs["config"], spec=kwargs["spec"],
                guidance=kwargs.get("guidance"), run_dir=run, resume=True, progress=False)
        assert "only epochs, max_steps, patience" in str(info.value)
        assert _snapshot(run) == before
    # What may change: when to stop, and the device.
    result = fit(_model(), train, valid, _config(max_steps=2, epochs=3, patience=5, device="auto" if not
                 torch.cuda.is_available() else "cpu"), spec=SPEC, run_dir=run, resume=True, progress=False)
    assert result.steps == 2


def test_resume_with_other_guidance_masks_is_refused(data, base_checkpoint, lipstick_mask, tmp_path: Path) -> None:
    train, _ = data
    run = tmp_path / "run"
    fit(_load(base_checkpoint), train, None, _config(max_steps=1), spec=SPEC, guidance=_guidance(lipstick_mask),
        run_dir=run, progress=False)
    moved = lipstick_mask.copy()
    moved[:, 1:] = lipstick_mask[:, :-1]  # the same area, one pixel to the right
    assert moved.sum() == lipstick_mask.sum()
    for guidance, expected in ((_guidance(moved), "another drawing of the same area"),
                               (_guidance(lipstick_mask, w_g=2.0), r"w_g 1\.0 → 2\.0"),
                               (_guidance(lipstick_mask, target="both"), "target 'positive' → 'both'")):
        with pytest.raises(ResumeMismatchError, match=expected):
            fit(_load(base_checkpoint), train, None, _config(max_steps=2), spec=SPEC, guidance=guidance,
                run_dir=run, resume=True, progress=False)


def test_a_live_lock_is_refused(data, tmp_path: Path) -> None:
    train, _ = data
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(str(os.getpid()))
    with pytest.raises(RunLockedError, match=str(os.getpid())):
        fit(_model(), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
    assert (run / ".lock").read_text() == str(os.getpid())  # the other run's lock is left alone
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_a_concurrent_run_in_the_same_folder_is_refused(data, tmp_path: Path) -> None:
    train, _ = data
    run = tmp_path / "run"
    errors = []

    def second_run(record):
        assert (run / ".lock").read_text() == str(os.getpid())
        try:
            fit(_model(), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
        except RunLockedError as err:
            errors.append(err)

    fit(_model(), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False, on_epoch=second_run)
    assert len(errors) == 1 and "in use" in str(errors[0])
    assert not (run / ".lock").exists()  # released when the first run ended


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True)
    pid = int(out.stdout)
    if pid_alive(pid):  # reused already: vanishingly unlikely
        pytest.skip("the PID of the finished process was reused")
    return pid


@pytest.mark.parametrize("content", ["dead", "not a pid", ""])
def test_a_stale_lock_is_taken_over(data, tmp_path: Path, content: str) -> None:
    train, _ = data
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(str(_dead_pid()) if content == "dead" else content)
    result = fit(_model(), train, None, _config(max_steps=1), spec=SPEC, run_dir=run, progress=False)
    assert result.steps == 1
    assert {p.name for p in run.iterdir()} == RUN_FILES  # lock taken over, then released


@pytest.mark.parametrize("loss", ["iou", "energy", "rrr_cam", "rrr_input"])
def test_one_step_of_each_guidance_loss_reduces_it(data, base_checkpoint, lipstick_mask, loss) -> None:
    """Pure guidance (w_a = 0), no dropout, one fixed batch: one step of fit lowers the chosen loss."""
    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)
    model = _load(base_checkpoint, spec)
    batch = train.subset_names(train.names[:32])
    images_u8, targets, landmarks = batch.get_batch(range(len(batch)))
    images = normalize_uint8(images_u8)
    guidance = _guidance(lipstick_mask, w_a=0.0, loss=loss)
    assert guidance.w_g == DEFAULT_GUIDANCE_WEIGHTS[loss]
    i = attribute_index(LIPSTICK)
    masks = train_module.guidance_masks(guidance, model, 64, torch.device("cpu"))

    def value() -> float:
        return train_module.guided_terms(model, images, targets, guidance, [i], masks, landmarks).guidance.item()

    before = value()
    result = fit(model, batch, None, _config(lr=1e-4, weight_decay=0.0), spec=spec, guidance=guidance,
                 progress=False)
    assert result.history["train_loss_g"].iloc[0] == pytest.approx(before, rel=1e-4)
    assert value() < before


def test_landmark_transfer_guides_with_one_moved_mask_per_image(data, base_checkpoint, lipstick_mask) -> None:
    """transfer="landmarks" equals the template loss on masks moved by each image's landmarks."""
    from cocam.masks import transfer_masks

    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)
    model = _load(base_checkpoint, spec).eval()
    images_u8, targets, landmarks = train.get_batch(range(16))
    images = normalize_uint8(images_u8)
    i = attribute_index(LIPSTICK)
    moved = _guidance(lipstick_mask, transfer="landmarks", target="both")
    masks = train_module.guidance_masks(moved, model, 64, torch.device("cpu"))
    terms = train_module.guided_terms(model, images, targets, moved, [i], masks, landmarks)
    res = grad_cam(model, images, [i], signs=2 * targets[:, [i]] - 1, output_size=64)
    expected = iou_loss(res.cams, transfer_masks(masks, landmarks, 64), reduction="none", raw=res.signed)
    torch.testing.assert_close(terms.per_sample, expected)
    template = train_module.guided_terms(model, images, targets, _guidance(lipstick_mask, target="both"), [i], masks,
                                          landmarks)
    assert not torch.allclose(terms.per_sample, template.per_sample)  # the synthetic faces do move
    result = fit(_load(base_checkpoint), train, None, _config(max_steps=1, batch_size=16), spec=SPEC,
                 guidance=moved, progress=False)
    assert result.steps == 1 and math.isfinite(result.history["train_loss_g"].iloc[0])


def test_guidance_loss_and_transfer_are_validated(lipstick_mask) -> None:
    with pytest.raises(ValueError, match="iou, energy, rrr_cam, rrr_input"):
        _guidance(lipstick_mask, loss="dice")
    with pytest.raises(ValueError, match="resolution='input' and exact=True"):
        _guidance(lipstick_mask, loss="rrr_input", resolution="feature")
    with pytest.raises(ValueError, match="landmarks"):
        _guidance(lipstick_mask, transfer="warp")
    assert _guidance(lipstick_mask, loss="rrr_cam", w_g=2.5).w_g == 2.5
    assert _guidance(lipstick_mask).describe()["loss"] == "iou"


# --------------------------------------------------------------------------------------------
# Dead-CAM share, gradient norms and clipping, the paper's defaults
# --------------------------------------------------------------------------------------------


def test_history_logs_the_dead_cam_share_and_the_pre_clip_gradient_norm(data, lipstick_mask) -> None:
    """One step on one batch from a random model (seed 1: half its lipstick CAMs are dead), checked by hand."""
    from cocam.losses import dead_cams

    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)  # train mode == eval mode
    model = _model(seed=1, spec=spec)
    batch = train.subset_names(train.names[:32])
    images_u8, targets, landmarks = batch.get_batch(range(len(batch)))
    images = normalize_uint8(images_u8)
    i = attribute_index(LIPSTICK)
    res = grad_cam(model, images, [i], output_size=64)
    positive = targets[:, i] > 0
    share = dead_cams(res.cams)[:, 0][positive].float().mean().item()
    assert 0.0 < share < 1.0  # the check below can tell a wrong count from a right one

    guidance = _guidance(lipstick_mask, w_a=0.0)  # the paper's target: positives only
    masks = train_module.guidance_masks(guidance, model, 64, torch.device("cpu"))
    terms = train_module.guided_terms(model, images, targets, guidance, [i], masks, landmarks)
    model.zero_grad(set_to_none=True)
    terms.total.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)

    result = fit(model, batch, None, _config(), spec=spec, guidance=guidance, progress=False)
    record = result.history.iloc[0]
    assert record["dead_cam"] == pytest.approx(share, abs=1e-12)  # a ratio of counts
    # the same loss in another batch order: float32 sums of 32 terms differ in the last bits only
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    control = fit(_model(seed=1, spec=spec), batch, None, _config(), spec=spec, progress=False)
    assert "dead_cam" not in control.history.columns and control.history["grad_norm"].iloc[0] > 0


def test_clip_gradients_bounds_the_norm_and_none_leaves_the_gradients_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    model(torch.randn(7, 5)).square().sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in before]))
    assert norm > 0.5
    pre = train_module._clip_gradients(model, None)
    assert pre.item() == pytest.approx(norm.item(), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))  # untouched, bit for bit
    pre = train_module._clip_gradients(model, 0.5)
    assert pre.item() == pytest.approx(norm.item(), rel=1e-6)  # the pre-clip norm is what is logged
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert after.item() <= 0.5 * (1 + 1e-5)  # float32 rounding of the rescaled gradients
    for p, g in zip(model.parameters(), before):  # a rescaling: same direction
        torch.testing.assert_close(p.grad, g * (after / norm))


def test_fit_clips_before_the_optimiser_step(data, base_checkpoint, lipstick_mask, monkeypatch) -> None:
    """The optimiser sees gradients of norm ≤ clip_grad_norm; the history keeps the larger pre-clip norm."""
    train, _ = data
    seen: list[float] = []
    make = train_module._adamw

    def spying_adamw(model, config):
        optimizer = make(model, config)
        step = optimizer.step

        def spied_step(*args, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            seen.append(torch.nn.utils.get_total_norm(grads).item())
            return step(*args, **kwargs)

        optimizer.step = spied_step
        return optimizer

    monkeypatch.setattr(train_module, "_adamw", spying_adamw)
    bound = 1e-3
    clipped = fit(_load(base_checkpoint), train, None, _config(max_steps=2, clip_grad_norm=bound), spec=SPEC,
                  guidance=_guidance(lipstick_mask), progress=False)
    assert len(seen) == 2 and max(seen) <= bound * (1 + 1e-5)
    assert clipped.history["grad_norm"].iloc[0] > 10 * bound
    seen.clear()
    plain = fit(_load(base_checkpoint), train, None, _config(max_steps=1), spec=SPEC, guidance=_guidance(lipstick_mask),
                progress=False)
    assert seen[0] == pytest.approx(plain.history["grad_norm"].iloc[0], rel=1e-6)  # nothing clipped


def test_clip_grad_norm_none_or_inactive_gives_bit_identical_runs(data, base_checkpoint, lipstick_mask) -> None:
    train, _ = data
    runs = [fit(_load(base_checkpoint), train, None, _config(max_steps=2, clip_grad_norm=clip), spec=SPEC,
                guidance=_guidance(lipstick_mask), progress=False) for clip in (None, 1e30)]
    a, b = (_params(r.model) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_grad_norm_is_validated_and_reaches_the_cli() -> None:
    from cocam.cli import train_config, build_parser

    with pytest.raises(ValueError, match="clip_grad_norm must be a positive number"):
        TrainConfig(clip_grad_norm=0.0)
    for command in ("train", "finetune", "demo"):
        extra = ["--checkpoint", "x.pt"] if command == "finetune" else []
        args = build_parser().parse_args([command, *extra, "--clip-grad-norm", "2.5"])
        assert train_config(args).clip_grad_norm == 2.5
        assert train_config(build_parser().parse_args([command, *extra])).clip_grad_norm is None


def test_the_defaults_are_the_papers_method(lipstick_mask) -> None:
    """Guidance, `cocam finetune` and `cocam demo` default to the paper's -ln IoU on the positives."""
    from cocam.cli import build_parser

    g = _guidance(lipstick_mask)
    assert (g.target, g.loss, g.w_g, g.exact, g.resolution) == ("positive", "iou", 1.0, True, "input")
    for argv in (["finetune", "--checkpoint", "x.pt"], ["demo"]):
        args = build_parser().parse_args(argv)
        assert (args.target, args.loss) == (["positive"], ["iou"])


# --------------------------------------------------------------------------------------------
# The CAM method the guidance is computed on
# --------------------------------------------------------------------------------------------


def test_cam_method_is_validated_and_fingerprinted_only_when_not_the_default(lipstick_mask) -> None:
    from cocam.cams import UnknownCamMethodError

    plain = _guidance(lipstick_mask)
    assert plain.cam_method == "gradcam" and plain.describe()["cam_method"] == "gradcam"
    # The fingerprint of this Guidance before cam_method existed: run folders keep their names.
    assert plain.fingerprint() == _guidance(lipstick_mask, cam_method="gradcam").fingerprint() == "24d69616ae"
    prints = {m: _guidance(lipstick_mask, cam_method=m).fingerprint() for m in ("gradcam", "gradcam++", "layercam")}
    assert len(set(prints.values())) == 3
    with pytest.raises(UnknownCamMethodError, match=r"cam_method must be one of gradcam, gradcam\+\+, layercam"):
        _guidance(lipstick_mask, cam_method="GradCAM")
    with pytest.raises(ValueError, match="uses no CAM"):
        _guidance(lipstick_mask, loss="rrr_input", cam_method="layercam")


def test_guided_step_uses_the_cam_method_and_runs_record_it(data, base_checkpoint, lipstick_mask,
                                                             tmp_path: Path) -> None:
    """``cam_method`` reaches the guided step's ``grad_cam``; ``run.json`` and the checkpoints record it."""
    from cocam.masks import masks_for_batch

    train, _ = data
    spec = dataclasses.replace(SPEC, dropout=0.0)
    model = _load(base_checkpoint, spec).eval()
    images_u8, targets, _ = train.get_batch(range(16))
    images = normalize_uint8(images_u8)
    i = attribute_index(LIPSTICK)
    per_sample = {}
    for method in ("gradcam", "layercam"):
        guidance = _guidance(lipstick_mask, target="both", cam_method=method)
        masks = train_module.guidance_masks(guidance, model, 64, torch.device("cpu"))
        terms = train_module.guided_terms(model, images, targets, guidance, [i], masks)
        res = grad_cam(model, images, [i], signs=2 * targets[:, [i]] - 1, output_size=64, method=method)
        expected = iou_loss(res.cams, masks_for_batch(masks, None, "template", 64), reduction="none", raw=res.signed)
        torch.testing.assert_close(terms.per_sample, expected)
        per_sample[method] = terms.per_sample
    assert not torch.allclose(per_sample["gradcam"], per_sample["layercam"])
    guidance = _guidance(lipstick_mask, cam_method="layercam")
    result = fit(_load(base_checkpoint), train, None, _config(max_steps=1, batch_size=16), spec=SPEC,
                 guidance=guidance, run_dir=tmp_path / "run", progress=False)
    assert math.isfinite(result.history["train_loss_g"].iloc[0])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["guidance"]["cam_method"] == "layercam"
    assert load_checkpoint(result.last_path)["guidance"]["cam_method"] == "layercam"


def test_resume_of_a_run_recorded_before_cam_method(data, base_checkpoint, lipstick_mask, tmp_path: Path) -> None:
    """A record without ``cam_method`` is a Grad-CAM run: it resumes with the default, not with another method."""
    train, _ = data
    run = tmp_path / "run"
    fit(_load(base_checkpoint), train, None, _config(max_steps=1, batch_size=16), spec=SPEC,
        guidance=_guidance(lipstick_mask), run_dir=run, progress=False)
    state = torch.load(run / "last.pt", weights_only=True)
    del state["guidance"]["cam_method"]  # as written before the setting existed
    torch.save(state, run / "last.pt")
    record = json.loads((run / "run.json").read_text())
    del record["guidance"]["cam_method"]
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(ResumeMismatchError, match=r"cam_method .*gradcam.* → .*layercam"):
        fit(_load(base_checkpoint), train, None, _config(max_steps=2, batch_size=16), spec=SPEC,
            guidance=_guidance(lipstick_mask, cam_method="layercam"), run_dir=run, resume=True, progress=False)
    result = fit(_load(base_checkpoint), train, None, _config(max_steps=2, epochs=2, batch_size=16), spec=SPEC,
                 guidance=_guidance(lipstick_mask), run_dir=run, resume=True, progress=False)
    assert result.steps == 2 and len(result.history) == 2


def test_pool_weights_hand_computation() -> None:
    from cocam.train import pool_weights

    m = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # counts 4, 1, 0
    w = pool_weights(m)
    expected = torch.tensor([[1 / 8, 0, 0], [1 / 8, 1 / 2, 0], [1 / 8, 0, 0], [1 / 8, 0, 0]])  # T' = 2
    torch.testing.assert_close(w, expected)
    assert w.sum().item() == pytest.approx(1.0)
    loss = torch.tensor([[1.0, 5.0, 7.0], [3.0, 2.0, 7.0], [5.0, 9.0, 7.0], [7.0, 9.0, 7.0]])
    # the mean over attributes of each attribute's own mean: ((1+3+5+7)/4 + 2/1) / 2 = 3
    assert ((w * loss).sum() / w.sum()).item() == pytest.approx(3.0)
    # global counts (data-parallel) replace the batch's
    torch.testing.assert_close(pool_weights(m, torch.tensor([8.0, 2.0, 0.0])), expected / 2)


def test_pooling_per_attribute_in_the_guided_step() -> None:
    from cocam.attributes import attribute_index
    from cocam.masks import default_mask
    from cocam.model import build_model
    from cocam.train import guidance_masks, guided_terms

    attrs = ("Wearing_Lipstick", "Double_Chin")
    masks = tuple(default_mask(a) for a in attrs)
    pairs = Guidance(attrs, masks, w_g=(3.0, 1.0))
    pooled = Guidance(attrs, masks, w_g=(3.0, 1.0), pool="attribute")
    assert pairs.fingerprint() == Guidance(attrs, masks, w_g=(3.0, 1.0), pool="pairs").fingerprint()
    assert pooled.fingerprint() != pairs.fingerprint() and pooled.describe()["pool"] == "attribute"
    with pytest.raises(ValueError, match="pool must be one of pairs, attribute"):
        Guidance(attrs, masks, pool="mean")
    torch.manual_seed(0)
    model = build_model("alexnet", num_outputs=40, hidden=16).eval()
    images = torch.rand(6, 3, 64, 64)
    targets = torch.zeros(6, 40)
    idx = [attribute_index(a) for a in attrs]
    targets[:, idx[0]] = torch.tensor([1.0, 1, 1, 1, 0, 0])  # 4 lipstick positives, 1 double chin
    targets[:, idx[1]] = torch.tensor([0.0, 0, 0, 0, 1, 0])
    masks_t = guidance_masks(pooled, model, 64, torch.device("cpu"))
    a = guided_terms(model, images, targets, pairs, idx, masks_t)
    b = guided_terms(model, images, targets, pooled, idx, masks_t)
    torch.testing.assert_close(a.per_sample, b.per_sample)  # the same losses, pooled differently
    ell = a.per_sample.double()
    lip, chin = ell[:4, 0].mean(), ell[4, 1]
    torch.testing.assert_close(b.total.double(), b.bce.double() + (3.0 * lip + 1.0 * chin) / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.total.double(), a.bce.double() + (3.0 * ell[:4, 0].sum() + chin) / 5,
                               rtol=1e-6, atol=1e-6)
