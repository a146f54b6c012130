"""What the notebooks call: settings, a shared workspace, training shortcuts, figures, a verdict.

The four notebooks (discover the bias → draw the region → fine-tune → evaluate) keep their
code cells to one or two library calls; this module holds the glue they share:

* :func:`smoke_mode` / :func:`default_settings` — the real settings, or tiny ones for a quick
  headless run (``COCAM_SMOKE=1``);
* :class:`Workspace` — where the dataset, the runs and the masks live, so every notebook finds
  what the others wrote (and can make it itself when run alone: every training call resumes);
  :func:`current` — the workspace this kernel made, the guard every later cell starts with;
* :class:`GuidanceSettings`, :func:`record_guidance`, :func:`trained_guidance` — the guidance
  settings live in one place: notebook 3 records what it trains in the run folder
  (``guidance.json``), notebook 4 evaluates exactly that run and says loudly when it is asked
  to train another one;
* :func:`train_baseline`, :func:`fine_tune`, :func:`ensure_checkpoints`,
  :func:`evaluate_models` — the pipeline of ``cocam demo``, one step per call;
* figures that return a :class:`matplotlib.figure.Figure` (shown by Jupyter, saved or ignored
  headless): :func:`plot_cooccurrence_heatmap`, :func:`show_cam_grid`,
  :func:`show_cam_comparison`, :func:`show_mask_on_images`, :func:`show_masks`,
  :func:`plot_history` and :class:`LivePlot` for curves that grow while training runs;
* :func:`verdict` — the before/after table in plain words.

Cells run out of order
----------------------
Every code cell after a notebook's workspace cell starts with ``import cocam.notebook as nb``
and ``ws = nb.current()``. After a kernel restart (or when a later cell is run first) that line
stops the cell with "run the notebook from the top" instead of a ``NameError`` on whatever the
skipped cells defined — the import is what keeps ``nb`` itself defined. The stop, like every
:func:`require` guard, is a :class:`NotebookOrderError`, which IPython shows as one short line,
not a red traceback: IPython renders an exception that has a ``_render_traceback_`` method with
the lines that method returns.

Paths given as relative (``"runs/notebooks"``) are taken relative to the project folder (the
nearest folder above the working directory with a ``pyproject.toml`` and a ``notebooks/``
folder, or ``$COCAM_PROJECT_DIR``), so a notebook finds the same files whether Jupyter was
started in the project or in ``notebooks/``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cocam.attributes import CELEBA_ATTRIBUTES, PAPER_PAIRS, attribute_index, validate_attribute, validate_attributes
from cocam.checkpoint import ModelSpec, load_model
from cocam.compare import ComparisonResult
from cocam.errors import CocamError
from cocam.protocol import ProtocolConfig
from cocam.io import exclusive_lock
from cocam.masks import default_mask_dir, is_shipped_mask, project_dir
from cocam.dataset import CelebADataset, LabelledImages, label_space_of_dataset, normalize_uint8
from cocam.labels import LabelSpace
from cocam.model import SplitModel
from cocam.train import FitResult, Guidance, ResumeMismatchError, RunLockedError, TrainConfig, fit

__all__ = [
    "BASELINE",
    "CONTROL",
    "GUIDANCE_RECORD",
    "GUIDED",
    "SMOKE_ENV",
    "GuidanceSettings",
    "LivePlot",
    "NotebookOrderError",
    "Settings",
    "Workspace",
    "compare_methods",
    "conflict_mistakes",
    "current",
    "default_settings",
    "ensure_checkpoints",
    "ensure_dataset",
    "evaluate_models",
    "fine_tune",
    "guidance_for",
    "load_models",
    "mask_sources",
    "mask_transfer_quality",
    "paint_with_strokes",
    "plot_cooccurrence_heatmap",
    "plot_history",
    "project_dir",
    "protocol_config",
    "record_guidance",
    "recorded_guidance",
    "require",
    "results_table",
    "show_bias_evidence",
    "show_cam_comparison",
    "show_cam_grid",
    "show_mask_on_images",
    "show_masks",
    "smoke_mode",
    "train_baseline",
    "trained_guidance",
    "verdict",
]

#: Environment variable that switches the notebooks to their quick smoke settings.
SMOKE_ENV = "COCAM_SMOKE"
#: Model names used in tables (as in ``cocam demo``).
BASELINE = "pre-trained"
CONTROL = "BCE-only control"
GUIDED = "fine-tuned (guided)"


class NotebookOrderError(CocamError, RuntimeError):
    """A cell needs something an earlier cell makes (e.g. a drawn mask).

    A guard, not a crash: IPython shows it as one line (``Stopped: <what to run first>``) through
    :meth:`_render_traceback_`, instead of a red traceback into cocam's code.
    """

    def _render_traceback_(self) -> list[str]:
        """The lines IPython prints for this exception in place of the traceback."""
        return [f"\x1b[1;31mStopped:\x1b[0m {self}"]


def require(condition: Any, message: str) -> None:
    """Stop a cell with ``message`` unless ``condition`` holds (guards cells run out of order)."""
    if not condition:
        raise NotebookOrderError(message)


def smoke_mode() -> bool:
    """Whether ``COCAM_SMOKE`` asks for the quick settings (``1``, ``true``, ``yes`` or ``on``)."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Settings and the workspace
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Dataset preset, model size and training budget used by the notebooks.

    Attributes:
        smoke: the quick settings (tiny data, one epoch) for headless checks.
        preset: synthetic dataset preset (:data:`cocam.synthetic.PRESETS`).
        image_size, hidden: model input side and classifier width (:class:`~cocam.checkpoint.ModelSpec`).
        epochs, patience, lr: baseline training.
        finetune_epochs, finetune_lr: guided fine-tuning and its control (same steps for both).
        batch_size, seed, device: as in :class:`~cocam.train.TrainConfig`.
        workers: processes used to render the synthetic dataset (``None``: all cores).
    """

    smoke: bool = False
    preset: str = "default"
    image_size: int = 112
    hidden: int = 512
    epochs: int = 10
    finetune_epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-4
    finetune_lr: float = 3e-4
    patience: int | None = 3
    seed: int = 0
    device: str = "auto"
    workers: int | None = None

    def spec(self) -> ModelSpec:
        """The model to build."""
        return ModelSpec(image_size=self.image_size, hidden=self.hidden)

    def train_config(self) -> TrainConfig:
        """Baseline training: early stopping on the validation BCE."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, patience=self.patience,
                           seed=self.seed, device=self.device)

    def finetune_config(self, n_train: int) -> TrainConfig:
        """Fine-tuning and control: a fixed number of steps, no early stopping."""
        return TrainConfig.fine_tuning(n_train, self.finetune_epochs, batch_size=self.batch_size,
                                       lr=self.finetune_lr, seed=self.seed, device=self.device)


def default_settings(smoke: bool | None = None) -> Settings:
    """The notebooks' settings: ``smoke=None`` reads :func:`smoke_mode`.

    Real: the ``default`` synthetic preset (14,000 faces), 112 px AlexNet with a 512-wide head,
    up to 10 epochs, 2 fine-tuning epochs. Smoke: the ``smoke`` preset (192 faces), 64 px, a
    32-wide head, one epoch each — minutes for the four notebooks on two CPU cores.
    """
    smoke = smoke_mode() if smoke is None else bool(smoke)
    if smoke:
        return Settings(smoke=True, preset="smoke", image_size=64, hidden=32, epochs=1, finetune_epochs=1,
                        batch_size=32, patience=None, workers=1)
    return Settings()


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_dir() / p


