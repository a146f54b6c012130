"""Tests for cocam.masks: loading, validation, saving and mapping to the model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocam.geometry import aligned_to_input
from cocam.masks import (
    TEMPLATE_SHAPE,
    as_template_mask,
    default_mask,
    is_shipped_mask,
    load_mask,
    mask_to_feature,
    mask_to_input,
    save_mask,
    shipped_mask_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mouth() -> np.ndarray:
    mask = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    mask[140:165, 60:120] = True
    return mask


def test_save_load_roundtrip(tmp_path, mouth) -> None:
    path = save_mask(tmp_path / "mouth.png", mouth)
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (178, 218)
        assert set(np.unique(np.asarray(img))) == {0, 255}
    loaded = load_mask(path)
    assert loaded.dtype == bool and loaded.shape == (218, 178)
    assert np.array_equal(loaded, mouth)
    assert [p.name for p in tmp_path.iterdir()] == ["mouth.png"]  # no temporary left behind


def test_save_refuses_overwrite_unless_asked(tmp_path, mouth) -> None:
    path = tmp_path / "m.png"
    save_mask(path, mouth)
    other = np.zeros_like(mouth)
    other[10:50, 10:50] = True
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_mask(path, other)
    assert np.array_equal(load_mask(path), mouth)
    save_mask(path, other, overwrite=True)
    assert np.array_equal(load_mask(path), other)
    with pytest.raises(ValueError, match=".png"):
        save_mask(tmp_path / "m.jpg", mouth)
    with pytest.raises(ValueError, match="empty"):
        save_mask(tmp_path / "empty.png", np.zeros_like(mouth))
    assert not (tmp_path / "empty.png").exists()


def test_grayscale_threshold_is_strictly_above_half(tmp_path) -> None:
    arr = np.zeros(TEMPLATE_SHAPE, dtype=np.uint8)
    arr[100:110, :] = 128  # 128/255 > 0.5 -> in the region
    arr[120:130, :] = 127  # 127/255 < 0.5 -> not
    Image.fromarray(arr).save(tmp_path / "g.png")
    mask = load_mask(tmp_path / "g.png")
    assert mask[100:110].all() and not mask[120:130].any() and mask.sum() == 10 * 178


def test_rgb_uses_the_brightest_channel(tmp_path, mouth) -> None:
    # A stroke of any bright colour on black is the region: pure red has luminance 76 (< 128), which read
    # the region as empty; its brightest channel is 255.
    for colour in [(255, 255, 255), (255, 0, 0), (0, 200, 0), (0, 0, 255)]:
        rgb = np.zeros((*TEMPLATE_SHAPE, 3), dtype=np.uint8)
        rgb[mouth] = colour
        Image.fromarray(rgb).save(tmp_path / "rgb.png")
        assert np.array_equal(load_mask(tmp_path / "rgb.png"), mouth), colour
    rgb = np.zeros((*TEMPLATE_SHAPE, 3), dtype=np.uint8)
    rgb[mouth] = (127, 0, 40)  # brightest channel 127/255 < 0.5: not in the region
    Image.fromarray(rgb).save(tmp_path / "dark.png")
    with pytest.raises(ValueError, match="empty"):
        load_mask(tmp_path / "dark.png")
    # A palette image (no transparency) goes through RGB: the same rule.
    rgb[mouth] = (200, 0, 0)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert np.array_equal(load_mask(tmp_path / "p.png"), mouth)


def test_rgba_uses_nontrivial_alpha_else_luminance(tmp_path, mouth) -> None:
    rgba = np.full((*TEMPLATE_SHAPE, 4), 255, dtype=np.uint8)  # white everywhere
    rgba[..., 3] = np.where(mouth, 255, 0)  # painted region = opaque
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert np.array_equal(load_mask(tmp_path / "alpha.png"), mouth)

    opaque = np.zeros((*TEMPLATE_SHAPE, 4), dtype=np.uint8)
    opaque[..., 3] = 255  # constant alpha: fall back to luminance
    opaque[mouth, :3] = 255
    Image.fromarray(opaque).save(tmp_path / "opaque.png")
    assert np.array_equal(load_mask(tmp_path / "opaque.png"), mouth)

    la = np.stack([np.zeros(TEMPLATE_SHAPE, np.uint8), np.where(mouth, 255, 0).astype(np.uint8)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert np.array_equal(load_mask(tmp_path / "la.png"), mouth)


def test_16_bit_and_1_bit_png(tmp_path, mouth) -> None:
    Image.fromarray(mouth.astype(np.uint16) * 40000).save(tmp_path / "16.png")
    assert np.array_equal(load_mask(tmp_path / "16.png"), mouth)
    Image.fromarray(mouth.astype(np.uint16) * 30000).save(tmp_path / "16dark.png")  # < 32767.5
    with pytest.raises(ValueError, match="empty"):
        load_mask(tmp_path / "16dark.png")
    Image.fromarray(mouth).convert("1").save(tmp_path / "1.png")
    assert np.array_equal(load_mask(tmp_path / "1.png"), mouth)


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m,
        lambda m: m.astype(np.uint8) * 255,
        lambda m: m.astype(np.float32) * 0.9,
        lambda m: m.astype(np.int64),
        lambda m: m[..., None],
    ],
    ids=["bool", "uint8", "float", "int01", "hw1"],
)
def test_npy_dtypes(tmp_path, mouth, convert) -> None:
    np.save(tmp_path / "m.npy", convert(mouth))
    assert np.array_equal(load_mask(tmp_path / "m.npy"), mouth)


def test_float_threshold_and_range() -> None:
    arr = np.zeros(TEMPLATE_SHAPE, dtype=np.float64)
    arr[50:60] = 0.5  # exactly one half: not in the region
    arr[70:80] = 0.51
    mask = as_template_mask(arr)
    assert mask[70:80].all() and not mask[50:60].any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_template_mask(arr * 255)
    arr[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        as_template_mask(arr)


def test_unsupported_values_explain_the_rule(mouth) -> None:
    with pytest.raises(ValueError, match="0/255"):
        as_template_mask(mouth.astype(np.uint8))  # 0/1 stored as uint8
    with pytest.raises(ValueError, match="unsupported mask dtype"):
        as_template_mask(mouth.astype(np.int32) * 2)
    with pytest.raises(ValueError, match="2-D"):
        as_template_mask(np.stack([mouth] * 3, axis=-1))


def test_degenerate_masks(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty"):
        as_template_mask(np.zeros(TEMPLATE_SHAPE, bool))
    with pytest.raises(ValueError, match="whole template"):
        as_template_mask(np.ones(TEMPLATE_SHAPE, bool))
    np.save(tmp_path / "empty.npy", np.zeros(TEMPLATE_SHAPE, bool))
    with pytest.raises(ValueError, match="empty.npy"):
        load_mask(tmp_path / "empty.npy")
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "missing.png")


def test_other_resolutions_with_template_aspect(tmp_path, mouth) -> None:
    double = np.kron(mouth, np.ones((2, 2), dtype=bool))  # 356 x 436
    assert np.array_equal(as_template_mask(double), mouth)
    Image.fromarray(double.astype(np.uint8) * 255).save(tmp_path / "double.png")
    assert np.array_equal(load_mask(tmp_path / "double.png"), mouth)
    half = mouth[::2, ::2]  # 89 x 109, enlarged back
    restored = as_template_mask(half)
    assert restored.shape == TEMPLATE_SHAPE and (restored != mouth).sum() < 0.1 * mouth.sum()
    assert as_template_mask(mouth[:, :-1]).shape == TEMPLATE_SHAPE  # 177x218: rounding allowed


@pytest.mark.parametrize("shape", [(178, 178), (178, 218), (224, 224), (218, 170)])
def test_wrong_aspect_ratio_is_an_error(shape) -> None:
    arr = np.zeros(shape, dtype=bool)
    arr[50:60, 50:60] = True
    with pytest.raises(ValueError, match="178:218"):
        as_template_mask(arr)


def test_mask_to_input_crops_and_area_averages(mouth) -> None:
    out = mask_to_input(mouth, 89)  # 178 -> 89: exact 2x2 block means of the crop
    assert out.dtype == torch.float32 and out.shape == (89, 89)
    expected = mouth[20:198].reshape(89, 2, 89, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)

    edge = np.zeros(TEMPLATE_SHAPE, bool)
    edge[21:40, 0:50] = True  # odd start row: border pixels half covered at 89 px
    vals = np.unique(mask_to_input(edge, 89).numpy())
    assert set(np.round(vals, 4)) == {0.0, 0.5, 1.0}

    big = mask_to_input(mouth, 224, device="cpu")
    assert big.shape == (224, 224) and big.min() >= 0 and big.max() == 1
    assert float(big.sum()) * (178 / 224) ** 2 == pytest.approx(mouth.sum(), rel=1e-4)
    torch.testing.assert_close(mask_to_input(torch.from_numpy(mouth), 64), mask_to_input(mouth, 64))


def test_thin_region_does_not_vanish() -> None:
    line = np.zeros(TEMPLATE_SHAPE, bool)
    line[120, :] = True  # one pixel high
    small = mask_to_input(line, 16)
    assert small.max() > 0.05
    assert float(small.sum()) * (178 / 16) ** 2 == pytest.approx(178, rel=1e-4)  # area preserved


def test_mask_to_input_matches_geometry(mouth) -> None:
    ys, xs = np.nonzero(mouth)
    centre = aligned_to_input(np.array([xs.mean(), ys.mean()]), 64)
    out = mask_to_input(mouth, 64).numpy()
    rows, cols = np.indices(out.shape)
    centroid = np.array([(cols * out).sum(), (rows * out).sum()]) / out.sum()
    np.testing.assert_allclose(centroid, centre, atol=0.05)


def test_region_outside_crop_is_an_error() -> None:
    top = np.zeros(TEMPLATE_SHAPE, bool)
    top[0:15, 40:120] = True  # rows 0..19 are cut by the square crop
    assert as_template_mask(top).any()
    with pytest.raises(ValueError, match="outside the model's view"):
        mask_to_input(top, 64)


def test_mask_to_feature(mouth) -> None:
    feat = mask_to_feature(mouth, 13)
    torch.testing.assert_close(feat, mask_to_input(mouth, 13))
    assert feat.shape == (13, 13) and 0 < feat.max() <= 1
    assert mask_to_feature(mouth, (5, 7)).shape == (5, 7)
    with pytest.raises(ValueError, match="positive"):
        mask_to_feature(mouth, 0)
    with pytest.raises(ValueError, match="positive"):
        mask_to_input(mouth, 0)


@pytest.mark.parametrize("shape", [(2, 2), (3, 2), (5, 5), (54, 44), (109, 44)])
def test_tiny_images_are_refused_even_with_a_near_template_aspect(shape) -> None:
    # 2x2 is within one pixel of 178:218 (2 * 178/218 = 1.63): the aspect check alone let it through.
    arr = np.zeros(shape, dtype=bool)
    arr[0, 0] = True
    with pytest.raises(ValueError, match="too small.*at least 45x55"):
        as_template_mask(arr)


def test_smallest_accepted_mask_is_a_quarter_of_the_template() -> None:
    from cocam.masks import MIN_MASK_SIZE

    assert MIN_MASK_SIZE == (55, 45)
    arr = np.zeros(MIN_MASK_SIZE, dtype=bool)
    arr[35:42, 15:30] = True
    assert as_template_mask(arr).shape == TEMPLATE_SHAPE


def test_a_mask_covering_most_of_the_face_warns(tmp_path, mouth) -> None:
    import warnings

    from cocam.masks import MAX_REGION_SHARE, MaskCoverageWarning, region_share

    inverted = ~mouth  # black mouth on white: the region is everything but the mouth
    assert region_share(inverted) > MAX_REGION_SHARE
    Image.fromarray(inverted.astype(np.uint8) * 255).save(tmp_path / "inverted.png")
    with pytest.warns(MaskCoverageWarning, match=r"inverted\.png: the region covers 9\d % .*inverted"):
        assert np.array_equal(load_mask(tmp_path / "inverted.png"), inverted)  # still accepted
    with pytest.warns(MaskCoverageWarning):
        save_mask(tmp_path / "saved.png", inverted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal region (and the largest built-in one) stays silent
        save_mask(tmp_path / "mouth.png", mouth)
        load_mask(tmp_path / "mouth.png")
        from cocam.masks import default_mask

        assert region_share(default_mask("Wavy_Hair")) <= MAX_REGION_SHARE


def test_a_file_that_is_not_a_mask_is_a_one_line_error(tmp_path) -> None:
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(ValueError, match=r"notes\.png: not a readable image .*save the mask as a PNG"):
        load_mask(tmp_path / "notes.png")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"bad\.npy: not a NumPy array file"):
        load_mask(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy: not a NumPy array file"):
        load_mask(tmp_path / "obj.npy")  # pickled objects are never loaded


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder whose data/masks holds the shipped masks (cocam's built-in regions)."""
    monkeypatch.setenv("COCAM_PROJECT_DIR", str(tmp_path / "project"))
    for name in ("Wearing_Lipstick", "Double_Chin"):
        save_mask(tmp_path / "project" / "data" / "masks" / f"{name}.png", default_mask(name))
    return tmp_path / "project"


