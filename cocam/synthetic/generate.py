"""Writing the synthetic CelebA: the project's embedded default and benchmark.

:func:`generate_synthetic_celeba` writes a dataset in the exact layout and file formats of
real CelebA (``<root>/celeba/img_align_celeba/000001.jpg``, ``list_attr_celeba.txt``, …), so
the same reader loads both. Beside the standard files it writes ``evidence_regions.npz`` — the
ground-truth region of every rendered attribute for every image — and ``cocam_synthetic.json``
(the configuration, written last: its presence marks a complete dataset).

The whole dataset is built in a temporary sibling folder and renamed into place at the end,
so an interrupted run never leaves a folder that looks complete. Every image is a function of
``(seed, image index)`` only, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cocam.attributes import CELEBA_ATTRIBUTES, validate_attribute
from cocam.celeba import (
    BBOX_COLUMNS,
    LANDMARK_COLUMNS,
    write_attributes,
    write_bbox,
    write_identity,
    write_landmarks,
    write_partition,
)
from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH
from cocam.io import atomic_folder, atomic_write_text
from cocam.synthetic.labels import fit_label_tree, sample_labels
from cocam.synthetic.render import (
    MAX_ELLIPSES,
    REGION_ATTRIBUTES,
    TEMPLATE_LABELS,
    CueDifficulty,
    render_face,
    template_geometry,
)

__all__ = [
    "EVIDENCE_FILE",
    "MARKER_FILE",
    "PRESETS",
    "SyntheticConfig",
    "generate_synthetic_celeba",
    "is_synthetic_complete",
    "render_template",
    "synthetic_labels",
    "template_region",
]

MARKER_FILE = "cocam_synthetic.json"
EVIDENCE_FILE = "evidence_regions.npz"


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.

    Attributes:
        n_train, n_valid, n_test: images per split (the files list train, then valid, then test,
            as CelebA does).
        seed: every label and image derives from it.
        train_conflict_scale: bias strength — multiplier on the conflict cells of the paper's
            pairs in the *training* split only (1.0 = CelebA's rates; the validation and test
            splits always keep CelebA's rates).
        train_decorrelated: the *oracle*'s training split: each paper pair's A drawn independently
            of its B (at CelebA's rate of A), so the training split has no co-occurrence to
            exploit; ``train_conflict_scale`` is then ignored. Validation and test are unchanged.
        difficulty: visibility of the true cues (see :class:`CueDifficulty`).
        jpeg_quality: JPEG quality of the written images.
    """

    n_train: int = 8_000
    n_valid: int = 2_000
    n_test: int = 4_000
    seed: int = 0
    train_conflict_scale: float = 0.25
    train_decorrelated: bool = False
    difficulty: CueDifficulty = field(default_factory=CueDifficulty)
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.n_images > 999_999:
            raise ValueError("At most 999,999 images (CelebA's 6-digit file names).")
        if not 0.0 <= self.train_conflict_scale <= 1.0:
            raise ValueError(f"train_conflict_scale must lie in [0, 1], got {self.train_conflict_scale}.")

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_valid + self.n_test

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["train_decorrelated"]:  # added later: left out at its default, so older markers still match
            del d["train_decorrelated"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticConfig:
        d = dict(d)
        d["difficulty"] = CueDifficulty(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in d.get("difficulty", {}).items()})
        return cls(**d)


#: Named configurations: ``default`` (the benchmark), ``small`` (quick experiments), ``smoke``
#: (tests and notebook smoke runs).
PRESETS: dict[str, SyntheticConfig] = {
    "default": SyntheticConfig(),
    "small": SyntheticConfig(n_train=3_000, n_valid=600, n_test=1_200),
    "smoke": SyntheticConfig(n_train=96, n_valid=32, n_test=64),
}


def _image_name(i: int) -> str:
    return f"{i + 1:06d}.jpg"


