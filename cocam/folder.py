"""A dataset of your own: a folder of images and a table of binary labels.

Layout::

    root/
      labels.csv
      images/
        cat_001.jpg
        scans/0042.png        (sub-folders are fine: names are relative to images/)

``labels.csv`` has a header row and one row per image:

* ``image`` — the file name relative to ``images/`` (required, each image once);
* one column per label, each holding 0/1 or -1/1 (-1 and 0 mean absent; a column is either
  kind, and any other value — an empty cell, 2, "yes" — is an error naming the column and the
  values). The label columns, in file order, are the dataset's
  :class:`~cocam.labels.LabelSpace`: a model trained on it has one output per label;
* ``split`` (optional) — ``train``, ``valid`` or ``test`` per image. Without it every image is
  assigned by a hash of its name (:func:`hash_split`): ``u = first 8 bytes of SHA-256(name) / 2⁶⁴``
  goes to train when ``u < 0.8``, valid when ``u < 0.9``, test otherwise — deterministic,
  independent of the row order and of the other images, so adding images never moves one.

Images of any size and mode are converted to RGB, cut to their largest centred square (side
``min(W, H)``, offset ``⌊(W − m)/2⌋, ⌊(H − m)/2⌋``) and resized to ``image_size²`` with PIL's
antialiased bilinear filter (:func:`cocam.dataset.decode_square_image`). They are decoded once
into the same memory-mapped ``uint8`` cache as CelebA's (:func:`cocam.dataset.ensure_image_cache`:
same files, same fingerprint of every image's name, size and modification time, same location
rule, :func:`cocam.dataset.default_cache_dir` — the user's cache folder, never the dataset's).
A listed image that is missing or unreadable stops the build with its name, unless
``skip_unreadable`` (``--skip-unreadable``) leaves such images out.

Masks for such a dataset are drawn on the square image the model sees
(``mask_view = "square"``; :func:`cocam.masks.load_mask` with ``view="square"``); there are no
built-in regions and no landmarks.

:func:`open_dataset` takes either kind of root: a folder with ``labels.csv`` is a
:class:`FolderDataset`, anything else a CelebA layout (:class:`~cocam.dataset.CelebADataset`).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cocam.celeba import SPLITS, DatasetNotFoundError, find_celeba_dir, load_annotations
from cocam.dataset import (
    CachedImageDataset,
    CelebADataset,
    cache_files,
    default_cache_dir,
    ensure_image_cache,
)
from cocam.errors import CocamError
from cocam.labels import CELEBA, LabelSpace, LabelSpaceError

__all__ = [
    "DATA_ROOT_ENV",
    "IMAGE_COLUMN",
    "IMAGES_DIR",
    "LABELS_FILE",
    "SPLIT_COLUMN",
    "SPLIT_SHARES",
    "EmptySplitError",
    "FolderDataset",
    "FolderLabels",
    "LabelTableError",
    "dataset_label_space",
    "env_data_root",
    "hash_split",
    "is_folder_dataset",
    "label_files",
    "open_dataset",
    "read_folder_labels",
    "read_labels",
]

LABELS_FILE = "labels.csv"
IMAGES_DIR = "images"
IMAGE_COLUMN = "image"
SPLIT_COLUMN = "split"
#: Shares of train and valid in the hash split (test takes the rest): 80 / 10 / 10 %.
SPLIT_SHARES: tuple[float, float] = (0.8, 0.1)


class LabelTableError(CocamError, ValueError):
    """A ``labels.csv`` that cannot be read as a label table (its message names the column or row)."""


class EmptySplitError(CocamError, ValueError):
    """A split of a folder dataset with no image."""


DATA_ROOT_ENV = "COCAM_DATA_ROOT"


def env_data_root() -> Path | None:
    """The dataset named by ``$COCAM_DATA_ROOT`` (``None`` when unset or empty).

    Every command that reads a dataset (``cocam stats``, ``train``, ``finetune``, ``evaluate``,
    ``bias``, ``rank``, ``compare``, ``fix``, ``paper``) and the notebooks' ``DATA_ROOT = None``
    use it, so one variable points the whole tool at your data; ``cocam generate`` and ``cocam
    demo`` keep writing the synthetic default.
    """
    value = os.environ.get(DATA_ROOT_ENV, "").strip()
    return Path(value).expanduser() if value else None


def is_folder_dataset(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a folder dataset: it holds ``labels.csv``."""
    return (Path(root).expanduser() / LABELS_FILE).is_file()


