"""User regions ``S`` drawn on the template face.

A mask lives in **template coordinates**: the 178×218 (width×height) aligned CelebA face,
stored as a ``(218, 178)`` boolean array. Any file with that aspect ratio (e.g. 356×436 drawn
at double resolution) is accepted and resized; another aspect ratio is an error, because a
mask drawn on the square model input or on an unaligned photo would land on the wrong pixels.
A mask must also be at least a quarter of the template's resolution (:data:`MIN_MASK_SIZE`,
45×55): below that the one-pixel rounding the aspect check allows is no check at all (a 2×2
image would pass) and the region is too coarse to mean anything.

Binarisation rule: values are scaled to ``[0, 1]`` by the range of their type (bool → 0/1,
uint8 → /255, uint16 → /65535, float → must already be in ``[0, 1]``), resized to the template
resolution with exact area averaging, and a pixel is in the region when its
value is **> 0.5**. A mask that is empty or covers the whole template is degenerate and
rejected.

Image files: the value of a pixel is, in this order, its alpha when the image has an alpha
channel that is not constant (painted = opaque, on a transparent background); else, for a
grayscale image, its gray level (white = region); else, for a colour image, its **brightest
channel** (``max(R, G, B)``), so a stroke of any bright colour — red, green, blue, white —
on a black background marks the region (a pure red stroke is 255 in R: in the region).

A mask whose region covers more than :data:`MAX_REGION_SHARE` (60 %) of the face the model
sees (the :data:`~cocam.geometry.CROP_BOX` of the template) is still accepted — some regions
are large — but :func:`load_mask` and :func:`save_mask` warn (:class:`MaskCoverageWarning`):
a region that large is most often an inverted mask (black region on white). The largest
built-in region (hair) covers 48 %.

For training, :func:`mask_to_input` maps the template mask to the model input exactly like the
images (crop :data:`cocam.geometry.CROP_BOX`, then resize) and keeps the area-averaged, soft
values in ``[0, 1]`` so thin regions do not vanish at low resolution.

Mask transfer
-------------
The template mask marks the region on the *template* face. Faces in the dataset are aligned,
but not perfectly: eyes and mouth move by a few pixels and faces differ in size. Two ways to
place the region on an image (:data:`MASK_TRANSFERS`, :func:`masks_for_batch`):

* ``"template"`` — reuse the template mask as is on every image (the paper's setting);
* ``"landmarks"`` — move it with the similarity transform (rotation, uniform scale,
  translation; :func:`cocam.geometry.similarity_transform`) that best maps the template's five
  landmarks (:data:`cocam.geometry.TEMPLATE_LANDMARKS`) onto the image's five landmarks
  (:func:`transfer_masks`).

:func:`transfer_quality` measures, on the synthetic dataset, how well each one matches the true
region of every image.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cocam.attributes import UnknownAttributeError, validate_attribute
from cocam.errors import CocamError
from cocam.geometry import (
    ALIGNED_HEIGHT,
    ALIGNED_WIDTH,
    CROP_BOX,
    TEMPLATE_LANDMARKS,
    aligned_to_input,
    invert_affine,
    similarity_transform,
)
from cocam.io import atomic_write

if TYPE_CHECKING:
    from cocam.dataset import CelebADataset

__all__ = [
    "MASK_TRANSFERS",
    "MASK_VIEWS",
    "MaskNotFoundError",
    "square_to_template",
    "project_dir",
    "MAX_REGION_SHARE",
    "MIN_MASK_SIZE",
    "MaskCoverageWarning",
    "TEMPLATE_SHAPE",
    "as_template_mask",
    "MASK_DIR_ENV",
    "default_mask",
    "default_mask_dir",
    "is_shipped_mask",
    "load_mask",
    "mask_to_feature",
    "mask_to_input",
    "masks_for_batch",
    "region_share",
    "resolve_mask",
    "resolve_mask_dir",
    "save_mask",
    "shipped_mask_dir",
    "transfer_masks",
    "transfer_quality",
]

#: How a template mask is placed on each image: reused as is, or moved by the landmarks.
MASK_TRANSFERS: tuple[str, ...] = ("template", "landmarks")

#: ``(height, width)`` of a mask in template coordinates.
TEMPLATE_SHAPE: tuple[int, int] = (ALIGNED_HEIGHT, ALIGNED_WIDTH)

#: ``(height, width)`` of the smallest mask accepted: a quarter of the template's resolution.
MIN_MASK_SIZE: tuple[int, int] = (-(-ALIGNED_HEIGHT // 4), -(-ALIGNED_WIDTH // 4))

#: Share of the model's view (the template's crop box) above which a region draws a
#: :class:`MaskCoverageWarning` (it is most often an inverted mask).
MAX_REGION_SHARE: float = 0.6


class MaskCoverageWarning(UserWarning):
    """A mask's region covers most of the face: probably inverted (black region on white)."""


