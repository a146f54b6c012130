"""Tests for landmark-based mask transfer: cocam.geometry's similarity transforms and cocam.masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cocam.attributes import UnknownAttributeError
from cocam.dataset import CelebADataset
from cocam.geometry import (
    TEMPLATE_LANDMARKS,
    aligned_to_input,
    apply_affine,
    invert_affine,
    similarity_transform,
)
from cocam.masks import (
    MASK_TRANSFERS,
    default_mask,
    mask_to_feature,
    mask_to_input,
    masks_for_batch,
    transfer_masks,
    transfer_quality,
)
from cocam.synthetic import EvidenceRegions, render_template

SIZE = 64


def _similarity(theta: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """(B, 2, 3) matrices built by hand from angle, scale and translation."""
    c, s = np.cos(theta) * scale, np.sin(theta) * scale
    return np.stack([np.stack([c, -s, shift[:, 0]], -1), np.stack([s, c, shift[:, 1]], -1)], -2)


def _centroid(mask: torch.Tensor) -> np.ndarray:
    """(x, y) centre of mass of a (h, w) mask in pixel-centre coordinates."""
    m = mask.double()
    ys, xs = torch.meshgrid(torch.arange(m.shape[0], dtype=torch.float64),
                            torch.arange(m.shape[1], dtype=torch.float64), indexing="ij")
    return np.array([float((m * xs).sum() / m.sum()), float((m * ys).sum() / m.sum())])


@pytest.fixture
def mouth() -> torch.Tensor:
    """(1, S, S) the template's lipstick region at model-input size."""
    return mask_to_input(default_mask("Wearing_Lipstick", margin=0), SIZE)[None]


def _template_input(size: int = SIZE) -> torch.Tensor:
    return torch.tensor(aligned_to_input(TEMPLATE_LANDMARKS, size), dtype=torch.float32)


# ------------------------------------------------------------------------------- geometry


def test_template_landmarks_are_the_template_face() -> None:
    _, landmarks, _ = render_template()
    np.testing.assert_array_equal(TEMPLATE_LANDMARKS, landmarks)
    shipped = Path(__file__).resolve().parents[1] / "data" / "template_landmarks.json"
    if shipped.is_file():
        np.testing.assert_array_equal(TEMPLATE_LANDMARKS, json.loads(shipped.read_text())["xy"])
    assert not TEMPLATE_LANDMARKS.flags.writeable


def test_similarity_transform_recovers_a_known_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(6, 5, 2))
    theta = rng.uniform(-np.pi, np.pi, 6)
    scale = rng.uniform(0.5, 2.0, 6)
    shift = rng.uniform(-30, 30, (6, 2))
    # dst by hand: x' = s (x cos θ - y sin θ) + tx, y' = s (x sin θ + y cos θ) + ty
    x, y = src[..., 0], src[..., 1]
    dst = np.stack([scale[:, None] * (x * np.cos(theta)[:, None] - y * np.sin(theta)[:, None]) + shift[:, :1],
                    scale[:, None] * (x * np.sin(theta)[:, None] + y * np.cos(theta)[:, None]) + shift[:, 1:]], -1)

    matrix = similarity_transform(src, dst)
    assert isinstance(matrix, np.ndarray) and matrix.shape == (6, 2, 3)
    np.testing.assert_allclose(matrix, _similarity(theta, scale, shift), atol=1e-10)

    on_device = similarity_transform(torch.from_numpy(src), torch.from_numpy(dst))  # the torch path
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float64
    np.testing.assert_allclose(on_device.numpy(), matrix, atol=1e-12)

    # round trip: the reverse fit is the inverse, and applying both returns the points
    back = similarity_transform(dst, src)
    np.testing.assert_allclose(back, invert_affine(matrix), atol=1e-10)
    np.testing.assert_allclose(apply_affine(back, apply_affine(matrix, src)), src, atol=1e-9)


def test_similarity_transform_is_the_least_squares_fit() -> None:
    """With noise, the fit equals the linear least-squares solution for (a, b, tx, ty)."""
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = src @ np.array([[0.9, 0.3], [-0.3, 0.9]]) + [4.0, -7.0] + rng.normal(0, 2.0, (5, 2))
    # x' = a x - b y + tx ; y' = b x + a y + ty
    rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    np.testing.assert_allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-10)