def hash_split(name: str) -> str:
    """The split of an image without a ``split`` column: by a hash of its name (see the module docstring)."""
    u = int.from_bytes(hashlib.sha256(str(name).encode("utf-8")).digest()[:8], "big") / 2.0**64
    train, valid = SPLIT_SHARES
    return "train" if u < train else "valid" if u < train + valid else "test"


@dataclass(frozen=True, eq=False)
class FolderLabels:
    """The labels of a folder dataset: 0/1 ``uint8`` table (index: image names, columns: labels), splits."""

    root: Path
    label_space: LabelSpace
    attributes: pd.DataFrame
    split: pd.Series
    split_from_hash: bool

    @property
    def image_dir(self) -> Path:
        return self.root / IMAGES_DIR

    def names(self, split: str) -> pd.Index:
        """The images of ``split`` (``"all"``: every image), in file order."""
        return self.attributes.index if split == "all" else self.attributes.index[(self.split == split).to_numpy()]


_VALUES = {"0": 0, "1": 1, "-1": 0}


def read_folder_labels(root: str | os.PathLike) -> FolderLabels:
    """Read and check ``root/labels.csv`` (see the module docstring for the format).

    Raises:
        DatasetNotFoundError: ``root`` has no ``labels.csv``.
        LabelTableError: no ``image`` column, no label column, a repeated column or image, an
            empty image name, a label column that is not 0/1 or -1/1, a split that is not
            train/valid/test.
    """
    root = Path(root).expanduser()
    path = root / LABELS_FILE
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} not found: a folder dataset is <root>/{LABELS_FILE} (columns {IMAGE_COLUMN}, one 0/1 column "
            f"per label, optional {SPLIT_COLUMN}) plus the images in <root>/{IMAGES_DIR}/; give --root the folder "
            f"that holds {LABELS_FILE}.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, csv.Error) as exc:
        raise LabelTableError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]}); write it as UTF-8 "
                              f"comma-separated values with a header row.") from None
    header = [h.strip() for h in header or []]
    if IMAGE_COLUMN not in header:
        raise LabelTableError(f"{path}: no {IMAGE_COLUMN!r} column (the header is {', '.join(header) or 'empty'}): "
                              f"name the column of file names (relative to {IMAGES_DIR}/) {IMAGE_COLUMN!r}.")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise LabelTableError(f"{path}: column {repeated[0]!r} appears more than once: give each label one column.")
    table.columns = header
    labels = [h for h in header if h not in (IMAGE_COLUMN, SPLIT_COLUMN)]
    if not labels:
        raise LabelTableError(f"{path}: no label column: add one 0/1 column per label beside {IMAGE_COLUMN!r}.")
    try:
        space = LabelSpace(labels)
    except LabelSpaceError as exc:
        raise LabelTableError(f"{path}: {exc}") from None
    names = table[IMAGE_COLUMN].str.strip()
    if (names == "").any():
        row = int(np.flatnonzero((names == "").to_numpy())[0]) + 2
        raise LabelTableError(f"{path}: line {row} has no image name: fill in its {IMAGE_COLUMN!r} cell or remove "
                              f"the row.")
    if names.duplicated().any():
        raise LabelTableError(f"{path}: image {names[names.duplicated()].iloc[0]!r} is listed more than once: one "
                              f"row per image.")
    values = {}
    for column in labels:
        cells = table[column].str.strip()
        bad = sorted(set(cells) - set(_VALUES))
        if bad:
            shown = ", ".join(repr(v) for v in bad[:5]) + (", …" if len(bad) > 5 else "")
            raise LabelTableError(f"{path}: label column {column!r} is not binary: it holds {shown}; use 0/1 or "
                                  f"-1/1 (1 = present) in every row.")
        if "0" in set(cells) and "-1" in set(cells):
            raise LabelTableError(f"{path}: label column {column!r} mixes 0 and -1: use 0/1 or -1/1, not both.")
        values[column] = cells.map(_VALUES).to_numpy(np.uint8)
    attributes = pd.DataFrame(values, index=pd.Index(names.to_numpy(), name=IMAGE_COLUMN), columns=labels)
    if SPLIT_COLUMN in header:
        split = table[SPLIT_COLUMN].str.strip().str.lower()
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise LabelTableError(f"{path}: column {SPLIT_COLUMN!r} holds {', '.join(repr(v) for v in bad[:5])}; "
                                  f"each row's split must be one of {', '.join(SPLITS)}.")
        split = pd.Series(split.to_numpy(), index=attributes.index, name=SPLIT_COLUMN)
    else:
        split = pd.Series([hash_split(n) for n in attributes.index], index=attributes.index, name=SPLIT_COLUMN)
    return FolderLabels(root=root.resolve(), label_space=space, attributes=attributes, split=split,
                        split_from_hash=SPLIT_COLUMN not in header)


