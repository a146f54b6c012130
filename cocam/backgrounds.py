"""Faces to draw a mask on: the dataset's mean aligned face, or any one of its images.

The mask editor (:class:`cocam.widget.MaskEditor`) draws in **template coordinates**: the
178×218 aligned face, the frame of every CelebA ``img_align_celeba`` image. What is shown under
the drawing — the template face, the dataset's mean face, one of its images — changes nothing
about the mask; it only helps the user see where the evidence lies in *their* data.

**The mean face.** :func:`mean_image` averages the images of a
dataset (a :class:`~cocam.dataset.CelebADataset`, or any with the same protocol such as a
folder dataset) as the model sees them — its decoded ``uint8`` cache, each
image the central 178×178 crop (:data:`cocam.geometry.CROP_BOX`, rows 20–197) resized to
``S × S`` — in float64, chunk by chunk (memory stays one chunk, whatever the dataset's size)::

    mean[i, j, c] = (1 / m) · Σ_k image_k[i, j, c]

A sum of ``uint8`` values in float64 is exact (every partial sum is an integer below 2⁵³), so
the mean is the correctly rounded quotient whatever the chunking. It is then mapped back to the
template frame by the inverse of the images' own mapping: the ``S × S`` mean is resized to the
178×178 crop (bilinear, pixel-centre convention, ``align_corners=False``, antialiased when
shrinking — the inverse of :func:`cocam.geometry.aligned_to_input`, ``c ↦ (c + ½)·178/S − ½``) and
placed in rows 20–197. Rows 0–19 and 198–217 are outside what the model sees; they hold the
flat grey ``fill``. At ``S = 178`` the resize is the identity, so rows 20–197 are exactly
``round(mean)``.

**One image.** :func:`dataset_image` reads one image's aligned JPEG at full resolution (all 218
rows): the sharpest view to draw on.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cocam.dataset import LabelledImages
from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH, CROP_BOX

__all__ = ["MEAN_CHUNK", "dataset_image", "input_to_template", "mean_image", "mean_indices"]

#: Images read from the cache per step of :func:`mean_image`.
MEAN_CHUNK: int = 256


def mean_indices(n: int, max_images: int | None) -> np.ndarray:
    """The images :func:`mean_image` averages: all ``n``, or ``m = max_images`` evenly spread ones.

    ``i_k = ⌊k·n / m⌋`` for ``k = 0 … m − 1``: distinct, in order, spread over the whole split
    (CelebA's files are not in random order, so the first ``m`` would not do).
    """
    if max_images is None:
        return np.arange(n, dtype=np.int64)
    m = operator.index(max_images)
    if m < 1:
        raise ValueError(f"max_images must be at least 1 (or None for all images), got {max_images}.")
    if m >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(m, dtype=np.int64) * n) // m


def input_to_template(image: np.ndarray, *, fill: int = 128) -> np.ndarray:
    """A model-view image ``(S, S, 3)`` (any real dtype) → ``(218, 178, 3)`` uint8 in the template frame.

    Resizes to the 178×178 crop (bilinear, ``align_corners=False``, antialiased when shrinking;
    the identity when ``S = 178``), rounds to the nearest integer and puts it in rows 20–197;
    the rows the model never sees get ``fill``.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != arr.shape[1] or arr.shape[2] != 3:
        raise ValueError(f"a model-view image must be (S, S, 3), got shape {arr.shape}.")
    if not 0 <= int(fill) <= 255:
        raise ValueError(f"fill must be a grey level in [0, 255], got {fill}.")
    left, top, right, bottom = CROP_BOX
    width, height = right - left, bottom - top
    values = arr.astype(np.float64)
    if values.shape[:2] != (height, width):
        t = torch.from_numpy(values).permute(2, 0, 1)[None]
        shrink = values.shape[0] > height
        values = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False,
                               antialias=shrink)[0].permute(1, 2, 0).numpy()
    out = np.full((ALIGNED_HEIGHT, ALIGNED_WIDTH, 3), int(fill), dtype=np.uint8)
    out[top:bottom, left:right] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def mean_image(dataset: LabelledImages, max_images: int | None = None, *, fill: int = 128,
               chunk_size: int = MEAN_CHUNK) -> np.ndarray:
    """The mean aligned face of ``dataset`` as ``(218, 178, 3)`` uint8, in template coordinates.

    Args:
        dataset: the images to average (their decoded cache, as the model sees them).
        max_images: average ``m`` evenly spread images (:func:`mean_indices`); ``None``: all.
        fill: grey level of the rows outside the model's view (0–19 and 198–217).
        chunk_size: images read per step (float64 accumulation; memory is one chunk).

    See the module docstring for the arithmetic and the mapping back to the template frame.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no images: a mean face needs at least one.")
    chunk = operator.index(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    indices = mean_indices(n, max_images)
    total: np.ndarray | None = None
    for start in range(0, indices.size, chunk):
        pixels = dataset.get_batch_numpy(indices[start:start + chunk])[0]
        part = pixels.sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
    return input_to_template(total / indices.size, fill=fill)


def dataset_image(dataset: LabelledImages, index: int) -> np.ndarray:
    """Image ``index`` of ``dataset`` as ``(218, 178, 3)`` uint8: its aligned JPEG, full frame.

    A dataset whose masks are drawn on the square model view (``mask_view == "square"``, a
    folder dataset's) gives that view instead — the image as the model sees it, from the
    decoded cache — placed in the template frame by :func:`input_to_template`.

    Raises:
        IndexError: ``index`` outside the dataset.
        ValueError: the file is not a 178×218 aligned image.
        FileNotFoundError: the image file is missing.
    """
    n = len(dataset)
    i = operator.index(index)
    if not -n <= i < n:
        raise IndexError(f"image index {index} is out of range for a dataset of {n} images.")
    if getattr(dataset, "mask_view", "template") == "square":
        return input_to_template(dataset.get_batch_numpy(np.array([i % n]))[0][0])
    path = dataset.annotations.image_dir / dataset.names[i]
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if rgb.shape[:2] != (ALIGNED_HEIGHT, ALIGNED_WIDTH):
        raise ValueError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}, not an aligned {ALIGNED_WIDTH}x"
                         f"{ALIGNED_HEIGHT} CelebA image: masks are drawn in that frame.")
    return rgb