def test_similarity_transform_never_reflects() -> None:
    src = TEMPLATE_LANDMARKS
    mirrored = src * [-1.0, 1.0]  # a reflection is not a similarity without reflection
    matrix = similarity_transform(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) >= 0
    assert np.abs(apply_affine(matrix, src) - mirrored).max() > 1.0  # so it cannot fit exactly


def test_similarity_transform_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.zeros((5, 2)), TEMPLATE_LANDMARKS)
    with pytest.raises(ValueError, match="4 points and dst 5"):
        similarity_transform(TEMPLATE_LANDMARKS[:4], TEMPLATE_LANDMARKS)
    with pytest.raises(ValueError, match=r"\(\.\.\., K, 2\)"):
        similarity_transform(np.zeros((5, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="singular"):
        invert_affine(np.zeros((2, 3)))


# ------------------------------------------------------------------------------- transfer


def test_template_landmarks_give_the_identity(mouth) -> None:
    rng = torch.Generator().manual_seed(0)
    masks = torch.cat([mouth, torch.rand(1, SIZE, SIZE, generator=rng)])  # a soft random mask too
    out = transfer_masks(masks, _template_input()[None].repeat(3, 1, 1), SIZE)
    assert out.shape == (3, 2, SIZE, SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(out, masks.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_translated_landmarks_translate_the_mask(mouth) -> None:
    base = _template_input()
    # whole pixels: the mask is shifted exactly
    out = transfer_masks(mouth, (base + torch.tensor([5.0, -3.0]))[None], SIZE)[0, 0]
    expected = torch.zeros_like(mouth[0])
    expected[0:SIZE - 3, 5:] = mouth[0, 3:, : SIZE - 5]  # y - 3, x + 5
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # fractional pixels: the centre of mass moves by the same amount (bilinear keeps it exact)
    shifts = torch.tensor([[2.25, 1.5], [-4.7, 0.3]])
    moved = transfer_masks(mouth, base + shifts[:, None], SIZE)[:, 0]
    for shift, m in zip(shifts.numpy(), moved):
        np.testing.assert_allclose(_centroid(m) - _centroid(mouth[0]), shift, atol=1e-3)
        assert abs(float(m.sum() - mouth.sum())) < 1e-3  # translation keeps the area


def test_rotation_and_scale_follow_the_landmarks(mouth) -> None:
    centre = (SIZE - 1) / 2
    base = _template_input().double()
    # a quarter turn about the image centre: out[i, j] = mask[S - 1 - j, i]
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
    turned = (base - centre) @ torch.from_numpy(quarter).T + centre
    out = transfer_masks(mouth, turned[None].float(), SIZE)[0, 0]
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    torch.testing.assert_close(out, mouth[0][SIZE - 1 - j, i], atol=1e-4, rtol=0)
    # scaling by 1.5 about a point scales the area by 2.25 and keeps that point fixed
    anchor = torch.tensor([30.0, 40.0], dtype=torch.float64)
    grown = transfer_masks(mouth, ((base - anchor) * 1.5 + anchor)[None].float(), SIZE)[0, 0]
    assert float(grown.sum() / mouth.sum()) == pytest.approx(2.25, rel=0.02)
    np.testing.assert_allclose(_centroid(grown) - anchor.numpy(), 1.5 * (_centroid(mouth[0]) - anchor.numpy()),
                               atol=0.05)


def test_transfer_at_feature_resolution() -> None:
    """A translation of d input pixels moves an h-pixel mask by d * h / S of its pixels."""
    region = default_mask("Wearing_Lipstick")
    feature = mask_to_feature(region, (8, 16))  # non-square, 8 rows x 16 columns
    base = _template_input()
    out = transfer_masks(feature, (base + torch.tensor([8.0, -16.0]))[None], SIZE)[0, 0]
    # x: 8 input px = 2 of 16 columns; y: -16 input px = -2 of 8 rows
    expected = torch.zeros_like(feature)
    expected[:-2, 2:] = feature[2:, :-2]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # identity at feature size too
    same = transfer_masks(feature, base[None], SIZE)[0, 0]
    torch.testing.assert_close(same, feature, atol=1e-4, rtol=0)


def test_masks_for_batch(mouth) -> None:
    landmarks = _template_input()[None].repeat(4, 1, 1) + torch.randn(4, 1, 2)
    assert MASK_TRANSFERS == ("template", "landmarks")
    assert masks_for_batch(mouth, landmarks, "template", SIZE) is mouth
    assert masks_for_batch(mouth, None, "template", SIZE) is mouth
    placed = masks_for_batch(mouth, landmarks.numpy(), "landmarks", SIZE)  # numpy landmarks work too
    assert placed.shape == (4, 1, SIZE, SIZE)
    torch.testing.assert_close(placed, transfer_masks(mouth, landmarks, SIZE))
    with pytest.raises(ValueError, match="'template', 'landmarks'"):
        masks_for_batch(mouth, landmarks, "affine", SIZE)
    with pytest.raises(ValueError, match="needs the batch's"):
        masks_for_batch(mouth, None, "landmarks", SIZE)
    with pytest.raises(ValueError, match=r"\(B, 5, 2\)"):
        transfer_masks(mouth, landmarks[:, :4], SIZE)
    assert transfer_masks(mouth, torch.zeros(0, 5, 2), SIZE).shape == (0, 1, SIZE, SIZE)
    assert transfer_masks(mouth.double(), landmarks, SIZE).dtype == torch.float64
    missing = landmarks.clone()
    missing[2] = 0.0  # landmarks that all coincide (e.g. missing ones stored as zeros)
    with pytest.raises(ValueError, match="coincide"):
        masks_for_batch(mouth, missing, "landmarks", SIZE)
    assert masks_for_batch(mouth, missing, "landmarks", SIZE, validate=False)[2].isnan().all()  # no check, no sync


# ------------------------------------------------------------------------------- on the synthetic faces


def test_landmark_transfer_follows_the_synthetic_jitter(synthetic_root, one_thread) -> None:
    """Faces are jittered (±3 px, ±5 %); their landmarks record it, so the moved region is closer."""
    ds = CelebADataset(synthetic_root, "all", image_size=SIZE, progress=False)
    region = default_mask("Wearing_Lipstick", margin=0)  # the template's exact lipstick region

    quality = transfer_quality(ds, "Wearing_Lipstick", region).set_index("transfer")
    positives = np.flatnonzero(ds.attributes["Wearing_Lipstick"].to_numpy() > 0)
    assert list(quality.index) == list(MASK_TRANSFERS)
    assert (quality["n"] == len(positives)).all() and len(positives) > 20
    # measured on this smoke set at 64 px: template 0.68, landmarks 0.75
    assert quality.loc["landmarks", "soft_iou"] >= quality.loc["template", "soft_iou"] + 0.03

    # independently: the moved region is centred where the true ellipse of each image is
    truth = EvidenceRegions(synthetic_root).ellipses_for(list(ds.names[positives]), "Wearing_Lipstick")[:, 0, :2]
    truth_centre = aligned_to_input(truth.numpy(), SIZE)
    template = mask_to_input(region, SIZE)
    moved = transfer_masks(template, ds.landmarks[positives], SIZE)[:, 0]
    err_moved = np.linalg.norm(np.stack([_centroid(m) for m in moved]) - truth_centre, axis=1)
    err_fixed = np.linalg.norm(_centroid(template) - truth_centre, axis=1)
    assert err_moved.mean() < 0.6 * err_fixed.mean()
    assert err_moved.mean() < 1.0  # input pixels; landmarks are stored rounded to whole aligned pixels


def test_transfer_quality_errors(synthetic_root) -> None:
    ds = CelebADataset(synthetic_root, "test", image_size=SIZE, progress=False)
    with pytest.raises(UnknownAttributeError):
        transfer_quality(ds, "Wearing_Lipstik", None)
    with pytest.raises(ValueError, match="unknown mask transfer"):
        transfer_quality(ds, "Wearing_Lipstick", None, transfers=("template", "tps"))
    with pytest.raises(ValueError, match="global"):
        transfer_quality(ds, "Attractive", None)
    only = transfer_quality(ds, "Wearing_Lipstick", None, transfers=("landmarks",))
    assert list(only["transfer"]) == ["landmarks"] and list(only.columns) == [
        "transfer", "attribute", "soft_iou", "soft_iou_std", "n"]