class FolderDataset(CachedImageDataset):
    """One split of a folder dataset (see the module docstring), over the decoded-image cache.

    Args:
        root: the folder holding ``labels.csv`` and ``images/``.
        split: ``"train"``, ``"valid"``, ``"test"`` or ``"all"``.
        image_size: side of the square model input in pixels.
        images: restrict to these image names (all in ``split``), in this order.
        transform: applied to the normalised ``(3, S, S)`` float image in ``__getitem__``.
        cache_dir, num_workers, progress, skip_unreadable: as for
            :class:`~cocam.dataset.CelebADataset` (the same cache and the same rules).

    Items are ``(image, target, landmarks)``: float32 ``(3, S, S)`` ImageNet-normalised, float32
    ``(L,)`` 0/1 in :attr:`label_space` order, and float32 ``(5, 2)`` NaN (no landmarks).

    Raises:
        EmptySplitError: ``split`` has no image.
    """

    mask_view = "square"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        image_size: int = 128,
        images: Sequence[str] | pd.Index | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int = 2,
        progress: bool = True,
        skip_unreadable: bool | None = None,
    ) -> None:
        split, image_size, skip_unreadable = self._checked_arguments(split, image_size, skip_unreadable)
        labels = read_folder_labels(root)
        image_dir = labels.image_dir
        if not image_dir.is_dir():
            raise DatasetNotFoundError(f"Image folder not found: {image_dir}: put the images listed in "
                                       f"{labels.root / LABELS_FILE} in <root>/{IMAGES_DIR}/.")
        split_names = labels.names(split)
        if len(split_names) == 0:
            how = (f"by the hash of their names ({', '.join(f'{s:.0%}' for s in SPLIT_SHARES)} train/valid, the "
                   f"rest test)" if labels.split_from_hash else f"by its {SPLIT_COLUMN!r} column")
            raise EmptySplitError(f"the {split} split of {labels.root / LABELS_FILE} has no image (images are "
                                  f"assigned {how}): add images to it, or give a {SPLIT_COLUMN!r} column that "
                                  f"puts some there.")
        self._labels = labels
        self.label_space = labels.label_space
        self.split = split
        self._image_size = image_size
        self.transform = transform
        self._split_names = split_names
        self._split_positions = (np.arange(len(labels.attributes)) if split == "all"
                                 else np.flatnonzero((labels.split == split).to_numpy()))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(labels.root)
        self._cache_path, self._meta_path = cache_files(self.cache_dir, split, image_size)
        unreadable = ensure_image_cache(image_dir, split_names.tolist(), image_size, self.cache_dir, split,
                                        view="square", num_workers=num_workers, progress=progress,
                                        skip_unreadable=skip_unreadable,
                                        desc=f"Caching {labels.root.name} {split} at {image_size}px")
        self._memmap: np.ndarray | None = None
        rows = np.arange(len(split_names)) if images is None else self._rows_for(images, split_names)
        self._set_rows(self._without_unreadable(rows, unreadable, image_dir))

    def _not_in_dataset(self, name: str, within: pd.Index) -> str:
        if name in self._labels.attributes.index:
            if len(within) != len(self._split_names):
                return f"image {name!r} is not in this {self.split} dataset: it is not part of this subset"
            return (f"image {name!r} is not in this {self.split} dataset: it belongs to the "
                    f"{self._labels.split.loc[name]} split")
        return f"image {name!r} is not listed in {self._labels.root / LABELS_FILE}"

    def _set_rows(self, rows: np.ndarray) -> None:
        self._rows = rows
        self._positions = self._split_positions[rows]
        self._targets = self._labels.attributes.to_numpy()[self._positions].astype(np.float32)
        self._landmarks = np.full((len(rows), 5, 2), np.nan, dtype=np.float32)

    @property
    def root(self) -> Path:
        """The folder holding ``labels.csv``."""
        return self._labels.root

    @property
    def labels(self) -> FolderLabels:
        """The whole label table (every split; shared, read-only)."""
        return self._labels

    @property
    def attributes(self) -> pd.DataFrame:
        """0/1 ``uint8`` labels of this dataset's images, one column per label in :attr:`label_space` order."""
        return self._labels.attributes.iloc[self._positions]

    @property
    def has_landmarks(self) -> bool:
        """Always ``False``: a folder dataset has no facial landmarks."""
        return False

    def require_landmarks(self, feature: str) -> None:
        """Raise :class:`~cocam.celeba.DatasetNotFoundError`: ``feature`` needs landmarks, which this dataset lacks."""
        raise DatasetNotFoundError(f"{feature} needs facial landmarks, and the folder dataset {self.root} has none: "
                                   f"use the template transfer (--transfer template).")

    def __repr__(self) -> str:
        subset = "" if len(self._rows) == len(self._split_names) else f" of {len(self._split_names)}"
        return (f"FolderDataset(root='{self.root}', split={self.split!r}, n={len(self)}{subset}, "
                f"labels={list(self.label_space.names)}, image_size={self._image_size}, cache='{self._cache_path}')")


