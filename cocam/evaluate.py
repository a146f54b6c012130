"""Evaluation: accuracy on the whole test split and on the conflict subsets, and attention.

For a guided pair (A, B) — e.g. Wearing_Lipstick and its co-occurring shortcut Heavy_Makeup —
the model's accuracy *on attribute A* is reported on the whole split (the paper's first column),
on the conflict subset A∧¬B (the paper's second column), on the reverse conflict ¬A∧B, on the
four (A, B) groups, and as the worst-group accuracy, each with its subset size and a 95 %
bootstrap interval (conflict subsets are small: 384 images for Double_Chin∧¬Chubby in real
CelebA's test split).

Attention is scored with the Grad-CAM of A on images that have A, against a region (the user's
mask, or on the synthetic benchmark the ground-truth evidence region): soft IoU, the pointing
game (is the CAM's maximum inside the region?) and the share of CAM energy inside the region.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cocam.attributes import attribute_index, validate_attributes
from cocam.dataset import CelebADataset, iterate_batches
from cocam.gradcam import grad_cam
from cocam.losses import soft_iou
from cocam.model import SplitModel

__all__ = [
    "attention_metrics",
    "attention_scores",
    "bootstrap_interval",
    "evaluate_checkpoints",
    "name_checkpoints",
    "pair_accuracy",
    "paper_table",
    "predict",
    "resolve_device",
    "results_sidecar",
    "write_results",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict(model: SplitModel, dataset: CelebADataset, *, batch_size: int = 256,
            device: str | torch.device | None = "auto", progress: bool = False) -> np.ndarray:
    """Logits ``(N, num_outputs)`` of ``model`` on every image of ``dataset`` (in eval mode).

    The model's train/eval mode is restored afterwards.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    out = []
    try:
        batches = iterate_batches(dataset, batch_size, device=device)
        for images, _, _ in tqdm(batches, total=-(-len(dataset) // batch_size), desc="predicting",
                                 disable=not progress, leave=False):
            out.append(model(images).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_outputs), np.float32)