def region_share(mask: np.ndarray) -> float:
    """Share of the model's view (the template's :data:`~cocam.geometry.CROP_BOX`) inside a template mask."""
    left, top, right, bottom = CROP_BOX
    return float(np.asarray(mask, dtype=bool)[top:bottom, left:right].mean())


def _warn_if_inverted(binary: np.ndarray, source: str) -> None:
    """Warn (:class:`MaskCoverageWarning`) when ``binary`` covers more than :data:`MAX_REGION_SHARE` of the view."""
    share = region_share(binary)
    if share > MAX_REGION_SHARE:
        warnings.warn(
            f"{source}: the region covers {100 * share:.0f} % of the face the model sees (more than "
            f"{100 * MAX_REGION_SHARE:.0f} %): is the mask inverted? The region is white (or opaque, or painted "
            f"in a bright colour) on a black (or transparent) background.", MaskCoverageWarning, stacklevel=3)


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


def _as_2d(mask: np.ndarray | Tensor) -> np.ndarray:
    """A mask as a 2-D NumPy array (a tensor is copied to the CPU; a trailing channel of 1 dropped)."""
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"a mask must be a 2-D (height, width) array, got shape {arr.shape}.")
    return arr


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
    arr = _as_2d(mask)
    h, w = arr.shape
    if h < MIN_MASK_SIZE[0] or w < MIN_MASK_SIZE[1]:
        raise ValueError(
            f"mask is {w}x{h} (width x height), too small to be drawn on the template face: draw it at "
            f"{ALIGNED_WIDTH}x{ALIGNED_HEIGHT} (at least {MIN_MASK_SIZE[1]}x{MIN_MASK_SIZE[0]}, the same "
            f"{ALIGNED_WIDTH}:{ALIGNED_HEIGHT} aspect ratio)."
        )
    if abs(w - h * ALIGNED_WIDTH / ALIGNED_HEIGHT) > 1.0:
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


def square_to_template(mask: np.ndarray | Tensor) -> np.ndarray:
    """A mask drawn on the square model view (any ``S × S``) → ``(218, 178)`` bool template mask.

    The square is what the model sees of an image (a folder dataset's centre square; CelebA's
    :data:`~cocam.geometry.CROP_BOX` of the template), so the mask is binarised at the crop's
    178 × 178 resolution (values scaled as in the module docstring, area-averaged, ``> 0.5``) and
    placed in the crop box; the rows outside it stay empty. :func:`mask_to_input` then crops the
    same box back out, so a square mask reaches the model input as drawn.
    """
    arr = _as_2d(mask)
    h, w = arr.shape
    if h != w:
        raise ValueError(f"mask is {w}x{h} (width x height), but this dataset's masks are drawn on the square image "
                         f"the model sees: draw it square (e.g. at the images' --image-size).")
    left, top, right, bottom = CROP_BOX
    if h < 8:
        raise ValueError(f"mask is {w}x{h}, too small to mark a region: draw it at least 8x8 (e.g. at the images' "
                         f"--image-size).")
    binary = _resize(_to_unit_range(arr), bottom - top, right - left) > 0.5
    out = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    out[top:bottom, left:right] = binary
    if not binary.any():
        raise ValueError("the mask is empty (no pixel > 0.5): draw the region S that should explain the label.")
    if binary.all():
        raise ValueError("the mask covers the whole image: a region that includes everything gives no guidance; "
                         "draw only the region S that should explain the label.")
    return out


