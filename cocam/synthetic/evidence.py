"""Ground-truth evidence regions of the synthetic faces.

Each image of the synthetic dataset comes with, for every localised attribute, up to two
ellipses ``(cx, cy, rx, ry)`` in aligned-image pixels (an ellipse with ``rx == 0`` is unused).
:class:`EvidenceRegions` loads them and rasterises them at the model's input resolution
(after the same crop and resize the images go through), ready to score attention against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cocam.attributes import validate_attribute
from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH, CROP_BOX

__all__ = ["EvidenceRegions", "rasterize_ellipses"]


def rasterize_ellipses(ellipses: torch.Tensor, height: int, width: int, *,
                       box: tuple[float, float, float, float] = (0, 0, ALIGNED_WIDTH, ALIGNED_HEIGHT)) -> torch.Tensor:
    """Rasterise (..., E, 4) ellipses in aligned pixels onto a ``height × width`` grid.

    The grid covers ``box`` = (left, top, right, bottom) of the aligned image (default: all of
    it); a grid cell is inside when its centre lies inside any of the E ellipses. Returns a bool
    tensor (..., height, width).
    """
    ellipses = torch.as_tensor(ellipses, dtype=torch.float32)
    left, top, right, bottom = box
    ys = (torch.arange(height, dtype=torch.float32, device=ellipses.device) + 0.5) * (bottom - top) / height + top - 0.5
    xs = (torch.arange(width, dtype=torch.float32, device=ellipses.device) + 0.5) * (right - left) / width + left - 0.5
    cx, cy, rx, ry = (ellipses[..., i, None, None] for i in range(4))
    used = rx > 0
    d = ((xs - cx) / rx.clamp_min(1e-6)) ** 2 + ((ys[:, None] - cy) / ry.clamp_min(1e-6)) ** 2
    return ((d <= 1.0) & used).any(dim=-3)


class EvidenceRegions:
    """The ``evidence_regions.npz`` of a synthetic dataset.

    Args:
        root: the dataset root (the folder holding ``celeba/``) or the ``celeba/`` folder.
    """

    def __init__(self, root: str | Path) -> None:
        from cocam.synthetic.generate import EVIDENCE_FILE, _celeba_dir

        path = _celeba_dir(root) / EVIDENCE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: ground-truth evidence regions exist only for the synthetic dataset "
                f"(cocam generate). Real CelebA has none; score attention against your mask instead."
            )
        with np.load(path) as z:
            self.images = [str(s) for s in z["images"]]
            self.attributes = [str(s) for s in z["attributes"]]
            self.ellipses = torch.from_numpy(z["ellipses"].astype(np.float32))  # (N, A, 2, 4)
        self._row = {name: i for i, name in enumerate(self.images)}

    def __repr__(self) -> str:
        return f"EvidenceRegions(images={len(self.images)}, attributes={len(self.attributes)})"

    def ellipses_for(self, images: Sequence[str], attribute: str) -> torch.Tensor:
        """(N, E, 4) ellipses of ``attribute`` for the named images."""
        attribute = validate_attribute(attribute)
        if attribute not in self.attributes:
            raise ValueError(f"{attribute} has no ground-truth region (it is not localised in the synthetic faces).")
        try:
            rows = [self._row[name] for name in images]
        except KeyError as err:
            raise KeyError(f"Image {err.args[0]!r} is not in this dataset's evidence regions.") from None
        return self.ellipses[rows, self.attributes.index(attribute)]

    def masks(self, images: Sequence[str], attribute: str, image_size: int) -> torch.Tensor:
        """Bool (N, S, S) masks of ``attribute``'s region at model-input resolution (crop + resize)."""
        return rasterize_ellipses(self.ellipses_for(images, attribute), image_size, image_size, box=CROP_BOX)
