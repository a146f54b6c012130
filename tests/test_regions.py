"""Random control regions: same shape and area, inside the visible face, away from the true region."""

from __future__ import annotations

import numpy as np
import pytest

from cocam.geometry import CROP_BOX
from cocam.masks import TEMPLATE_SHAPE, default_mask
from cocam.regions import random_region, valid_shifts


def _shift_of(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    return int(yb.min() - ya.min()), int(xb.min() - xa.min())


@pytest.mark.parametrize("attribute", ["Wearing_Lipstick", "High_Cheekbones", "Double_Chin"])
def test_random_region_is_the_mask_moved_away_from_itself_and_the_shortcut(attribute):
    mask = default_mask(attribute)
    shortcut = default_mask("Heavy_Makeup")
    moved = random_region(mask, seed=0, avoid=[shortcut], margin=4)
    assert moved.shape == TEMPLATE_SHAPE and moved.dtype == bool
    assert moved.sum() == mask.sum()
    dy, dx = _shift_of(mask, moved)
    assert np.array_equal(np.roll(np.roll(mask, dy, 0), dx, 1), moved)  # a pure shift: the same shape
    assert not (moved & mask).any() and not (moved & shortcut).any()
    left, top, right, bottom = CROP_BOX
    ys, xs = np.nonzero(moved)
    assert ys.min() >= top and ys.max() < bottom and xs.min() >= left and xs.max() < right


def test_the_margin_is_kept_and_the_seed_decides():
    mask = default_mask("Wearing_Lipstick")
    a = random_region(mask, seed=1, margin=8)
    assert np.array_equal(a, random_region(mask, seed=1, margin=8))
    assert not np.array_equal(a, random_region(mask, seed=2, margin=8))
    # distance from every moved pixel to every original pixel is more than the margin
    ys, xs = np.nonzero(mask)
    ym, xm = np.nonzero(a)
    d2 = (ym[:, None] - ys[None]) ** 2 + (xm[:, None] - xs[None]) ** 2
    assert d2.min() > 8**2


def test_valid_shifts_agree_with_a_brute_force_count():
    mask = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    mask[100:140, 20:150] = True  # a wide band: few places left
    shifts = valid_shifts(mask, margin=3)
    brute = []
    for dy in range(-120, 120):
        for dx in range(-40, 40):
            ys, xs = np.nonzero(mask)
            ys2, xs2 = ys + dy, xs + dx
            if ys2.min() < CROP_BOX[1] or ys2.max() >= CROP_BOX[3] or xs2.min() < 0 or xs2.max() >= CROP_BOX[2]:
                continue
            # rows 100..139 moved by dy stay clear of rows 97..142 (the band grown by 3 px) iff |dy| > 42;
            # the columns cannot move clear (the band spans 130 of the 178 columns)
            if abs(dy) > 39 + 3:
                brute.append((dy, dx))
    assert sorted(map(tuple, shifts.tolist())) == sorted(brute)


def test_a_region_that_cannot_move_is_a_clear_error():
    mask = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    mask[30:190, 10:170] = True
    with pytest.raises(ValueError, match="no place for a random control region"):
        random_region(mask, seed=0)
