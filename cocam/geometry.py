"""Image geometry shared by the data layer, masks and landmarks.

CelebA's aligned images are 178 wide and 218 high. cocam feeds models a square view: the
central 178×178 crop (rows 20..197, all columns), resized to ``image_size``. Eyes (y≈110) and
mouth (y≈150) lie well inside it. Masks drawn on the template face (in aligned-image
coordinates) and landmarks go through the same mapping, so a region means the same pixels
for the image, the mask and the landmarks.

Coordinates are ``(x, y)`` pixel positions with the **pixel-centre convention**: pixel
``(i, j)`` (row ``i``, column ``j``) has its centre at ``(x, y) = (j, i)`` and covers
``[j - 0.5, j + 0.5) × [i - 0.5, i + 0.5)``. This is the convention of
``torch.nn.functional.grid_sample`` / ``affine_grid`` with ``align_corners=False``, where the
normalised coordinate of ``x`` on an axis of ``n`` pixels is ``(2x + 1) / n - 1``.

Landmark-based transfer (:func:`similarity_transform`) uses 2×3 affine matrices ``M`` acting on
column vectors ``(x, y, 1)``: ``p' = M[:, :2] @ p + M[:, 2]`` (:func:`apply_affine`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ALIGNED_HEIGHT",
    "ALIGNED_WIDTH",
    "CROP_BOX",
    "LANDMARK_NAMES",
    "TEMPLATE_LANDMARKS",
    "aligned_to_input",
    "apply_affine",
    "invert_affine",
    "similarity_transform",
]

#: Width and height of CelebA's aligned images (``img_align_celeba``).
ALIGNED_WIDTH: int = 178
ALIGNED_HEIGHT: int = 218

#: (left, top, right, bottom) of the square crop taken from an aligned image, in pixels.
CROP_BOX: tuple[int, int, int, int] = (0, 20, 178, 198)

#: Order of CelebA's five landmarks (``list_landmarks_align_celeba.txt``).
LANDMARK_NAMES: tuple[str, ...] = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")

_TEMPLATE_LANDMARKS = np.array(
    [[69.0, 111.0], [108.0, 111.0], [88.5, 134.0], [73.5, 152.0], [103.5, 152.0]], dtype=np.float64
)
_TEMPLATE_LANDMARKS.flags.writeable = False
#: ``(5, 2)`` landmarks ``(x, y)`` of the template face (the face masks are drawn on), in
#: aligned 178×218 pixels, in :data:`LANDMARK_NAMES` order: CelebA's mean aligned geometry, the
#: same values as ``cocam.synthetic.render_template()`` and ``data/template_landmarks.json``
#: (``cocam template``). Read-only; map it to the model input with
#: ``aligned_to_input(TEMPLATE_LANDMARKS, image_size)``.
TEMPLATE_LANDMARKS: np.ndarray = _TEMPLATE_LANDMARKS


def aligned_to_input(xy: np.ndarray, image_size: int) -> np.ndarray:
    """Map (..., 2) pixel coordinates (x, y) of an aligned image to model-input coordinates.

    Uses pixel-centre convention: a coordinate ``c`` in the crop maps to
    ``(c + 0.5) * image_size / crop_extent - 0.5``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    left, top, right, bottom = CROP_BOX
    scale = np.array([image_size / (right - left), image_size / (bottom - top)])
    return (xy - np.array([left, top]) + 0.5) * scale - 0.5


def _as_float_tensor(x: np.ndarray | Tensor, name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.array(x))  # a copy: inputs may be read-only views
    if not t.is_floating_point():
        t = t.to(torch.float64 if not isinstance(x, Tensor) else torch.get_default_dtype())
    if t.ndim < 2 or t.shape[-1] != 2:
        raise ValueError(f"{name} must be (..., K, 2) points (x, y), got shape {tuple(t.shape)}.")
    return t


