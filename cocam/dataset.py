"""A torch Dataset over a CelebA split with a decoded ``uint8`` memory-mapped image cache.

Image pipeline (shared by every model input, mask and landmark in cocam): open the aligned
178x218 JPEG, convert to RGB, crop :data:`cocam.geometry.CROP_BOX` (the central 178x178
square) and resize to ``image_size`` x ``image_size`` with PIL's bilinear filter
(``Image.resize(..., Image.Resampling.BILINEAR)``, which is antialiased: its support widens
with the downscale factor).

Decoding JPEGs is the slow part of training, so each (split, image size) is decoded once into
``<cache_dir>/<split>_<size>px.uint8``, a raw ``(N, S, S, 3)`` ``uint8`` array that is memory
mapped afterwards, plus a JSON sidecar recording the image count, size and a fingerprint of
the split's image names, file sizes and modification times (one ``stat`` per image). The
array is written to a temporary file, fsync'ed and renamed; the sidecar is written last, so an
interrupted build is never mistaken for a complete one; temporaries left by a killed build are
deleted by the next build (builds hold a lock file). A sidecar whose fingerprint disagrees
(other images, a replaced image, other size) triggers a rebuild. Subsets index into their
split's cache. Where the cache lives is decided by :func:`default_cache_dir`: real CelebA is
cached under the user's cache folder, never inside the dataset folder unless asked.

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
from typing import Any, Protocol, runtime_checkable

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
    find_celeba_dir,
    load_annotations,
    select_images,
    validate_split,
)
from cocam.errors import CocamError
from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH, CROP_BOX, aligned_to_input
from cocam.io import atomic_write_text, exclusive_lock
from cocam.labels import CELEBA, LabelSpace

__all__ = [
    "CACHE_DIRNAME",
    "CACHE_ENV",
    "SKIP_UNREADABLE_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIEWS",
    "BatchLoader",
    "CachedImageDataset",
    "CelebADataset",
    "LabelledImages",
    "ImageCacheError",
    "ImageReadError",
    "cache_files",
    "check_image_size",
    "decode_image",
    "decode_square_image",
    "default_cache_dir",
    "ensure_image_cache",
    "label_space_of_dataset",
    "iterate_batches",
    "normalize_uint8",
    "unreadable_list_path",
    "user_cache_root",
]

#: Per-channel RGB mean and standard deviation of ImageNet (inputs are scaled to [0, 1] first).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_CACHE_VERSION = 1
#: Folder of the decoded-image cache inside ``celeba/`` (unless ``cache_dir=`` says otherwise).
CACHE_DIRNAME = ".cocam_cache"
_CHUNK = 128  # images per task sent to a decode worker
_MIN_IMAGES_FOR_POOL = 256  # below this, decoding in-process beats starting workers
#: Environment variable naming the folder under which decoded-image caches are kept.
CACHE_ENV = "COCAM_CACHE_DIR"
#: Environment variable: ``1`` makes ``skip_unreadable=None`` (the default) skip unreadable images
#: (the CLI's ``--skip-unreadable`` sets it for the command's run, reaching every dataset it builds).
SKIP_UNREADABLE_ENV = "COCAM_SKIP_UNREADABLE"
_UNREADABLE_SHOWN = 5  # unreadable images named in the warning (all are listed in a file)
_SKIP_HINT = "or pass skip_unreadable=True (CLI: --skip-unreadable) to leave such images out"


class ImageReadError(CocamError, OSError):
    """A CelebA image exists but cannot be decoded (or has the wrong size)."""


class ImageCacheError(CocamError, OSError):
    """The decoded-image cache cannot be written (no writable folder, not enough space)."""


# --------------------------------------------------------------------------------------------
# Where the decoded-image cache lives
# --------------------------------------------------------------------------------------------


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/cocam``, or ``~/.cache/cocam`` when that variable is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cocam"


def _dataset_key(folder: Path) -> str:
    """A folder name unique to a dataset: its folder's name and a hash of its resolved path."""
    resolved = folder.resolve()
    return f"{resolved.name}-{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16]}"


