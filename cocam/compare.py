"""Which guidance works for this bias? Several guidance settings and the control, side by side.

:func:`compare_guidance` runs the protocol cocam uses for every claim about the method:

1. a baseline trained to convergence (early stopping on the validation BCE; reused if its run
   folder is complete);
2. from its best checkpoint, for every seed, the BCE-only control and each guidance setting,
   all with the *same* number of steps, learning rate and data order (the seed);
3. each fine-tuned model scored on the **validation** and the **test** split
   (:func:`cocam.evaluate.pair_metrics`): for each guided attribute the worst-group accuracy
   over the four (A, B) groups and the mean of the two conflict groups (the headline, which
   predicting A more often cannot raise), the whole split, the paper's conflict subset
   ``A∧¬B``, the reverse group ``¬A∧B``, the AUC of A's logit within B and within ¬B, and the
   Grad-CAM IoU with the user's mask and (synthetic data) with the true evidence region.

:func:`summarize_comparison` turns the per-run rows into means over seeds with 95 %
t-intervals, and the per-seed gains over the control. :func:`select_settings` picks, per
attribute, the setting with the largest worst-group gain **on the validation split** within
a 1-point budget of whole-split accuracy; its test numbers are then an unbiased report
(nothing is chosen on the test split). :func:`comparison_table` is a view for people.

The settings are :class:`~cocam.train.Guidance` keyword arguments by name;
:data:`METHODS` holds cocam's standard comparison of the guidance losses
(:data:`cocam.losses.GUIDANCE_LOSSES`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cocam.attributes import PAPER_PAIRS
from cocam.checkpoint import ModelSpec, load_model, save_checkpoint
from cocam.dataset import CelebADataset
from cocam.dfr import retrain_last_layer
from cocam.evaluate import evaluate_checkpoints
from cocam.folder import dataset_label_space, is_folder_dataset, label_files, open_dataset
from cocam.groups import balanced_resample, balancing_weights
from cocam.io import atomic_write_text
from cocam.masks import default_mask, resolve_mask
from cocam.regions import random_region
from cocam.train import Guidance, TrainConfig, fit

__all__ = [
    "CONTROL",
    "GAINS",
    "METHODS",
    "PRE_TRAINED",
    "RUN_METRICS",
    "ComparisonConfig",
    "ComparisonResult",
    "compare_guidance",
    "run_name",
    "comparison_table",
    "select_settings",
    "summarize_comparison",
    "t_interval",
]

#: Names of the two reference rows.
CONTROL = "BCE-only control"
PRE_TRAINED = "pre-trained"

#: The controls and peers a comparison can run beside the guidance settings (``ComparisonConfig.peers``),
#: each with the same baseline, steps, learning rate, data order and seeds as the guided runs:
#:
#: * ``random region`` — the reference guidance setting with every mask replaced by a region of the same
#:   shape and area placed away from it and from the shortcut's region (:func:`cocam.regions.random_region`,
#:   a new place per seed): does the *region* matter, or would any Grad-CAM regulariser do?
#: * ``group-balanced`` — BCE only, on a resample of the training split in which the four (A, B)
#:   groups of every pair weigh the same (:func:`cocam.groups.balancing_weights`): what a user holding
#:   B's labels would do instead of drawing a region.
#: * ``guided + balanced`` — the reference guidance setting on that resample: does guidance add to it?
#: * ``last layer (DFR)`` — the baseline's last layer refit per guided attribute on a group-balanced
#:   subset of the training split (:func:`cocam.dfr.retrain_last_layer`; no fine-tuning steps).
PEERS: tuple[str, ...] = ("random region", "group-balanced", "guided + balanced", "last layer (DFR)")

#: The guidance losses side by side: the paper's setting, then each loss guiding the evidence for
#: the true label of every image (``target="both"``) at its default weight.
METHODS: dict[str, dict[str, Any]] = {
    "iou, positives (paper)": {"loss": "iou", "target": "positive"},
    "iou, both classes": {"loss": "iou", "target": "both"},
    "energy": {"loss": "energy", "target": "both"},
    "rrr_cam": {"loss": "rrr_cam", "target": "both"},
    "rrr_input": {"loss": "rrr_input", "target": "both"},
}


@dataclass(frozen=True)
class ComparisonConfig:
    """The shared budget of a comparison.

    Attributes:
        root: dataset root (holds ``celeba/``).
        out: folder for the baseline, one run folder per (setting, seed), ``runs.csv``,
            ``summary.csv`` and ``comparison.json``.
        seeds: fine-tuning seeds (the data order and dropout of each run and its control).
        pairs: the guided attributes and their shortcut attributes ``(A, B)``; all ``A`` are
            guided at once, each with its mask.
        image_size, hidden, arch: the model (see :class:`~cocam.checkpoint.ModelSpec`).
        baseline_epochs, patience: the baseline's budget (early stopping on the valid BCE).
        finetune_epochs, finetune_lr, batch_size: every fine-tuning run's budget
            (:meth:`TrainConfig.fine_tuning`: equal steps for all).
        splits: where each run is scored (``"valid"`` for selection, ``"test"`` for the report).
        mask_dir: where ``<Attribute>.png`` masks are read (else the built-in regions).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``…
        baseline_seeds: one converged baseline per seed (its initial weights and data order);
            every fine-tuning seed runs from every baseline, so intervals cover both sources of
            variance. Baseline 0 lives in ``out/baseline`` and its runs in ``out/<run>_seed<s>``;
            baseline ``b > 0`` in ``out/baseline<b>`` and ``out/b<b>_<run>_seed<s>``.
        peers: which of :data:`PEERS` to run beside the settings (all by default).
        peer_setting: the setting whose loss, target and weight ``random region`` and
            ``guided + balanced`` reuse (default: the first setting).
    """

    root: Path
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    pairs: tuple[tuple[str, str], ...] = tuple(PAPER_PAIRS)
    image_size: int = 112
    hidden: int | None = 512
    arch: str = "alexnet"
    baseline_epochs: int = 40
    patience: int = 3
    finetune_epochs: int = 2
    finetune_lr: float = 3e-4
    batch_size: int = 64
    splits: tuple[str, ...] = ("valid", "test")
    mask_dir: Path | None = Path("data/masks")
    device: str = "auto"
    baseline_seeds: tuple[int, ...] = (0,)
    peers: tuple[str, ...] = PEERS
    peer_setting: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "baseline_seeds", tuple(int(s) for s in self.baseline_seeds))
        object.__setattr__(self, "peers", tuple(self.peers))
        if not self.baseline_seeds or len(set(self.baseline_seeds)) != len(self.baseline_seeds):
            raise ValueError(f"baseline_seeds must be distinct and at least one, got {list(self.baseline_seeds)}.")
        if unknown := [p for p in self.peers if p not in PEERS]:
            raise ValueError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)}.")
        object.__setattr__(self, "pairs", tuple((str(a), str(b)) for a, b in self.pairs))
        if not self.seeds:
            raise ValueError("a comparison needs at least one seed.")
        dataset_label_space(self.root).validate([x for pair in self.pairs for x in pair])
        bad = sorted(set(self.splits) - {"train", "valid", "test"})
        if bad or not self.splits:
            raise ValueError(f"splits must be some of train, valid, test; got {list(self.splits)}.")


@dataclass
class ComparisonResult:
    """What :func:`compare_guidance` returns (also written to ``config.out``)."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    baseline: Path
    seconds: dict[str, float] = field(default_factory=dict)


