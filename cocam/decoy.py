"""Decoy-FashionMNIST: a benchmark the explanatory-interactive-learning literature already uses.

Ross et al. (IJCAI 2017) built **Decoy-MNIST** to test "right for the right reasons": every
training image gets a 4×4 grey patch in one of its four corners whose grey level is a function
of the class, so a classifier can read the class off the patch and ignore the digit; at test time
the patch's grey level is random, and a model that learned the shortcut fails. Friedrich et al.
("A typology for exploring the mitigation of shortcut behavior", Nature Machine Intelligence
2023) use the same construction on Fashion-MNIST (**Decoy-FMNIST**) and report, for a small CNN,
the test accuracy of the vanilla model against the XIL losses (RRR, RRR on Grad-CAM, CDEP, HINT,
CE…). The per-image *wrong* region — where the evidence must not be — is the patch.

:func:`generate_decoy_fmnist` builds it from the Fashion-MNIST files that Debian's
``dataset-fashion-mnist`` package installs (``/usr/share/datasets/fashion-mnist``; no download):

* **patch**: ``size×size`` pixels (default 4) at a corner drawn uniformly per image (seeded); its
  grey level is ``255 − 25·c`` for the image's class ``c`` in the training and validation
  splits, and ``255 − 25·c'`` for a class ``c'`` drawn uniformly in the test split (Ross et al.'s
  rule, as in the typology's code);
* **splits**: ``train`` and ``valid`` from Fashion-MNIST's 60,000 training images (the last
  ``n_valid`` of a seeded permutation are ``valid``), ``test`` from its 10,000 test images;
  ``n_train``/``n_test`` take the first images of their pools (all by default);
* **layout** (the generic folder layout): ``images/<split>_<k>.png`` (28×28 greyscale PNG),
  ``labels.csv`` with ``image``, one 0/1 column per class (one-hot) and ``split``,
  ``decoy_boxes.csv`` with each image's patch box ``x0, y0, x1, y1`` (pixels, end exclusive) —
  the wrong region —, and ``cocam_decoy.json`` (the configuration; written last: its presence
  marks a complete dataset).

The dataset is written into a temporary sibling folder and renamed into place, so an interrupted
run never leaves a folder that looks complete; the same configuration gives byte-identical
files; a folder that is not a generated Decoy-FashionMNIST is never replaced.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cocam.errors import CocamError
from cocam.io import atomic_folder

__all__ = ["CLASSES", "DEFAULT_SOURCE", "MARKER", "DecoyConfig", "DecoySourceError", "box_corners", "corner_boxes",
           "decoy_patches",
           "generate_decoy_fmnist", "read_idx"]

#: Where Debian's ``dataset-fashion-mnist`` package puts the four files.
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")

#: Fashion-MNIST's ten classes, as label column names (in class order 0–9).
CLASSES: tuple[str, ...] = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                            "bag", "ankle_boot")

MARKER = "cocam_decoy.json"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DecoySourceError(CocamError, FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for, or are not IDX files."""


@dataclass(frozen=True)
class DecoyConfig:
    """What to generate (see the module docstring).

    Attributes:
        n_train, n_valid, n_test: images per split (``None``: all there are — 60,000 − n_valid
            and 10,000).
        patch: the side of the square decoy patch in pixels.
        seed: the permutation of the training pool, the corners and the test grey levels.
    """

    n_train: int | None = None
    n_valid: int = 5_000
    n_test: int | None = None
    patch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None: all), got {value}.")
        if self.n_valid < 1:
            raise ValueError(f"n_valid must be at least 1, got {self.n_valid}.")
        if not 1 <= self.patch <= 14:
            raise ValueError(f"patch must be 1–14 pixels (a corner of a 28×28 image), got {self.patch}.")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST's format; gzipped or not) as a uint8 array of its dimensions."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DecoySourceError(f"{path} is missing: install Debian's dataset-fashion-mnist package "
                               f"(apt-get install dataset-fashion-mnist) or pass source= the folder holding "
                               f"the four Fashion-MNIST .gz files.") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DecoySourceError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DecoySourceError(f"{path} holds {data.size} values, its header says {dims}: the file is truncated.")
    return data.reshape(dims)