def _is_writable(path: Path) -> bool:
    """Whether new files can be created in the folder ``path`` (tests replace this: root writes anywhere)."""
    return os.access(path, os.W_OK | os.X_OK)


def default_cache_dir(root: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Where the decoded images of the dataset at ``root`` are cached when no ``cache_dir`` is given.

    The rule, in order:

    1. ``$COCAM_CACHE_DIR`` set: ``$COCAM_CACHE_DIR/<dataset key>`` (the CLI's ``--cache-dir``
       sets it for the command's run).
    2. A dataset cocam generated (its ``cocam_synthetic.json`` marker is present) in a writable
       folder: ``<dataset>/.cocam_cache``, inside the folder cocam made.
    3. Anything else — real CelebA, a folder dataset (:mod:`cocam.folder`), or a generated
       dataset in a read-only folder:
       :func:`user_cache_root` ``/<dataset key>``. A real dataset folder is never written to
       unless ``cache_dir=`` (or ``--cache-dir``) points into it.

    The dataset key is the dataset folder's name and a hash of its resolved path, so several
    datasets share one cache root without mixing. ``base`` given: ``base/<dataset key>``
    (what a workspace's own cache folder uses).
    """
    from cocam.folder import is_folder_dataset
    from cocam.synthetic.generate import MARKER_FILE

    folder = Path(root).expanduser().resolve() if is_folder_dataset(root) else find_celeba_dir(root)
    if base is not None:
        return Path(base).expanduser() / _dataset_key(folder)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / _dataset_key(folder)
    if (folder / MARKER_FILE).is_file() and _is_writable(folder):
        return folder / CACHE_DIRNAME
    return user_cache_root() / _dataset_key(folder)


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
            f"Image file not found: {path}. Every image listed in {ATTR_FILE} must exist in {IMAGE_DIR}/: "
            "re-extract the images, or regenerate the synthetic dataset with `cocam generate`."
        ) from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"Cannot read image {path}: {exc}") from exc
    view = rgb.crop(CROP_BOX)
    if view.size != (image_size, image_size):
        view = view.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(view, dtype=np.uint8)


def decode_square_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode an image of any size into the model-input view: ``(S, S, 3)`` ``uint8`` RGB.

    The rule of a folder dataset (:mod:`cocam.folder`): convert to RGB, crop the largest
    centred square — side ``m = min(W, H)``, left ``⌊(W − m)/2⌋``, top ``⌊(H − m)/2⌋`` — and
    resize it to ``S × S`` with PIL's antialiased bilinear filter (as for CelebA). Nothing is
    stretched: a wide image loses equal strips left and right, a tall one top and bottom.

    Raises:
        DatasetNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise DatasetNotFoundError(
            f"Image file not found: {path}. Every image listed in labels.csv must exist in images/: add the "
            "file or remove its row"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"Cannot read image {path}: {exc}") from exc
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    view = rgb.crop((left, top, left + side, top + side))
    if view.size != (image_size, image_size):
        view = view.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(view, dtype=np.uint8)


# The cache builder looks these names up at call time (tests replace them to count or fail decodes).
_decode_image = decode_image
_decode_square_image = decode_square_image

#: How a cache's images are cut to the square model input: ``"aligned"`` (CelebA's 178x218
#: aligned faces, :func:`decode_image`) or ``"square"`` (any size, centre square: :func:`decode_square_image`).
VIEWS: tuple[str, ...] = ("aligned", "square")


def _decode_or_skip(path: str | os.PathLike, size: int, skip: bool, view: str = "aligned") -> np.ndarray | None:
    """Decode one image; with ``skip``, ``None`` for a missing or undecodable file instead of an error."""
    try:
        return (_decode_image if view == "aligned" else _decode_square_image)(path, size)
    except (ImageReadError, DatasetNotFoundError):
        if not skip:
            raise
        return None


def _decode_chunk(
    task: tuple[str, list[str], int, int, bool, str],
) -> tuple[int, np.ndarray, list[int], tuple[int, str, str] | None]:
    """Worker: decode ``names`` from ``image_dir``.

    Returns (offset, (n, S, S, 3) uint8, unreadable positions, error). Without ``skip`` the
    chunk stops at its first unreadable image and ``error`` is (position, ``"missing"`` or
    ``"unreadable"``, message): the parent raises it as one clear error, never as a traceback
    of the worker process.
    """
    image_dir, names, offset, size, skip, view = task
    out = np.zeros((len(names), size, size, 3), dtype=np.uint8)
    bad: list[int] = []
    for j, name in enumerate(names):
        try:
            pixels = _decode_or_skip(os.path.join(image_dir, name), size, skip, view)
        except DatasetNotFoundError as exc:
            return offset, out, bad, (offset + j, "missing", str(exc))
        except ImageReadError as exc:
            return offset, out, bad, (offset + j, "unreadable", str(exc))
        if pixels is None:
            bad.append(offset + j)
        else:
            out[j] = pixels
    return offset, out, bad, None


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


def _image_stats(image_dir: Path, names: Sequence[str]) -> list[tuple[int, int] | None]:
    """(size, modification time in ns) of every listed image, ``None`` where it is missing.

    One ``stat`` per image and no read: cheap next to decoding (a fraction of a second for
    CelebA's 162,770 training images on a local disk).
    """
    stats: list[tuple[int, int] | None] = []
    base = os.fspath(image_dir)
    for name in names:
        try:
            st = os.stat(os.path.join(base, name))
        except OSError:
            stats.append(None)
        else:
            stats.append((st.st_size, st.st_mtime_ns))
    return stats


def _crop_description(view: str) -> Any:
    """The crop of a view as the cache's sidecar and fingerprint record it."""
    return list(CROP_BOX) if view == "aligned" else "centre-square"


def _fingerprint(names: Sequence[str], stats: Sequence[tuple[int, int] | None], image_size: int,
                 view: str = "aligned") -> str:
    """Hash of the pipeline settings and of every image's name, size and modification time.

    Replacing, adding or removing any image (not only a sampled one) changes it, and so
    triggers a rebuild of the cache; so does another crop rule (``view``).
    """
    crop = CROP_BOX if view == "aligned" else "centre-square"
    digest = hashlib.sha256()
    digest.update(
        f"cocam-image-cache v{_CACHE_VERSION} size={image_size} crop={crop} resample=bilinear\n".encode()
    )
    digest.update(
        "\n".join(f"{n}:{st[0]}:{st[1]}" if st else f"{n}:-1" for n, st in zip(names, stats)).encode("utf-8")
    )
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


def unreadable_list_path(data_path: Path) -> Path:
    """The text file beside a split cache listing every image it left out (one name per line)."""
    return data_path.with_name(data_path.name.replace(".uint8", "") + ".unreadable.txt")


def _remove_stale_temps(data_path: Path) -> None:
    """Delete temporaries of ``data_path`` left by a killed build (the caller holds the build lock)."""
    for stale in data_path.parent.glob(f".{data_path.name}.tmp-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _image_error(kind: str, message: str, missing: int, total: int, image_dir: Path) -> CocamError:
    """The one-line error for the first image (in dataset order) that could not be read."""
    if kind == "missing":
        count = f" ({missing:,} of the {total:,} listed images are missing from {image_dir})" if missing > 1 else ""
        return DatasetNotFoundError(f"{message}{count}; {_SKIP_HINT}.")
    return ImageReadError(f"{message}. Replace the file (re-extract it), {_SKIP_HINT}.")


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
    missing: int = 0,
    view: str = "aligned",
) -> list[str]:
    """Decode every image into ``data_path``: temporary file, fsync, rename, then the sidecar.

    The caller holds the cache's build lock, so temporaries left by a killed build are deleted
    first. With ``skip_unreadable``, a missing or undecodable image is left as zeros and its
    name is recorded in the sidecar's ``"unreadable"`` list (returned) and in
    :func:`unreadable_list_path`; otherwise the first such image in dataset order is an error
    (``missing``: how many listed images do not exist, for its message).
    """
    n = len(names)
    nbytes = n * image_size * image_size * 3
    cache_dir = data_path.parent
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()  # from here on the old cache is invalid, whatever happens
    with contextlib.suppress(FileNotFoundError):
        data_path.unlink()  # invalid without its sidecar: free its space for the new one
    _remove_stale_temps(data_path)
    free = shutil.disk_usage(cache_dir).free
    if nbytes > free:
        raise ImageCacheError(
            f"Not enough disk space for the image cache {data_path}: it needs {nbytes / 2**30:.2f} GiB and "
            f"{free / 2**30:.2f} GiB are free. Free some space, put the cache elsewhere (--cache-dir or "
            f"${CACHE_ENV}; cache_dir= in Python), or use a smaller image size."
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
                results: Iterable = (_decode_chunk((str(image_dir), list(names[i : i + _CHUNK]), i, image_size,
                                                    skip_unreadable, view)) for i in range(0, n, _CHUNK))
                pool = None
            else:
                tasks = [
                    (str(image_dir), list(names[i : i + _CHUNK]), i, image_size, skip_unreadable, view)
                    for i in range(0, n, _CHUNK)
                ]
                # forkserver, not fork: a child forked from a process that holds torch's threads can
                # deadlock the pool (every thread waiting on a futex after an error in a worker)
                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
                pool = multiprocessing.get_context(method).Pool(num_workers)
                results = pool.imap(_decode_chunk, tasks)  # in order: the first error is the first image's
            try:
                for offset, block, block_bad, error in results:
                    if error is not None:
                        raise _image_error(error[1], error[2], missing, n, image_dir)
                    array[offset : offset + len(block)] = block
                    bad.extend(block_bad)
                    bar.update(len(block))
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
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
        listing = unreadable_list_path(data_path)
        if unreadable:
            atomic_write_text(listing, "".join(f"{name}\n" for name in unreadable))
        else:
            with contextlib.suppress(FileNotFoundError):
                listing.unlink()
        atomic_write_text(meta_path, json.dumps(dict(meta), indent=2) + "\n")
        with contextlib.suppress(OSError):
            os.chmod(meta_path, mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return unreadable


def _reusable(data_path: Path, meta_path: Path, meta: Mapping[str, Any], skip_unreadable: bool) -> list[str] | None:
    """The unreadable names of a complete, matching cache that may be served; ``None`` to rebuild."""
    if not _cache_is_valid(data_path, meta_path, meta):
        return None
    try:
        unreadable = list(json.loads(meta_path.read_text(encoding="utf-8")).get("unreadable") or [])
    except (OSError, ValueError):
        return None
    if unreadable and not skip_unreadable:
        return None
    return unreadable


def ensure_image_cache(
    image_dir: Path,
    names: Sequence[str],
    image_size: int,
    cache_dir: Path,
    split: str,
    *,
    view: str = "aligned",
    num_workers: int = 2,
    progress: bool = True,
    skip_unreadable: bool = False,
    desc: str | None = None,
) -> list[str]:
    """Make sure ``cache_dir`` holds the decoded ``(N, S, S, 3)`` cache of ``names``; the names it skipped.

    The one cache of every dataset kind (:class:`CelebADataset`, :class:`cocam.folder.FolderDataset`):
    the files are :func:`cache_files` ``(cache_dir, split, image_size)``; a complete cache whose
    sidecar matches (image count, size, crop rule ``view`` and the fingerprint of every image's
    name, size and modification time) is reused, anything else is rebuilt under a lock file
    beside it (``.<split>_<size>px.lock``), so two processes never build the same cache at once;
    the second waits and then reuses it. ``view`` is ``"aligned"`` (CelebA's crop box) or
    ``"square"`` (the centre square of an image of any size); see :data:`VIEWS`.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}.")
    cache_dir = Path(cache_dir)
    data_path, meta_path = cache_files(cache_dir, split, image_size)
    names = list(names)
    stats = _image_stats(image_dir, names)
    meta = {
        "format": "cocam-image-cache",
        "version": _CACHE_VERSION,
        "split": split,
        "count": len(names),
        "image_size": image_size,
        "shape": [len(names), image_size, image_size, 3],
        "dtype": "uint8",
        "crop_box": _crop_description(view),
        "resample": "bilinear",
        "fingerprint": _fingerprint(names, stats, image_size, view),
    }
    if not names:
        return []
    reused = _reusable(data_path, meta_path, meta, skip_unreadable)
    if reused is not None:
        return reused
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not _is_writable(cache_dir):
            raise PermissionError(f"no permission to write in {cache_dir}")
    except OSError as exc:
        raise ImageCacheError(
            f"Cannot write the image cache folder {cache_dir} ({exc.strerror or exc}): put the cache "
            f"somewhere writable with --cache-dir or ${CACHE_ENV} (cache_dir= in Python)."
        ) from None
    lock = cache_dir / f".{data_path.stem}.lock"
    with exclusive_lock(lock, wait=math.inf, what=f"building the image cache {data_path.name}"):
        reused = _reusable(data_path, meta_path, meta, skip_unreadable)  # another process may have built it
        if reused is not None:
            return reused
        return _build_cache(
            image_dir,
            names,
            image_size,
            data_path,
            meta_path,
            meta,
            num_workers=num_workers,
            progress=progress,
            desc=desc or f"Caching {split} at {image_size}px",
            skip_unreadable=skip_unreadable,
            missing=sum(st is None for st in stats),
            view=view,
        )


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


def check_image_size(image_size: Any) -> int:
    """``image_size`` as a positive int (TypeError / ValueError naming the value otherwise)."""
    try:
        image_size = operator.index(image_size)
    except TypeError:
        raise TypeError(f"image_size must be an int, got {image_size!r}") from None
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return image_size


@runtime_checkable
class LabelledImages(Protocol):
    """What cocam's pipeline reads from a dataset: :class:`CelebADataset`, :class:`cocam.folder.FolderDataset`.

    * ``label_space`` — a :class:`~cocam.labels.LabelSpace`: the labels, in the order of the
      targets' columns and of a model's outputs (``len(label_space)`` logits).
    * ``attributes`` — a ``(N, L)`` DataFrame of 0/1 labels in item order, one column per label
      (in ``label_space`` order), indexed by image name: the groups, balancing weights and
      scores read it.
    * ``targets`` — the same labels as a ``(N, L)`` float32 array.
    * ``names`` — the image names in item order (``subset_names`` selects by them).
    * ``image_size`` — side ``S`` of the square model input.
    * ``mask_view`` — what a mask is drawn on: ``"template"`` (the aligned template face, CelebA)
      or ``"square"`` (the square image the model sees); see :func:`cocam.masks.load_mask`.
    * ``len(ds)``; ``ds[i]`` → ``(image (3, S, S) float32 normalised, target (L,) float32,
      landmarks (5, 2) float32 — NaN where the dataset has none)``.
    * ``get_batch_numpy(indices)`` → ``(uint8 images (n, S, S, 3), targets (n, L), landmarks (n, 5, 2))``:
      what :class:`BatchLoader` (hence :func:`~cocam.train.fit`, :func:`~cocam.evaluate.predict`) reads.
    * ``subset(conditions)`` / ``subset_names(names)`` / ``resampled(indices)`` — datasets over the
      same cache (the images with given labels; given images; a resample with repeats).
    * ``require_landmarks(feature)`` — raise a one-line error naming ``feature`` when the dataset
      has no landmarks (the landmark mask transfer needs them).

    :class:`CachedImageDataset` implements all of it over the decoded-image cache.
    """

    label_space: LabelSpace
    mask_view: str

    @property
    def attributes(self) -> pd.DataFrame: ...

    @property
    def targets(self) -> np.ndarray: ...

    @property
    def names(self) -> pd.Index: ...

    @property
    def image_size(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def get_batch_numpy(self, indices: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def subset(self, conditions: Mapping[str, int | bool] | None = None, /, **kwargs: int | bool) -> LabelledImages: ...

    def subset_names(self, names: Iterable[str]) -> LabelledImages: ...

    def resampled(self, indices: Any) -> LabelledImages: ...

    def require_landmarks(self, feature: str) -> None: ...


def label_space_of_dataset(dataset: Any) -> LabelSpace:
    """``dataset.label_space``; :data:`~cocam.labels.CELEBA` for a stand-in without one (e.g. a timing
    stand-in with 40 CelebA-ordered target columns), which is what such stand-ins held before label spaces."""
    space = getattr(dataset, "label_space", None)
    return CELEBA if space is None else space


class CachedImageDataset(torch.utils.data.Dataset):
    """The machinery every cocam dataset shares: a split's decoded ``uint8`` cache, items, batches, subsets.

    A subclass (:class:`CelebADataset`, :class:`cocam.folder.FolderDataset`) reads its own
    annotations, builds its cache with :func:`ensure_image_cache` and sets ``_split_names`` (the
    split's image names in cache order), ``_image_size``, ``_cache_path``, ``split``,
    ``transform`` and ``_memmap = None``; it implements ``_set_rows(rows)`` (which rows of the
    cache it serves, setting ``_rows``, ``_targets`` ``(N, L)`` and ``_landmarks`` ``(N, 5, 2)``),
    :attr:`attributes` and ``_not_in_dataset(name)`` (the message for an image it does not
    hold). Everything here follows the :class:`LabelledImages` protocol.
    """

    #: The labels, in target (and model output) order.
    label_space: LabelSpace = CELEBA
    #: What masks are drawn on: ``"template"`` (the aligned template face) or ``"square"`` (the model's view).
    mask_view: str = "template"

    @property
    def attributes(self) -> pd.DataFrame:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _without_unreadable(self, rows: np.ndarray, unreadable: Sequence[str], image_dir: Path) -> np.ndarray:
        """``rows`` less the images the cache build skipped, with the warning that counts and names them."""
        if not unreadable:
            return rows
        listing = unreadable_list_path(self._cache_path)
        if not listing.is_file():  # deleted since the build: the warning promises it
            with contextlib.suppress(OSError):
                atomic_write_text(listing, "".join(f"{name}\n" for name in unreadable))
        shown = ", ".join(unreadable[:_UNREADABLE_SHOWN]) + (", ..." if len(unreadable) > _UNREADABLE_SHOWN else "")
        warnings.warn(
            f"Skipping {len(unreadable):,} missing or unreadable image(s) of the {self.split} split in "
            f"{image_dir} (first: {shown}); the full list is in {listing}",
            UserWarning,
            stacklevel=3,
        )
        return rows[~np.isin(rows, self._split_names.get_indexer(list(unreadable)))]

    @staticmethod
    def _checked_arguments(split: str, image_size: int, skip_unreadable: bool | None) -> tuple[str, int, bool]:
        """The constructor arguments every subclass validates alike (``skip_unreadable=None``: the
        ``COCAM_SKIP_UNREADABLE`` environment variable decides)."""
        if skip_unreadable is None:
            skip_unreadable = os.environ.get(SKIP_UNREADABLE_ENV, "") == "1"
        return validate_split(split), check_image_size(image_size), skip_unreadable

    def _not_in_dataset(self, name: str, within: pd.Index) -> str:
        return f"image {name!r} is not in this {self.split} dataset"

    def _rows_for(self, names: Iterable[str], within: pd.Index) -> np.ndarray:
        """Positions in ``within`` of ``names``; errors name the first unknown or repeated one."""
        wanted = pd.Index([str(n) for n in names])
        if wanted.has_duplicates:
            raise ValueError(f"image {wanted[wanted.duplicated()][0]!r} is listed more than once")
        rows = within.get_indexer(wanted)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            raise ValueError(self._not_in_dataset(wanted[missing[0]], within))
        return rows.astype(np.int64)

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
    def targets(self) -> np.ndarray:
        """(N, 40) float32 0/1 targets in item order (read-only view)."""
        view = self._targets.view()
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

    def subset_names(self, names: Iterable[str]) -> CachedImageDataset:
        """A dataset of the given images (all must be in this dataset), sharing the same cache."""
        rows = self._rows[self._rows_for(names, self.names)]
        derived = copy.copy(self)
        derived._set_rows(rows)
        return derived

    def subset(self, conditions: Mapping[str, int | bool] | None = None, /, **kwargs: int | bool) -> CachedImageDataset:
        """The images matching attribute conditions, e.g. ``ds.subset(Wearing_Lipstick=1)``.

        Conditions can be given as a mapping (needed for ``5_o_Clock_Shadow``) and/or keywords;
        see :func:`cocam.celeba.select_images`. The result shares this dataset's cache.
        """
        merged: dict[str, int | bool] = dict(conditions or {})
        for name, value in kwargs.items():
            if name in merged:
                raise ValueError(f"Condition on {name!r} given twice")
            merged[name] = value
        return self.subset_names(select_images(self.attributes, merged, labels=self.label_space))

    def resampled(self, indices: Any) -> CachedImageDataset:
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

class CelebADataset(CachedImageDataset):
    """CelebA images of one split (or a subset of it) with attributes and landmarks.

    Args:
        root: the folder containing ``celeba/``, or ``celeba/`` itself.
        split: ``"train"``, ``"valid"``, ``"test"`` or ``"all"``.
        image_size: side of the square model input in pixels.
        images: restrict to these image names (all must belong to ``split``), in this order.
        transform: applied to the normalised ``(3, S, S)`` float image in ``__getitem__``.
        cache_dir: the folder of the decoded-image cache (default: :func:`default_cache_dir`, which
            never writes into a real dataset's folder).
        num_workers: decode processes used when the cache is built (``<= 1``: in-process).
        progress: show a progress bar while building the cache.
        skip_unreadable: what to do with a listed image that is missing or cannot be decoded
            while the cache is built (``None``, the default: ``True`` when ``$COCAM_SKIP_UNREADABLE``
            is ``1``, else ``False``). ``False``: raise (:class:`ImageReadError` or
            :class:`~cocam.celeba.DatasetNotFoundError`, naming the file). ``True``: warn
            (:class:`UserWarning` counting them and naming the first few; the full list is
            written to ``<cache_dir>/<split>_<size>px.unreadable.txt``, see
            :func:`unreadable_list_path`) and leave them out of the dataset. The
            names are recorded in the cache's sidecar, so a later construction with the same
            cache leaves out the same images (and warns again); a construction with
            ``skip_unreadable=False`` over such a cache rebuilds it and raises. An image passed
            in ``images`` that is unreadable is left out as well.

    Items are ``(image, target, landmarks)``: float32 ``(3, S, S)`` ImageNet-normalised,
    float32 ``(40,)`` 0/1 in :data:`~cocam.attributes.CELEBA_ATTRIBUTES` order, float32 ``(5, 2)``
    (x, y) of the eyes, nose and mouth corners in model-input pixels — NaN when the dataset
    has no landmark file (:attr:`has_landmarks`; :attr:`landmarks` then raises, naming the file).
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
        skip_unreadable: bool | None = None,
    ) -> None:
        split, image_size, skip_unreadable = self._checked_arguments(split, image_size, skip_unreadable)
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
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(annotations.root)
        self._cache_path, self._meta_path = cache_files(self.cache_dir, split, image_size)
        unreadable = self._ensure_cache(num_workers=num_workers, progress=progress, skip_unreadable=skip_unreadable)
        self._memmap: np.ndarray | None = None
        rows = np.arange(len(split_names)) if images is None else self._rows_for(images, split_names)
        self._set_rows(self._without_unreadable(rows, unreadable, image_dir))

    # -- construction helpers ----------------------------------------------------------------

    def _ensure_cache(self, *, num_workers: int, progress: bool, skip_unreadable: bool = False) -> list[str]:
        """Build the split cache if needed (:func:`ensure_image_cache`); the names of the images it skipped."""
        return ensure_image_cache(self._annotations.image_dir, self._split_names.tolist(), self._image_size,
                                  self.cache_dir, self.split, view="aligned", num_workers=num_workers,
                                  progress=progress, skip_unreadable=skip_unreadable,
                                  desc=f"Caching CelebA {self.split} at {self._image_size}px")

    def _not_in_dataset(self, name: str, within: pd.Index) -> str:
        if name in self._annotations.attributes.index:
            where = f"it belongs to the {self._annotations.split.loc[name]!s} split"
            if len(within) != len(self._split_names):
                where = "it is not part of this subset"
            return f"image {name!r} is not in this {self.split} dataset: {where}"
        return f"image {name!r} is not listed in the CelebA annotations of {self.root}"

    def _set_rows(self, rows: np.ndarray) -> None:
        """Select the rows (positions in the split cache) this dataset serves."""
        self._rows = rows
        positions = self._split_positions[rows]
        self._positions = positions
        attributes = self._annotations.attributes
        order = [attributes.columns.get_loc(name) for name in CELEBA_ATTRIBUTES]
        self._targets = attributes.to_numpy()[positions][:, order].astype(np.float32)
        if self._annotations.landmarks is None:
            self._landmarks = np.full((len(positions), 5, 2), np.nan, dtype=np.float32)
        else:
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
    def attributes(self) -> pd.DataFrame:
        """0/1 ``uint8`` attributes of this dataset's images (columns in CELEBA_ATTRIBUTES order)."""
        return self._annotations.attributes.iloc[self._positions][list(CELEBA_ATTRIBUTES)]

    @property
    def has_landmarks(self) -> bool:
        """Whether the dataset folder has a landmark file (needed by the ``landmarks`` mask transfer)."""
        return self._annotations.landmarks is not None

    def require_landmarks(self, feature: str) -> None:
        """Raise :class:`~cocam.celeba.DatasetNotFoundError` naming ``feature`` and the file if landmarks are absent."""
        self._annotations.require_landmarks(feature)

    @property
    def landmarks_aligned(self) -> pd.DataFrame:
        """Landmarks of this dataset's images in aligned 178x218 image pixels."""
        landmarks = self._annotations.require_landmarks("dataset.landmarks_aligned")
        return landmarks.iloc[self._positions][list(LANDMARK_COLUMNS)]

    @property
    def landmarks(self) -> np.ndarray:
        """(N, 5, 2) float32 landmarks in model-input pixels, in item order (read-only view).

        Raises :class:`~cocam.celeba.DatasetNotFoundError` when the dataset has no landmark file
        (the landmark transfer and its quality measurement read this).
        """
        self._annotations.require_landmarks("the landmark mask transfer (dataset.landmarks)")
        view = self._landmarks.view()
        view.flags.writeable = False
        return view

    def __repr__(self) -> str:
        subset = "" if len(self._rows) == len(self._split_names) else f" of {len(self._split_names)}"
        return (
            f"CelebADataset(root='{self.root}', split={self.split!r}, n={len(self)}{subset}, "
            f"image_size={self._image_size}, cache='{self._cache_path}')"
        )




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
