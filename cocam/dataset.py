"""A torch Dataset over a CelebA split with a decoded ``uint8`` memory-mapped image cache.

Image pipeline (shared by every model input, mask and landmark in cocam): open the aligned
178x218 JPEG, convert to RGB, crop :data:`cocam.geometry.CROP_BOX` (the central 178x178
square) and resize to ``image_size`` x ``image_size`` with PIL's bilinear filter
(``Image.resize(..., Image.Resampling.BILINEAR)``, which is antialiased: its support widens
with the downscale factor).

Decoding JPEGs is the slow part of training, so each (split, image size) is decoded once into
``<cache_dir>/<split>_<size>px.uint8``, a raw ``(N, S, S, 3)`` ``uint8`` array that is memory
mapped afterwards, plus a JSON sidecar recording the image count, size and a fingerprint of
the split's image names. The array is written to a temporary file, fsync'ed and renamed; the
sidecar is written last, so an interrupted build is never mistaken for a complete one. A
sidecar whose fingerprint disagrees (other images, other size) triggers a rebuild. Subsets
index into their split's cache.

Two ways to read batches:

* ``CelebADataset[i]`` → ``(image, target, landmarks)``: normalised float32 image, works with a
  plain :class:`torch.utils.data.DataLoader`.
* :func:`iterate_batches` / :class:`BatchLoader`: one fancy-index into the memmap per batch
  (:meth:`CelebADataset.get_batch`), ``uint8`` transfer to the device and normalisation there.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import multiprocessing
import operator
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.celeba import (
    ATTR_FILE,
    IMAGE_DIR,
    LANDMARK_COLUMNS,
    CelebAAnnotations,
    DatasetNotFoundError,
    load_annotations,
    select_images,
    validate_split,
)
from cocam.errors import CocamError
from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH, CROP_BOX, aligned_to_input
from cocam.io import atomic_write_text

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchLoader",
    "CelebADataset",
    "ImageReadError",
    "decode_image",
    "iterate_batches",
    "CACHE_DIRNAME",
    "cache_files",
    "normalize_uint8",
]

#: Per-channel RGB mean and standard deviation of ImageNet (inputs are scaled to [0, 1] first).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_CACHE_VERSION = 1
#: Folder of the decoded-image cache inside ``celeba/`` (unless ``cache_dir=`` says otherwise).
CACHE_DIRNAME = ".cocam_cache"
_CHUNK = 128  # images per task sent to a decode worker
_MIN_IMAGES_FOR_POOL = 256  # below this, decoding in-process beats starting workers
_FINGERPRINT_SAMPLES = 32  # JPEG file sizes mixed into the fingerprint


class ImageReadError(CocamError, OSError):
    """A CelebA image exists but cannot be decoded (or has the wrong size)."""


# --------------------------------------------------------------------------------------------
# Image decoding and normalisation
# --------------------------------------------------------------------------------------------


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one aligned CelebA JPEG into the model-input view: ``(S, S, 3)`` ``uint8`` RGB.

    Crops :data:`~cocam.geometry.CROP_BOX` and resizes with PIL's antialiased bilinear filter.

    Raises:
        DatasetNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded or is not 178x218.
    """
    try:
        with Image.open(path) as image:
            if image.size != (ALIGNED_WIDTH, ALIGNED_HEIGHT):
                raise ImageReadError(
                    f"Image {path} is {image.size[0]}x{image.size[1]}; CelebA aligned images are "
                    f"{ALIGNED_WIDTH}x{ALIGNED_HEIGHT} (img_align_celeba)"
                )
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise DatasetNotFoundError(
            f"Image file not found: {path}\nEvery image listed in {ATTR_FILE} must exist in {IMAGE_DIR}/. "
            "Re-extract the images, or regenerate the synthetic dataset with `cocam generate`."
        ) from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"Cannot read image {path}: {exc}") from exc
    view = rgb.crop(CROP_BOX)
    if view.size != (image_size, image_size):
        view = view.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(view, dtype=np.uint8)