def ensure_dataset(root: str | os.PathLike | None, settings: Settings, *, progress: bool = True) -> Path:
    """The dataset root to use, generating the synthetic default on first use.

    Args:
        root: ``None`` for ``$COCAM_DATA_ROOT`` when it is set (:func:`cocam.folder.env_data_root`),
            else the synthetic CelebA at ``data/synthetic`` (``data/synthetic/smoke``
            in smoke mode), written once and reused; the folder holding a real ``celeba/``; or a
            dataset of your own, a folder with ``labels.csv`` and ``images/`` (:mod:`cocam.folder`).
            A given folder is checked, never written to.
        settings: :func:`default_settings`; its ``preset`` picks the synthetic size.

    Returns:
        The dataset's root: the folder that contains ``celeba/``, or the one holding ``labels.csv``.
    """
    if root is None:
        from cocam.folder import env_data_root

        root = env_data_root()
    if root is None:
        from cocam.synthetic import generate_synthetic_celeba, is_synthetic_complete

        root = _resolve("data/synthetic") / ("smoke" if settings.smoke else "")
        if not is_synthetic_complete(root):
            with exclusive_lock(root / ".generate.lock", wait=6 * 3600, what=f"generating {root}"):
                if not is_synthetic_complete(root):  # another process may have finished it meanwhile
                    generate_synthetic_celeba(root, settings.preset, workers=settings.workers, progress=progress)
        return root
    from cocam.celeba import load_annotations
    from cocam.folder import is_folder_dataset, read_folder_labels

    root = _resolve(root)
    if is_folder_dataset(root):  # a dataset of your own (cocam.folder): a clear error now if its table is wrong
        read_folder_labels(root)
    else:
        load_annotations(root)  # a clear error now if this is not a CelebA folder
    return root


_CURRENT: list[Workspace] = []  # the workspace this kernel created last (module state survives no restart)


def current() -> Workspace:
    """The workspace created in this kernel (:meth:`Workspace.create`), else a :class:`NotebookOrderError`.

    Later cells call it first (after ``import cocam.notebook as nb``), so a cell run after a
    kernel restart, or before the notebook's first cells, stops with what to run instead of a
    ``NameError``.
    """
    require(_CURRENT, "this kernel has not run the notebook's first cells yet (a kernel restart clears them): "
                      "run the notebook from the top — Run ▸ Run All Cells, or the cells from the imports down "
                      "to 'ws = nb.Workspace.create(...)' — then this one again.")
    return _CURRENT[-1]


@dataclass(frozen=True)
class Workspace:
    """Where one series of notebooks keeps its data, runs and masks.

    Create it with :meth:`create` in every notebook with the same parameters; each notebook
    then finds what the others wrote: ``run_dir/baseline``, ``run_dir/guided-<hash>`` (one per
    guidance setting, see :func:`guided_run_name`), ``run_dir/control`` and the masks in
    ``mask_dir``.
    """

    settings: Settings
    data_root: Path
    run_dir: Path
    mask_dir: Path
    _datasets: dict = field(default_factory=dict, repr=False, compare=False)
    _labels: list = field(default_factory=list, repr=False, compare=False)  # the label table, read once
    cache_dir: Path | None = None  # decoded-image caches under it; None: cocam.dataset.default_cache_dir

    @classmethod
    def create(cls, data_root: str | os.PathLike | None = None, run_dir: str | os.PathLike = "runs/notebooks", *,
               smoke: bool | None = None, mask_dir: str | os.PathLike | None = None,
               settings: Settings | None = None, progress: bool = True,
               cache_dir: str | os.PathLike | None = None) -> Workspace:
        """Resolve the folders and make sure the dataset exists.

        Args:
            data_root: see :func:`ensure_dataset`.
            run_dir: checkpoints and histories (smoke runs go to ``run_dir/smoke``).
            smoke: ``None`` reads :func:`smoke_mode`.
            mask_dir: where masks are saved and looked up; ``None`` is
                :func:`cocam.masks.default_mask_dir` (``$COCAM_MASK_DIR``, else the project's
                ``data/masks``, as for the CLI; ``run_dir/smoke/masks`` in smoke mode, so a quick
                run never touches the shipped masks).
            settings: overrides :func:`default_settings`.
            cache_dir: folder under which the decoded images are cached (``None``: ``$COCAM_CACHE_DIR``,
                else the rule of :func:`cocam.dataset.default_cache_dir`, which never writes into a
                real dataset's folder).
        """

        settings = settings if settings is not None else default_settings(smoke)
        runs = _resolve(run_dir) / ("smoke" if settings.smoke else "")
        masks = _resolve(mask_dir) if mask_dir is not None else (
            runs / "masks" if settings.smoke else default_mask_dir())
        root = ensure_dataset(data_root, settings, progress=progress)
        ws = cls(settings=settings, data_root=root, run_dir=runs, mask_dir=masks,
                 cache_dir=None if cache_dir is None else _resolve(cache_dir))
        _CURRENT[:] = [ws]  # what nb.current() returns in the notebook's later cells
        return ws

    @property
    def baseline_dir(self) -> Path:
        return self.run_dir / "baseline"

    @property
    def control_dir(self) -> Path:
        return self.run_dir / "control"

    def guided_dir(self, guidance: Guidance) -> Path:
        """The run folder of guided fine-tuning with ``guidance``."""
        return self.run_dir / guided_run_name(guidance)

    @property
    def synthetic(self) -> bool:
        """Whether the dataset is cocam's synthetic CelebA (it has ground-truth regions)."""
        from cocam.synthetic import is_synthetic_complete

        return is_synthetic_complete(self.data_root)

    @property
    def folder(self) -> bool:
        """Whether the dataset is one of your own (a folder with ``labels.csv``, :mod:`cocam.folder`)."""
        from cocam.folder import is_folder_dataset

        return is_folder_dataset(self.data_root)

    @property
    def label_space(self) -> LabelSpace:
        """The dataset's labels: CelebA's 40 attributes, or the columns of ``labels.csv``."""
        from cocam.labels import CELEBA

        return self.labels().label_space if self.folder else CELEBA

    def spec(self) -> ModelSpec:
        """The model the notebooks train: :meth:`Settings.spec` with one output per label of the dataset."""
        return dataclasses.replace(self.settings.spec(), attributes=self.label_space.names)

    def labels(self) -> Any:
        """The label table of every image: ``.attributes`` (0/1 frame, one column per label) and ``.split``.

        :func:`cocam.celeba.load_annotations` for CelebA, :func:`cocam.folder.read_folder_labels` for a
        folder dataset; both have these two fields, which is all :func:`cocam.cooccurrence.cooccurrence` reads.
        Read once per workspace.
        """
        if not self._labels:
            from cocam.folder import read_labels

            self._labels.append(read_labels(self.data_root))
        return self._labels[0]

    def pairs(self, given: Sequence[tuple[str, str]] | None = None, *, top: int = 3) -> list[tuple[str, str]]:
        """The (A, B) pairs the notebooks examine: ``given`` (checked against the labels) if not ``None``.

        Otherwise the paper's three pairs on CelebA, and on a folder dataset the ``top`` pairs of
        labels with the largest positive correlation φ on the train split that have at least one
        A∧¬B image (:func:`cocam.cooccurrence.rank_pairs`): the co-occurrences a shortcut could come
        from. A dataset with no such pair is an error that says to give the pairs.
        """
        if given is not None:
            return [tuple(self.label_space.validate([a, b])) for a, b in given]
        if not self.folder:
            return list(PAPER_PAIRS)
        from cocam.cooccurrence import suggest_pairs

        labels = self.labels()
        try:
            return suggest_pairs(labels.attributes, labels.split, top=top)
        except ValueError:
            raise NotebookOrderError(f"no two labels of {self.data_root} co-occur (positive φ with an A∧¬B image on "
                                     f"the train split): set PAIRS = [(A, B), ...] in the parameters cell.") from None

    def reference(self) -> pd.DataFrame | None:
        """CelebA's published co-occurrence statistics beside CelebA-format data; ``None`` for a folder dataset."""
        from cocam.cooccurrence import celeba_reference

        return None if self.folder else celeba_reference()

    def dataset(self, split: str) -> LabelledImages:
        """A split at the model's input size (built once per workspace): CelebA or a folder dataset."""
        if split not in self._datasets:
            from cocam.dataset import default_cache_dir
            from cocam.folder import open_dataset

            cache = None if self.cache_dir is None else default_cache_dir(self.data_root, base=self.cache_dir)
            self._datasets[split] = open_dataset(self.data_root, split, image_size=self.settings.image_size,
                                                 cache_dir=cache)
        return self._datasets[split]

    def describe(self) -> str:
        """A few lines saying what this workspace uses."""
        s = self.settings
        kind = ("your dataset (labels.csv): " + ", ".join(self.label_space.names) if self.folder
                else "synthetic CelebA" if self.synthetic else "CelebA")
        return "\n".join([
            f"mode      : {'SMOKE (tiny data, 1 epoch: checks that everything runs)' if s.smoke else 'full'}",
            f"dataset   : {kind} at {self.data_root}",
            f"runs      : {self.run_dir}",
            f"masks     : {self.mask_dir}",
            f"model     : {self.spec().arch}, {s.image_size}px input, head width {s.hidden}",
            f"training  : baseline up to {s.epochs} epochs, fine-tuning {s.finetune_epochs} epoch(s), "
            f"batch {s.batch_size}, device {s.device}",
        ])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def guided_run_name(guidance: Guidance) -> str:
    """``guided-<hash>``: a new drawing, attribute or weight gives a new run (never a stale one)."""
    return f"guided-{guidance.fingerprint()}"