#: What a mask can be drawn on: the aligned ``"template"`` face (CelebA) or the ``"square"`` model view.
MASK_VIEWS: tuple[str, ...] = ("template", "square")


def load_mask(path: str | os.PathLike, *, view: str = "template") -> np.ndarray:
    """Load a mask from a PNG (or other PIL image) or a ``.npy`` file.

    Image: if it has an alpha channel that is not constant, the alpha is the mask (painted =
    opaque); otherwise the gray level of a grayscale image, or the brightest channel of a colour
    one (white or any bright colour = region; see the module docstring). ``.npy``: a 2-D bool,
    uint8, uint16, float or 0/1 integer array. A file that is neither is a :class:`ValueError`
    naming it. A region over :data:`MAX_REGION_SHARE` of the view warns (:class:`MaskCoverageWarning`).

    ``view`` says what the mask was drawn on: ``"template"`` (the aligned template face, the
    CelebA datasets' ``mask_view``; see :func:`as_template_mask`) or ``"square"`` (the square
    model view, a folder dataset's; see :func:`square_to_template`).

    Returns:
        ``(218, 178)`` bool array in template coordinates (see :func:`as_template_mask`).
    """
    if view not in MASK_VIEWS:
        raise ValueError(f"view must be one of {', '.join(MASK_VIEWS)}, not {view!r}.")
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a NumPy array file ({_first_line(exc)}); save the mask with numpy.save "
                             f"(a 2-D array) or as a PNG image.") from None
    else:
        try:
            with Image.open(path) as img:
                img.load()
                arr = _image_to_array(img)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL reports some broken files as these
            raise ValueError(f"{path}: not a readable image ({_first_line(exc)}); save the mask as a PNG "
                             f"(white region on black) or as a .npy array.") from None
    try:
        binary = as_template_mask(arr) if view == "template" else square_to_template(arr)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    _warn_if_inverted(binary, str(path))
    return binary


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _image_to_array(img: Image.Image) -> np.ndarray:
    """The 2-D array of an image's mask values: non-constant alpha, else gray level, else brightest channel."""
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
    if img.mode in ("1", "L", "LA", "La"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB")).max(axis=2)  # colour: the brightest channel (a red stroke counts)


def save_mask(path: str | os.PathLike, mask: np.ndarray | Tensor, *, overwrite: bool = False,
              view: str = "template") -> Path:
    """Save a mask as an 8-bit grayscale PNG (0 / 255), atomically, in the frame of ``view``.

    ``mask`` goes through :func:`as_template_mask` first. ``view="template"`` writes the whole
    178×218 template; ``view="square"`` (a folder dataset's masks, drawn on the square model
    view) writes only the 178×178 :data:`~cocam.geometry.CROP_BOX`, the square the model sees,
    so the file is the square mask :func:`load_mask` with ``view="square"`` expects. Either way
    ``load_mask(save_mask(p, m, view=v), view=v)`` equals ``as_template_mask(m)`` on the rows
    the view holds (every row for the template; the crop's rows for the square, where the
    178 → 178 resize is the identity). Refuses to replace an existing file unless
    ``overwrite=True`` (:class:`FileExistsError`). A region over :data:`MAX_REGION_SHARE` of
    the view is saved, with a :class:`MaskCoverageWarning`.
    """
    if view not in MASK_VIEWS:
        raise ValueError(f"view must be one of {', '.join(MASK_VIEWS)}, not {view!r}.")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"masks are saved as PNG; use a .png file name, got {path.name!r}.")
    binary = as_template_mask(mask)
    _warn_if_inverted(binary, str(path))
    if view == "square":
        left, top, right, bottom = CROP_BOX
        binary = binary[top:bottom, left:right]
        if not binary.any():
            raise ValueError("the mask lies entirely outside the square the model sees: draw the region inside it.")
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