def test_the_repository_ships_the_built_in_regions(monkeypatch) -> None:
    monkeypatch.setenv("COCAM_PROJECT_DIR", str(ROOT))
    assert shipped_mask_dir() == ROOT / "data" / "masks"
    shipped = sorted(shipped_mask_dir().glob("*.png"))
    assert [p.stem for p in shipped] == ["Double_Chin", "High_Cheekbones", "Wearing_Lipstick"]
    assert all(is_shipped_mask(p) for p in shipped)


def test_shipped_masks_are_told_apart_from_a_users(project, tmp_path, monkeypatch) -> None:
    masks = project / "data" / "masks"
    assert is_shipped_mask(masks / "Wearing_Lipstick.png")
    monkeypatch.setenv("COCAM_MASK_DIR", str(tmp_path / "mine"))  # drawing elsewhere does not move the shipped ones
    assert shipped_mask_dir() == masks and is_shipped_mask(masks / "Wearing_Lipstick.png")
    assert not is_shipped_mask(masks / "High_Cheekbones.png")  # no such file
    drawn = default_mask("Double_Chin")
    drawn[:, :89] = False
    save_mask(masks / "Double_Chin.png", drawn, overwrite=True)
    assert not is_shipped_mask(masks / "Double_Chin.png")  # edited: the user's
    save_mask(masks / "High_Cheekbones.png", default_mask("Wearing_Lipstick"))
    assert not is_shipped_mask(masks / "High_Cheekbones.png")  # another attribute's region
    elsewhere = save_mask(tmp_path / "mine" / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))
    assert not is_shipped_mask(elsewhere)  # the built-in region, but outside the shipped folder
    (masks / "Smiling.png").write_bytes(b"broken")
    assert not is_shipped_mask(masks / "Smiling.png")  # unreadable: may be someone's
    assert not is_shipped_mask(masks / "notes.png")