def _fit_when_free(run_dir: Path, make_model: Callable[[], tuple[SplitModel, ModelSpec]], train: CelebADataset,
                   valid: CelebADataset, config: TrainConfig, *, spec: ModelSpec | None = None,
                   **kwargs: Any) -> FitResult:
    """:func:`cocam.train.fit` with ``resume=True``, waiting while another process trains the same run.

    A run that already finished is reloaded from its checkpoint without calling ``fit``; with
    ``spec``, only if it holds that model (see :func:`_finished_run`).
    """
    told = False
    while True:
        finished = _finished_run(run_dir, config, len(train), spec=spec)
        if finished is not None:
            return finished
        model, spec = make_model()
        try:
            return fit(model, train, valid, config, spec=spec, run_dir=run_dir, resume=True, **kwargs)
        except RunLockedError:
            if not told:
                print(f"{run_dir} is being trained by another process; waiting for it to finish...", flush=True)
                told = True
            time.sleep(2.0)


def _finished_run(run_dir: Path, config: TrainConfig, n_train: int, *,
                  spec: ModelSpec | None = None) -> FitResult | None:
    """The result of a run in ``run_dir`` that has nothing left to do under ``config``, else ``None``.

    Mirrors the stopping rule of :func:`cocam.train.fit`: all steps done, all epochs done, or
    early stopping's patience exhausted. With ``spec``, a finished run of another model (other
    labels — e.g. ``DATA_ROOT`` now names another dataset —, architecture or input size) is a
    :class:`~cocam.train.ResumeMismatchError`; the run is left as it is.
    """
    from cocam.checkpoint import CheckpointError, load_checkpoint

    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if not last.is_file() or (run_dir / ".lock").exists():
        return None
    try:
        state = load_checkpoint(last, map_location="cpu")
    except CheckpointError:
        return None
    total = config.epochs * (n_train // config.batch_size)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    step, epoch = int(state["step"]), int(state["epoch"])
    stale = int(state.get("stale_epochs", 0))
    done = (step >= total or epoch + 1 >= config.epochs
            or (config.patience is not None and stale >= config.patience))
    if not done:
        return None
    model, stored, _ = load_model(last)
    old, new = stored.to_dict(), spec.to_dict() if spec is not None else None
    if new is not None and old != new:
        changed = [k for k, v in new.items() if old.get(k) != v]
        raise ResumeMismatchError(f"{run_dir} holds a model with other settings ({', '.join(changed)} differ: another "
                                  f"dataset or model?); it is kept: give RUN_DIR another folder for these.")
    return FitResult(model=model, history=pd.DataFrame(state["history"]), steps=step, run_dir=run_dir,
                     best_path=best if best.is_file() else None, last_path=last)


def train_baseline(ws: Workspace, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   progress: bool = True) -> FitResult:
    """Train (or resume, or just reload) the baseline into ``ws.baseline_dir``."""
    spec = ws.spec()
    return _fit_when_free(ws.baseline_dir, lambda: (spec.build(), spec), ws.dataset("train"), ws.dataset("valid"),
                          ws.settings.train_config(), spec=spec, on_epoch=on_epoch, progress=progress)


def _baseline_checkpoint(ws: Workspace, progress: bool) -> Path:
    best = ws.baseline_dir / "best.pt"
    result = train_baseline(ws, progress=progress)
    return result.best_path or best


def mask_sources(ws: Workspace, attributes: Sequence[str]) -> pd.DataFrame:
    """For each attribute: the mask that will be used and whose it is.

    ``mask`` is the file (or ``"built-in"``); ``whose`` is ``"your drawing"`` for a file in the
    mask folder, ``"shipped (built-in region)"`` for a shipped mask
    (:func:`cocam.masks.is_shipped_mask`: cocam's own region, written out in ``data/masks``) and
    ``"built-in"`` when there is no file.
    """
    from cocam.masks import resolve_mask

    rows = []
    for a in validate_attributes(attributes):
        mask, source = resolve_mask(a, ws.mask_dir)
        whose = ("built-in" if source == "built-in" else
                 "shipped (built-in region)" if is_shipped_mask(source) else "your drawing")
        rows.append({"attribute": a, "mask": source, "whose": whose, "pixels": int(mask.sum()),
                     "% of the face": round(100 * float(mask.mean()), 1)})
    return pd.DataFrame(rows)


def guidance_for(ws: Workspace, attributes: Sequence[str], *, w_a: float = 1.0,
                 w_g: float | None | Sequence[float | None] = None, target: str | Sequence[str] = "positive",
                 loss: str | Sequence[str] = "iou", transfer: str = "template",
                 cam_method: str = "gradcam") -> Guidance:
    """A :class:`~cocam.train.Guidance` with each attribute's mask from ``ws.mask_dir`` (or built-in).

    ``loss`` names the guidance loss (:data:`cocam.losses.GUIDANCE_LOSSES`; ``w_g=None`` takes its
    default weight) and ``transfer`` how the mask reaches each image (``"template"`` or
    ``"landmarks"``), ``cam_method`` the CAM guided (:data:`cocam.cams.CAM_METHODS`). ``loss``,
    ``target`` and ``w_g`` take one value for all attributes or one per attribute.
    """
    from cocam.masks import resolve_mask

    attributes = validate_attributes(attributes)
    masks = tuple(resolve_mask(a, ws.mask_dir)[0] for a in attributes)
    return Guidance(tuple(attributes), masks, w_a=w_a, w_g=w_g, target=target, loss=loss, transfer=transfer,
                    cam_method=cam_method)


#: File in a workspace's run folder naming the guided run notebook 3 trains (:func:`record_guidance`).
GUIDANCE_RECORD = "guidance.json"


@dataclass(frozen=True)
class GuidanceSettings:
    """The guidance settings of a guided run, without the masks (those come from the workspace's mask folder).

    The defaults are notebook 3's, the paper's method: its three attributes, its ``-ln IoU`` loss,
    its ``"positive"`` target (the attribute's own evidence, on the images that have it), template masks, ``w_a = 1`` and the loss's default ``w_g``. Fields are
    those of :class:`~cocam.train.Guidance` (``loss``, ``target`` and ``w_g`` may be one per
    attribute).
    """

    attributes: tuple[str, ...] = tuple(a for a, _ in PAPER_PAIRS)
    loss: str | tuple[str, ...] = "iou"
    target: str | tuple[str, ...] = "positive"
    transfer: str = "template"
    w_a: float = 1.0
    w_g: float | None | tuple[float | None, ...] = None
    exact: bool = True
    resolution: str = "input"
    cam_method: str = "gradcam"

    @classmethod
    def of(cls, guidance: Guidance) -> GuidanceSettings:
        """The settings of ``guidance`` (as normalised by it: ``w_g=None`` becomes the loss's weight)."""
        return cls(attributes=tuple(guidance.attributes), loss=guidance.loss, target=guidance.target,
                   transfer=guidance.transfer, w_a=float(guidance.w_a), w_g=guidance.w_g, exact=guidance.exact,
                   resolution=guidance.resolution, cam_method=guidance.cam_method)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GuidanceSettings:
        """Inverse of :meth:`to_dict` (JSON lists become tuples again)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def guidance(self, ws: Workspace) -> Guidance:
        """The :class:`~cocam.train.Guidance` with each attribute's mask from ``ws.mask_dir`` (or built-in)."""
        from cocam.masks import resolve_mask

        attributes = validate_attributes(self.attributes)
        masks = tuple(resolve_mask(a, ws.mask_dir)[0] for a in attributes)
        return Guidance(tuple(attributes), masks, w_a=self.w_a, w_g=self.w_g, target=self.target, loss=self.loss,
                        transfer=self.transfer, exact=self.exact, resolution=self.resolution,
                        cam_method=self.cam_method)

    def summary(self) -> str:
        """One line: what is guided and how."""
        return (f"{', '.join(self.attributes)}; loss {self.loss}, target {self.target}, transfer {self.transfer}, "
                f"w_a {self.w_a:g}, w_g {self.w_g}"
                f"{'' if self.cam_method == 'gradcam' else ', CAM ' + self.cam_method}")


def record_guidance(ws: Workspace, guidance: Guidance) -> Path:
    """Write which guided run this workspace trains (settings, masks, run folder) to ``run_dir/guidance.json``.

    Notebook 3 calls it (through ``fine_tune(..., record=True)``) before training, so notebook 4
    evaluates that run (:func:`trained_guidance`) without repeating the settings.
    """
    import json

    from cocam.io import atomic_write_text
    from cocam.masks import resolve_mask

    record = {"settings": GuidanceSettings.of(guidance).to_dict(), "run": guided_run_name(guidance),
              "mask_dir": str(ws.mask_dir),
              "masks": {a: resolve_mask(a, ws.mask_dir)[1] for a in guidance.attributes}}
    path = ws.run_dir / GUIDANCE_RECORD
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def recorded_guidance(ws: Workspace) -> dict[str, Any] | None:
    """The record :func:`record_guidance` wrote in this workspace, or ``None`` (notebook 3 has not run)."""
    import json

    path = ws.run_dir / GUIDANCE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        GuidanceSettings.from_dict(record["settings"])
        return record
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a guidance record ({exc}): re-run notebook 3's fine-tuning cell to "
                         f"write it again, or delete it.") from None