#: Two-sided 95 % Student-t quantiles by degrees of freedom (1–30); beyond, the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_interval(values: Sequence[float] | np.ndarray | pd.Series) -> tuple[float, float]:
    """Two-sided 95 % Student-t interval of the mean of the finite values (``nan`` below two)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    df = len(x) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


#: Per-run accuracy columns of :func:`compare_guidance`'s ``runs``, in percent, headline first:
#: ``worst_group`` (the lowest of the four (A, B) groups), ``conflict_mean`` (the mean of A∧¬B and
#: ¬A∧B), ``test`` (the whole split), ``conflict`` (the paper's A∧¬B), ``reverse`` (¬A∧B). The AUCs
#: (``auc_within_b``, ``auc_within_not_b``) are fractions in [0, 1].
RUN_METRICS: dict[str, str] = {
    "worst_group": "acc_worst_group", "conflict_mean": "acc_conflict_mean", "test": "acc_all",
    "conflict": "acc_a_not_b", "reverse": "acc_not_a_b", "auc_within_b": "auc_within_b",
    "auc_within_not_b": "auc_within_not_b",
}

#: Summary column of the per-seed difference to the control, for each run column.
GAINS: dict[str, str] = {
    "worst_group": "gain_worst_group", "conflict_mean": "gain_conflict_mean", "conflict": "gain",
    "reverse": "gain_reverse", "test": "test_change", "auc_within_b": "gain_auc_within_b",
    "auc_within_not_b": "gain_auc_within_not_b",
}


def _score(config: ComparisonConfig, name: str, seed: int, checkpoint: Path) -> list[dict[str, Any]]:
    """One row per (split, attribute) of :func:`cocam.evaluate.evaluate_checkpoints`' numbers."""
    rows = []
    for split in config.splits:
        table, _ = evaluate_checkpoints(config.root, {name: checkpoint}, config.pairs, split=split,
                                        mask_dir=config.mask_dir, device=config.device)
        for _, r in table.iterrows():
            row: dict[str, Any] = {"setting": name, "seed": seed, "split": split, "attribute": r["attribute"]}
            for col, metric in RUN_METRICS.items():
                row[col] = 100.0 * r[metric] if col not in ("auc_within_b", "auc_within_not_b") else r[metric]
            row |= {"worst_of": r["worst_group"], "n_images": int(r["n_all"]), "n_conflict": int(r["n_a_not_b"]),
                    "n_reverse": int(r["n_not_a_b"]), "mask_iou": r.get("mask soft_iou", np.nan),
                    "truth_iou": r.get("truth soft_iou", np.nan)}
            rows.append(row)
    return rows