def corner_boxes(corner: np.ndarray, patch: int, size: int = 28) -> np.ndarray:
    """``(N, 4)`` boxes ``(x0, y0, x1, y1)`` of side ``patch`` at corners 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    corner = np.asarray(corner)
    x0 = np.where(corner % 2 == 0, 0, size - patch)
    y0 = np.where(corner < 2, 0, size - patch)
    return np.stack([x0, y0, x0 + patch, y0 + patch], axis=1)


def box_corners(boxes: np.ndarray, size: int = 28) -> np.ndarray:
    """The corner number (as in :func:`corner_boxes`) of each ``(x0, y0, x1, y1)`` corner box."""
    boxes = np.asarray(boxes)
    return (boxes[:, 0] > 0).astype(np.int64) + 2 * (boxes[:, 1] > 0).astype(np.int64)


def decoy_patches(labels: np.ndarray, split: str, rng: np.random.Generator, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the patch box ``(x0, y0, x1, y1)`` and its grey level (Ross et al.'s rule)."""
    n = len(labels)
    corner = rng.integers(0, 4, n)
    shown = labels if split != "test" else rng.integers(0, len(CLASSES), n)
    grey = (255 - 25 * shown).astype(np.uint8)
    return corner_boxes(corner, patch), grey


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write(folder: Path, config: DecoyConfig, source: Path) -> None:
    train_x, train_y = (read_idx(source / f) for f in _FILES["train"])
    test_x, test_y = (read_idx(source / f) for f in _FILES["test"])
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DecoySourceError(f"the image and label files in {source} disagree on the number of images.")
    if config.n_valid >= len(train_x):
        raise ValueError(f"n_valid={config.n_valid} leaves no training image of {len(train_x)}.")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(train_x))
    pools = {"train": order[: len(train_x) - config.n_valid], "valid": order[len(train_x) - config.n_valid:],
             "test": np.arange(len(test_x))}
    counts = {"train": config.n_train, "valid": config.n_valid, "test": config.n_test}
    (folder / "images").mkdir()
    rows, boxes = [], []
    for split in ("train", "valid", "test"):
        pool = pools[split]
        n = len(pool) if counts[split] is None else counts[split]
        if n > len(pool):
            raise ValueError(f"n_{split}={n} is more than the {len(pool)} images available for {split}.")
        xs, ys = (test_x, test_y) if split == "test" else (train_x, train_y)
        idx = pool[:n]
        images, labels = xs[idx].copy(), ys[idx].astype(np.int64)
        box, grey = decoy_patches(labels, split, np.random.default_rng([config.seed, ("train", "valid", "test").index(split)]),
                                  config.patch)
        for k in range(n):
            x0, y0, x1, y1 = box[k]
            images[k, y0:y1, x0:x1] = grey[k]
            name = f"{split}_{k:05d}.png"
            (folder / "images" / name).write_bytes(_png(images[k]))
            rows.append({"image": name, **{c: int(labels[k] == i) for i, c in enumerate(CLASSES)}, "split": split})
            boxes.append({"image": name, "x0": int(x0), "y0": int(y0), "x1": int(x1), "y1": int(y1),
                          "grey": int(grey[k])})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    pd.DataFrame(boxes).to_csv(folder / "decoy_boxes.csv", index=False)
    (folder / MARKER).write_text(json.dumps({"dataset": "Decoy-FashionMNIST", "config": dataclasses.asdict(config),
                                             "classes": list(CLASSES)}, indent=2) + "\n")


def generate_decoy_fmnist(root: str | os.PathLike, config: DecoyConfig = DecoyConfig(), *,
                          source: str | os.PathLike = DEFAULT_SOURCE, overwrite: bool = False) -> Path:
    """Write Decoy-FashionMNIST into ``root`` (created) and return it.

    An existing ``root`` generated with the same configuration is returned as is; one with
    another configuration is replaced only with ``overwrite=True``; a folder that holds anything
    else (no ``cocam_decoy.json``) is never replaced (a one-line error says so).
    """
    root = Path(root)
    if root.exists():
        marker = root / MARKER
        if not marker.is_file():
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            else:
                raise FileExistsError(f"{root} exists and is not a generated Decoy-FashionMNIST (no {MARKER}): it is "
                                      f"never replaced. Choose a new folder.")
        else:
            try:
                recorded = json.loads(marker.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError):
                recorded = None
            if recorded == dataclasses.asdict(config) and not overwrite:
                return root
            if not overwrite:
                raise FileExistsError(f"{root} holds Decoy-FashionMNIST of another configuration: pass overwrite=True "
                                      f"(`--overwrite`) to replace it, or choose another folder.")
    with atomic_folder(root) as tmp:
        _write(tmp, config, Path(source))
    return root