def _loud(message: str) -> None:
    """A message that must not be missed: on stderr (a red box in Jupyter), framed."""
    import sys

    print(f"⚠ {message}", file=sys.stderr, flush=True)


def trained_guidance(ws: Workspace, settings: GuidanceSettings | None = None, *,
                     log: Callable[[str], Any] | None = print) -> Guidance:
    """The guidance of the run notebook 3 trained in ``ws`` (read from ``run_dir/guidance.json``).

    Args:
        settings: ``None`` evaluates exactly what notebook 3 recorded (or, before notebook 3 ran
            in this workspace, its defaults, which notebook 3 then reuses). Other settings give
            another guided run: that is said loudly, with each setting that differs.
        log: where the ordinary line goes (``None``: silent); the warnings always go to stderr.
    """
    say = log or (lambda _: None)
    record = recorded_guidance(ws)
    recorded = GuidanceSettings.from_dict(record["settings"]) if record else None
    chosen = settings if settings is not None else (recorded or GuidanceSettings())
    guidance = chosen.guidance(ws)
    name = guided_run_name(guidance)
    if record is None:
        say(f"Notebook 3 has not trained a guided run in {ws.run_dir} yet: using its default settings "
            f"({GuidanceSettings.of(guidance).summary()}), run {name}.")
        return guidance
    if settings is not None and GuidanceSettings.of(guidance) != recorded:
        theirs, mine = recorded.to_dict(), GuidanceSettings.of(guidance).to_dict()
        changes = ", ".join(f"{k} {theirs[k]!r} → {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        _loud(f"These guidance settings are not the ones notebook 3 trained ({changes}): notebook 4 will train "
              f"and evaluate ANOTHER guided run, {name}, not notebook 3's {record['run']}. Set GUIDANCE = None "
              f"to evaluate notebook 3's run.")
    elif name != record["run"]:
        moved = "" if str(ws.mask_dir) == record.get("mask_dir") else \
            f" (masks from {ws.mask_dir}; notebook 3 used {record.get('mask_dir')})"
        _loud(f"The masks changed since notebook 3 trained {record['run']}{moved}: notebook 4 will train and "
              f"evaluate a NEW guided run, {name}, with the current masks. Re-run notebook 3 to see its curves.")
    else:
        say(f"Evaluating the guided run notebook 3 trained: {name} ({recorded.summary()}).")
    return guidance


def fine_tune(ws: Workspace, guidance: Guidance | None, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
              progress: bool = True, record: bool = False) -> FitResult:
    """Fine-tune the baseline's best checkpoint: guided, or the BCE-only control (``guidance=None``).

    Both use :meth:`Settings.finetune_config` (same steps, same seed), so they differ only by the
    guidance term. Runs resume: a finished run is just reloaded. The baseline is trained first
    if it does not exist yet. ``record=True`` (notebook 3) first records ``guidance`` as the
    workspace's guided run (:func:`record_guidance`), the one notebook 4 evaluates.
    """
    if record and guidance is not None:
        record_guidance(ws, guidance)
    checkpoint = _baseline_checkpoint(ws, progress=False)
    train, valid = ws.dataset("train"), ws.dataset("valid")
    run_dir = ws.guided_dir(guidance) if guidance is not None else ws.control_dir

    def make() -> tuple[SplitModel, ModelSpec]:
        model, spec, _ = load_model(checkpoint)
        return model, spec

    return _fit_when_free(run_dir, make, train, valid, ws.settings.finetune_config(len(train)), guidance=guidance,
                          on_epoch=on_epoch, progress=progress)