def _render_chunk(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render and write images ``start..stop``; return landmarks, face boxes and regions."""
    start, label_rows, seed, difficulty, quality, folder = args
    n = len(label_rows)
    landmarks = np.zeros((n, 5, 2), dtype=np.float32)
    boxes = np.zeros((n, 4), dtype=np.float32)
    regions = np.zeros((n, len(REGION_ATTRIBUTES), MAX_ELLIPSES, 4), dtype=np.float32)
    for k, row in enumerate(label_rows):
        i = start + k
        rng = np.random.default_rng([seed, i])
        labels = dict(zip(CELEBA_ATTRIBUTES, (int(v) for v in row)))
        img, lm, reg = render_face(labels, rng, difficulty=difficulty)
        img.save(os.path.join(folder, _image_name(i)), "JPEG", quality=quality)
        landmarks[k] = lm
        for j, a in enumerate(REGION_ATTRIBUTES):
            for e, ellipse in enumerate(reg[a]):
                regions[k, j, e] = ellipse
        boxes[k] = _face_box(reg["Oval_Face"][0])
    return landmarks, boxes, regions


def _face_box(face) -> tuple[float, float, float, float]:
    cx, cy, rx, ry = face
    return cx - rx, cy - ry, 2 * rx, 2 * ry


def is_synthetic_complete(root: str | Path) -> bool:
    """Whether ``root`` holds a complete synthetic dataset (its marker file was written)."""
    return (_celeba_dir(root) / MARKER_FILE).is_file()


def _celeba_dir(root: str | Path) -> Path:
    root = Path(root)
    return root if root.name == "celeba" else root / "celeba"


def generate_synthetic_celeba(
    root: str | Path,
    config: SyntheticConfig | str = "default",
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the synthetic CelebA under ``root/celeba`` and return that folder.

    Args:
        root: the folder that will contain ``celeba/`` (as for ``torchvision.datasets.CelebA``).
        config: a :class:`SyntheticConfig` or a preset name from :data:`PRESETS`.
        workers: rendering processes (default: the number of CPU cores).
        overwrite: replace an existing dataset that cocam generated (it holds the marker file
            ``cocam_synthetic.json``). Without it, an existing dataset made with the same
            configuration is reused as is, and any other content is an error. A folder without
            the marker (real CelebA, or anything else) is never replaced, even with ``overwrite``.
        progress: show a progress bar.

    Raises:
        FileExistsError: ``root/celeba`` holds something other than the requested dataset; the
            message says whether ``overwrite`` would help (a generated dataset of another
            configuration) or not (a folder cocam did not generate: nothing in it is touched).

    The folder is created with the permissions of an ordinary ``mkdir`` under the current
    umask (not the private 0700 of a temporary folder), so others can read a shared copy.
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"Unknown preset {config!r}; choose one of {sorted(PRESETS)}.")
        config = PRESETS[config]
    target = _celeba_dir(root)
    if target.exists():
        marker = target / MARKER_FILE
        if not marker.is_file():
            raise FileExistsError(
                f"{target} exists and was not generated by cocam (no {MARKER_FILE} in it): cocam never replaces "
                f"it, not even with overwrite. Choose another root (a new or empty folder) for the synthetic "
                f"dataset, or delete {target} yourself if it is really disposable."
            )
        try:
            recorded = json.loads(marker.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        same = recorded == json.loads(json.dumps(config.to_dict()))
        if same and not overwrite:
            return target
        if not overwrite:
            raise FileExistsError(
                f"{target} already holds a synthetic dataset with another configuration. Pass overwrite=True "
                f"(`cocam generate --overwrite`) to replace it, or choose another root."
            )
    with atomic_folder(target) as tmp:
        _write_dataset(tmp, config, workers=workers, progress=progress)
    return target


def synthetic_labels(config: SyntheticConfig) -> tuple[pd.DataFrame, pd.Series]:
    """The labels (0/1, indexed by image name) and split of every image ``config`` describes."""
    splits = [("train", config.n_train), ("valid", config.n_valid), ("test", config.n_test)]
    frames, split_names = [], []
    for s, (split, n) in enumerate(splits):
        train = split == "train"
        tree = fit_label_tree(split, train_conflict_scale=config.train_conflict_scale if train else 1.0,
                              decorrelate=train and config.train_decorrelated)
        frames.append(sample_labels(tree, n, np.random.default_rng([config.seed, 1_000_003, s])))
        split_names += [split] * n
    labels = pd.concat(frames, ignore_index=True)
    labels.index = pd.Index([_image_name(i) for i in range(config.n_images)], name="image_id")
    split = pd.Series(pd.Categorical(split_names, categories=["train", "valid", "test"]), index=labels.index,
                      name="split")
    return labels, split


def _write_dataset(folder: Path, config: SyntheticConfig, *, workers: int | None, progress: bool) -> None:
    images_dir = folder / "img_align_celeba"
    images_dir.mkdir(parents=True)
    labels, split = synthetic_labels(config)
    names = list(labels.index)

    rows = labels.to_numpy(dtype=np.uint8)
    chunk = 256
    jobs = [(start, rows[start:start + chunk], config.seed, config.difficulty, config.jpeg_quality, str(images_dir))
            for start in range(0, config.n_images, chunk)]
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = tqdm(total=config.n_images, desc="rendering faces", unit="img", disable=not progress)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_render_chunk(job))
            bar.update(len(job[1]))
    else:
        # fork where available: workers need only numpy and PIL, and a script without a
        # `if __name__ == "__main__":` guard would re-run itself in spawned workers
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for job, res in zip(jobs, pool.imap(_render_chunk, jobs)):
                results.append(res)
                bar.update(len(job[1]))
    bar.close()
    landmarks = np.concatenate([r[0] for r in results])
    boxes = np.concatenate([r[1] for r in results])
    regions = np.concatenate([r[2] for r in results])

    write_attributes(folder / "list_attr_celeba.txt", labels)
    write_partition(folder / "list_eval_partition.txt", split)
    write_landmarks(folder / "list_landmarks_align_celeba.txt",
                    pd.DataFrame(np.rint(landmarks.reshape(-1, 10)).astype(np.int64), index=labels.index,
                                 columns=list(LANDMARK_COLUMNS)))
    write_bbox(folder / "list_bbox_celeba.txt",
               pd.DataFrame(np.rint(boxes).astype(np.int64), index=labels.index,
                            columns=list(BBOX_COLUMNS)))
    write_identity(folder / "identity_CelebA.txt", pd.Series(np.arange(1, config.n_images + 1), index=labels.index))
    with open(folder / EVIDENCE_FILE, "wb") as fh:
        np.savez_compressed(fh, images=np.array(names), attributes=np.array(REGION_ATTRIBUTES),
                            ellipses=regions.astype(np.float16))
    from cocam import __version__

    atomic_write_text(folder / MARKER_FILE, json.dumps(
        {"generator": "cocam.synthetic", "cocam_version": __version__, "config": config.to_dict(),
         "image_size": [ALIGNED_WIDTH, ALIGNED_HEIGHT],
         "notes": "bbox: the face ellipse's box in aligned coordinates; identity: one per image."},
        indent=2))


def render_template():
    """The template face for drawing masks: the neutral face at CelebA's mean aligned geometry.

    Returns ``(image, landmarks, regions)`` as :func:`cocam.synthetic.render.render_face` does.
    """
    return render_face(TEMPLATE_LABELS, np.random.default_rng(0), geometry=template_geometry(), plain=True)


def template_region(attribute: str) -> list[tuple[float, float, float, float]]:
    """The evidence region of ``attribute`` on the template face (ellipses in aligned pixels)."""
    attribute = validate_attribute(attribute)
    _, _, regions = render_template()
    if attribute not in regions:
        raise ValueError(f"{attribute} has no localised cue in the synthetic faces (it is global).")
    return regions[attribute]
