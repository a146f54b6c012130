"""The paper's experiment as one call, on a CelebA-layout folder (real CelebA or the synthetic one).

:func:`run_protocol` trains the baseline 40-attribute AlexNet, fine-tunes it with Grad-CAM
guidance once per pair — each run from the same baseline checkpoint, guiding only the pair's
attribute with its mask — runs an equal-step BCE-only control, evaluates every model on the
test split and returns the paper's table with the paper's numbers next to cocam's.
:func:`requirements_report` says beforehand what a run needs (files, disk, GPU, minutes);
:func:`estimate_minutes` is its measured time estimate.

What the paper states
---------------------
From the paper's text (``shared/seed-paper.txt``):

* the data and the model: *"We test on CelebA dataset, the pre-trained AlexNet is fine-tuned
  to focus on the specific facial attributes based on the results of Grad-CAM."*, *"We used
  AlexNet for facial attribute classification task. The last conv-layer delivers the Grad-CAM
  results."*;
* the procedure: *"If the network makes a classification based on biased features, the user
  manually specifies the correct region on a template. This will fine-tune the pre-trained
  network to focus on user's defined region"*;
* the objective: ``Loss = w_a · loss_a + w_g · loss_g`` with ``loss_g = −ln(|G ∩ S| / |G ∪ S|)``
  and ``loss_a`` *"the combined binary cross entropy (BCE) of the predicted scores and the
  labels"*;
* the results, one table per attribute with the rows *Pre-trained network* / *Fine-tuned
  network* and the columns *Test set* / *'A' but no 'B' set* (:data:`PAPER_RESULTS`):
  Wearing_Lipstick (vs Heavy_Makeup) 92.9 % / 82.17 % → 93.25 % / 83.31 %;
  High_Cheekbones (vs Smiling) 63.53 % / 47.41 % → 65.56 % / 61.33 %;
  Double_Chin (vs Chubby) 84.18 % / 81.77 % → 84.79 % / 86.45 %.

What the paper does not state
-----------------------------
The input size, the optimiser, learning rate, batch size, number of epochs (baseline or
fine-tuning), the values of ``w_a`` and ``w_g``, whether AlexNet was ImageNet-initialised,
how the baseline was trained, whether the three attributes were fine-tuned one at a time or
together, which split the *'A' but no 'B'* subset is drawn from, whether the Grad-CAM is
taken for the attribute's logit on the images that have it (cocam's ``target="positive"``,
its reading of the paper) or otherwise, the subset sizes, seeds, intervals, and any control.
It does not define *Test set* accuracy either; note that on real CelebA's test split
Double_Chin is positive on 913 of 19,962 images (``cocam/data/celeba_cooccurrence.csv``), so
always answering "no" scores 95.4 %, above the paper's 84.18 %: the paper's *Test set* column
may not be plain accuracy over the whole split. cocam reports accuracy on attribute A over
the whole test split and over its A∧¬B subset (:func:`cocam.evaluate.pair_accuracy`).

So the defaults of :class:`ProtocolConfig` follow the paper where it is explicit (AlexNet,
Grad-CAM at the last conv layer, the loss, the three pairs, the positive-class target) and are
otherwise cocam's defaults: 224-pixel inputs (AlexNet's native size), torchvision's full
4096-wide classifier, a baseline of at most 10 epochs with early stopping on the validation
BCE (patience 3), 2 fine-tuning epochs, batch 64, AdamW at 3e-4, ``w_a = w_g = 1``. Because
the paper reports a separate *Fine-tuned network* row under each attribute, the protocol
fine-tunes **one attribute at a time**, every run from the same baseline checkpoint. The
BCE-only control (same checkpoint, steps, learning rate and data order, no guidance term) is
not in the paper; it tells what fine-tuning alone does (``control=False`` skips it).

Output layout (``<out>/``): ``baseline/``, ``guided_<Attribute>/`` per pair, ``control/``
(each a :func:`cocam.train.fit` run folder), ``protocol.csv`` (:func:`run_protocol`'s
table), ``protocol.json`` (provenance: versions, each checkpoint's spec/config/guidance, the
protocol configuration, the mask sources, the stage times) and ``protocol_details.csv``
(:func:`cocam.evaluate.evaluate_checkpoints`' table: every model on every pair; its long form
in ``protocol_long.csv``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cocam.attributes import PAPER_PAIRS, parse_pairs, validate_attributes
from cocam.dataset import cache_files, default_cache_dir
from cocam.errors import CocamError
from cocam.folder import env_data_root

__all__ = [
    "PAPER_RESULTS",
    "PaperResult",
    "ProtocolConfig",
    "ProtocolError",
    "add_protocol_arguments",
    "config_from_args",
    "estimate_minutes",
    "format_protocol_table",
    "paper_results",
    "protocol_table",
    "requirements_check",
    "requirements_report",
    "run_from_args",
    "run_protocol",
]


# --------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperResult:
    """One of the paper's tables: accuracy (%) on attribute ``attribute`` before and after.

    ``test`` is the paper's *Test set* column, ``conflict`` its *'A' but no 'B' set* column;
    ``pre_trained`` the *Pre-trained network* row, ``fine_tuned`` the *Fine-tuned network* row.
    """

    attribute: str
    shortcut: str
    pre_trained_test: float
    pre_trained_conflict: float
    fine_tuned_test: float
    fine_tuned_conflict: float


#: The paper's three tables, transcribed from its text (see the module docstring).
_PAPER: tuple[PaperResult, ...] = (
    PaperResult("Wearing_Lipstick", "Heavy_Makeup", 92.90, 82.17, 93.25, 83.31),
    PaperResult("High_Cheekbones", "Smiling", 63.53, 47.41, 65.56, 61.33),
    PaperResult("Double_Chin", "Chubby", 84.18, 81.77, 84.79, 86.45),
)

_PAPER_COLUMNS = {
    "pre_trained_test": "pre-trained test %",
    "pre_trained_conflict": "pre-trained conflict %",
    "fine_tuned_test": "fine-tuned test %",
    "fine_tuned_conflict": "fine-tuned conflict %",
}


def paper_results() -> pd.DataFrame:
    """The paper's numbers as a fresh DataFrame (one row per pair; see :data:`PAPER_RESULTS`)."""
    rows = []
    for r in _PAPER:
        row = {"attribute": r.attribute, "shortcut": r.shortcut}
        row.update({name: getattr(r, key) for key, name in _PAPER_COLUMNS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


#: The paper's results: ``attribute``, ``shortcut``, ``pre-trained test %``, ``pre-trained
#: conflict %``, ``fine-tuned test %``, ``fine-tuned conflict %`` (conflict = the *'A' but no
#: 'B'* subset). Treat it as read-only; :func:`paper_results` gives a copy to modify.
PAPER_RESULTS: pd.DataFrame = paper_results()


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class ProtocolError(CocamError, ValueError):
    """A protocol that cannot run as configured; the message names the problem and the fix."""


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of :func:`run_protocol` (paper = stated by the paper; cocam = cocam's default).

    Attributes:
        root: the CelebA-layout dataset: the folder that contains ``celeba/`` (or ``celeba/``
            itself), e.g. real CelebA laid out as torchvision does.
        out: where the runs and the results go.
        image_size: model input side in pixels (cocam: 224, AlexNet's native size; the paper
            does not say).
        arch: the classifier (paper: AlexNet).
        hidden: width of the two hidden fully connected layers; ``None`` keeps AlexNet's 4096
            (cocam; a small width such as 512 is much faster on a CPU).
        pretrained: start the baseline from ImageNet weights (must already be in the torch
            cache; cocam: ``False``, the paper does not say).
        baseline_epochs: the baseline's maximum number of epochs (cocam: 10).
        patience: early stopping on the validation BCE (cocam: 3; ``None`` never stops early).
        finetune_epochs: epochs of each fine-tuning run and of the control (cocam: 2), turned
            into an exact step budget by :meth:`cocam.train.TrainConfig.fine_tuning`.
        batch_size: images per step, for every run (cocam: 64).
        lr: AdamW learning rate of the baseline (cocam: 3e-4).
        finetune_lr: learning rate of the fine-tuning runs and the control (cocam: 3e-4).
        w_a, w_g: weights of the BCE and the Grad-CAM term (the paper's loss; values cocam's: 1, 1).
        target: ``"positive"`` — the CAM of the attribute's logit on the images that have it
            (cocam's reading of the paper) — or ``"both"`` (see :mod:`cocam.train`).
        seed: initial weights, dropout and data order.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …
        pairs: (guided attribute A, co-occurring shortcut B) pairs (paper: the three below);
            one guided run per pair.
        mask_dir: the user's regions, ``<mask_dir>/<A>.png`` (drawn on the template face);
            an attribute without a file uses cocam's built-in region; ``None``: built-in only.
        control: also run the equal-step BCE-only control (not in the paper).
        attention: also score each model's Grad-CAM against the masks (written to
            ``protocol_details.csv``; costs one Grad-CAM pass over each attribute's positives).
    """

    root: Path
    out: Path = Path("runs/paper")
    image_size: int = 224
    arch: str = "alexnet"
    hidden: int | None = None
    pretrained: bool = False
    baseline_epochs: int = 10
    patience: int | None = 3
    finetune_epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-4
    finetune_lr: float = 3e-4
    w_a: float = 1.0
    w_g: float = 1.0
    target: str = "positive"
    seed: int = 0
    device: str = "auto"
    pairs: tuple[tuple[str, str], ...] = field(default=PAPER_PAIRS)
    mask_dir: Path | None = Path("data/masks")
    control: bool = True
    attention: bool = False

    def __post_init__(self) -> None:
        from cocam.archs import ARCHITECTURES
        from cocam.model import MIN_INPUT_SIZE, SUPPORTED_ARCHS

        if self.root is None or str(self.root) == "":
            raise ProtocolError("ProtocolConfig needs root=: the folder holding your CelebA (with celeba/ inside).")
        object.__setattr__(self, "root", Path(self.root).expanduser())
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if self.mask_dir is not None:
            object.__setattr__(self, "mask_dir", Path(self.mask_dir).expanduser())
        if self.arch not in SUPPORTED_ARCHS:
            raise ProtocolError(f"arch {self.arch!r} is not supported: use one of {', '.join(SUPPORTED_ARCHS)} "
                                f"(the paper uses 'alexnet').")
        if int(self.image_size) < MIN_INPUT_SIZE[self.arch]:
            raise ProtocolError(f"image_size {self.image_size} is too small for {self.arch}: use at least "
                                f"{MIN_INPUT_SIZE[self.arch]} (224 is AlexNet's native size).")
        if self.hidden is not None and (not ARCHITECTURES[self.arch].hidden_layers or int(self.hidden) < 1):
            takes = "/".join(name for name, a in ARCHITECTURES.items() if a.hidden_layers)
            raise ProtocolError(f"hidden={self.hidden!r}: give a positive width for {takes}, or None for "
                                f"torchvision's 4096 ({self.arch} takes only None).")
        for name in ("baseline_epochs", "finetune_epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ProtocolError(f"{name} must be at least 1, got {getattr(self, name)!r}.")
        if self.patience is not None and int(self.patience) < 1:
            raise ProtocolError(f"patience must be at least 1 (or None to never stop early), got {self.patience!r}.")
        for name in ("lr", "finetune_lr"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ProtocolError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in ("w_a", "w_g"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ProtocolError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}.")
        if self.target not in ("positive", "both"):
            raise ProtocolError(f"target must be 'positive' (the paper) or 'both', not {self.target!r}.")
        pairs = []
        for pair in self.pairs:
            if isinstance(pair, str) or len(pair) != 2:
                raise ProtocolError(f"each pair must be (attribute, shortcut), e.g. "
                                    f"('Wearing_Lipstick', 'Heavy_Makeup'); got {pair!r}.")
            a, b = validate_attributes(pair)
            if a == b:
                raise ProtocolError(f"pair ({a}, {b}) pairs an attribute with itself: give its co-occurring shortcut.")
            pairs.append((a, b))
        if not pairs:
            raise ProtocolError("pairs is empty: give at least one (attribute, shortcut) pair, e.g. cocam.PAPER_PAIRS.")
        guided = [a for a, _ in pairs]
        repeated = sorted({a for a in guided if guided.count(a) > 1})
        if repeated:
            raise ProtocolError(f"{', '.join(repeated)} appears as the guided attribute of several pairs: each "
                                f"attribute gets one guided run, so give it once.")
        object.__setattr__(self, "pairs", tuple(pairs))

    def spec(self):
        """The :class:`~cocam.checkpoint.ModelSpec` of every model of the protocol."""
        from cocam.checkpoint import ModelSpec

        return ModelSpec(arch=self.arch, image_size=int(self.image_size), hidden=self.hidden)

    def baseline_config(self):
        """The baseline's :class:`~cocam.train.TrainConfig` (early stopping on the validation BCE)."""
        from cocam.train import TrainConfig

        return TrainConfig(epochs=int(self.baseline_epochs), batch_size=int(self.batch_size), lr=float(self.lr),
                           patience=self.patience, seed=int(self.seed), device=self.device)

    def finetune_config(self, n_train: int):
        """The :class:`~cocam.train.TrainConfig` shared by every guided run and the control."""
        from cocam.train import TrainConfig

        return TrainConfig.fine_tuning(n_train, int(self.finetune_epochs), batch_size=int(self.batch_size),
                                       lr=float(self.finetune_lr), seed=int(self.seed), device=self.device)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able settings."""
        d = dataclasses.asdict(self)
        d["root"], d["out"] = os.fspath(self.root), os.fspath(self.out)
        d["mask_dir"] = None if self.mask_dir is None else os.fspath(self.mask_dir)
        d["pairs"] = [list(p) for p in self.pairs]
        return d


# --------------------------------------------------------------------------------------------
# Requirements and time estimate
# --------------------------------------------------------------------------------------------


def _annotations(config: ProtocolConfig):
    """Load the annotations, turning a missing dataset into an error that says what to do."""
    from cocam.celeba import DatasetNotFoundError, load_annotations

    try:
        return load_annotations(config.root)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"The paper protocol needs a CelebA-layout dataset at root={os.fspath(config.root)!r}, and it is not "
            f"complete there.\n{err}\nPoint root at your CelebA (the folder that contains celeba/), or write the "
            f"synthetic stand-in with `cocam generate --root <folder>` and use that folder.") from None


def _split_counts(annotations) -> dict[str, int]:
    return {s: int((annotations.split == s).sum()) for s in ("train", "valid", "test")}


def _cached(celeba_dir: Path, split: str, image_size: int) -> bool:
    data, meta = cache_files(default_cache_dir(celeba_dir), split, image_size)
    return data.is_file() and meta.is_file()


class _RandomImages:
    """Random ``uint8`` images with random labels, for timing training steps without a decoded cache.

    Provides what :func:`cocam.train.fit` and :func:`cocam.evaluate.predict` read from a
    dataset (``len``, ``image_size``, ``get_batch_numpy``), so the timing goes through the very
    same code as a real run; only the pixels are not CelebA's (the cost does not depend on them).
    """

    def __init__(self, n: int, image_size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._n, self._size = int(n), int(image_size)
        self._pixels = rng.integers(0, 256, (min(self._n, 256), self._size, self._size, 3), dtype=np.uint8)
        self._targets = rng.integers(0, 2, (self._n, 40)).astype(np.float32)
        self._landmarks = np.zeros((self._n, 5, 2), np.float32)

    @property
    def image_size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._n

    def get_batch_numpy(self, indices: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self._pixels[idx % len(self._pixels)], self._targets[idx], self._landmarks[idx]


def _seconds_per_step(config: ProtocolConfig, guidance, measure_steps: int, device: torch.device) -> float:
    """Seconds of one training step of :func:`cocam.train.fit` (after one warm-up step)."""
    from cocam.train import TrainConfig, fit

    spec = config.spec()
    data = _RandomImages(config.batch_size * (measure_steps + 1), config.image_size, config.seed)
    torch.manual_seed(config.seed)
    model = spec.build()
    base = {"epochs": 1, "batch_size": config.batch_size, "lr": config.finetune_lr, "patience": None,
            "seed": config.seed, "device": config.device}
    fit(model, data, None, TrainConfig(max_steps=1, **base), spec=spec, guidance=guidance, progress=False)
    _sync(device)
    t = time.perf_counter()
    fit(model, data, None, TrainConfig(max_steps=measure_steps, **base), spec=spec, guidance=guidance,
        progress=False)
    _sync(device)
    return (time.perf_counter() - t) / measure_steps


def _seconds_per_eval_image(config: ProtocolConfig, device: torch.device) -> float:
    """Seconds per image of :func:`cocam.evaluate.predict` (evaluation and per-epoch validation)."""
    from cocam.evaluate import predict

    spec = config.spec()
    model = spec.build()
    batch = 256
    predict(model, _RandomImages(batch, config.image_size), batch_size=batch, device=device)  # warm-up
    data = _RandomImages(2 * batch, config.image_size, config.seed + 1)
    _sync(device)
    t = time.perf_counter()
    predict(model, data, batch_size=batch, device=device)
    _sync(device)
    return (time.perf_counter() - t) / len(data)


def _seconds_per_decoded_image(annotations, image_size: int, n: int = 16) -> float | None:
    """Seconds to decode one JPEG into the cache (``None`` when no listed image can be read)."""
    from cocam.dataset import decode_image

    names = list(annotations.attributes.index[:n])
    t, done = time.perf_counter(), 0
    for name in names:
        try:
            decode_image(annotations.image_dir / name, image_size)
            done += 1
        except (OSError, ValueError):
            continue
    return (time.perf_counter() - t) / done if done else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plan(config: ProtocolConfig, counts: Mapping[str, int]) -> dict[str, int]:
    """Planned step counts: the baseline's maximum, and each fine-tuning run's exact budget."""
    per_epoch = counts["train"] // config.batch_size
    return {"baseline_steps": int(config.baseline_epochs) * per_epoch,
            "finetune_steps": int(config.finetune_config(max(counts["train"], 1)).max_steps or 0),
            "steps_per_epoch": per_epoch}


def estimate_minutes(config: ProtocolConfig, measure_steps: int = 3) -> dict[str, float]:
    """Minutes each stage of :func:`run_protocol` will take on this machine, from a short measurement.

    Times ``measure_steps`` training steps of :func:`cocam.train.fit` (after a warm-up step)
    on the configured device, model, input size and batch size — a plain BCE step and a guided
    step — plus :func:`cocam.evaluate.predict` on two batches of 256 and the decoding of a few of
    the dataset's JPEGs, then extrapolates to the planned numbers of steps and images. The
    timed steps use random pixels (the cost does not depend on them), so no decoded cache is
    needed.

    Returns:
        Minutes per stage, in order: ``"decode cache"`` (0 when every split is already decoded
        at this size), ``"baseline"`` (the maximum: early stopping may end it sooner, including
        its per-epoch validation), ``"guided <Attribute>"`` per pair, ``"control"`` (when
        ``config.control``), ``"evaluation"``. Stages already done in ``config.out`` are not
        discounted.

    Raises:
        DatasetNotFoundError: the dataset's annotation files are not at ``config.root``.
    """
    return _estimate(config, measure_steps)[0]


def _estimate(config: ProtocolConfig, measure_steps: int) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`estimate_minutes` and the measurements it extrapolates from."""
    from cocam.evaluate import resolve_device
    from cocam.masks import default_mask
    from cocam.train import Guidance

    if measure_steps < 1:
        raise ProtocolError(f"measure_steps must be at least 1, got {measure_steps}.")
    annotations = _annotations(config)
    counts = _split_counts(annotations)
    if counts["train"] < config.batch_size:
        raise ProtocolError(f"The training split has {counts['train']} images, fewer than one batch "
                            f"({config.batch_size}): lower batch_size or check list_eval_partition.txt.")
    device = resolve_device(config.device)
    plan = _plan(config, counts)
    plain = _seconds_per_step(config, None, measure_steps, device)
    a = config.pairs[0][0]
    guidance = Guidance((a,), (default_mask(a),), w_a=config.w_a, w_g=config.w_g,
                        target=config.target)  # the cost is the same for any mask
    guided = _seconds_per_step(config, guidance, measure_steps, device)
    per_image = _seconds_per_eval_image(config, device)

    missing = [s for s in ("train", "valid", "test") if counts[s] and not _cached(annotations.root, s,
                                                                                    config.image_size)]
    decode = 0.0
    if missing:
        per_jpeg = _seconds_per_decoded_image(annotations, config.image_size)
        workers = max(1, min(2, os.cpu_count() or 1))  # CelebADataset decodes with 2 processes by default
        decode = (per_jpeg or 0.0) * sum(counts[s] for s in missing) / workers

    valid_pass = counts["valid"] * per_image
    minutes = {"decode cache": decode / 60,
               "baseline": (plan["baseline_steps"] * plain + config.baseline_epochs * valid_pass) / 60}
    for a, _ in config.pairs:
        minutes[f"guided {a}"] = (plan["finetune_steps"] * guided + config.finetune_epochs * valid_pass) / 60
    if config.control:
        minutes["control"] = (plan["finetune_steps"] * plain + config.finetune_epochs * valid_pass) / 60
    n_models = 1 + len(config.pairs) + int(config.control)
    evaluation = n_models * counts["test"] * per_image
    if config.attention:  # one Grad-CAM (forward and backward) per positive image, per model and attribute
        is_test = (annotations.split == "test").to_numpy()
        positives = sum(int(annotations.attributes[a].to_numpy()[is_test].sum()) for a, _ in config.pairs)
        evaluation += n_models * positives * plain / config.batch_size
    minutes["evaluation"] = evaluation / 60
    measured = {"plain_step_s": plain, "guided_step_s": guided, "eval_image_s": per_image, "device": str(device)}
    return minutes, measured


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def requirements_report(config: ProtocolConfig, *, measure_steps: int = 3) -> str:
    """The text of :func:`requirements_check` (what the run needs, how long it takes)."""
    return requirements_check(config, measure_steps=measure_steps)[0]


def requirements_check(config: ProtocolConfig, *, measure_steps: int = 3) -> tuple[str, list[str]]:
    """What :func:`run_protocol` needs with this configuration, and how long it will take here.

    Returns the report and its list of problems: what stops the run (missing images or folders,
    an empty split, too little disk space, an unusable mask); empty when the run can proceed
    (``cocam paper --check`` exits non-zero otherwise). Findings that leave the run possible
    (an empty conflict subset) are printed as warnings and not returned.

    Checks the dataset with cocam's readers (annotation files, images per split, listed images
    missing from the image folder, the conflict subsets), the disk space of the decoded-image
    cache, the masks that will be used, the device (a GPU is recommended), and estimates the
    minutes per stage with :func:`estimate_minutes`.

    Raises:
        DatasetNotFoundError: the dataset folder or one of its annotation files is missing (the
            message names it, shows the expected layout and what to do).
        AnnotationError: an annotation file is malformed (the message names the file and line).
    """
    from cocam.masks import resolve_mask

    annotations = _annotations(config)
    counts = _split_counts(annotations)
    lines = [f"cocam paper protocol — requirements for {annotations.root}", ""]
    problems: list[str] = []  # the run cannot proceed
    notes: list[str] = []  # it can, with a result to read with care

    lines.append(f"Dataset: {len(annotations):,} images listed: train {counts['train']:,}, valid {counts['valid']:,}, "
                 f"test {counts['test']:,}.")
    image_dir = annotations.image_dir
    if not image_dir.is_dir():
        problems.append(f"the image folder {image_dir} is missing: put the aligned JPEGs (img_align_celeba/"
                        f"000001.jpg ...) there.")
    else:
        present = {entry.name for entry in os.scandir(image_dir)}
        absent = [n for n in annotations.attributes.index if n not in present]
        if absent:
            problems.append(f"{len(absent):,} listed images are missing from {image_dir} (first: "
                            f"{', '.join(absent[:3])}): re-extract img_align_celeba, or the run stops at the first.")
        else:
            lines.append(f"  every listed image is present in {image_dir}.")
    for split in ("train", "valid", "test"):
        if counts[split] == 0:
            problems.append(f"the {split} split is empty: check list_eval_partition.txt (0 train, 1 valid, 2 test).")
    if counts["train"] and counts["train"] < config.batch_size:
        problems.append(f"the training split ({counts['train']}) is smaller than one batch ({config.batch_size}): "
                        f"lower batch_size.")
    test = annotations.attributes.loc[(annotations.split == "test").to_numpy()]
    lines.append("Conflict subsets of the test split (A without B), where the paper's second column is measured:")
    for a, b in config.pairs:
        n = int(((test[a] == 1) & (test[b] == 0)).sum())
        lines.append(f"  {a} ∧ ¬{b}: {n:,} of {len(test):,} test images ({int((test[a] == 1).sum()):,} with {a})")
        if n == 0:
            notes.append(f"no test image has {a} without {b}: the conflict accuracy of this pair will be empty (NaN).")

    missing = [s for s in ("train", "valid", "test") if counts[s] and not _cached(annotations.root, s,
                                                                                    config.image_size)]
    cache_dir = default_cache_dir(annotations.root)
    if missing:
        need = sum(counts[s] for s in missing) * config.image_size ** 2 * 3
        probe = next(p for p in (cache_dir, *cache_dir.parents) if p.exists())
        free = shutil.disk_usage(probe).free
        lines.append(f"Decoded image cache ({config.image_size} px, {cache_dir}): to build for {', '.join(missing)}: "
                     f"{_gib(need)} (free: {_gib(free)}).")
        if need > free:
            problems.append(f"the decoded cache needs {_gib(need)} but {probe} has {_gib(free)} free: free space, "
                            f"put the cache elsewhere (--cache-dir or $COCAM_CACHE_DIR), or lower image_size "
                            f"(the cache grows with its square).")
    else:
        lines.append(f"Decoded image cache ({config.image_size} px, {cache_dir}): complete.")

    masks = []
    for a, _ in config.pairs:
        try:
            masks.append(f"{a}: {resolve_mask(a, config.mask_dir)[1]}")
        except (OSError, ValueError) as err:
            problems.append(f"the mask of {a} cannot be used: {err}")
    lines.append("Masks (the user's region S per guided attribute): " + "; ".join(masks))

    if torch.cuda.is_available():
        lines.append(f"Device: CUDA ({torch.cuda.get_device_name(0)}), used with device={config.device!r}.")
    else:
        lines.append("Device: no CUDA GPU found — a GPU is strongly recommended: AlexNet at 224 px on real CelebA "
                     "takes hours per epoch on a CPU (see the estimate below).")

    plan = _plan(config, counts)
    n_runs = len(config.pairs) + int(config.control)
    lines.append(f"Plan: baseline ≤ {config.baseline_epochs} epochs ({plan['baseline_steps']:,} steps at most, "
                 f"early stopping patience {config.patience}); {len(config.pairs)} guided fine-tune(s), one per pair"
                 f"{' and the BCE-only control' if config.control else ''}: {n_runs} × {plan['finetune_steps']:,} "
                 f"steps; evaluation of {1 + n_runs} models on {counts['test']:,} test images.")
    if counts["train"] < config.batch_size:
        lines.append("")
        lines.append("Time estimate skipped: the training split does not fill one batch (see below).")
    else:
        minutes, m = _estimate(config, measure_steps)
        lines.append("")
        lines.append(f"Time estimate on {m['device']} (measured: {m['plain_step_s']:.3f} s per BCE step, "
                     f"{m['guided_step_s']:.3f} s per guided step, {1000 * m['eval_image_s']:.2f} ms per evaluated "
                     f"image; batch {config.batch_size}, {config.image_size} px, {config.arch}, hidden "
                     f"{config.hidden or 4096}):")
        width = max(len(k) for k in minutes)
        for stage, value in minutes.items():
            lines.append(f"  {stage:<{width}}  {value:8.1f} min{'  (at most)' if stage == 'baseline' else ''}")
        lines.append(f"  {'total':<{width}}  {sum(minutes.values()):8.1f} min")
    if notes:
        lines.append("")
        lines.append("Warnings (the run can proceed):")
        lines.extend(f"  ! {n}" for n in notes)
    if problems:
        lines.append("")
        lines.append("Problems (the run cannot proceed):")
        lines.extend(f"  ✗ {p}" for p in problems)
    else:
        lines.append("")
        lines.append("Ready: nothing is missing.")
    return "\n".join(lines), problems


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------

_COMPARED_CONFIG_KEYS_IGNORED = ("device", "amp", "channels_last")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_MARKER = "protocol_source.json"


def _check_resumable(run_dir: Path, planned: Mapping[str, Any], origin: Mapping[str, Any]) -> None:
    """Refuse to resume a run folder made with other settings or from another starting point.

    ``planned`` is compared with the folder's ``run.json`` (written by :func:`cocam.train.fit`;
    the device is allowed to differ), ``origin`` with its ``protocol_source.json`` (written by
    :func:`run_protocol`: the ImageNet start of the baseline, the baseline checkpoint of a
    fine-tuning run).
    """
    if not (run_dir / "last.pt").exists():
        return
    fix = (f"Use another out folder, delete {run_dir}, or run with resume=False (CLI: --no-resume) to retrain "
           f"every stage (overwrites).")
    record_path = run_dir / "run.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        differences = []
        for key in ("config", "spec", "guidance"):
            old, new = record.get(key), planned.get(key)
            if key == "guidance" and isinstance(old, dict) and isinstance(new, dict):  # a setting added since
                from cocam.train import GUIDANCE_ADDED_DEFAULTS

                old, new = {**GUIDANCE_ADDED_DEFAULTS, **old}, {**GUIDANCE_ADDED_DEFAULTS, **new}
            if isinstance(old, dict) and isinstance(new, dict):
                for k in sorted(set(old) | set(new)):
                    if key == "config" and k in _COMPARED_CONFIG_KEYS_IGNORED:
                        continue
                    if old.get(k) != new.get(k):
                        differences.append(f"{key}.{k}: {old.get(k)!r} → {new.get(k)!r}")
            elif old != new:
                differences.append(f"{key}: {old!r} → {new!r}")
        if differences:
            raise ProtocolError(f"{run_dir} holds a run made with other settings ({'; '.join(differences)}). {fix}")
    marker = run_dir / _MARKER
    if not marker.is_file():
        raise ProtocolError(f"{run_dir} holds a run that the protocol did not start (no {_MARKER}). {fix}")
    made = json.loads(marker.read_text(encoding="utf-8"))
    for k, v in origin.items():
        if made.get(k) != v:
            what = ("was fine-tuned from another baseline checkpoint than the current one" if k == "baseline_sha256"
                    else f"was started with {k}={made.get(k)!r}, not {v!r}")
            raise ProtocolError(f"{run_dir} {what}. {fix}")


def _planned(config, spec, guidance) -> dict[str, Any]:
    return {"config": dataclasses.asdict(config), "spec": spec.to_dict(),
            "guidance": guidance.describe() if guidance is not None else None}


def _cell(long: pd.DataFrame, model: str, a: str, b: str, subset: str) -> pd.Series | None:
    rows = long[(long["model"] == model) & (long["a"] == a) & (long["b"] == b) & (long["subset"] == subset)]
    return rows.iloc[0] if len(rows) else None


def _percent(row: pd.Series | None, key: str) -> float:
    if row is None or row["n"] == 0:
        return float("nan")
    return 100.0 * float(row[key])


def _interval(row: pd.Series | None) -> str:
    if row is None or row["n"] == 0:
        return ""
    return f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


_DETAILS = "protocol_details.csv"
_LONG = "protocol_long.csv"


def _evaluation_key(config: ProtocolConfig, checkpoints: Mapping[str, Path],
                    sources: Mapping[str, str]) -> dict[str, Any]:
    """What an evaluation depends on: the checkpoint files (size, modification time), pairs, masks, data."""
    files = {}
    for name, path in checkpoints.items():
        st = Path(path).stat()
        files[name] = {"path": os.fspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return json.loads(json.dumps({"checkpoints": files, "pairs": [list(p) for p in config.pairs], "split": "test",
                                  "attention": config.attention, "mask_sources": dict(sources),
                                  "root": os.fspath(Path(config.root).resolve())}))


def _cached_evaluation(out: Path, key: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The evaluation written by an earlier run with the same :func:`_evaluation_key`, if any.

    The CSVs are written before the sidecar that records their key, so a key in the sidecar
    always describes CSVs that were completely written (checkpoints are replaced atomically, so
    a changed checkpoint changes its modification time and the key).
    """
    try:
        record = json.loads((out / "protocol.json").read_text(encoding="utf-8"))
        if record.get("evaluation_key") != key:
            return None
        return pd.read_csv(out / _DETAILS), pd.read_csv(out / _LONG)
    except (OSError, ValueError):
        return None


def protocol_table(long: pd.DataFrame, config: ProtocolConfig,
                   mask_sources: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The paper's layout with the paper's numbers next to cocam's, one row per pair.

    Args:
        long: the long table of :func:`cocam.evaluate.evaluate_checkpoints` (columns ``model``,
            ``a``, ``b``, ``subset``, ``n``, ``accuracy``, ``ci_low``, ``ci_high``) with the models
            ``"pre-trained"``, ``"fine-tuned (<A>)"`` for each pair and ``"BCE-only control"``.
        config: the protocol's configuration (its pairs, whether there is a control).
        mask_sources: attribute → where its mask came from (a ``mask`` column).

    Returns:
        Columns ``pair``, ``attribute``, ``shortcut``; ``paper <row> <column> %`` for the
        paper's rows (pre-trained, fine-tuned) and columns (test, conflict) — NaN for a pair the
        paper did not report; ``cocam <model> worst group %``, ``… worst group 95% CI``,
        ``… conflict mean %`` (the headline the paper did not report: the lowest of the four
        (A, B) groups, and the mean of A∧¬B and ¬A∧B, which predicting A more often cannot
        raise), ``… reverse %`` (¬A∧B), ``… test %``, ``… test 95% CI``, ``… conflict %``,
        ``… conflict 95% CI`` for pre-trained, fine-tuned and (with the control) control;
        ``paper conflict change``, ``cocam conflict change`` (fine-tuned − pre-trained),
        ``cocam conflict change vs control``; ``n test``, ``n conflict``; ``mask``. Accuracy is
        on attribute A over the whole test split (*test*) and over A∧¬B (*conflict*), in percent;
        intervals are 95 % bootstrap intervals over the test images.
    """
    paper = {(r.attribute, r.shortcut): r for r in _PAPER}
    rows = []
    for a, b in config.pairs:
        row: dict[str, Any] = {"pair": f"{a} / {b}", "attribute": a, "shortcut": b}
        p = paper.get((a, b))
        for key, name in _PAPER_COLUMNS.items():
            row[f"paper {name}"] = getattr(p, key) if p is not None else float("nan")
        models = {"pre-trained": "pre-trained", "fine-tuned": f"fine-tuned ({a})"}
        if config.control:
            models["control"] = "BCE-only control"
        n_test = n_conflict = 0
        for label, model in models.items():
            test, conflict = _cell(long, model, a, b, "all"), _cell(long, model, a, b, "A∧¬B")
            worst = _cell(long, model, a, b, "worst group")
            row[f"cocam {label} worst group %"] = _percent(worst, "accuracy")
            row[f"cocam {label} worst group 95% CI"] = _interval(worst)
            row[f"cocam {label} conflict mean %"] = _percent(_cell(long, model, a, b, "conflict mean"), "accuracy")
            row[f"cocam {label} reverse %"] = _percent(_cell(long, model, a, b, "¬A∧B"), "accuracy")
            row[f"cocam {label} test %"] = _percent(test, "accuracy")
            row[f"cocam {label} test 95% CI"] = _interval(test)
            row[f"cocam {label} conflict %"] = _percent(conflict, "accuracy")
            row[f"cocam {label} conflict 95% CI"] = _interval(conflict)
            n_test = int(test["n"]) if test is not None else n_test
            n_conflict = int(conflict["n"]) if conflict is not None else n_conflict
        row["paper conflict change"] = row["paper fine-tuned conflict %"] - row["paper pre-trained conflict %"]
        row["cocam conflict change"] = row["cocam fine-tuned conflict %"] - row["cocam pre-trained conflict %"]
        if config.control:
            row["cocam conflict change vs control"] = row["cocam fine-tuned conflict %"] - row["cocam control conflict %"]
        row["n test"], row["n conflict"] = n_test, n_conflict
        row["mask"] = (mask_sources or {}).get(a, "")
        rows.append(row)
    return pd.DataFrame(rows)


def run_protocol(config: ProtocolConfig, *, progress: bool = True, resume: bool = True) -> pd.DataFrame:
    """Run the paper's experiment on ``config.root`` and return its table next to the paper's.

    Stages, each a :func:`cocam.train.fit` run folder under ``config.out``:

    1. ``baseline/``: the 40-attribute classifier, BCE, early stopping on the validation BCE;
    2. ``guided_<A>/`` for each pair (A, B): from the baseline's ``best.pt``, guided on A alone
       with A's mask (:func:`cocam.masks.resolve_mask`), ``w_a · BCE + w_g · loss_g``, for the
       fixed budget of :meth:`cocam.train.TrainConfig.fine_tuning`;
    3. ``control/``: the same start, budget, learning rate and data order, BCE only;
    4. evaluation of every model on the test split (:func:`cocam.evaluate.evaluate_checkpoints`).

    Args:
        config: the settings (:class:`ProtocolConfig`).
        progress: print the stages and show progress bars.
        resume: reuse what is done in ``config.out``: a complete stage is not trained again and
            an interrupted one continues from its ``last.pt`` (same result as uninterrupted on
            the CPU). A folder made with other settings, or fine-tuned from another baseline, is
            refused with :class:`ProtocolError`. ``False`` retrains every stage (overwriting).
            The evaluation is reused too when the checkpoints, pairs and masks are unchanged.

    Returns:
        :func:`protocol_table` — one row per pair: the paper's numbers, cocam's (pre-trained,
        fine-tuned, control) with 95 % intervals, the subset sizes, the mask used. Also written
        atomically to ``<out>/protocol.csv`` with the provenance sidecar ``<out>/protocol.json``
        (:func:`cocam.evaluate.write_results`, plus the protocol's configuration, the mask
        sources and the stage times); every model on every pair goes to
        ``<out>/protocol_details.csv`` (and in long form to ``<out>/protocol_long.csv``).
        ``df.attrs`` holds ``stage_seconds`` and ``checkpoints``.

    Raises:
        DatasetNotFoundError: the dataset at ``config.root`` is missing or incomplete.
        ProtocolError: a run folder cannot be resumed, or the data do not fit the settings.
        RunLockedError: another process is running the protocol (or one of its stages) in ``out``.
    """
    from cocam.checkpoint import load_model
    from cocam.dataset import CelebADataset
    from cocam.evaluate import evaluate_checkpoints, write_results
    from cocam.io import LockedError, atomic_write_text, exclusive_lock
    from cocam.masks import resolve_mask
    from cocam.train import Guidance, RunLockedError, fit

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    annotations = _annotations(config)
    counts = _split_counts(annotations)
    for split, n in counts.items():
        if n == 0:
            raise ProtocolError(f"The {split} split of {annotations.root} is empty: the protocol needs train, valid "
                                f"and test images (check list_eval_partition.txt: 0 train, 1 valid, 2 test).")
    if counts["train"] < config.batch_size:
        raise ProtocolError(f"The training split has {counts['train']} images, fewer than one batch "
                            f"({config.batch_size}): lower batch_size.")
    masks: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for a, _ in config.pairs:  # before any training: a bad mask file fails now, not after the baseline
        masks[a], sources[a] = resolve_mask(a, config.mask_dir)

    out = config.out
    n_stages = 2 + len(config.pairs) + int(config.control)
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(exclusive_lock(out / ".protocol.lock", what="running the paper protocol"))
    except LockedError as err:
        raise RunLockedError(str(err)) from None
    with lock:
        times: dict[str, float] = {}
        spec = config.spec()
        t = time.perf_counter()
        train = CelebADataset(config.root, "train", image_size=spec.image_size, progress=progress)
        valid = CelebADataset(config.root, "valid", image_size=spec.image_size, progress=progress)
        times["datasets"] = time.perf_counter() - t

        say(f"1/{n_stages} baseline: BCE on all 40 attributes, early stopping on the validation split")
        base_config = config.baseline_config()
        base_dir = out / "baseline"
        if resume:
            _check_resumable(base_dir, _planned(base_config, spec, None), {"pretrained": config.pretrained})
        atomic_write_text(base_dir / _MARKER, json.dumps({"pretrained": config.pretrained}, indent=2) + "\n")
        t = time.perf_counter()
        torch.manual_seed(config.seed)  # the initial weights
        base = fit(spec.build(pretrained=config.pretrained), train, valid, base_config, spec=spec,
                   run_dir=base_dir, resume=resume, overwrite=not resume, progress=progress)
        times["baseline"] = time.perf_counter() - t
        if base.best_path is None:
            raise ProtocolError(f"The baseline in {base_dir} has no best.pt: its training ended before one epoch "
                                f"was validated. Delete {base_dir} and run again.")
        source = _sha256(base.best_path)

        ft_config = config.finetune_config(len(train))
        runs: list[tuple[str, str, Guidance | None]] = [
            (f"guided {a}", f"guided_{a}", Guidance((a,), (masks[a],), w_a=config.w_a, w_g=config.w_g,
                                                    target=config.target))
            for a, _ in config.pairs]
        if config.control:
            runs.append(("control", "control", None))
        tuned: dict[str, Path] = {}
        for i, (stage, folder, guidance) in enumerate(runs, start=2):
            if guidance is not None:
                a = guidance.attributes[0]
                say(f"\n{i}/{n_stages} guided fine-tuning of {a} "
                    f"(w_a·BCE + w_g·loss_g, mask: {sources[a]}), {ft_config.max_steps} steps from the baseline")
            else:
                say(f"\n{i}/{n_stages} BCE-only control, the same {ft_config.max_steps} steps from the baseline")
            run_dir = out / folder
            if resume:
                _check_resumable(run_dir, _planned(ft_config, spec, guidance), {"baseline_sha256": source})
            else:
                for stale in ("last.pt", "best.pt"):  # never leave a checkpoint of an earlier baseline behind
                    (run_dir / stale).unlink(missing_ok=True)
            atomic_write_text(run_dir / _MARKER, json.dumps(
                {"baseline": os.fspath(base.best_path), "baseline_sha256": source}, indent=2) + "\n")
            model, _, _ = load_model(base.best_path)
            t = time.perf_counter()
            result = fit(model, train, valid, ft_config, spec=spec, guidance=guidance, run_dir=run_dir,
                         resume=resume, overwrite=not resume, progress=progress)
            times[stage] = time.perf_counter() - t
            if result.last_path is None or result.steps != ft_config.max_steps:
                raise ProtocolError(f"{run_dir} ended after {result.steps} of {ft_config.max_steps} steps: delete it "
                                    f"and run again.")
            tuned[stage] = result.last_path

        checkpoints: dict[str, Path] = {"pre-trained": base.best_path}
        checkpoints.update({f"fine-tuned ({a})": tuned[f"guided {a}"] for a, _ in config.pairs})
        if config.control:
            checkpoints["BCE-only control"] = tuned["control"]
        key = _evaluation_key(config, checkpoints, sources)
        t = time.perf_counter()
        cached = _cached_evaluation(out, key) if resume else None
        if cached is not None:
            say(f"\n{n_stages}/{n_stages} evaluation on the test split: reused (same checkpoints, pairs and masks)")
            details, long = cached
        else:
            say(f"\n{n_stages}/{n_stages} evaluation on the test split")
            details, long = evaluate_checkpoints(config.root, checkpoints, list(config.pairs), split="test",
                                                 attention=config.attention, mask_dir=config.mask_dir,
                                                 device=config.device)
        times["evaluation"] = time.perf_counter() - t
        table = protocol_table(long, config, sources)

        # The evaluation first, the sidecar (which vouches for it) last: see _cached_evaluation.
        atomic_write_text(out / _DETAILS, details.to_csv(index=False))
        atomic_write_text(out / _LONG, long.to_csv(index=False))
        csv_path, sidecar = write_results(out / "protocol.csv", table, checkpoints)
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        record.update({"protocol": config.to_dict(), "resume": resume, "mask_sources": sources,
                       "baseline_sha256": source, "finetune_steps": ft_config.max_steps,
                       "stage_seconds": {k: round(v, 3) for k, v in times.items()},
                       "paper_results": PAPER_RESULTS.to_dict(orient="records"),
                       "details": _DETAILS, "long": _LONG, "evaluation_key": key})
        atomic_write_text(sidecar, json.dumps(record, indent=2, default=str) + "\n")
        say(f"\nresults: {csv_path} (provenance: {sidecar}; every model on every pair: {out / _DETAILS})")
    table.attrs["stage_seconds"] = times
    table.attrs["checkpoints"] = {k: os.fspath(v) for k, v in checkpoints.items()}
    return table


def format_protocol_table(df: pd.DataFrame) -> str:
    """A readable text version of :func:`run_protocol`'s table: one block per pair.

    Each block has the paper's rows and cocam's (pre-trained, fine-tuned, control when
    present) with cocam's worst-group and reverse-group accuracy (the paper reports neither: "—"),
    the test and conflict accuracy in percent and cocam's 95 % intervals.
    """
    blocks = []
    for _, r in df.iterrows():
        n_test, n_conflict = int(r["n test"]), int(r["n conflict"])
        head = (f"{r['attribute']} (shortcut {r['shortcut']}): accuracy on {r['attribute']}, % — whole test split "
                f"({n_test:,} image{'s' * (n_test != 1)}) and {r['attribute']} without {r['shortcut']} "
                f"({n_conflict:,} image{'s' * (n_conflict != 1)})")
        rows = []
        for source, label in (("paper", "pre-trained"), ("paper", "fine-tuned"), ("cocam", "pre-trained"),
                              ("cocam", "fine-tuned"), ("cocam", "control")):
            key = f"{source} {label}"
            if f"{key} test %" not in r.index:
                continue
            rows.append({"": f"{source} {label if label != 'control' else 'BCE-only control'}",
                         "worst group %": _fmt(r.get(f"{key} worst group %")) if source == "cocam" else "—",
                         "worst group 95% CI": r.get(f"{key} worst group 95% CI", "") if source == "cocam" else "",
                         "reverse ¬A∧B %": _fmt(r.get(f"{key} reverse %")) if source == "cocam" else "—",
                         "test %": _fmt(r[f"{key} test %"]),
                         "test 95% CI": r.get(f"{key} test 95% CI", "") if source == "cocam" else "",
                         "conflict %": _fmt(r[f"{key} conflict %"]),
                         "conflict 95% CI": r.get(f"{key} conflict 95% CI", "") if source == "cocam" else ""})
        body = pd.DataFrame(rows).fillna("").to_string(index=False)
        change = (f"conflict change, fine-tuned − pre-trained: paper {_fmt(r['paper conflict change'], sign=True)}, "
                  f"cocam {_fmt(r['cocam conflict change'], sign=True)}")
        if "cocam conflict change vs control" in r.index:
            change += f" (cocam vs the control: {_fmt(r['cocam conflict change vs control'], sign=True)})"
        mask = f"; mask: {r['mask']}" if r.get("mask") else ""
        blocks.append(f"{head}\n{body}\n{change}{mask}")
    return "\n\n".join(blocks)


def _fmt(value: Any, *, sign: bool = False) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    if math.isnan(v):
        return "—"
    return f"{v:+.2f}" if sign else f"{v:.2f}"


# --------------------------------------------------------------------------------------------
# Command line (for a thin `cocam paper` subcommand)
# --------------------------------------------------------------------------------------------


def add_protocol_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the protocol's options to ``parser`` (e.g. a ``cocam paper`` subparser) and return it.

    Pair it with :func:`run_from_args`: ``parser.set_defaults(func=run_from_args)``. Defaults
    are :class:`ProtocolConfig`'s.
    """
    from cocam.model import SUPPORTED_ARCHS

    d = ProtocolConfig(root=Path("."))
    parser.add_argument("--root", type=Path, required=env_data_root() is None, default=env_data_root(),
                        help="your CelebA: the folder that contains celeba/ (or celeba/ itself); default: "
                             "$COCAM_DATA_ROOT")
    parser.add_argument("--out", type=Path, default=d.out, help="runs and results (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="only print what the run needs and how long it will take here, then stop")
    parser.add_argument("--measure-steps", type=int, default=3, help="training steps timed by --check")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="default: %(default)s")
    parser.add_argument("--arch", choices=SUPPORTED_ARCHS, default=d.arch, help="default: %(default)s (the paper's)")
    parser.add_argument("--hidden", type=int, default=0,
                        help="width of the two hidden layers (0 = AlexNet's 4096, the default; 512 for CPU runs)")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights (must be in the torch cache)")
    parser.add_argument("--epochs", type=int, default=d.baseline_epochs,
                        help="baseline: maximum epochs (default: %(default)s)")
    parser.add_argument("--patience", type=int, default=d.patience,
                        help="baseline: early stopping patience (default: %(default)s; 0 = never stop early)")
    parser.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                        help="each fine-tuning run and the control (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=d.lr, help="baseline learning rate (default: %(default)s)")
    parser.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="default: %(default)s")
    parser.add_argument("--w-a", type=float, default=d.w_a, help="weight of the BCE term (default: %(default)s)")
    parser.add_argument("--w-g", type=float, default=d.w_g, help="weight of loss_g (default: %(default)s)")
    parser.add_argument("--target", choices=["positive", "both"], default=d.target,
                        help="positive: the paper (CAM of the logit on positives); both: CAM of sign(y)*logit")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--pair", action="append", metavar="A:B",
                        help="guided attribute and its shortcut (repeatable; default: the paper's three pairs)")
    parser.add_argument("--mask-dir", type=Path, default=d.mask_dir,
                        help="<mask-dir>/<Attribute>.png masks, else the built-in region (default: %(default)s)")
    parser.add_argument("--no-control", action="store_true", help="skip the equal-step BCE-only control")
    parser.add_argument("--attention", action="store_true",
                        help="also score Grad-CAM against the masks (protocol_details.csv)")
    parser.add_argument("--no-resume", action="store_true", help="retrain every stage (overwrites --out)")
    return parser


def _parse_pairs(values: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(parse_pairs(values)) if values else tuple(PAPER_PAIRS)


def config_from_args(args: argparse.Namespace) -> ProtocolConfig:
    """The :class:`ProtocolConfig` described by options parsed with :func:`add_protocol_arguments`."""
    return ProtocolConfig(
        root=args.root, out=args.out, image_size=args.image_size, arch=args.arch,
        hidden=args.hidden or None, pretrained=args.pretrained, baseline_epochs=args.epochs,
        patience=args.patience or None, finetune_epochs=args.finetune_epochs, batch_size=args.batch_size,
        lr=args.lr, finetune_lr=args.finetune_lr, w_a=args.w_a, w_g=args.w_g, target=args.target, seed=args.seed,
        device=args.device, pairs=_parse_pairs(args.pair), mask_dir=args.mask_dir, control=not args.no_control,
        attention=args.attention)


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or with ``--check`` only report on) the protocol; print the table. Returns the exit status.

    Errors (missing dataset, unusable run folder, bad option) are raised as
    :class:`~cocam.celeba.DatasetNotFoundError` (a ``FileNotFoundError``) or
    :class:`ProtocolError` (a ``ValueError``), which ``cocam``'s ``main`` prints as one line.
    """
    config = config_from_args(args)
    if args.check:
        report, problems = requirements_check(config, measure_steps=args.measure_steps)
        print(report)
        if problems:
            print(f"cocam paper: error: the run cannot proceed ({len(problems)} problem(s) listed above).",
                  file=sys.stderr)
            return 1
        return 0
    table = run_protocol(config, progress=True, resume=not args.no_resume)
    print("\nThe paper's table, next to cocam's on " + os.fspath(config.root) + ":\n")
    print(format_protocol_table(table))
    return 0
