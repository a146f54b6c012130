"""Control regions: a region of the same shape and area as the user's, placed where the evidence is not.

A random-region control answers "does the *region* matter, or does any Grad-CAM regulariser
help?" (Shrestha et al., ACL 2020, matched a grounding method's gains with random regions).
It trains with exactly the guided setting — same loss, target, weight, steps and seeds — but
with S replaced by :func:`random_region` of S.

The control region is S moved by a whole-pixel shift ``(dy, dx)`` on the template, so its shape
and area are exactly the user's. The shift is drawn uniformly, from the seed, among the shifts
that

* keep the moved region inside the part of the template the model sees
  (:data:`cocam.geometry.CROP_BOX`), and
* leave it at least ``margin`` pixels away from S itself and from every mask in ``avoid``
  (e.g. the shortcut's region, so that the control does not turn into "guide towards the
  shortcut"): the moved region does not overlap any of them grown by ``margin``.

When no shift satisfies this (a region too large to move), it is an error naming the sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cocam.geometry import CROP_BOX
from cocam.masks import TEMPLATE_SHAPE, as_template_mask

__all__ = ["random_region", "valid_shifts"]


def _grow(mask: np.ndarray, margin: int) -> np.ndarray:
    if margin <= 0:
        return mask
    yy, xx = np.mgrid[-margin : margin + 1, -margin : margin + 1]
    disk = torch.from_numpy(((yy**2 + xx**2) <= margin**2).astype(np.float32))[None, None]
    hits = F.conv2d(torch.from_numpy(mask.astype(np.float32))[None, None], disk, padding=margin)
    return hits[0, 0].numpy() > 0.5  # a pixel within `margin` of the region (the disk is symmetric)


def valid_shifts(mask: np.ndarray, *, avoid: Sequence[np.ndarray] = (), margin: int = 8) -> np.ndarray:
    """``(K, 2)`` int array of every shift ``(dy, dx)`` allowed by the rules in the module docstring."""
    region = as_template_mask(mask)
    forbidden = _grow(region, margin)
    for other in avoid:
        forbidden |= _grow(as_template_mask(other), margin)
    height, width = TEMPLATE_SHAPE
    left, top, right, bottom = CROP_BOX
    ys, xs = np.nonzero(region)
    # the moved region must stay inside the visible crop: bounds on dy, dx
    dy = np.arange(top - ys.min(), bottom - 1 - ys.max() + 1)
    dx = np.arange(left - xs.min(), right - 1 - xs.max() + 1)
    if dy.size == 0 or dx.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # overlap of the shifted region with `forbidden` for every shift: a correlation, computed with an FFT
    pad_r = np.zeros((2 * height, 2 * width))
    pad_r[:height, :width] = region
    pad_f = np.zeros((2 * height, 2 * width))
    pad_f[:height, :width] = forbidden
    overlap = np.fft.irfft2(np.conj(np.fft.rfft2(pad_r)) * np.fft.rfft2(pad_f), s=pad_r.shape)
    # overlap[dy mod 2H, dx mod 2W] = Σ region[y, x] · forbidden[y + dy, x + dx]
    grid_y, grid_x = np.meshgrid(dy, dx, indexing="ij")
    counts = overlap[grid_y % (2 * height), grid_x % (2 * width)]
    ok = counts < 0.5  # integer counts up to FFT rounding (≪ 0.5 for these sizes)
    return np.stack([grid_y[ok], grid_x[ok]], axis=1).astype(np.int64)


def random_region(mask: np.ndarray, seed: int, *, avoid: Sequence[np.ndarray] = (), margin: int = 8) -> np.ndarray:
    """The user's region moved to a random place away from it (``(218, 178)`` bool; see the module docstring).

    Args:
        mask: the user's region S (any form :func:`cocam.masks.as_template_mask` accepts).
        seed: the same seed gives the same region.
        avoid: other regions the control must keep away from (e.g. the shortcut's).
        margin: the least distance, in template pixels, to S and to each region in ``avoid``.
    """
    region = as_template_mask(mask)
    shifts = valid_shifts(region, avoid=avoid, margin=margin)
    if len(shifts) == 0:
        raise ValueError(
            f"no place for a random control region: the region ({int(region.sum())} pixels) cannot be moved "
            f"{margin} px away from itself and the regions to avoid inside the visible face; pass a smaller "
            f"margin or fewer regions to avoid.")
    dy, dx = shifts[np.random.default_rng(seed).integers(len(shifts))]
    moved = np.zeros_like(region)
    ys, xs = np.nonzero(region)
    moved[ys + dy, xs + dx] = True
    return moved