def bootstrap_interval(correct: np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (NaN for an empty one)."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.binomial(correct.size, correct.mean(), size=n_boot) / correct.size \
        if correct.size > 5000 else correct[rng.integers(0, correct.size, (n_boot, correct.size))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def pair_accuracy(logits: np.ndarray, labels: pd.DataFrame, pairs: Sequence[tuple[str, str]], *,
                  threshold: float = 0.0, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Accuracy on attribute A for every subset of every pair (A, B).

    Args:
        logits: ``(N, 40)`` model outputs (:func:`predict`).
        labels: the ``(N, 40)`` 0/1 labels of the same images, in the same order.
        pairs: (A, B) pairs: A is the guided attribute, B its co-occurring shortcut.
        threshold: decision threshold on the logit (0 = probability 0.5).

    Returns:
        One row per (a, b, subset) with ``n``, ``accuracy``, ``ci_low``, ``ci_high``; the
        subsets are ``all``, ``A∧¬B`` (conflict), ``¬A∧B`` (reverse conflict), ``A∧B``,
        ``¬A∧¬B`` and ``worst group`` (the lowest of the four groups).
    """
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions but {len(labels)} label rows.")
    rows = []
    for a, b in pairs:
        validate_attributes([a, b])
        ya = labels[a].to_numpy().astype(bool)
        yb = labels[b].to_numpy().astype(bool)
        correct = (logits[:, attribute_index(a)] > threshold) == ya
        groups = {"all": np.ones_like(ya), "A∧¬B": ya & ~yb, "¬A∧B": ~ya & yb, "A∧B": ya & yb,
                  "¬A∧¬B": ~ya & ~yb}
        accs = {}
        for name, sel in groups.items():
            c = correct[sel]
            lo, hi = bootstrap_interval(c, n_boot=n_boot, seed=seed)
            acc = float(c.mean()) if c.size else float("nan")
            accs[name] = (acc, int(c.size), lo, hi)
            rows.append({"a": a, "b": b, "subset": name, "n": int(c.size), "accuracy": acc, "ci_low": lo,
                         "ci_high": hi})
        four = {k: v for k, v in accs.items() if k not in ("all",) and v[1] > 0}
        if four:
            worst = min(four, key=lambda k: four[k][0])
            acc, n, lo, hi = four[worst]
        else:  # no images at all
            worst, (acc, n, lo, hi) = None, (float("nan"), 0, float("nan"), float("nan"))
        rows.append({"a": a, "b": b, "subset": "worst group", "n": n, "accuracy": acc, "ci_low": lo, "ci_high": hi,
                     "group": worst})
    return pd.DataFrame(rows)


def paper_table(results: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The before/after table in the paper's layout, plus extra columns.

    Args:
        results: model name (e.g. ``"pre-trained"``, ``"BCE-only control"``, ``"fine-tuned"``)
            → the output of :func:`pair_accuracy` for that model.

    Returns:
        One row per (attribute A, model): ``test`` (accuracy on the whole split), ``A∧¬B``
        (the conflict subset), ``¬A∧B``, ``worst group`` — in percent — and the sizes and
        95 % intervals of the conflict subset.
    """
    rows = []
    for model_name, df in results.items():
        for (a, b), g in df.groupby(["a", "b"], sort=False):
            s = g.set_index("subset")
            rows.append({
                "attribute": a, "shortcut": b, "model": model_name,
                "test %": 100 * s.loc["all", "accuracy"],
                "conflict A∧¬B %": 100 * s.loc["A∧¬B", "accuracy"],
                "conflict 95% CI": f"[{100 * s.loc['A∧¬B', 'ci_low']:.1f}, {100 * s.loc['A∧¬B', 'ci_high']:.1f}]",
                "n conflict": int(s.loc["A∧¬B", "n"]),
                "reverse ¬A∧B %": 100 * s.loc["¬A∧B", "accuracy"],
                "worst group %": 100 * s.loc["worst group", "accuracy"],
                "n test": int(s.loc["all", "n"]),
            })
    out = pd.DataFrame(rows)
    order = {a: i for i, a in enumerate(dict.fromkeys(out["attribute"]))}
    return out.sort_values(["attribute"], key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def attention_metrics(model: SplitModel, dataset: CelebADataset, attribute: str, region: torch.Tensor, *,
                      batch_size: int = 64, device: str | torch.device | None = "auto",
                      positives_only: bool = True) -> dict[str, float]:
    """How well the Grad-CAM of ``attribute`` falls inside ``region``.

    Args:
        region: ``(S, S)`` one region for every image (e.g. the user's mask at input size) or
            ``(N, S, S)`` one per image of ``dataset`` (e.g. ground-truth evidence regions).
        positives_only: score only images that have the attribute (the CAM of an absent
            attribute shows evidence *for* it, which is not what the region marks).

    Returns:
        ``{"soft_iou", "pointing_game", "energy_inside", "n"}`` averaged over the scored images.
    """
    return attention_scores(model, dataset, attribute, {"region": region}, batch_size=batch_size, device=device,
                            positives_only=positives_only)["region"]


def attention_scores(model: SplitModel, dataset: CelebADataset, attribute: str,
                     regions: Mapping[str, torch.Tensor], *, batch_size: int = 64,
                     device: str | torch.device | None = "auto",
                     positives_only: bool = True) -> dict[str, dict[str, float]]:
    """:func:`attention_metrics` against several regions at once, from one Grad-CAM pass.

    Returns one ``{"soft_iou", "pointing_game", "energy_inside", "n"}`` dict per region name.
    """
    device = resolve_device(device)
    idx = attribute_index(attribute)
    regions = {name: torch.as_tensor(r, dtype=torch.float32) for name, r in regions.items()}
    for name, r in regions.items():
        if r.ndim == 3 and r.shape[0] != len(dataset):
            raise ValueError(f"region {name!r} has {r.shape[0]} masks for {len(dataset)} images.")
    labels = torch.tensor(np.asarray(dataset.targets)[:, idx])  # a copy: targets may be a read-only view
    was_training = model.training
    model.eval()
    model.to(device)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {name: {"iou": [], "point": [], "energy": []}
                                                      for name in regions}
    n = 0
    try:
        start = 0
        for images, _, _ in iterate_batches(dataset, batch_size, device=device):
            stop = start + len(images)
            keep = labels[start:stop] > 0 if positives_only else torch.ones(stop - start, dtype=torch.bool)
            if keep.any():
                res = grad_cam(model, images[keep.to(device)], idx, output_size=images.shape[-1])
                cam = res.cams[:, 0].detach().float().cpu()
                flat = cam.flatten(1)
                for name, region in regions.items():
                    r = region[start:stop][keep] if region.ndim == 3 else region.expand_as(cam)
                    parts[name]["iou"].append(soft_iou(cam, r))
                    parts[name]["point"].append(r.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0] > 0.5)
                    parts[name]["energy"].append((flat * r.flatten(1)).sum(1) / flat.sum(1).clamp_min(1e-12))
                n += int(keep.sum())
            start = stop
    finally:
        model.train(was_training)
    if n == 0:
        empty = {"soft_iou": float("nan"), "pointing_game": float("nan"), "energy_inside": float("nan"), "n": 0}
        return {name: dict(empty) for name in regions}
    return {name: {"soft_iou": float(torch.cat(p["iou"]).mean()),
                   "pointing_game": float(torch.cat(p["point"]).float().mean()),
                   "energy_inside": float(torch.cat(p["energy"]).mean()), "n": n}
            for name, p in parts.items()}


def evaluate_checkpoints(root: str | os.PathLike, checkpoints: Mapping[str, str | os.PathLike],
                         pairs: Sequence[tuple[str, str]], *, split: str = "test", attention: bool = True,
                         mask_dir: str | os.PathLike | None = "data/masks",
                         device: str | torch.device | None = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The before/after table of several checkpoints on one split of the dataset at ``root``.

    Args:
        checkpoints: model name (e.g. ``"pre-trained"``, ``"fine-tuned"``) → checkpoint path.
        pairs: (A, B) pairs to report.
        attention: add Grad-CAM attention metrics of A on the images with A: against the
            user's mask (``mask …`` columns, from ``mask_dir`` or the built-in region) and, on
            the synthetic dataset, against each image's true evidence region (``truth …``).

    Returns:
        ``(table, long)``: :func:`paper_table` (plus attention columns), and the long format of
        :func:`pair_accuracy` with a ``model`` column.
    """
    from cocam.checkpoint import load_model
    from cocam.masks import mask_to_input, resolve_mask

    if not checkpoints:
        raise ValueError("No checkpoints to evaluate: train the baseline and fine-tune first "
                         "(or pass at least one name → checkpoint path).")
    try:
        from cocam.synthetic import EvidenceRegions

        regions = EvidenceRegions(root) if attention else None
    except FileNotFoundError:  # real CelebA: no ground truth
        regions = None
    results, attn = {}, []
    dataset: CelebADataset | None = None
    for name, path in checkpoints.items():
        model, spec, _ = load_model(path)
        if dataset is None or dataset.image_size != spec.image_size:
            dataset = CelebADataset(root, split, image_size=spec.image_size)
        results[name] = pair_accuracy(predict(model, dataset, device=device), dataset.attributes, pairs)
        if not attention:
            continue
        for a, _ in pairs:
            positives = dataset.subset({a: 1})
            if len(positives) == 0:
                continue
            mask, _ = resolve_mask(a, mask_dir)
            targets = {"mask": mask_to_input(mask, spec.image_size)}
            if regions is not None:
                targets["truth"] = regions.masks(list(positives.names), a, spec.image_size).float()
            scores = attention_scores(model, positives, a, targets, device=device)
            row: dict = {"model": name, "attribute": a}
            for kind, m in scores.items():
                row.update({f"{kind} {k}": v for k, v in m.items() if k != "n"})
            row["n positives"] = scores["mask"]["n"]
            attn.append(row)
    table = paper_table(results)
    if attn:
        table = table.merge(pd.DataFrame(attn), on=["model", "attribute"], how="left")
    long = pd.concat([df.assign(model=name) for name, df in results.items()], ignore_index=True)
    return table, long


def name_checkpoints(items: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Name each checkpoint given as ``NAME=PATH`` or ``PATH`` (the names of the rows of the table).

    ``NAME=PATH`` splits at the first ``=`` (a path that exists as given is never split). A
    bare ``PATH`` is named after its folder (``runs/guided/last.pt`` → ``guided``), the name
    a run folder is known by. When that name is shared — ``runs/kb/best.pt`` and
    ``runs/kb/last.pt`` — each of those checkpoints is named ``<folder>/<file stem>`` instead
    (``kb/best``, ``kb/last``), so no checkpoint replaces another in the table. A name given
    twice, or the same checkpoint given twice, is an error: the table would silently hold one
    of them.
    """
    parsed = []
    for item in items:
        text = os.fspath(item)
        # NAME=PATH splits at the first "=", unless the whole text is an existing file (runs/lr=0.1/last.pt)
        name, sep, path = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        if sep and not name:
            raise ValueError(f"checkpoint {text!r} has an empty name: write NAME=PATH, or just PATH to name it "
                             f"after its folder.")
        if not path:
            raise ValueError(f"checkpoint {text!r} has no path: write NAME=PATH (e.g. guided=runs/guided/last.pt).")
        parsed.append((name or None, Path(path)))
    folders = [p.parent.name or p.stem for n, p in parsed if n is None]
    shared = {f for f in folders if folders.count(f) > 1}
    named: dict[str, Path] = {}
    for name, path in parsed:
        if name is None:
            folder = path.parent.name or path.stem
            name = f"{folder}/{path.stem}" if folder in shared else folder
        if name in named:
            what = "the same checkpoint" if named[name] == path else f"both {named[name]} and {path}"
            raise ValueError(f"two checkpoints are named {name!r} ({what}): give each its own name with "
                             f"NAME=PATH, e.g. {name}-2={path}.")
        named[name] = path
    return named


def results_sidecar(path: str | os.PathLike) -> Path:
    """The provenance file of the results file ``path``: ``<name>.csv`` → ``<name>.json``.

    Raises :class:`ValueError` unless ``path`` ends in ``.csv``: the sidecar must never be the
    results file itself (``res.json``), and a results file must not take another kind of file's
    name (``best.pt``).
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"results are written as CSV: give a file name ending in .csv (e.g. "
                         f"{path.with_suffix('.csv').name}), not {path.name!r}; its provenance goes next to it "
                         f"as <name>.json.")
    return path.with_suffix(".json")


def write_results(path: str | os.PathLike, table: pd.DataFrame,
                  checkpoints: Mapping[str, str | os.PathLike], *, overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``table`` as CSV to ``path`` and its provenance as JSON next to it (``<name>.json``).

    The JSON sidecar holds the library versions (:func:`cocam.checkpoint.versions`) and, for
    each checkpoint, its path and the ``spec``, ``config`` and ``guidance`` it stores. Both files
    are written atomically. ``path`` must end in ``.csv`` (:func:`results_sidecar`), so neither
    file can replace the other. With ``overwrite=False`` an existing results file or sidecar is
    a :class:`FileExistsError` and nothing is written. Returns ``(csv_path, json_path)``.
    """
    import json

    from cocam.checkpoint import load_checkpoint, versions
    from cocam.io import atomic_write_text

    path = Path(path)
    sidecar = results_sidecar(path)
    if not overwrite:
        for existing in (path, sidecar):
            if existing.exists():
                raise FileExistsError(f"{existing} already exists: choose another file name, or pass "
                                      f"overwrite=True to replace it.")
    record: dict = {"results": path.name, "versions": versions(), "checkpoints": {}}
    for name, ckpt in checkpoints.items():
        payload = load_checkpoint(ckpt)
        record["checkpoints"][str(name)] = {"path": os.fspath(ckpt), "spec": payload.get("spec"),
                                            "config": payload.get("config"), "guidance": payload.get("guidance")}
    text = json.dumps(record, indent=2, default=str) + "\n"  # validate before writing anything
    atomic_write_text(path, table.to_csv(index=False))
    atomic_write_text(sidecar, text)
    return path, sidecar