def run_name(guidance: Guidance | None) -> str:
    """The run folder stem of a setting: ``control``, or ``<loss>_<target>_<fingerprint>``
    (``mixed_<fingerprint>`` when the loss or target differs between attributes).

    The fingerprint (:meth:`~cocam.train.Guidance.fingerprint`) covers every setting and the
    masks, so a changed setting never resumes an old run.
    """
    if guidance is None:
        return "control"
    if isinstance(guidance.loss, tuple) or isinstance(guidance.target, tuple):
        return f"mixed_{guidance.fingerprint()}"
    return f"{guidance.loss}_{guidance.target}_{guidance.fingerprint()}"


def _scores_key(config: ComparisonConfig) -> str:
    """What a run's scores depend on besides its checkpoint: the dataset's labels and splits, the masks."""
    celeba, files = label_files(config.root)
    labels = [f.stat().st_mtime_ns for f in files]
    masks = None
    if config.mask_dir is not None and Path(config.mask_dir).is_dir():
        masks = sorted((f.name, f.stat().st_mtime_ns) for f in Path(config.mask_dir).iterdir() if f.is_file())
    key = json.dumps([str(celeba.resolve()), labels, str(config.mask_dir), masks])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _scores(config: ComparisonConfig, key: str, name: str, seed: int, checkpoint: Path) -> list[dict[str, Any]]:
    """:func:`_score`, kept next to the checkpoint and reused while it is newer.

    The file is named by the dataset and masks it was scored on (``scores_<key>.csv``, ``key``
    from :func:`_scores_key`), so a baseline reused on another dataset, or a regenerated one, is
    scored again; so is one written before a metric of :data:`RUN_METRICS` existed.
    """
    cached = checkpoint.parent / f"scores_{key}.csv"
    if cached.is_file() and cached.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        rows = pd.read_csv(cached)
        if set(RUN_METRICS) <= set(rows.columns) and set(config.splits) <= set(rows.split) and set(a for a, _ in config.pairs) <= set(rows.attribute):
            rows = rows[rows.split.isin(config.splits) & rows.attribute.isin([a for a, _ in config.pairs])]
            return rows.assign(setting=name, seed=seed).to_dict("records")
    rows = _score(config, name, seed, checkpoint)
    atomic_write_text(cached, pd.DataFrame(rows).to_csv(index=False))
    return rows