def ensure_checkpoints(ws: Workspace, guidance: Guidance, *, progress: bool = True,
                       log: Callable[[str], Any] | None = print) -> dict[str, Path]:
    """The three checkpoints to compare, training whatever is missing: name → path.

    Says first which runs are already in the workspace and which are trained now (and where);
    each one trained shows its progress bar (``tqdm.auto``) unless ``progress=False``.
    """
    say = log or (lambda _: None)
    n_train = len(ws.dataset("train"))
    tune = ws.settings.finetune_config(n_train)
    plan = [(BASELINE, ws.baseline_dir, ws.settings.train_config()), (CONTROL, ws.control_dir, tune),
            (GUIDED, ws.guided_dir(guidance), tune)]
    missing = [(name, folder) for name, folder, config in plan if _finished_run(folder, config, n_train) is None]
    if not missing:
        say(f"The three checkpoints are in {ws.run_dir}: reloaded, nothing to train.")
    for i, (name, folder) in enumerate(missing, 1):
        say(f"{i}/{len(missing)} not in the workspace yet, training it now: {name} → {folder}")
        if name == BASELINE:
            _baseline_checkpoint(ws, progress=progress)
        else:
            fine_tune(ws, guidance if name == GUIDED else None, progress=progress)
    baseline = _baseline_checkpoint(ws, progress=progress)
    control = fine_tune(ws, None, progress=progress).last_path
    guided = fine_tune(ws, guidance, progress=progress).last_path
    return {BASELINE: baseline, CONTROL: control, GUIDED: guided}


def mask_transfer_quality(ws: Workspace, attribute: str, mask: np.ndarray) -> pd.DataFrame | str:
    """Template reuse vs landmark transfer of ``mask``, scored against the true regions of the test split.

    Returns :func:`cocam.masks.transfer_quality`'s table on the synthetic dataset, or a sentence
    saying why there is nothing to score (real CelebA has no ground-truth regions).
    """
    from cocam.masks import transfer_quality

    if not ws.synthetic:
        return "Real CelebA has no ground-truth regions: look at the faces above instead."
    return transfer_quality(ws.dataset("test"), attribute, mask)


def compare_methods(ws: Workspace, pairs: Sequence[tuple[str, str]] = PAPER_PAIRS, *,
                    methods: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
                    progress: bool = True) -> ComparisonResult:
    """The guidance losses side by side from the notebooks' baseline (:func:`cocam.compare.compare_guidance`).

    Every method in ``methods`` (names of :data:`cocam.compare.METHODS`; ``None``: all) and the
    BCE-only control are fine-tuned with the notebooks' budget (:class:`Settings`) for each seed,
    into ``ws.run_dir / "compare"``, and scored on the validation and test splits. Finished runs
    are reloaded, so the cell can be re-run or given more seeds. ``progress`` shows one bar
    (``tqdm.auto``) over all the runs, naming the one that finished last; nothing else is printed.
    """
    from tqdm.auto import tqdm

    from cocam.compare import METHODS, ComparisonConfig, compare_guidance

    names = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(repr(m) for m in METHODS)}.")
    s = ws.settings
    config = ComparisonConfig(root=ws.data_root, out=ws.run_dir / "compare", seeds=tuple(seeds), pairs=tuple(pairs),
                              image_size=s.image_size, hidden=s.hidden, finetune_epochs=s.finetune_epochs,
                              finetune_lr=s.finetune_lr, batch_size=s.batch_size, mask_dir=ws.mask_dir,
                              device=s.device)
    baseline = _baseline_checkpoint(ws, progress)
    with tqdm(total=len(seeds) * (len(names) + 1), desc="comparing guidance losses", unit="run",
              disable=not progress) as bar:
        def finished(line: str) -> None:  # compare_guidance says "baseline: …" once, then one line per run
            if not line.startswith("baseline"):
                bar.set_postfix_str(line.split(":")[0], refresh=False)
                bar.update(1)

        return compare_guidance(config, {m: METHODS[m] for m in names}, baseline=baseline, progress=False,
                                log=finished)


def protocol_config(ws: Workspace, pairs: Sequence[tuple[str, str]] = PAPER_PAIRS) -> ProtocolConfig:
    """The paper's protocol (:mod:`cocam.protocol`) on the notebooks' dataset, into ``ws.run_dir / "paper"``.

    The paper's settings (AlexNet at 224 px with the 4096-wide head, cocam's budget where the
    paper is silent); in smoke mode the notebooks' tiny model and budget instead, so the cell
    runs end to end in seconds.
    """
    from cocam.protocol import ProtocolConfig

    common = {"root": ws.data_root, "out": ws.run_dir / "paper", "pairs": tuple(pairs), "mask_dir": ws.mask_dir,
              "device": ws.settings.device}
    if not ws.settings.smoke:
        return ProtocolConfig(**common)
    s = ws.settings
    return ProtocolConfig(**common, image_size=s.image_size, hidden=s.hidden, baseline_epochs=s.epochs,
                          patience=s.patience, finetune_epochs=s.finetune_epochs, batch_size=s.batch_size)