# The cache builder looks this name up at call time (tests replace it to count or fail decodes).
_decode_image = decode_image


def _decode_or_skip(path: str | os.PathLike, size: int, skip: bool) -> np.ndarray | None:
    """Decode one image; with ``skip``, ``None`` for a missing or undecodable file instead of an error."""
    try:
        return _decode_image(path, size)
    except (ImageReadError, DatasetNotFoundError):
        if not skip:
            raise
        return None


def _decode_chunk(task: tuple[str, list[str], int, int, bool]) -> tuple[int, np.ndarray, list[int]]:
    """Worker: decode ``names`` from ``image_dir``; returns (offset, (n, S, S, 3) uint8, unreadable positions)."""
    image_dir, names, offset, size, skip = task
    out = np.zeros((len(names), size, size, 3), dtype=np.uint8)
    bad: list[int] = []
    for j, name in enumerate(names):
        pixels = _decode_or_skip(os.path.join(image_dir, name), size, skip)
        if pixels is None:
            bad.append(offset + j)
        else:
            out[j] = pixels
    return offset, out, bad


def normalize_uint8(images: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """Convert ``uint8`` images ``(N, 3, H, W)`` or ``(3, H, W)`` to ImageNet-normalised float32.

    Runs on the tensor's device: ``(x / 255 - mean) / std`` per channel, computed as
    ``(x - 255·mean) · (1 / (255·std))`` in two passes over a float copy made in the output's
    memory format (a channels-last view of an ``(N, H, W, 3)`` batch is converted without a
    transposing float copy). With ``channels_last`` a 4-D result uses the channels-last memory
    format, otherwise it is contiguous.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects a uint8 tensor, got {images.dtype}")
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"normalize_uint8 expects (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    shape = (3, 1, 1) if images.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(shape)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)  # uint8: a cheap byte copy, if any
    else:
        images = images.contiguous()
    return images.to(torch.float32).sub_(mean * 255.0).mul_((std * 255.0).reciprocal())


# --------------------------------------------------------------------------------------------
# The decoded-image cache
# --------------------------------------------------------------------------------------------


def cache_files(cache_dir: str | os.PathLike, split: str, image_size: int) -> tuple[Path, Path]:
    """``(images, metadata)`` paths of a split's decoded-image cache in ``cache_dir``.

    The default ``cache_dir`` is ``<celeba>/.cocam_cache``; the cache is complete when both exist
    and the metadata matches (:class:`CelebADataset` checks and rebuilds it).
    """
    cache_dir = Path(cache_dir)
    return cache_dir / f"{split}_{image_size}px.uint8", cache_dir / f"{split}_{image_size}px.json"


def _fingerprint(image_dir: Path, names: Sequence[str], image_size: int) -> str:
    """Hash of the pipeline settings, the image names and the sizes of a sample of the JPEGs."""
    digest = hashlib.sha256()
    digest.update(
        f"cocam-image-cache v{_CACHE_VERSION} size={image_size} crop={CROP_BOX} resample=bilinear\n".encode()
    )
    digest.update("\n".join(names).encode("utf-8"))
    if len(names):
        picks = np.unique(np.linspace(0, len(names) - 1, min(len(names), _FINGERPRINT_SAMPLES)).astype(int))
        for i in picks.tolist():
            try:
                size = os.stat(image_dir / names[i]).st_size
            except OSError:
                size = -1
            digest.update(f"\n{names[i]}:{size}".encode())
    return digest.hexdigest()


def _cache_is_valid(data_path: Path, meta_path: Path, expected: Mapping[str, Any]) -> bool:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return False
    n, size = expected["count"], expected["image_size"]
    try:
        return data_path.stat().st_size == n * size * size * 3
    except OSError:
        return False


def _file_mode() -> int:
    """Permissions of a newly created regular file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _build_cache(
    image_dir: Path,
    names: Sequence[str],
    image_size: int,
    data_path: Path,
    meta_path: Path,
    meta: Mapping[str, Any],
    *,
    num_workers: int,
    progress: bool,
    desc: str,
    skip_unreadable: bool = False,
) -> list[str]:
    """Decode every image into ``data_path``: temporary file, fsync, rename, then the sidecar.

    With ``skip_unreadable``, a missing or undecodable image is left as zeros and its name is
    recorded in the sidecar's ``"unreadable"`` list (returned); otherwise it is an error.
    """
    n = len(names)
    nbytes = n * image_size * image_size * 3
    cache_dir = data_path.parent
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()  # from here on the old cache is invalid, whatever happens
    free = shutil.disk_usage(cache_dir).free
    if nbytes > free:
        raise OSError(
            f"Not enough disk space for the image cache {data_path}: needs {nbytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free. Pass cache_dir= to put it elsewhere or use a smaller image_size."
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{data_path.name}.tmp-", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    mode = _file_mode()
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)  # mkstemp's 0600 would hide a shared cache from other users
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, image_size, image_size, 3))
        with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
            bad: list[int] = []
            if num_workers <= 1 or n < _MIN_IMAGES_FOR_POOL:
                for i, name in enumerate(names):
                    pixels = _decode_or_skip(image_dir / name, image_size, skip_unreadable)
                    if pixels is None:
                        bad.append(i)
                        array[i] = 0
                    else:
                        array[i] = pixels
                    bar.update(1)
            else:
                tasks = [
                    (str(image_dir), list(names[i : i + _CHUNK]), i, image_size, skip_unreadable)
                    for i in range(0, n, _CHUNK)
                ]
                with multiprocessing.get_context().Pool(num_workers) as pool:
                    for offset, block, block_bad in pool.imap_unordered(_decode_chunk, tasks):
                        array[offset : offset + len(block)] = block
                        bad.extend(block_bad)
                        bar.update(len(block))
        unreadable = [names[i] for i in sorted(bad)]
        meta = {**meta, "unreadable": unreadable}
        array.flush()
        del array
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, data_path)
        with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
            dir_fd = os.open(cache_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        atomic_write_text(meta_path, json.dumps(dict(meta), indent=2) + "\n")
        with contextlib.suppress(OSError):
            os.chmod(meta_path, mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return unreadable


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def _as_indices(indices: Any, n: int) -> np.ndarray:
    """Validate ``indices`` (ints, array, tensor) against length ``n``; negatives wrap."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.dtype == bool:
        raise TypeError("get_batch takes integer indices, not a boolean mask")
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"get_batch takes integer indices, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if (idx >= n).any() or (idx < -n).any():
        bad = int(idx[(idx >= n) | (idx < -n)][0])
        raise IndexError(f"index {bad} is out of range for a dataset of {n} images")
    return np.where(idx < 0, idx + n, idx)


class CelebADataset(torch.utils.data.Dataset):
    """CelebA images of one split (or a subset of it) with attributes and landmarks.

    Args:
        root: the folder containing ``celeba/``, or ``celeba/`` itself.
        split: ``"train"``, ``"valid"``, ``"test"`` or ``"all"``.
        image_size: side of the square model input in pixels.
        images: restrict to these image names (all must belong to ``split``), in this order.
        transform: applied to the normalised ``(3, S, S)`` float image in ``__getitem__``.
        cache_dir: where the decoded-image cache lives (default ``<celeba>/.cocam_cache``).
        num_workers: decode processes used when the cache is built (``<= 1``: in-process).
        progress: show a progress bar while building the cache.
        skip_unreadable: what to do with a listed image that is missing or cannot be decoded
            while the cache is built. ``False`` (default): raise (:class:`ImageReadError` or
            :class:`~cocam.celeba.DatasetNotFoundError`, naming the file). ``True``: warn
            (:class:`UserWarning` naming each such file) and leave it out of the dataset. The
            names are recorded in the cache's sidecar, so a later construction with the same
            cache leaves out the same images (and warns again); a construction with
            ``skip_unreadable=False`` over such a cache rebuilds it and raises. An image passed
            in ``images`` that is unreadable is left out as well.

    Items are ``(image, target, landmarks)``: float32 ``(3, S, S)`` ImageNet-normalised,
    float32 ``(40,)`` 0/1 in :data:`~cocam.attributes.CELEBA_ATTRIBUTES` order, float32 ``(5, 2)``
    (x, y) of the eyes, nose and mouth corners in model-input pixels.
    """

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
        skip_unreadable: bool = False,
    ) -> None:
        split = validate_split(split)
        try:
            image_size = operator.index(image_size)
        except TypeError:
            raise TypeError(f"image_size must be an int, got {image_size!r}") from None
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        annotations = load_annotations(root)
        image_dir = annotations.image_dir
        if not image_dir.is_dir():
            raise DatasetNotFoundError(
                f"Image folder not found: {image_dir}\n"
                f"Expected the aligned JPEGs in <root>/celeba/{IMAGE_DIR}/000001.jpg ... "
                "(the layout of torchvision.datasets.CelebA). "
                "To use the synthetic dataset instead, generate it with `cocam generate`."
            )
        self._annotations = annotations
        self.split = split
        self._image_size = image_size
        self.transform = transform
        split_names = annotations.names(split)
        self._split_names = split_names
        # Positions of the split's images in the annotation tables (file order).
        self._split_positions = (
            np.arange(len(annotations.attributes))
            if split == "all"
            else np.flatnonzero((annotations.split == split).to_numpy())
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else annotations.root / CACHE_DIRNAME
        self._cache_path, self._meta_path = cache_files(self.cache_dir, split, image_size)
        unreadable = self._ensure_cache(num_workers=num_workers, progress=progress, skip_unreadable=skip_unreadable)
        self._memmap: np.ndarray | None = None
        rows = np.arange(len(split_names)) if images is None else self._rows_for(images, split_names)
        if unreadable:
            warnings.warn(
                f"Skipping {len(unreadable)} unreadable image(s) in {self._annotations.image_dir}: "
                + ", ".join(unreadable),
                UserWarning,
                stacklevel=2,
            )
            rows = rows[~np.isin(rows, split_names.get_indexer(unreadable))]
        self._set_rows(rows)

    # -- construction helpers ----------------------------------------------------------------

    def _ensure_cache(self, *, num_workers: int, progress: bool, skip_unreadable: bool = False) -> list[str]:
        """Build the split cache if needed; the names of the images it could not read (skipped)."""
        names = self._split_names.tolist()
        size = self._image_size
        meta = {
            "format": "cocam-image-cache",
            "version": _CACHE_VERSION,
            "split": self.split,
            "count": len(names),
            "image_size": size,
            "shape": [len(names), size, size, 3],
            "dtype": "uint8",
            "crop_box": list(CROP_BOX),
            "resample": "bilinear",
            "fingerprint": _fingerprint(self._annotations.image_dir, names, size),
        }
        if not names:
            return []
        if _cache_is_valid(self._cache_path, self._meta_path, meta):
            try:
                unreadable = list(json.loads(self._meta_path.read_text(encoding="utf-8")).get("unreadable") or [])
            except (OSError, ValueError):
                unreadable = None
            if unreadable is not None and (skip_unreadable or not unreadable):
                return unreadable
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(
                f"Cannot create the image cache folder {self.cache_dir} ({exc}); pass cache_dir= to "
                "CelebADataset to put the cache somewhere writable."
            ) from exc
        return _build_cache(
            self._annotations.image_dir,
            names,
            size,
            self._cache_path,
            self._meta_path,
            meta,
            num_workers=num_workers,
            progress=progress,
            desc=f"Caching CelebA {self.split} at {size}px",
            skip_unreadable=skip_unreadable,
        )

    def _rows_for(self, names: Iterable[str], within: pd.Index) -> np.ndarray:
        """Positions in ``within`` of ``names``; errors name the first unknown or repeated one."""
        wanted = pd.Index([str(n) for n in names])
        if wanted.has_duplicates:
            raise ValueError(f"image {wanted[wanted.duplicated()][0]!r} is listed more than once")
        rows = within.get_indexer(wanted)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            name = wanted[missing[0]]
            everything = self._annotations.attributes.index
            if name in everything:
                where = f"it belongs to the {self._annotations.split.loc[name]!s} split"
                if len(within) != len(self._split_names):
                    where = "it is not part of this subset"
                raise ValueError(f"image {name!r} is not in this {self.split} dataset: {where}")
            raise ValueError(f"image {name!r} is not listed in the CelebA annotations of {self.root}")
        return rows.astype(np.int64)

    def _set_rows(self, rows: np.ndarray) -> None:
        """Select the rows (positions in the split cache) this dataset serves."""
        self._rows = rows
        positions = self._split_positions[rows]
        self._positions = positions
        attributes = self._annotations.attributes
        order = [attributes.columns.get_loc(name) for name in CELEBA_ATTRIBUTES]
        self._targets = attributes.to_numpy()[positions][:, order].astype(np.float32)
        aligned = self._annotations.landmarks.to_numpy()[positions].reshape(-1, 5, 2)
        self._landmarks = aligned_to_input(aligned, self._image_size).astype(np.float32)

    # -- basic properties --------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The ``celeba/`` folder."""
        return self._annotations.root

    @property
    def annotations(self) -> CelebAAnnotations:
        """All annotations of the dataset folder (shared, read-only)."""
        return self._annotations

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self._image_size

    @property
    def cache_path(self) -> Path:
        """The memory-mapped ``(N, S, S, 3)`` ``uint8`` array of this dataset's split."""
        return self._cache_path

    @property
    def names(self) -> pd.Index:
        """Image file names of this dataset, in item order."""
        return self._split_names[self._rows]

    @property
    def attributes(self) -> pd.DataFrame:
        """0/1 ``uint8`` attributes of this dataset's images (columns in CELEBA_ATTRIBUTES order)."""
        return self._annotations.attributes.iloc[self._positions][list(CELEBA_ATTRIBUTES)]

    @property
    def landmarks_aligned(self) -> pd.DataFrame:
        """Landmarks of this dataset's images in aligned 178x218 image pixels."""
        return self._annotations.landmarks.iloc[self._positions][list(LANDMARK_COLUMNS)]

    @property
    def targets(self) -> np.ndarray:
        """(N, 40) float32 0/1 targets in item order (read-only view)."""
        view = self._targets.view()
        view.flags.writeable = False
        return view

    @property
    def landmarks(self) -> np.ndarray:
        """(N, 5, 2) float32 landmarks in model-input pixels, in item order (read-only view)."""
        view = self._landmarks.view()
        view.flags.writeable = False
        return view

    @property
    def _images(self) -> np.ndarray:
        """The split cache, memory-mapped lazily (once per process)."""
        if self._memmap is None:
            n, size = len(self._split_names), self._image_size
            if n == 0:
                self._memmap = np.zeros((0, size, size, 3), dtype=np.uint8)
            else:
                self._memmap = np.memmap(self._cache_path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return self._memmap

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        subset = "" if len(self._rows) == len(self._split_names) else f" of {len(self._split_names)}"
        return (
            f"CelebADataset(root='{self.root}', split={self.split!r}, n={len(self)}{subset}, "
            f"image_size={self._image_size}, cache='{self._cache_path}')"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_memmap"] = None  # re-opened in the receiving process, never pickled as data
        return state

    # -- items and batches -------------------------------------------------------------------

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self)
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} images")
        i %= n
        pixels = np.array(self._images[self._rows[i]])  # (S, S, 3) copy out of the memmap
        image = normalize_uint8(torch.from_numpy(pixels).permute(2, 0, 1))
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self._targets[i].copy()), torch.from_numpy(self._landmarks[i].copy())

    def get_batch_numpy(self, indices: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`get_batch` but returns numpy: images ``(N, S, S, 3)`` ``uint8`` (NHWC)."""
        idx = _as_indices(indices, len(self))
        rows = self._rows[idx]
        images = self._images
        if rows.size and (rows.size == 1 or (np.diff(rows) > 0).all()):
            if rows[-1] - rows[0] + 1 == rows.size:
                pixels = np.array(images[rows[0] : rows[-1] + 1])  # contiguous block: one slice
            else:
                pixels = np.asarray(images[rows])
        elif rows.size:
            order = np.argsort(rows, kind="stable")  # read in file order for locality
            pixels = np.empty((rows.size, *images.shape[1:]), dtype=np.uint8)
            pixels[order] = images[rows[order]]
        else:
            pixels = np.zeros((0, *images.shape[1:]), dtype=np.uint8)
        return pixels, self._targets[idx], self._landmarks[idx]

    def get_batch(
        self, indices: Any, *, channels_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read several items at once, without normalisation (the fast path).

        Args:
            indices: item indices (sequence, numpy array or tensor of ints).
            channels_last: return the images as an NHWC-strided view (channels-last memory
                format) instead of a contiguous NCHW tensor.

        Returns:
            ``uint8`` images ``(N, 3, S, S)``, float32 targets ``(N, 40)``, float32 landmarks
            ``(N, 5, 2)``, in the order of ``indices``.
        """
        pixels, targets, landmarks = self.get_batch_numpy(indices)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if not channels_last:
            images = images.contiguous()
        return images, torch.from_numpy(targets), torch.from_numpy(landmarks)

    # -- subsets -----------------------------------------------------------------------------

    def subset_names(self, names: Iterable[str]) -> CelebADataset:
        """A dataset of the given images (all must be in this dataset), sharing the same cache."""
        rows = self._rows[self._rows_for(names, self.names)]
        derived = copy.copy(self)
        derived._set_rows(rows)
        return derived

    def subset(self, conditions: Mapping[str, int | bool] | None = None, /, **kwargs: int | bool) -> CelebADataset:
        """The images matching attribute conditions, e.g. ``ds.subset(Wearing_Lipstick=1)``.

        Conditions can be given as a mapping (needed for ``5_o_Clock_Shadow``) and/or keywords;
        see :func:`cocam.celeba.select_images`. The result shares this dataset's cache.
        """
        merged: dict[str, int | bool] = dict(conditions or {})
        for name, value in kwargs.items():
            if name in merged:
                raise ValueError(f"Condition on {name!r} given twice")
            merged[name] = value
        return self.subset_names(select_images(self.attributes, merged))

    def resampled(self, indices: Any) -> CelebADataset:
        """A dataset serving the given item indices, repeats allowed (a resample), sharing the cache.

        An index listed k times is served k times per epoch — what group-balanced training
        needs (:func:`cocam.groups.balanced_resample`). The result's :attr:`names` repeat, so
        selecting from it by name is refused.
        """
        idx = _as_indices(indices, len(self))
        if idx.size == 0:
            raise ValueError("a resample needs at least one image.")
        derived = copy.copy(self)
        derived._set_rows(self._rows[idx])
        return derived


# --------------------------------------------------------------------------------------------
# Fast batch iteration
# --------------------------------------------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    seed, epoch = operator.index(seed), operator.index(epoch)
    state = np.random.SeedSequence([abs(seed), int(seed < 0), abs(epoch), int(epoch < 0)]).generate_state(2)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return generator


def iterate_batches(
    dataset: CelebADataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images, targets, landmarks)`` batches on ``device``.

    Each batch is one :meth:`CelebADataset.get_batch` read; the ``uint8`` images are moved to
    the device (from pinned memory with a non-blocking copy on CUDA) and converted to
    normalised float32 there. With ``shuffle`` the order is a permutation drawn from a
    :class:`torch.Generator` seeded by ``(seed, epoch)``: the same pair gives the same order,
    and every index appears exactly once per epoch.
    """
    batch_size = operator.index(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = len(dataset)
    order = torch.randperm(n, generator=_epoch_generator(seed, epoch)).numpy() if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        pixels, targets, landmarks = dataset.get_batch_numpy(idx)
        host = [torch.from_numpy(pixels), torch.from_numpy(targets), torch.from_numpy(landmarks)]
        if cuda:
            host = [t.pin_memory() for t in host]
        images_u8, targets_t, landmarks_t = (t.to(device, non_blocking=cuda) for t in host)
        images = normalize_uint8(images_u8.permute(0, 3, 1, 2), channels_last=channels_last)
        yield images, targets_t, landmarks_t


class BatchLoader:
    """Re-iterable batches of a :class:`CelebADataset` for training loops (see :func:`iterate_batches`).

    Call :meth:`set_epoch` before each epoch to get a new (deterministic) shuffle order.

    **Sharding for data-parallel training** (``num_replicas > 1``): ``batch_size`` is the
    *global* batch. Every replica draws the same shuffled order (it depends on ``seed`` and the
    epoch only), cuts it into the same global batches of ``batch_size`` images, and replica
    ``rank`` yields the ``rank``-th contiguous :attr:`local_batch_size` ``= batch_size /
    num_replicas`` images of each. The replicas' batches of one step are disjoint and together
    are exactly the batch a single loader with the same ``batch_size`` yields.
    ``batch_size`` must be divisible by ``num_replicas``, and sharding needs ``drop_last=True``
    (every replica then gets the same number of equal batches; ``len()`` is the number of
    global batches).
    """

    def __init__(
        self,
        dataset: CelebADataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        batch_size = operator.index(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rank, num_replicas = operator.index(rank), operator.index(num_replicas)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..num_replicas-1 with num_replicas >= 1, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        if num_replicas > 1:
            if batch_size % num_replicas:
                raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by num_replicas "
                                 f"{num_replicas}")
            if not drop_last:
                raise ValueError("sharding a BatchLoader over replicas (num_replicas > 1) needs drop_last=True, "
                                 "so that every replica gets equal batches")
        self.rank = rank
        self.num_replicas = num_replicas
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of the next iteration."""
        self.epoch = operator.index(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def local_batch_size(self) -> int:
        """Images per batch yielded by this replica (``batch_size / num_replicas``)."""
        return self.batch_size // self.num_replicas

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        source = self.dataset
        if self.num_replicas > 1:
            lo = self.rank * self.local_batch_size
            source = _ShardView(self.dataset, slice(lo, lo + self.local_batch_size))  # type: ignore[assignment]
        return iterate_batches(
            source,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=self.drop_last,
            device=self.device,
            channels_last=self.channels_last,
        )

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={len(self.dataset)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, epoch={self.epoch}, device='{self.device}'"
            + (f", rank={self.rank}, num_replicas={self.num_replicas})" if self.num_replicas > 1 else ")")
        )


class _ShardView:
    """A dataset as :func:`iterate_batches` sees it, reading only ``part`` of each batch's indices.

    :func:`iterate_batches` draws the order and cuts the (global) batches over ``len(dataset)``
    images; every batch read goes through :meth:`get_batch_numpy`, which keeps this replica's
    slice of the indices, so the order, ``drop_last`` and the device transfer stay in one place.
    """

    def __init__(self, dataset: CelebADataset, part: slice) -> None:
        self._dataset = dataset
        self._part = part

    def __len__(self) -> int:
        return len(self._dataset)

    def get_batch_numpy(self, indices: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._dataset.get_batch_numpy(np.asarray(indices)[self._part])