def _prefix(baseline_seed: int) -> str:
    return "" if baseline_seed == 0 else f"b{baseline_seed}_"


def _train_baseline(config: ComparisonConfig, spec: ModelSpec, train: CelebADataset, valid: CelebADataset,
                    seed: int, progress: bool, say: Callable[[str], Any]) -> Path:
    """The converged baseline of one initial seed (its weights' draw and its data order)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = fit(spec.build(), train, valid, TrainConfig(epochs=config.baseline_epochs, patience=config.patience,
                                                       batch_size=config.batch_size, seed=seed, device=config.device),
               spec=spec, run_dir=config.out / ("baseline" if seed == 0 else f"baseline{seed}"), resume=True,
               progress=progress)
    say(f"baseline: seed {seed}, {len(base.history)} epochs, best valid BCE {base.history.valid_bce.min():.4f} "
        f"({time.perf_counter() - t0:.0f} s)")
    return base.best_path


def _control_regions(config: ComparisonConfig, masks: Sequence[np.ndarray], seed: int) -> tuple[np.ndarray, ...]:
    """Per guided attribute, its mask moved away from itself and from its shortcut's built-in region."""
    out = []
    for i, ((_, b), mask) in enumerate(zip(config.pairs, masks)):
        try:
            avoid = [default_mask(b)]
        except (KeyError, ValueError):  # a shortcut with no region of its own (e.g. a global attribute)
            avoid = []
        out.append(random_region(mask, seed=1009 * seed + i, avoid=avoid))
    return tuple(out)


def _last_layer_run(config: ComparisonConfig, base_path: Path, train: CelebADataset, seed: int,
                    run_dir: Path) -> Path:
    """DFR from the baseline, written once as ``run_dir/last.pt`` (reused when present)."""
    path = run_dir / "last.pt"
    if path.is_file():
        return path
    model, spec, _ = load_model(base_path)
    retrained, info = retrain_last_layer(model, train, config.pairs, seed=seed, device=config.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, retrained, spec, last_layer_retraining={
        "baseline": str(base_path), "seed": seed, "pairs": [list(p) for p in config.pairs],
        "subset_sizes": info.n_subset.tolist()})
    return path