def load_models(checkpoints: Mapping[str, Path]) -> dict[str, SplitModel]:
    """Load each checkpoint (eval mode, CPU)."""
    return {name: load_model(path)[0].eval() for name, path in checkpoints.items()}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_models(ws: Workspace, checkpoints: Mapping[str, Path], pairs: Sequence[tuple[str, str]] = PAPER_PAIRS,
                    *, split: str = "test", attention: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Before/after table (:func:`cocam.evaluate.paper_table`) with attention metrics.

    Attention is the Grad-CAM of A on the images with A, scored against the mask in
    ``ws.mask_dir`` (``mask …`` columns) and, on the synthetic dataset, against each image's
    true evidence region (``truth …`` columns).

    Returns:
        ``(table, long)``: one row per (attribute, model), and :func:`~cocam.evaluate.pair_accuracy`'s
        long format with a ``model`` column.
    """
    from cocam.evaluate import evaluate_checkpoints

    return evaluate_checkpoints(ws.data_root, checkpoints, pairs, split=split, attention=attention,
                                mask_dir=ws.mask_dir)


def results_table(table: pd.DataFrame) -> pd.DataFrame:
    """The columns worth reading, rounded, indexed by (attribute, model): a view of the numbers of
    :func:`evaluate_models` (:func:`cocam.evaluate.paper_table`), worst group and conflict mean first."""
    from cocam.evaluate import paper_table

    shown = paper_table(table) if "acc_worst_group" in table.columns else table
    cols = [c for c in ["attribute", "shortcut", "model", "worst group %", "worst group 95% CI", "worst group",
                        "conflict mean %", "conflict mean 95% CI", "test %", "conflict A∧¬B %", "conflict 95% CI",
                        "n conflict", "reverse ¬A∧B %", "n reverse", "AUC within B", "AUC within ¬B",
                        "mask soft_iou", "mask energy_inside", "truth soft_iou", "truth pointing_game"]
            if c in shown.columns]
    out = shown[cols].copy()
    for c in out.columns:
        if c.endswith("%"):
            out[c] = out[c].astype(float).round(1)
        elif c.startswith(("mask ", "truth ", "AUC ")):
            out[c] = out[c].astype(float).round(3)
    return out.set_index(["attribute", "model"])


def _interval(row: pd.Series, name: str) -> tuple[float, float]:
    """The 95 % interval of metric ``name`` (e.g. ``acc_worst_group``) in a row of numbers, in percent."""
    lo, hi = row.get(f"{name}_low", float("nan")), row.get(f"{name}_high", float("nan"))
    return (100.0 * float(lo) if pd.notna(lo) else float("nan"), 100.0 * float(hi) if pd.notna(hi) else float("nan"))


#: The group names of :func:`cocam.evaluate.pair_metrics`, in words for the verdict.
_GROUP_WORDS = {"ab": "{a} with {b}", "a_not_b": "{a} without {b}", "not_a_b": "{b} without {a}",
                "not_a_not_b": "neither {a} nor {b}"}


def verdict(table: pd.DataFrame, *, guided: str = GUIDED, baseline: str = BASELINE, control: str = CONTROL,
            cost_points: float = 2.0) -> str:
    """The before/after table in plain words, judged on the worst-group accuracy.

    For each attribute A (shortcut B) the guided model's **worst-group accuracy** (the lowest of
    the four (A, B) groups, which predicting A more often cannot raise) is compared with the
    BCE-only control's (or, without one, the pre-trained model's): *helped* only when the guided
    model's 95 % interval lies entirely above the reference's, *hurt* only when entirely below,
    *no clear change* otherwise — a conclusion is stated only where the intervals support it.
    The paper's A∧¬B column and the reverse group ¬A∧B are given beside it, with a warning when
    the paper's column rose while the reverse group fell (a moved threshold, not a fix); a drop of
    more than ``cost_points`` in whole-split accuracy is reported as a cost; the attention change
    (soft IoU of the Grad-CAM with the mask) is added when the table has it.

    Args:
        table: :func:`evaluate_models`' numbers (:func:`cocam.evaluate.metrics_table`), not its
            display view.
    """
    required = {"attribute", "model", "acc_worst_group", "acc_worst_group_low", "acc_worst_group_high",
                "worst_group", "acc_all", "acc_a_not_b", "acc_not_a_b"}
    missing = required - set(table.columns)
    if missing:
        raise ValueError(f"the table lacks the columns {sorted(missing)}; pass the numbers, evaluate_models()[0] "
                         f"(or cocam.evaluate.metrics_table()), not a display table.")
    lines, outcomes = [], []
    for attribute, rows in table.groupby("attribute", sort=False):
        by_model = rows.drop_duplicates("model").set_index("model")
        if guided not in by_model.index or baseline not in by_model.index:
            lines.append(f"• {attribute}: the table needs both '{baseline}' and '{guided}' rows to judge it.")
            continue
        g, b = by_model.loc[guided], by_model.loc[baseline]
        has_control = control in by_model.index
        ref = by_model.loc[control] if has_control else b
        ref_name = "the BCE-only control" if has_control else "the pre-trained model"
        shortcut = g.get("shortcut", "its shortcut")
        group = g["worst_group"] if isinstance(g["worst_group"], str) else None
        n = int(g.get(f"n_{group}", 0)) if group else 0
        if group is None or pd.isna(g["acc_worst_group"]):
            lines.append(f"• {attribute}: the test split has no image in any group of {attribute} and {shortcut}, "
                         f"so the shortcut cannot be judged here.")
            outcomes.append("unknown")
            continue
        gw, bw, rw = (100.0 * float(x["acc_worst_group"]) for x in (g, b, ref))
        g_lo, g_hi = _interval(g, "acc_worst_group")
        r_lo, r_hi = _interval(ref, "acc_worst_group")
        if not math.isnan(g_lo) and not math.isnan(r_hi) and g_lo > r_hi:
            outcome = "helped"
        elif not math.isnan(g_hi) and not math.isnan(r_lo) and g_hi < r_lo:
            outcome = "hurt"
        else:
            outcome = "no clear change"
        outcomes.append(outcome)
        words = _GROUP_WORDS[group].format(a=attribute, b=shortcut)
        images = f"{n} test image{'s' if n != 1 else ''}"
        text = (f"• {attribute}: on the worst of its four groups ({words}, {images} for the guided model), "
                f"accuracy went from {bw:.1f} % (pre-trained) to {gw:.1f} % [95 % interval {g_lo:.1f}–{g_hi:.1f}] "
                f"with guidance ({gw - bw:+.1f} points)")
        text += (f"; {ref_name} reached {rw:.1f} % [95 % interval {r_lo:.1f}–{r_hi:.1f}]." if has_control else ".")
        text += {"helped": f" The guidance helped: its interval lies above {ref_name}'s.",
                 "hurt": f" The guidance hurt: its interval lies below {ref_name}'s.",
                 "no clear change": f" No clear change: the intervals overlap {ref_name}'s, so nothing is "
                                    f"concluded."}[outcome]
        gc, rc = 100.0 * float(g["acc_a_not_b"]), 100.0 * float(ref["acc_a_not_b"])
        gr, rr = 100.0 * float(g["acc_not_a_b"]), 100.0 * float(ref["acc_not_a_b"])
        if not (math.isnan(gc) or math.isnan(rc)):
            text += (f" The paper's column ({attribute} without {shortcut}) went {rc:.1f} → {gc:.1f} % against "
                     f"{ref_name}")
            text += (f", the reverse group ({shortcut} without {attribute}) {rr:.1f} → {gr:.1f} %."
                     if not (math.isnan(gr) or math.isnan(rr)) else ".")
            if gc > rc and not math.isnan(gr) and not math.isnan(rr) and gr < rr - (gc - rc) / 2:
                text += (" The paper's column rose because the model predicts the attribute more often, not "
                         "because it reads the right region: read the worst group.")
        cost = 100.0 * (float(b["acc_all"]) - float(g["acc_all"]))
        text += (f" Overall test accuracy {100 * float(b['acc_all']):.1f} % → {100 * float(g['acc_all']):.1f} %"
                 + (f", a cost of {cost:.1f} points." if cost > cost_points else " (no real cost)."))
        if "mask soft_iou" in by_model.columns and pd.notna(g["mask soft_iou"]) and pd.notna(b["mask soft_iou"]):
            iou_b, iou_g = float(b["mask soft_iou"]), float(g["mask soft_iou"])
            moved = "moved into" if iou_g > iou_b + 0.02 else ("moved away from" if iou_g < iou_b - 0.02 else
                                                                "barely changed relative to")
            text += f" Its Grad-CAM {moved} the drawn region (soft IoU {iou_b:.2f} → {iou_g:.2f})."
        if n < 30:
            text += (f" With only {n} image{'s' if n != 1 else ''} in that group the interval is wide: treat this "
                     f"as a hint, not a result.")
        lines.append(text)
    judged = [o for o in outcomes if o != "unknown"]
    helped = sum(o == "helped" for o in judged)
    if not judged:
        head = "No attribute could be judged."
    elif helped == len(judged):
        head = (f"Guided fine-tuning helped on all {len(judged)} attribute(s): the worst-group accuracy rose beyond "
                f"the reference's interval.")
    elif helped:
        head = f"Guided fine-tuning helped on {helped} of {len(judged)} attributes (worst-group accuracy)."
    elif any(o == "hurt" for o in judged):
        head = "Guided fine-tuning did not help here; on some attributes it made the worst group worse."
    else:
        head = "Guided fine-tuning made no clear difference to the worst-group accuracy here."
    return "\n".join([head, *lines])


def conflict_mistakes(model: SplitModel, dataset: CelebADataset, attribute: str, shortcut: str,
                      logits: np.ndarray | None = None) -> CelebADataset:
    """Images with ``attribute`` but without ``shortcut`` that the model gets wrong on ``attribute``.

    ``logits`` are :func:`cocam.evaluate.predict` outputs for ``dataset`` (computed if omitted).
    """
    from cocam.evaluate import predict

    space = label_space_of_dataset(dataset)
    a, b = space.validate([attribute, shortcut])
    if logits is None:
        logits = predict(model, dataset)
    labels = dataset.attributes
    wrong = (labels[a].to_numpy() == 1) & (labels[b].to_numpy() == 0) & (logits[:, space.index(a)] <= 0)
    return dataset.subset_names(dataset.names[wrong])


def paint_with_strokes(editor: Any, region: np.ndarray, *, brush: float | None = None) -> None:
    """Fill ``region`` (template coordinates) with the editor's own brush, as a hand would.

    Horizontal strokes ``0.7 · brush`` apart sweep every run of region pixels, through
    :meth:`~cocam.widget.MaskEditor.press` / ``drag`` / ``release`` — what a notebook does
    when nobody is at the mouse. ``brush`` (template pixels) defaults to the editor's brush
    size; a brush or mode changed for the painting is put back afterwards, so the editor's
    controls keep showing the brush the notebook set up.
    """
    region = np.asarray(region, dtype=bool)
    size, mode = editor.brush_size, editor.mode
    brush = size if brush is None else brush
    editor.set_mode("brush")
    editor.set_brush(brush)
    try:
        s = editor.scale
        rows = np.flatnonzero(region.any(axis=1))
        step = max(1, int(round(0.7 * brush)))
        for r in range(int(rows[0]), int(rows[-1]) + 1, step) if rows.size else ():
            line = region[r].astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], line, [0]])))
            for start, stop in zip(edges[::2], edges[1::2], strict=True):
                y = (r + 0.5) * s
                editor.press((start + 0.5) * s, y)
                editor.drag((stop - 0.5) * s, y)
                editor.release()
    finally:
        editor.set_brush(size)
        editor.set_mode(mode)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    _register_figure_display()
    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _register_figure_display() -> None:
    """Let IPython show a returned Figure as a PNG, whatever matplotlib backend is active.

    The figures here are not managed by pyplot (so they never show twice, and nothing piles up
    in memory); IPython only knows how to show them once a formatter is registered.
    """
    if not _in_ipython():
        return
    from IPython import get_ipython
    from matplotlib.figure import Figure

    formatter = get_ipython().display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, _png)


def plot_cooccurrence_heatmap(stats: pd.DataFrame, split: str = "train", *,
                              highlight: Sequence[tuple[str, str]] | None = None):
    """The L×L matrix of P(B | A) (row A, column B) of one split, ``highlight`` pairs outlined.

    ``highlight=None`` outlines the paper's pairs on CelebA's 40 attributes and nothing on other
    labels. Rows and columns are the labels in the order of ``stats`` (:func:`~cocam.cooccurrence.cooccurrence`
    keeps the label columns' order, :func:`~cocam.cooccurrence.celeba_reference` CelebA's).

    Args:
        stats: :func:`cocam.cooccurrence.cooccurrence` (or :func:`~cocam.cooccurrence.celeba_reference`).
        split: ``"train"``, ``"valid"``, ``"test"`` (or ``"all"``).
    """
    from matplotlib.patches import Rectangle

    s = stats[stats["split"] == split]
    if s.empty:
        raise ValueError(f"no statistics for split {split!r}; splits present: {sorted(stats['split'].unique())}.")
    names = list(pd.unique(s["a"]))
    if highlight is None:
        highlight = PAPER_PAIRS if set(names) == set(CELEBA_ATTRIBUTES) else ()
    matrix = s.pivot(index="a", columns="b", values="p_b_given_a").reindex(index=names, columns=names)
    side = 10.5 if len(names) > 12 else 6.5
    fig = _figure(side, side - 1.0)
    ax = fig.add_subplot()
    im = ax.imshow(matrix.to_numpy(dtype=float), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    size = 7 if len(names) > 12 else 9
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=size)
    ax.set_yticks(range(len(names)), names, fontsize=size)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    for a, b in highlight:
        i, j = names.index(a), names.index(b)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#00e5ff", linewidth=2))
        ax.annotate(f"{matrix.loc[a, b]:.2f}", (j, i), color="#00e5ff", fontsize=7, ha="left", va="bottom",
                    xytext=(6, 4), textcoords="offset points", fontweight="bold")
    fig.colorbar(im, ax=ax, shrink=0.8, label="P(B | A)")
    n = int(s["n_images"].iloc[0])
    ax.set_title(f"How often B is present when A is ({split} split, {n} images); outlined: the guided pairs")
    return fig


def _model_device(model: SplitModel) -> torch.device:
    return next(model.parameters()).device


def _cams(model: SplitModel, dataset: CelebADataset, attribute: str, indices: Sequence[int]):
    """(uint8 images (N,S,S,3), cams (N,S,S), probabilities (N,), labels (N,)) of ``indices``."""
    from cocam.gradcam import grad_cam

    idx = label_space_of_dataset(dataset).index(attribute)
    pixels, targets, _ = dataset.get_batch_numpy(np.asarray(indices, dtype=np.int64))
    images = normalize_uint8(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            res = grad_cam(model, images.to(_model_device(model)), idx, output_size=dataset.image_size)
    finally:
        model.train(was_training)
    probs = torch.sigmoid(res.logits[:, idx].float()).cpu().numpy()
    return pixels, res.cams[:, 0].float().cpu().numpy(), probs, targets[:, idx]


def _empty_figure(message: str):
    fig = _figure(6, 1.2)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
    return fig


def show_cam_grid(model: SplitModel, dataset: CelebADataset, attribute: str, n: int = 8, *,
                  indices: Sequence[int] | None = None, cols: int = 4, title: str | None = None):
    """Grad-CAM overlays (:func:`cocam.gradcam.overlay`) of ``attribute`` on ``n`` images.

    Each panel is titled with the true label and the predicted probability, green when the
    prediction is right and red when it is wrong.
    """
    from cocam.gradcam import overlay

    attribute = label_space_of_dataset(dataset).validate_one(attribute)
    indices = list(indices) if indices is not None else list(range(min(n, len(dataset))))
    if not indices:
        return _empty_figure(f"no images to show for {attribute}")
    pixels, cams, probs, labels = _cams(model, dataset, attribute, indices)
    cols = max(1, min(cols, len(indices)))
    rows = math.ceil(len(indices) / cols)
    fig = _figure(2.4 * cols, 2.6 * rows)
    for k in range(len(indices)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(overlay(pixels[k], cams[k]))
        right = (probs[k] > 0.5) == (labels[k] > 0.5)
        ax.set_title(f"{dataset.names[indices[k]]}\ny={int(labels[k])}  p={probs[k]:.2f}", fontsize=8,
                     color="#1b7f3b" if right else "#c62828")
        ax.axis("off")
    fig.suptitle(title or f"Grad-CAM of {attribute}: where the model looks", fontsize=11)
    return fig


def show_bias_evidence(model: SplitModel, dataset: CelebADataset, ranking: pd.DataFrame, *, top: int = 3,
                       n: int = 4):
    """Grad-CAM evidence for the ``top`` pairs of :func:`cocam.bias.rank_biases`.

    Two rows per pair (A, B): the Grad-CAM of A on faces with A and B (the habitual case), then
    on faces with A but without B (the conflict subset); titles as in :func:`show_cam_grid`. A
    shortcut shows as the same place lighting up in both rows — B's region — and as misses
    (red titles) in the second.
    """
    from cocam.gradcam import overlay

    pairs = list(ranking[["a", "b"]].head(top).itertuples(index=False, name=None))
    if not pairs:
        return _empty_figure("no pair passed the ranking's minimum group size")
    fig = _figure(2.3 * n, 2.5 * 2 * len(pairs))
    labels = dataset.attributes
    for p, (a, b) in enumerate(pairs):
        for r, (cond, name) in enumerate((({a: 1, b: 1}, f"{a} ∧ {b}"), ({a: 1, b: 0}, f"{a} ∧ ¬{b}"))):
            mask = np.logical_and.reduce([labels[k].to_numpy() == v for k, v in cond.items()])
            indices = np.flatnonzero(mask)[:n]
            row = 2 * p + r
            if len(indices) == 0:
                continue
            pixels, cams, probs, ys = _cams(model, dataset, a, indices)
            for k in range(len(indices)):
                ax = fig.add_subplot(2 * len(pairs), n, row * n + k + 1)
                ax.imshow(overlay(pixels[k], cams[k]))
                right = (probs[k] > 0.5) == (ys[k] > 0.5)
                ax.set_title(f"p({a})={probs[k]:.2f}", fontsize=7, color="#1b7f3b" if right else "#c62828")
                ax.axis("off")
                if k == 0:
                    ax.text(-0.08, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center",
                            fontsize=8)
    fig.suptitle("Grad-CAM of A where B is present (upper row) and absent (lower row)", fontsize=11)
    return fig


def show_cam_comparison(models: Mapping[str, SplitModel], dataset: CelebADataset, attribute: str, n: int = 6, *,
                        indices: Sequence[int] | None = None):
    """The same images under several models: one row per model, the image itself on top."""
    from cocam.gradcam import overlay

    attribute = label_space_of_dataset(dataset).validate_one(attribute)
    indices = list(indices) if indices is not None else list(range(min(n, len(dataset))))
    if not indices or not models:
        return _empty_figure(f"no images to show for {attribute}")
    rows = len(models) + 1
    fig = _figure(2.2 * len(indices), 2.3 * rows)
    axes = fig.subplots(rows, len(indices), squeeze=False)
    pixels = dataset.get_batch_numpy(np.asarray(indices, dtype=np.int64))[0]
    for k, ax in enumerate(axes[0]):
        ax.imshow(pixels[k])
        ax.set_title(str(dataset.names[indices[k]]), fontsize=8)
    axes[0, 0].set_ylabel("image", fontsize=9)
    for r, (name, model) in enumerate(models.items(), start=1):
        _, cams, probs, labels = _cams(model, dataset, attribute, indices)
        for k, ax in enumerate(axes[r]):
            ax.imshow(overlay(pixels[k], cams[k]))
            right = (probs[k] > 0.5) == (labels[k] > 0.5)
            ax.set_title(f"p={probs[k]:.2f}", fontsize=8, color="#1b7f3b" if right else "#c62828")
        axes[r, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Grad-CAM of {attribute}, same images, before and after", fontsize=11)
    return fig


def _tint(image: np.ndarray, region: np.ndarray, colour=(64, 230, 96), alpha: float = 0.45) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    r = np.clip(np.asarray(region, dtype=np.float64), 0, 1)[..., None] * alpha
    return np.clip(img * (1 - r) + np.asarray(colour, dtype=np.float64) / 255.0 * r, 0, 1)


def show_masks(masks: Mapping[str, np.ndarray], *, titles: Mapping[str, str] | None = None):
    """Masks (template coordinates) on the template face, one panel each."""
    from cocam.synthetic import render_template

    face = np.asarray(render_template()[0].convert("RGB"))
    if not masks:
        return _empty_figure("no masks")
    fig = _figure(2.6 * len(masks), 3.4)
    for k, (name, mask) in enumerate(masks.items()):
        ax = fig.add_subplot(1, len(masks), k + 1)
        ax.imshow(_tint(face, mask))
        ax.set_title((titles or {}).get(name, name), fontsize=9)
        ax.axis("off")
    return fig


def show_mask_on_images(mask: np.ndarray, dataset: CelebADataset, n: int = 6, *,
                        indices: Sequence[int] | None = None):
    """The template mask on the template, then carried onto dataset images (:func:`cocam.masks.mask_to_input`).

    This is the region the guidance asks the Grad-CAM to fall into, at the model's input size.
    """
    from cocam.masks import mask_to_input
    from cocam.synthetic import render_template

    face = np.asarray(render_template()[0].convert("RGB"))
    region = mask_to_input(mask, dataset.image_size).numpy()
    indices = list(indices) if indices is not None else list(range(min(n, len(dataset))))
    pixels = dataset.get_batch_numpy(np.asarray(indices, dtype=np.int64))[0] if indices else []
    fig = _figure(2.3 * (len(indices) + 1), 2.9)
    ax = fig.add_subplot(1, len(indices) + 1, 1)
    ax.imshow(_tint(face, mask))
    ax.set_title("drawn on the template", fontsize=9)
    ax.axis("off")
    for k in range(len(indices)):
        ax = fig.add_subplot(1, len(indices) + 1, k + 2)
        ax.imshow(_tint(pixels[k], region))
        ax.contour(region, levels=[0.5], colors=["#ffffff"], linewidths=0.8)
        ax.set_title(str(dataset.names[indices[k]]), fontsize=8)
        ax.axis("off")
    return fig


_CURVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BCE", ("train_bce", "valid_bce")),
    ("loss_g = -ln softIoU", ("train_loss_g",)),
    ("dead CAMs (share of guided pairs)", ("dead_cam",)),
    ("validation accuracy", ("valid_accuracy",)),
)


def _draw_curves(fig, histories: Mapping[str, pd.DataFrame], x: str = "step") -> None:
    present = [(title, keys) for title, keys in _CURVES
               if any(k in h.columns and h[k].notna().any() for h in histories.values() for k in keys)]
    if not present:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "waiting for the first epoch...", ha="center", va="center")
        return
    for p, (title, keys) in enumerate(present):
        ax = fig.add_subplot(1, len(present), p + 1)
        for run, h in histories.items():
            for key in keys:
                if key in h.columns and h[key].notna().any():
                    label = key if len(histories) == 1 else f"{run}: {key}"
                    ax.plot(h[x], h[key], marker="o", markersize=3, label=label,
                            linestyle="--" if key.startswith("valid_") and "bce" in key else "-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_history(histories: Mapping[str, pd.DataFrame] | pd.DataFrame, *, x: str = "step"):
    """Training curves of one or several runs (``FitResult.history`` or ``history.csv``)."""
    if isinstance(histories, pd.DataFrame):
        histories = {"run": histories}
    fig = _figure(12, 3.3)
    _draw_curves(fig, histories, x)
    return fig


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


class LivePlot:
    """Curves that grow while :func:`cocam.train.fit` runs: pass ``on_epoch=live.update``.

    In Jupyter the figure is redrawn in place after every epoch (BCE, ``loss_g`` when guiding,
    validation accuracy); elsewhere nothing is displayed and :attr:`figure` / :attr:`history`
    hold the result.

    Args:
        title: shown above the curves.
        display: show the figure in the notebook (default: when running under IPython).
    """

    def __init__(self, title: str = "", *, display: bool | None = None) -> None:
        self.title = title
        self._records: list[dict[str, Any]] = []
        self._display = _in_ipython() if display is None else display
        self._handle: Any = None
        self._figure = None

    @property
    def history(self) -> pd.DataFrame:
        """The records received so far."""
        return pd.DataFrame(self._records)

    @property
    def figure(self):
        """The current figure (a :class:`matplotlib.figure.Figure`)."""
        if self._figure is None:
            self._redraw()
        return self._figure

    def update(self, record: Mapping[str, Any]) -> None:
        """Add one epoch's record (as given to ``fit``'s ``on_epoch``) and redraw."""
        self._records.append(dict(record))
        self._show()

    __call__ = update

    def complete(self, history: pd.DataFrame) -> None:
        """Show a run's whole history once it returns (also when it was resumed or already finished)."""
        self._records = [dict(r) for r in history.to_dict("records")]
        self._show()

    def _show(self) -> None:
        self._redraw()
        if self._display:
            from IPython.display import Image, display

            image = Image(data=_png(self._figure), format="png")
            if self._handle is None:
                self._handle = display(image, display_id=True)
            else:
                self._handle.update(image)

    def _redraw(self) -> None:
        fig = _figure(12, 3.3)
        _draw_curves(fig, {self.title or "run": self.history})
        if self.title:
            fig.suptitle(self.title, fontsize=11)
        self._figure = fig
