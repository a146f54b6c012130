"""User regions ``S`` drawn on the template face.

A mask lives in **template coordinates**: the 178×218 (width×height) aligned CelebA face,
stored as a ``(218, 178)`` boolean array. Any file with that aspect ratio (e.g. 356×436 drawn
at double resolution) is accepted and resized; another aspect ratio is an error, because a
mask drawn on the square model input or on an unaligned photo would land on the wrong pixels.

Binarisation rule: values are scaled to ``[0, 1]`` by the range of their type (bool → 0/1,
uint8 → /255, uint16 → /65535, float → must already be in ``[0, 1]``), resized to the template
resolution with exact area averaging, and a pixel is in the region when its
value is **> 0.5**. A mask that is empty or covers the whole template is degenerate and
rejected.

For training, :func:`mask_to_input` maps the template mask to the model input exactly like the
images (crop :data:`cocam.geometry.CROP_BOX`, then resize) and keeps the area-averaged, soft
values in ``[0, 1]`` so thin regions do not vanish at low resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH, CROP_BOX
from cocam.io import atomic_write

__all__ = [
    "TEMPLATE_SHAPE",
    "as_template_mask",
    "default_mask",
    "load_mask",
    "resolve_mask",
    "mask_to_feature",
    "mask_to_input",
    "save_mask",
]

#: ``(height, width)`` of a mask in template coordinates.
TEMPLATE_SHAPE: tuple[int, int] = (ALIGNED_HEIGHT, ALIGNED_WIDTH)


def _to_unit_range(arr: np.ndarray) -> np.ndarray:
    """Scale a 2-D array to float32 ``[0, 1]`` by the range of its dtype."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        if arr.max() == 1:
            raise ValueError(
                "uint8 mask with values 0/1: uint8 masks are read on the 0..255 scale (a pixel "
                "is in the region when > 127). Save it as bool or with values 0/255."
            )
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"float masks must have finite values in [0, 1], got range "
                f"[{np.nanmin(arr):g}, {np.nanmax(arr):g}]."
            )
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all():
        return arr.astype(np.float32)
    raise ValueError(
        f"unsupported mask dtype {arr.dtype}: use bool, uint8 (0..255), uint16, float in [0, 1] "
        f"or integers 0/1."
    )


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix: fraction of output cell ``i`` covered by input pixel ``j``.

    Output cell ``i`` spans ``[i, i + 1) * n_in / n_out`` in input coordinates; rows sum to 1,
    columns to ``n_out / n_in``, so the total area is preserved exactly.
    """
    edges_out = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(1, n_in + 1)[None, :])
    return np.clip(hi - lo, 0.0, None) * (n_out / n_in)


def _resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Exact area-averaging resize of a float ``[0, 1]`` array (shrinking or enlarging)."""
    if arr.shape == (height, width):
        return arr.astype(np.float32)
    rows = _area_weights(arr.shape[0], height)
    cols = _area_weights(arr.shape[1], width)
    out = rows @ arr.astype(np.float64) @ cols.T
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def as_template_mask(mask: np.ndarray | Tensor) -> np.ndarray:
    """Validate and binarise a mask to template resolution.

    Args:
        mask: ``(H, W)`` (or ``(H, W, 1)``) array with the template's aspect ratio
            ``178:218`` (width:height), any supported dtype (see the module docstring).

    Returns:
        ``(218, 178)`` bool array.

    Raises:
        ValueError: wrong shape/aspect ratio, unsupported values, empty or full mask.
    """
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"a mask must be a 2-D (height, width) array, got shape {arr.shape}.")
    h, w = arr.shape
    if h < 2 or w < 2 or abs(w - h * ALIGNED_WIDTH / ALIGNED_HEIGHT) > 1.0:
        raise ValueError(
            f"mask is {w}x{h} (width x height) but masks are drawn on the aligned template face, "
            f"which has a {ALIGNED_WIDTH}:{ALIGNED_HEIGHT} (width:height) aspect ratio, e.g. "
            f"{ALIGNED_WIDTH}x{ALIGNED_HEIGHT} or {2 * ALIGNED_WIDTH}x{2 * ALIGNED_HEIGHT}; "
            f"not the square model input."
        )
    unit = _resize(_to_unit_range(arr), *TEMPLATE_SHAPE)
    binary = unit > 0.5
    if not binary.any():
        raise ValueError(
            "the mask is empty (no pixel > 0.5 after resizing to 178x218): draw the region S "
            "that should explain the attribute."
        )
    if binary.all():
        raise ValueError(
            "the mask covers the whole template face: a region that includes everything gives "
            "no guidance; draw only the region S that should explain the attribute."
        )
    return binary


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Load a mask from a PNG (or other PIL image) or a ``.npy`` file.

    PNG: if the image has an alpha channel that is not constant, the alpha is the mask
    (painted = opaque); otherwise the luminance is (white = region). ``.npy``: a 2-D bool,
    uint8, uint16, float or 0/1 integer array.

    Returns:
        ``(218, 178)`` bool array in template coordinates (see :func:`as_template_mask`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as img:
            img.load()
            arr = _image_to_array(img)
    try:
        return as_template_mask(arr)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _image_to_array(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    if img.mode == "I":  # 32-bit integer image: 0/1 values, else read as 16-bit
        arr = np.asarray(img)
        if np.isin(arr, (0, 1)).all() or arr.min() < 0 or arr.max() > 65535:
            return arr
        return arr.astype(np.uint16)
    return np.asarray(img.convert("L"))


def save_mask(path: str | os.PathLike, mask: np.ndarray | Tensor, *, overwrite: bool = False) -> Path:
    """Save a mask as an 8-bit grayscale PNG (0 / 255) at template resolution, atomically.

    ``mask`` goes through :func:`as_template_mask` first, so ``load_mask(save_mask(p, m))``
    equals ``as_template_mask(m)``. Refuses to replace an existing file unless
    ``overwrite=True`` (:class:`FileExistsError`).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"masks are saved as PNG; use a .png file name, got {path.name!r}.")
    binary = as_template_mask(mask)
    image = Image.fromarray(binary.astype(np.uint8) * 255)
    with atomic_write(path, "wb", overwrite=overwrite) as fh:
        image.save(fh, format="PNG")
    return path


def _crop_resize(mask: np.ndarray | Tensor, height: int, width: int) -> np.ndarray:
    binary = as_template_mask(mask)
    left, top, right, bottom = CROP_BOX
    crop = binary[top:bottom, left:right]
    if not crop.any():
        raise ValueError(
            f"the mask lies entirely outside the model's view (rows {top}..{bottom - 1} of the "
            f"template are kept); draw the region inside the face crop."
        )
    return _resize(crop.astype(np.float32), height, width)


def mask_to_input(mask: np.ndarray | Tensor, image_size: int, device: torch.device | str | None = None) -> Tensor:
    """Template mask → ``(image_size, image_size)`` float tensor in ``[0, 1]`` on model input.

    Crops :data:`~cocam.geometry.CROP_BOX` (the same square the images are cropped to) and
    resizes it with exact area averaging, so border and thin-region pixels get fractional
    values instead of disappearing (the region's area is preserved). ``mask`` is anything
    :func:`as_template_mask` accepts; a region entirely outside the crop is a ValueError.
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    return torch.from_numpy(_crop_resize(mask, int(image_size), int(image_size))).to(device)


def mask_to_feature(
    mask: np.ndarray | Tensor, feature_size: int | tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """Template mask → ``(h, w)`` float tensor in ``[0, 1]`` at the CAM's native resolution.

    Same mapping as :func:`mask_to_input` (crop, area averaging); use it with the ``raw``
    resolution of :func:`cocam.gradcam.grad_cam` (``output_size=None``), e.g. 13 for AlexNet at
    224 px (``SplitModel.feature_shape(image_size)[1:]``).
    """
    h, w = (feature_size, feature_size) if isinstance(feature_size, int) else feature_size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"feature_size must be positive, got {feature_size}.")
    return torch.from_numpy(_crop_resize(mask, int(h), int(w))).to(device)


def default_mask(attribute: str, margin: float = 8.0) -> np.ndarray:
    """The built-in region of ``attribute`` on the template face, ``(218, 178)`` bool.

    It is where the synthetic faces draw the attribute's cue (e.g. the lips for
    Wearing_Lipstick, the cheekbones for High_Cheekbones, the chin for Double_Chin), which for
    these attributes is also where the evidence lies on real aligned faces, grown by
    ``margin`` pixels on each axis — as a person marks a region generously around a feature
    (and faces differ in position by a few pixels).
    """
    from cocam.synthetic import rasterize_ellipses, template_region

    ellipses = torch.tensor(template_region(attribute), dtype=torch.float32)
    ellipses[:, 2:] += margin
    return rasterize_ellipses(ellipses, *TEMPLATE_SHAPE).numpy()


def resolve_mask(attribute: str, mask_dir: str | os.PathLike | None = "data/masks") -> tuple[np.ndarray, str]:
    """The user's mask ``<mask_dir>/<attribute>.png`` if it exists, else :func:`default_mask`.

    Returns ``(mask, source)`` where ``source`` is the file path or ``"built-in"``.
    """
    if mask_dir is not None:
        path = Path(mask_dir) / f"{attribute}.png"
        if path.is_file():
            return load_mask(path), str(path)
    return default_mask(attribute), "built-in"