def compare_guidance(config: ComparisonConfig, settings: Mapping[str, Mapping[str, Any]] | None = None, *,
                     baseline: str | Path | None = None, progress: bool = False,
                     log: Callable[[str], Any] | None = print) -> ComparisonResult:
    """Run the baselines, the control, every setting and the peers for every seed; score them; summarise.

    Args:
        config: the shared budget (and which baselines, seeds and peers).
        settings: setting name → :class:`~cocam.train.Guidance` keyword arguments (e.g.
            ``{"loss": "energy", "target": "both"}``); default :data:`METHODS`.
        baseline: a converged baseline checkpoint to start from (e.g. the notebooks'); its
            spec must match ``config``'s image size, and it replaces the trained baselines
            (``config.baseline_seeds`` must then be one seed). ``None`` trains one per baseline seed.
        progress: progress bars of the training loops.
        log: called with one line per finished stage (``None``: silent).

    Every run of a baseline seed and a fine-tuning seed starts from that baseline's best
    checkpoint with the same steps, learning rate and data order; the rows of ``runs`` carry
    ``baseline`` and ``seed``, and the gains pair each run with the control of the same two.

    Runs resume: a finished run folder is reloaded, not retrained, so an interrupted comparison
    continues where it stopped and more seeds, baselines or settings can be added later.
    """
    settings = dict(METHODS if settings is None else settings)
    for reserved in (CONTROL, PRE_TRAINED, *PEERS):
        if reserved in settings:
            raise ValueError(f"{reserved!r} is a reference row, not a setting name: rename it.")
    needs_setting = {"random region", "guided + balanced"} & set(config.peers)
    peer_setting = config.peer_setting or (next(iter(settings)) if settings else None)
    if needs_setting and peer_setting not in settings:
        raise ValueError(f"the peers {sorted(needs_setting)} reuse a guidance setting, but "
                         f"{peer_setting!r} is not one of the settings: set peer_setting to one of {list(settings)}.")
    if baseline is not None and len(config.baseline_seeds) != 1:
        raise ValueError("a given baseline replaces the trained ones: use one baseline seed with baseline=.")
    say = log or (lambda _: None)
    attrs = tuple(a for a, _ in config.pairs)
    space = dataset_label_space(config.root)
    view = "square" if is_folder_dataset(config.root) else "template"
    masks = tuple(resolve_mask(a, config.mask_dir, view=view)[0] for a in attrs)
    guidances = {name: Guidance(attrs, masks, label_space=space, **kwargs)
                 for name, kwargs in settings.items()}  # validate first

    spec = ModelSpec(arch=config.arch, image_size=config.image_size, hidden=config.hidden, attributes=space.names)
    train = open_dataset(config.root, "train", image_size=spec.image_size)
    valid = open_dataset(config.root, "valid", image_size=spec.image_size)
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.out / "comparison.json", json.dumps(
        {"config": dataclasses.asdict(config), "settings": {k: dict(v) for k, v in settings.items()}},
        indent=2, default=str))

    seconds: dict[str, float] = {}
    key = _scores_key(config)  # once: the dataset and masks do not change during a comparison
    rows: list[dict[str, Any]] = []
    first_base: Path | None = None
    weights = (balancing_weights(train.attributes, config.pairs)  # the same for every baseline and seed
               if {"group-balanced", "guided + balanced"} & set(config.peers) else None)
    cfg_steps = dict(batch_size=config.batch_size, lr=config.finetune_lr, device=config.device)
    for b in config.baseline_seeds:
        if baseline is None:
            base_path = _train_baseline(config, spec, train, valid, b, progress, say)
        else:
            base_path = Path(baseline)
            base_spec = load_model(base_path)[1]
            if base_spec.image_size != spec.image_size:
                raise ValueError(f"the baseline {base_path} takes {base_spec.image_size}px inputs but the comparison "
                                 f"is configured for {spec.image_size}px: set image_size={base_spec.image_size}.")
            spec = base_spec
            say(f"baseline: {base_path}")
        first_base = first_base or base_path
        rows += [r | {"baseline": b} for r in _scores(config, key, PRE_TRAINED, -1, base_path)]
        for seed in config.seeds:
            balanced = None
            if weights is not None:
                balanced = train.resampled(balanced_resample(weights, len(train), seed))
            runs: dict[str, tuple[Guidance | None, CelebADataset, str]] = {CONTROL: (None, train, "control")}
            runs |= {name: (g, train, run_name(g)) for name, g in guidances.items()}
            if "random region" in config.peers:
                g = Guidance(attrs, _control_regions(config, masks, seed), label_space=space, **settings[peer_setting])
                runs["random region"] = (g, train, f"random_{run_name(g)}")
            if "group-balanced" in config.peers:
                runs["group-balanced"] = (None, balanced, "balanced")
            if "guided + balanced" in config.peers:
                g = guidances[peer_setting]
                runs["guided + balanced"] = (g, balanced, f"{run_name(g)}_balanced")
            for name, (guidance, data, stem) in runs.items():
                t = time.perf_counter()
                model, _, _ = load_model(base_path)
                cfg = TrainConfig.fine_tuning(len(train), config.finetune_epochs, seed=seed, **cfg_steps)
                r = fit(model, data, valid, cfg, spec=spec, guidance=guidance, resume=True, progress=progress,
                        run_dir=config.out / f"{_prefix(b)}{stem}_seed{seed}")
                rows += [row | {"baseline": b} for row in _scores(config, key, name, seed, r.last_path)]
                seconds[f"{name} baseline {b} seed {seed}"] = time.perf_counter() - t
                say(f"baseline {b} · seed {seed} · {name}: {seconds[f'{name} baseline {b} seed {seed}']:.0f} s")
                atomic_write_text(config.out / "runs.csv", pd.DataFrame(rows).to_csv(index=False))
            if "last layer (DFR)" in config.peers:
                path = _last_layer_run(config, base_path, train, seed, config.out / f"{_prefix(b)}dfr_seed{seed}")
                rows += [row | {"baseline": b} for row in _scores(config, key, "last layer (DFR)", seed, path)]
                atomic_write_text(config.out / "runs.csv", pd.DataFrame(rows).to_csv(index=False))
    runs_df = pd.DataFrame(rows)
    summary = summarize_comparison(runs_df)
    atomic_write_text(config.out / "summary.csv", summary.to_csv(index=False))
    return ComparisonResult(runs=runs_df, summary=summary, baseline=first_base, seconds=seconds)


