"""The shapes dataset in the generic layout (cocam.folder), written by tests.

Three labels: ``square`` (a bright square in the centre, the true object), ``stripe`` (a band
along the top, present with the square in most images: the spurious label) and ``corner_patch``
(a patch in the lower right, independent). Images are 72x64, so the centre square drops 4
columns on each side, where a red strip is painted that the model must never see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

LABELS = ("square", "stripe", "corner_patch")
WIDTH, HEIGHT = 72, 64  # the centre square is columns 4..67
SIZE = 64


def draw(square: int, stripe: int, corner: int, rng: np.random.Generator) -> np.ndarray:
    """One (64, 72, 3) uint8 image: grey noise, red side strips outside the centre square, the shapes."""
    img = rng.integers(60, 100, (HEIGHT, WIDTH, 3)).astype(np.uint8)
    img[:, :4] = img[:, -4:] = (255, 0, 0)
    if square:
        img[24:40, 28:44] = (250, 250, 250)  # columns 24..39 of the centre square
    if stripe:
        img[2:8, 4:68] = (0, 0, 230)
    if corner:
        img[52:62, 56:66] = (0, 200, 0)
    return img


def make_shapes(root: Path, n: int = 96, *, split_column: bool = True, seed: int = 0) -> Path:
    """Write ``root/images/*.png`` and ``root/labels.csv`` (square and stripe agree in ~85 % of the images)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        square = int(rng.random() < 0.5)
        stripe = square if rng.random() < 0.85 else 1 - square
        corner = int(rng.random() < 0.4)
        name = f"shape_{i:03d}.png"
        Image.fromarray(draw(square, stripe, corner, rng)).save(root / "images" / name)
        row = {"image": name, "square": square, "stripe": 2 * stripe - 1, "corner_patch": corner}  # stripe: -1/1
        if split_column:
            row["split"] = "train" if i < 64 else "valid" if i < 80 else "test"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def square_mask(path: Path) -> Path:
    """The region of the square, drawn on the 64x64 view the model sees (rows 24..39, columns 24..39)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[24:40, 24:40] = 255
    Image.fromarray(mask).save(path)
    return path