def open_dataset(root: str | os.PathLike, split: str = "train", **kwargs: Any) -> CachedImageDataset:
    """The dataset at ``root``: a :class:`FolderDataset` when ``root/labels.csv`` exists, else a CelebA layout.

    ``kwargs`` go to the dataset class (``image_size``, ``images``, ``cache_dir``, ...).

    Raises:
        DatasetNotFoundError: ``root`` is neither (the message names both layouts).
    """
    if is_folder_dataset(root):
        return FolderDataset(root, split, **kwargs)
    try:
        find_celeba_dir(root)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(f"{exc} Or, for a dataset of your own: <root>/{LABELS_FILE} and "
                                   f"<root>/{IMAGES_DIR}/ (see cocam.folder).") from None
    return CelebADataset(root, split, **kwargs)


def dataset_label_space(root: str | os.PathLike) -> LabelSpace:
    """The label space of the dataset at ``root`` without opening its images: ``labels.csv``'s, else CelebA's."""
    return read_folder_labels(root).label_space if is_folder_dataset(root) else CELEBA


def read_labels(root: str | os.PathLike) -> Any:
    """The label table of every image at ``root``: ``.attributes`` (0/1 frame, one column per label) and ``.split``.

    :func:`read_folder_labels` for a folder dataset, :func:`cocam.celeba.load_annotations` for a
    CelebA layout; both carry these two fields, which is all :func:`cocam.cooccurrence.cooccurrence`
    and :func:`cocam.cooccurrence.suggest_pairs` read.
    """
    return read_folder_labels(root) if is_folder_dataset(root) else load_annotations(root)


def label_files(root: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(dataset folder, the files its labels and splits come from)``: what a score depends on besides a model."""
    if is_folder_dataset(root):
        folder = Path(root).expanduser().resolve()
        return folder, [folder / LABELS_FILE]
    folder = find_celeba_dir(root)
    return folder, [folder / f for f in ("list_attr_celeba.txt", "list_eval_partition.txt")]