def summarize_comparison(runs: pd.DataFrame, *, reference: str = CONTROL) -> pd.DataFrame:
    """Mean over runs (baselines × seeds) with 95 % t-intervals, per split, setting and attribute: numbers only.

    Columns: ``split, setting, attribute, seeds, n_conflict, n_reverse``; for each metric of
    :data:`RUN_METRICS` present in ``runs`` and for ``truth_iou``/``mask_iou``, the mean and its
    ``_low``/``_high`` bounds; and for each guidance setting the per-seed difference to the same
    seed's control (:data:`GAINS`: ``gain_worst_group``, ``gain_conflict_mean`` — the headline —,
    ``gain`` on the paper's A∧¬B, ``gain_reverse``, ``test_change``, the AUC gains), each with
    its interval over the per-seed differences. ``reference`` names the row the gains are taken
    against (default the control; e.g. a peer, to ask whether a setting beats it, run for run).
    """
    needed = {"setting", "seed", "split", "attribute", "test", "conflict"}
    if missing := needed - set(runs.columns):
        raise ValueError(f"runs lacks the columns {sorted(missing)} (use compare_guidance's runs).")
    metrics = [c for c in RUN_METRICS if c in runs.columns]
    out = []
    for (split, name, attribute), g in runs.groupby(["split", "setting", "attribute"], sort=False):
        entry: dict[str, Any] = {"split": split, "setting": name, "attribute": attribute, "seeds": len(g)}
        for n in ("n_conflict", "n_reverse"):
            entry[n] = int(g[n].iloc[0]) if n in g and pd.notna(g[n].iloc[0]) else np.nan
        for col in (*metrics, "truth_iou", "mask_iou"):
            if col not in g:
                continue
            entry[col] = g[col].mean()
            entry[f"{col}_low"], entry[f"{col}_high"] = t_interval(g[col])
        control = runs[(runs.split == split) & (runs.setting == reference) & (runs.attribute == attribute)]
        if name not in (reference, PRE_TRAINED) and len(control):
            cell = ["baseline", "seed"] if "baseline" in runs.columns else ["seed"]  # pair with the same run's control
            mine, ref = g.set_index(cell), control.set_index(cell)
            for col in metrics:
                key = GAINS[col]
                diff = (mine[col] - ref[col]).dropna()
                entry[key] = diff.mean() if len(diff) else np.nan
                entry[f"{key}_low"], entry[f"{key}_high"] = t_interval(diff)
        out.append(entry)
    return pd.DataFrame(out)


