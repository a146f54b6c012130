"""Image geometry shared by the data layer, masks and landmarks.

CelebA's aligned images are 178 wide and 218 high. cocam feeds models a square view: the
central 178×178 crop (rows 20..197, all columns), resized to ``image_size``. Eyes (y≈110) and
mouth (y≈150) lie well inside it. Masks drawn on the template face (in aligned-image
coordinates) and landmarks go through the same mapping, so a region means the same pixels
for the image, the mask and the landmarks.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ALIGNED_HEIGHT",
    "ALIGNED_WIDTH",
    "CROP_BOX",
    "aligned_to_input",
]

#: Width and height of CelebA's aligned images (``img_align_celeba``).
ALIGNED_WIDTH: int = 178
ALIGNED_HEIGHT: int = 218

#: (left, top, right, bottom) of the square crop taken from an aligned image, in pixels.
CROP_BOX: tuple[int, int, int, int] = (0, 20, 178, 198)


def aligned_to_input(xy: np.ndarray, image_size: int) -> np.ndarray:
    """Map (..., 2) pixel coordinates (x, y) of an aligned image to model-input coordinates.

    Uses pixel-centre convention: a coordinate ``c`` in the crop maps to
    ``(c + 0.5) * image_size / crop_extent - 0.5``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    left, top, right, bottom = CROP_BOX
    scale = np.array([image_size / (right - left), image_size / (bottom - top)])
    return (xy - np.array([left, top]) + 0.5) * scale - 0.5