def similarity_transform(src: np.ndarray | Tensor, dst: np.ndarray | Tensor, *,
                         check: bool = True) -> np.ndarray | Tensor:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` points.

    Finds the rotation ``R`` (no reflection), uniform scale ``s ≥ 0`` and translation ``t``
    minimising ``Σ_k ||s R src_k + t - dst_k||²`` (Umeyama's / Procrustes' solution restricted
    to proper rotations). In 2-D it has a closed form: with ``u`` and ``v`` the points centred
    on their means, ``s cos θ = Σ (u · v) / Σ |u|²`` and ``s sin θ = Σ (u × v) / Σ |u|²``.
    Noise-free pairs related by a similarity are recovered exactly (to rounding).

    Args:
        src: ``(..., K, 2)`` source points ``(x, y)``, ``K ≥ 2`` (e.g. the template's five
            landmarks); leading dimensions are batch dimensions and broadcast against ``dst``'s.
        dst: ``(..., K, 2)`` destination points in the same order (e.g. an image's landmarks).
        check: raise on coinciding ``src`` points. Checking reads a value back from the
            device (a synchronisation on CUDA); ``False`` skips it, and a degenerate ``src``
            then gives NaN/inf entries.

    Returns:
        ``(..., 2, 3)`` matrices ``M`` with ``dst ≈ M[..., :2] @ src + M[..., 2]`` (see
        :func:`apply_affine`). A :class:`torch.Tensor` on ``src``'s device when either input is
        a tensor (computed there, so batches run on the GPU), else a float64 NumPy array.

    Raises:
        ValueError: shapes that are not ``(..., K, 2)`` with the same ``K ≥ 2``, or ``src``
            points that all coincide (no rotation or scale can be estimated from them).
    """
    as_numpy = not isinstance(src, Tensor) and not isinstance(dst, Tensor)
    s = _as_float_tensor(src, "src")
    d = _as_float_tensor(dst, "dst")
    if s.shape[-2] != d.shape[-2]:
        raise ValueError(f"src has {s.shape[-2]} points and dst {d.shape[-2]}: give corresponding points in the "
                         f"same order (e.g. the five CelebA landmarks of both faces).")
    if s.shape[-2] < 2:
        raise ValueError("a similarity transform needs at least 2 corresponding points.")
    dtype = torch.promote_types(s.dtype, d.dtype)
    s, d = s.to(dtype), d.to(device=s.device, dtype=dtype)
    s_mean, d_mean = s.mean(dim=-2, keepdim=True), d.mean(dim=-2, keepdim=True)
    u, v = s - s_mean, d - d_mean
    norm = (u * u).sum(dim=(-2, -1))
    dot = (u * v).sum(dim=(-2, -1))
    cross = (u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]).sum(dim=-1)
    if check and bool((norm <= torch.finfo(dtype).tiny).any()):
        raise ValueError("all src points coincide: a similarity transform needs at least two distinct points "
                         "(check that the landmarks are not all zero or missing).")
    a, b = dot / norm, cross / norm  # s cos θ, s sin θ
    linear = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=-2)  # (..., 2, 2)
    shift = d_mean[..., 0, :] - (linear @ s_mean[..., 0, :, None])[..., 0]
    matrix = torch.cat([linear, shift[..., None]], dim=-1)
    return matrix.numpy() if as_numpy else matrix


def apply_affine(matrix: np.ndarray | Tensor, points: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Apply ``(..., 2, 3)`` affine matrices to ``(..., K, 2)`` points: ``M[:, :2] @ p + M[:, 2]``.

    Batch dimensions broadcast. Returns a tensor when either input is one, else NumPy.
    """
    as_numpy = not isinstance(matrix, Tensor) and not isinstance(points, Tensor)
    m = matrix if isinstance(matrix, Tensor) else torch.from_numpy(np.array(matrix))
    p = points if isinstance(points, Tensor) else torch.from_numpy(np.array(points))
    if m.shape[-2:] != (2, 3):
        raise ValueError(f"matrix must be (..., 2, 3), got shape {tuple(m.shape)}.")
    if p.ndim < 2 or p.shape[-1] != 2:
        raise ValueError(f"points must be (..., K, 2), got shape {tuple(p.shape)}.")
    dtype = torch.promote_types(m.dtype, p.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    m, p = m.to(dtype), p.to(device=m.device, dtype=dtype)
    out = p @ m[..., :2].transpose(-1, -2) + m[..., None, :, 2]
    return out.numpy() if as_numpy else out


def invert_affine(matrix: np.ndarray | Tensor, *, check: bool = True) -> np.ndarray | Tensor:
    """Inverse of ``(..., 2, 3)`` invertible affine matrices (same type as the input).

    Args:
        matrix: ``(..., 2, 3)`` affine matrices.
        check: raise on a singular matrix (a device synchronisation on CUDA); ``False`` skips
            the check, and a singular matrix then gives NaN/inf entries.

    Raises:
        ValueError: a matrix whose linear part is singular (e.g. a zero scale).
    """
    as_numpy = not isinstance(matrix, Tensor)
    m = torch.from_numpy(np.array(matrix)) if as_numpy else matrix
    if m.shape[-2:] != (2, 3):
        raise ValueError(f"matrix must be (..., 2, 3), got shape {tuple(m.shape)}.")
    if not m.is_floating_point():
        m = m.to(torch.float64)
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    if check and bool((det.abs() <= torch.finfo(m.dtype).eps).any()):
        raise ValueError("the affine matrix is singular (zero scale): it cannot be inverted.")
    inv = torch.stack([torch.stack([d, -b], dim=-1), torch.stack([-c, a], dim=-1)], dim=-2) / det[..., None, None]
    shift = -(inv @ m[..., :, 2:])
    out = torch.cat([inv, shift], dim=-1)
    return out.numpy() if as_numpy else out