#: Environment variable naming the folder of the user's masks (``<Attribute>.png``).
MASK_DIR_ENV = "COCAM_MASK_DIR"


def project_dir() -> Path:
    """The cocam project folder: ``$COCAM_PROJECT_DIR``; else the nearest folder above the working
    directory with a ``pyproject.toml`` and a ``notebooks/`` folder (what the notebooks use);
    else the project this cocam package is run from (a source checkout); else the working directory."""
    env = os.environ.get("COCAM_PROJECT_DIR")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder
    source = Path(__file__).resolve().parents[1]
    if (source / "pyproject.toml").is_file() and (source / "cocam").is_dir():
        return source
    return here


def default_mask_dir() -> Path:
    """Where masks are looked up when no folder is given: ``$COCAM_MASK_DIR``, else the project's ``data/masks``.

    The project is found as the notebooks find it (``$COCAM_PROJECT_DIR``, else the nearest
    folder above the working directory holding ``pyproject.toml`` and ``notebooks/``, else
    the source checkout cocam runs from), so a mask drawn in notebook 2 is the one the CLI
    uses, whatever folder a command is started from.
    """
    env = os.environ.get(MASK_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return project_dir() / "data" / "masks"


def shipped_mask_dir() -> Path:
    """The folder of the masks shipped with cocam: the project's ``data/masks`` (:func:`project_dir`).

    Unlike :func:`default_mask_dir`, ``$COCAM_MASK_DIR`` does not move it: it is where the
    project keeps its defaults, whichever folder the user draws into.
    """
    return project_dir() / "data" / "masks"


def is_shipped_mask(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a shipped mask rather than a user's: ``<shipped_mask_dir()>/<Attribute>.png``
    holding exactly :func:`default_mask` of that attribute, pixel for pixel.

    The shipped masks are the built-in regions (the synthetic generator's true regions grown by
    8 px), written out so that the CLI and the notebooks find a mask for the paper's attributes
    in ``data/masks``; such a file holds nothing :func:`default_mask` cannot give back. A file
    anywhere else, with another name, with any other content, or that cannot be read as a mask,
    is not shipped: it may be someone's work.
    """
    path = Path(path)
    try:
        attribute = validate_attribute(path.stem)
    except UnknownAttributeError:
        return False
    if path.suffix.lower() != ".png" or not path.is_file():
        return False
    if path.resolve().parent != shipped_mask_dir().resolve():
        return False
    try:
        with warnings.catch_warnings():  # a large region is reported where the mask is used, not here
            warnings.simplefilter("ignore", MaskCoverageWarning)
            mask = load_mask(path)
    except (OSError, ValueError):
        return False
    return bool(np.array_equal(mask, default_mask(attribute)))


def resolve_mask_dir(mask_dir: str | os.PathLike | None = None) -> Path:
    """The mask folder to use: ``mask_dir`` if given (it must be an existing folder), else :func:`default_mask_dir`.

    Raises:
        FileNotFoundError: an explicit ``mask_dir`` that is not a folder (a misspelt folder would
            otherwise silently fall back to the built-in regions).
    """
    if mask_dir is None:
        return default_mask_dir()
    path = Path(mask_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"mask folder {path} does not exist (or is not a folder): give the folder holding "
                                f"<Attribute>.png, e.g. --mask-dir data/masks, or leave it out to use "
                                f"{default_mask_dir()}")
    return path.resolve()


_DEFAULT = object()


class MaskNotFoundError(CocamError, FileNotFoundError):
    """A guided label without a mask: no file for it, and no built-in region (only CelebA's face attributes have one)."""


def resolve_mask(attribute: str,
                 mask_dir: str | os.PathLike | None = _DEFAULT,  # type: ignore[assignment]
                 *, view: str = "template") -> tuple[np.ndarray, str]:
    """The user's mask ``<mask_dir>/<attribute>.png`` if it exists, else :func:`default_mask`.

    ``mask_dir`` left out: :func:`default_mask_dir` (``$COCAM_MASK_DIR``, else the project's
    ``data/masks``); ``None``: the built-in region only. Returns ``(mask, source)`` where
    ``source`` is the file path or ``"built-in"``. ``view`` is the dataset's ``mask_view``
    (:func:`load_mask`): built-in regions exist only on the template face, for CelebA's localised
    attributes; any other label needs a file, else :class:`MaskNotFoundError`.
    """
    if mask_dir is _DEFAULT:
        mask_dir = default_mask_dir()
    if mask_dir is not None:
        path = Path(mask_dir) / f"{attribute}.png"
        if path.is_file():
            return load_mask(path, view=view), str(path)
    looked = f"{Path(mask_dir) / f'{attribute}.png'} does not exist" if mask_dir is not None else "no mask folder"
    if view == "template":
        try:
            return default_mask(attribute), "built-in"
        except UnknownAttributeError:
            pass  # not a CelebA attribute: say what to give instead
    raise MaskNotFoundError(f"no mask for {attribute!r}: {looked}, and built-in regions exist only for CelebA's face "
                            f"attributes; draw one on the square image and give it with --mask (one per --attribute) "
                            f"or put it in --mask-dir as {attribute}.png.")


# --------------------------------------------------------------------------------------------
# Transfer of the template mask onto each image by its landmarks
# --------------------------------------------------------------------------------------------


def _input_to_normalised(matrix: Tensor, image_size: int) -> Tensor:
    """Express ``(B, 2, 3)`` affine maps between model-input pixels in ``grid_sample`` coordinates.

    With ``align_corners=False`` the normalised coordinate of pixel position ``x`` on an axis of
    ``S`` pixels is ``u = (2x + 1) / S - 1``, i.e. ``x = c + u S / 2`` with ``c = (S - 1) / 2``.
    Conjugating ``x ↦ L x + t`` by this gives ``u ↦ L u + 2 (L c + t - c) / S``; the linear
    part of a similarity is unchanged because the normalisation scales both axes alike.
    """
    centre = torch.full((2, 1), (image_size - 1) / 2, dtype=matrix.dtype, device=matrix.device)
    linear, shift = matrix[..., :2], matrix[..., 2:]
    return torch.cat([linear, 2.0 * (linear @ centre + shift - centre) / image_size], dim=-1)


def transfer_masks(masks: Tensor, landmarks: np.ndarray | Tensor, image_size: int, *,
                   validate: bool = True) -> Tensor:
    """Move template-placed masks onto each image with the similarity given by its landmarks.

    For image ``b``, the similarity ``M_b`` (rotation, uniform scale, translation; least squares,
    :func:`cocam.geometry.similarity_transform`) mapping the template's landmarks
    (:data:`~cocam.geometry.TEMPLATE_LANDMARKS` through
    :func:`~cocam.geometry.aligned_to_input`) onto the image's landmarks is estimated, and
    output pixel ``p`` takes the mask's value at ``M_b⁻¹(p)``, sampled bilinearly
    (``grid_sample`` with ``align_corners=False``, the pixel-centre convention of
    :mod:`cocam.geometry`); outside the mask's square it is 0. When an image's landmarks equal
    the template's the result equals ``masks`` (up to rounding).

    Masks at **feature resolution** work the same way: a ``(h, w)`` mask from
    :func:`mask_to_feature` covers the same ``image_size`` square as the input, and the warp is
    done in ``grid_sample``'s normalised coordinates, which are shared by every resolution of
    that square, so the transform estimated in input pixels is rescaled automatically (a
    translation of ``d`` input pixels moves a ``h``-pixel mask by ``d · h / image_size`` of its
    pixels). ``image_size`` is always the model-input size the landmarks are measured in.

    Args:
        masks: ``(T, h, w)`` float masks in ``[0, 1]`` (one per guided attribute, e.g. stacked
            :func:`mask_to_input` / :func:`mask_to_feature` outputs), or ``(h, w)`` for
            ``T = 1``.
        landmarks: ``(B, 5, 2)`` landmarks ``(x, y)`` of the batch's images in model-input
            pixels (as :meth:`cocam.dataset.CelebADataset.get_batch` returns them), a tensor or
            array; moved to ``masks``' device.
        image_size: side of the square model input the landmarks refer to.
        validate: check that no image's landmarks all coincide (e.g. missing landmarks stored
            as zeros). The check reads a value back from the device, a synchronisation per
            batch on CUDA; a training loop over validated data may pass ``False`` (a degenerate
            image then gets NaN values instead of an error).

    Returns:
        ``(B, T, h, w)`` tensor on ``masks``' device, with ``masks``' floating dtype (the
        transform itself is computed in at least float32).

    Raises:
        ValueError: wrong shapes, a non-positive ``image_size`` or degenerate landmarks.
    """
    if not isinstance(masks, Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (T, h, w) (or (h, w)), got shape {tuple(masks.shape)}; stack one "
                         f"mask_to_input / mask_to_feature output per guided attribute.")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    image_size = int(image_size)
    if not masks.is_floating_point():
        masks = masks.to(torch.float32)
    lm = landmarks if isinstance(landmarks, Tensor) else torch.from_numpy(np.array(landmarks))
    if lm.ndim != 3 or tuple(lm.shape[1:]) != (5, 2):
        raise ValueError(f"landmarks must be (B, 5, 2) (x, y) in model-input pixels, got shape {tuple(lm.shape)}.")
    dtype = torch.promote_types(masks.dtype, torch.float32)
    lm = lm.to(device=masks.device, dtype=dtype)
    t, h, w = masks.shape
    b = lm.shape[0]
    if b == 0:
        return masks.new_zeros((0, t, h, w))
    template = torch.as_tensor(aligned_to_input(TEMPLATE_LANDMARKS, image_size), dtype=dtype, device=masks.device)
    forward = similarity_transform(template, lm, check=False)  # template pixels -> image pixels, (B, 2, 3)
    try:
        inverse = invert_affine(forward, check=validate)
    except ValueError:
        raise ValueError("some images' landmarks all coincide (missing landmarks?): a mask cannot be moved onto "
                         "them; check dataset.landmarks, or use transfer='template'.") from None
    theta = _input_to_normalised(inverse, image_size)  # output grid -> template mask, normalised
    grid = F.affine_grid(theta, [b, t, h, w], align_corners=False).to(masks.dtype)
    return F.grid_sample(masks.expand(b, t, h, w), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def masks_for_batch(masks: Tensor, landmarks: np.ndarray | Tensor | None, transfer: str,
                    image_size: int, *, validate: bool = True) -> Tensor:
    """The guidance masks for one batch, placed by ``transfer`` (one of :data:`MASK_TRANSFERS`).

    Args:
        masks: ``(T, h, w)`` template-placed masks at input or feature resolution.
        landmarks: ``(B, 5, 2)`` the batch's landmarks in model-input pixels (unused, may be
            ``None``, for ``"template"``).
        transfer: ``"template"`` or ``"landmarks"``.
        image_size: side of the model input (see :func:`transfer_masks`).
        validate: passed to :func:`transfer_masks`.

    Returns:
        ``"template"``: ``masks`` itself, ``(T, h, w)`` — the same region for every image; it
        broadcasts against ``(B, T, h, w)`` CAMs (:func:`cocam.losses.soft_iou`).
        ``"landmarks"``: ``(B, T, h, w)`` from :func:`transfer_masks`, one per image.

    Raises:
        ValueError: an unknown ``transfer`` (the message lists the valid ones), or
            ``"landmarks"`` without landmarks.
    """
    if transfer not in MASK_TRANSFERS:
        raise ValueError(f"unknown mask transfer {transfer!r}; choose one of "
                         f"{', '.join(repr(name) for name in MASK_TRANSFERS)}.")
    if transfer == "template":
        return masks
    if landmarks is None:
        raise ValueError("the 'landmarks' transfer needs the batch's (B, 5, 2) landmarks; pass them (the third "
                         "element of CelebADataset.get_batch) or use transfer='template'.")
    return transfer_masks(masks, landmarks, image_size, validate=validate)


def transfer_quality(dataset: CelebADataset, attribute: str, mask: np.ndarray | Tensor | None, *,
                     transfers: Sequence[str] = MASK_TRANSFERS, batch_size: int = 256) -> pd.DataFrame:
    """How well each mask transfer matches the true evidence region, on a synthetic dataset.

    For every image of ``dataset`` that has ``attribute``, the template mask is placed on the
    image by each transfer (:func:`masks_for_batch`, at the dataset's ``image_size``) and
    compared with the image's ground-truth region of ``attribute`` (from the dataset's
    ``evidence_regions.npz``, :class:`cocam.synthetic.EvidenceRegions`) by
    :func:`cocam.losses.soft_iou`.

    Args:
        dataset: a split (or subset) of the synthetic dataset.
        attribute: a localised attribute, e.g. ``"Wearing_Lipstick"``.
        mask: the template mask (anything :func:`as_template_mask` accepts); ``None`` uses
            :func:`default_mask` of ``attribute``.
        transfers: which of :data:`MASK_TRANSFERS` to score.
        batch_size: images per step.

    Returns:
        One row per transfer: ``transfer``, ``attribute``, ``soft_iou`` (mean over the
        images), ``soft_iou_std`` and ``n`` (images scored; ``soft_iou`` is NaN when 0).

    Raises:
        FileNotFoundError: ``dataset`` has no ground-truth regions (real CelebA).
        ValueError: an unknown transfer or an attribute without a localised region.
        cocam.attributes.UnknownAttributeError: a misspelled attribute.
    """
    from cocam.attributes import attribute_index
    from cocam.losses import soft_iou
    from cocam.synthetic import EvidenceRegions

    column = attribute_index(attribute)
    transfers = list(transfers)
    for name in transfers:
        if name not in MASK_TRANSFERS:
            raise ValueError(f"unknown mask transfer {name!r}; choose from "
                             f"{', '.join(repr(n) for n in MASK_TRANSFERS)}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    regions = EvidenceRegions(dataset.root)
    size = dataset.image_size
    template = mask_to_input(default_mask(attribute) if mask is None else mask, size)[None]  # (1, S, S)
    positives = np.flatnonzero(np.asarray(dataset.targets)[:, column] > 0)
    names = dataset.names[positives]
    landmarks = np.asarray(dataset.landmarks)[positives]
    scores: dict[str, list[Tensor]] = {name: [] for name in transfers}
    for start in range(0, len(positives), int(batch_size)):
        stop = start + int(batch_size)
        truth = regions.masks(list(names[start:stop]), attribute, size).float()  # (b, S, S)
        for name in transfers:
            placed = masks_for_batch(template, landmarks[start:stop], name, size)  # (1,S,S) or (b,1,S,S)
            scores[name].append(soft_iou(placed.reshape(-1, size, size), truth))
    rows = []
    for name in transfers:
        values = torch.cat(scores[name]) if scores[name] else torch.zeros(0)
        n = int(values.numel())
        rows.append({"transfer": name, "attribute": attribute,
                     "soft_iou": float(values.mean()) if n else float("nan"),
                     "soft_iou_std": float(values.std(unbiased=False)) if n else float("nan"), "n": n})
    return pd.DataFrame(rows, columns=["transfer", "attribute", "soft_iou", "soft_iou_std", "n"])