def select_settings(summary: pd.DataFrame, *, split: str = "valid", max_test_drop: float = 1.0) -> pd.DataFrame:
    """Per attribute, the setting with the largest mean **worst-group** gain over the control on ``split``.

    The worst group is chosen on because the paper's A∧¬B gain can be bought by predicting A
    more often (see :func:`cocam.evaluate.pair_metrics`). Settings that lose more than
    ``max_test_drop`` points of whole-split accuracy against the control on ``split`` are not
    eligible. Only the rows of ``split`` are read, and ``split`` may not be ``"test"``: the
    test numbers of the chosen settings (read them off :func:`summarize_comparison`) are then an
    unbiased report. Only guidance settings are chosen from; the controls and peers
    (:data:`PEERS`) are what the choice is compared with. Returns one row per attribute with the
    chosen ``setting`` and its ``split`` numbers.
    """
    if split == "test":
        raise ValueError("settings are chosen on the valid split, never on test (its numbers are the report): "
                         "pass split='valid'.")
    if "gain" not in summary:
        raise ValueError("the summary has no guidance settings (only references): nothing to select.")
    if "gain_worst_group" not in summary:
        raise ValueError("the summary has no worst-group gain (it predates that metric): re-score the runs with "
                         "compare_guidance, which recomputes them from the checkpoints.")
    rows = summary[(summary.split == split) & summary.gain_worst_group.notna() & ~summary.setting.isin(PEERS)]
    rows = rows[rows.test_change >= -max_test_drop]
    if rows.empty:
        raise ValueError(f"no setting on the {split!r} split is eligible (each loses more than {max_test_drop} "
                         f"points of accuracy, or the split was not scored).")
    best = rows.loc[rows.groupby("attribute", sort=False).gain_worst_group.idxmax()]
    return best.reset_index(drop=True)


#: :func:`comparison_table`'s columns → (summary column, digits); ``{split}`` is the split's name.
_TABLE = {
    "worst group %": ("worst_group", 1), "worst group gain vs control": ("gain_worst_group", 1),
    "conflict mean %": ("conflict_mean", 1), "conflict mean gain": ("gain_conflict_mean", 1),
    "{split} %": ("test", 1), "{split} change": ("test_change", 1),
    "conflict A∧¬B %": ("conflict", 1), "conflict gain vs control": ("gain", 1),
    "reverse ¬A∧B %": ("reverse", 1), "AUC within B": ("auc_within_b", 3), "AUC within ¬B": ("auc_within_not_b", 3),
    "IoU true region": ("truth_iou", 2), "IoU mask": ("mask_iou", 2),
}


def comparison_table(summary: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """A readable view of one split of :func:`summarize_comparison`: ``value [low, high]`` strings,
    one row per (setting, attribute), the worst group and the conflict mean first, then the
    paper's columns."""
    rows = summary[summary.split == split]

    def fmt(r: pd.Series, col: str, digits: int) -> str:
        if col not in r or pd.isna(r[col]):
            return ""
        lo, hi = r.get(f"{col}_low", np.nan), r.get(f"{col}_high", np.nan)
        signed = col.startswith("gain") or col == "test_change"
        body = f"{r[col]:+.{digits}f}" if signed else f"{r[col]:.{digits}f}"
        return body if pd.isna(lo) else f"{body} [{lo:.{digits}f}, {hi:.{digits}f}]"

    return pd.DataFrame([{"setting": r.setting, "attribute": r.attribute, "seeds": r.seeds,
                          "n conflict": r.get("n_conflict", np.nan)}
                         | {label.format(split=split): fmt(r, col, digits) for label, (col, digits) in _TABLE.items()}
                         for _, r in rows.iterrows()])
