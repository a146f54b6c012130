"""Tests for cocam.ranking (what to correct next) and cocam.backgrounds (the faces to draw on).

The ranking tests use a hand-built model on hand-drawn images, so every score has a float64
reference computed here from the cached pixels and every order is known by construction:

* images: black 178×218 faces with one red square (side 30–60 px) left of, across or right of
  the column 89 that bounds the region ``S`` (the left half of the model's view), and one
  all-black face;
* model: ``A = ReLU(conv1x1(x))`` with two channels, ``A₀ = ReLU(red)`` (the square) and
  ``A₁ = ReLU(−red)`` (the background), at input resolution (so Grad-CAM needs no upsampling);
  every logit is ``c·(mean A₀ − k·mean A₁) + b``. Grad-CAM's channel weights are the spatial
  means of the gradients, ``w = sign·(c, −c·k) / HW``, so the CAM of a predicted positive
  (``sign = +1``) is the square, that of a predicted negative (``sign = −1``) the background, and
  that of the black face (a constant map) is dead.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _tolerance import gamma
from PIL import Image

from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.backgrounds import dataset_image, input_to_template, mean_image, mean_indices
from cocam.celeba import SPLITS, write_attributes, write_partition
from cocam.dataset import IMAGENET_MEAN, IMAGENET_STD, CelebADataset
from cocam.gradcam import NORMALIZE_EPS
from cocam.masks import TEMPLATE_SHAPE, mask_to_input
from cocam.model import SplitModel
from cocam.ranking import RANKINGS, rank_for_correction
from cocam.widget import MaskEditor

SIZE = 64  # model input: the 178×178 crop resized to 64×64
C, K = 20.0, 0.1
B = 1.284  # puts the decision at a square covering 6 % of the view: 30 and 40 px negative, 50 and 60 px positive
A, SHORTCUT = "Wearing_Lipstick", "Heavy_Makeup"

# (side, left column in the 178×178 crop, A label, B label); the square's top is crop row 60.
# The sides give distinct logits (about ±0.5 … ±3.6), so no two images share an uncertainty.
SQUARES = [
    (40, 20, 1, 0),    # 0: negative, inside S       -> a_not_b, wrong
    (49, 60, 1, 1),    # 1: positive, 20/49 outside  -> ab, right
    (60, 110, 1, 1),   # 2: positive, all outside    -> ab, right
    (32, 20, 1, 0),    # 3: negative, inside         -> a_not_b, wrong
    (54, 20, 1, 0),    # 4: positive, all inside     -> a_not_b, right
    (65, 40, 0, 1),    # 5: positive, 16/65 outside  -> not_a_b, wrong
    (26, 120, 0, 1),   # 6: negative, all outside    -> not_a_b, right
    (20, 79, 0, 0),    # 7: negative, 10/20 outside  -> not_a_not_b, right
    (0, 0, 0, 0),      # 8: all black (dead CAM)     -> not_a_not_b, right
]


def _face(side: int, left: int) -> np.ndarray:
    image = np.zeros((*TEMPLATE_SHAPE, 3), dtype=np.uint8)
    image[20 + 60:20 + 60 + side, left:left + side, 0] = 255
    return image


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> object:
    root = tmp_path_factory.mktemp("squares")
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = pd.Index([f"{i + 1:06d}.jpg" for i in range(len(SQUARES))], name="image_id")
    attributes = pd.DataFrame(0, index=names, columns=list(CELEBA_ATTRIBUTES), dtype=np.uint8)
    for name, (side, left, a, b) in zip(names, SQUARES):
        Image.fromarray(_face(side, left)).save(folder / "img_align_celeba" / name, quality=95, subsampling=0)
        attributes.loc[name, [A, SHORTCUT]] = a, b
    write_attributes(folder / "list_attr_celeba.txt", attributes)
    write_partition(folder / "list_eval_partition.txt",
                    pd.Series(pd.Categorical(["valid"] * len(names), categories=list(SPLITS)), index=names))
    return root


@pytest.fixture(scope="module")
def dataset(root) -> CelebADataset:
    return CelebADataset(root, "valid", image_size=SIZE, num_workers=0, progress=False)


def region_mask() -> np.ndarray:
    """``S``: the left half of the model's view (template columns 0–88)."""
    mask = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    mask[20:198, :89] = True
    return mask


def squares_model() -> SplitModel:
    conv = torch.nn.Conv2d(3, 2, 1, bias=False)
    linear = torch.nn.Linear(2, len(CELEBA_ATTRIBUTES))
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0], conv.weight[1, 0] = 1.0, -1.0
        linear.weight[:, 0], linear.weight[:, 1] = C, -C * K
        linear.bias.fill_(B)
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), linear)
    return SplitModel(torch.nn.Sequential(conv, torch.nn.ReLU()), head, num_outputs=len(CELEBA_ATTRIBUTES))


def reference(dataset: CelebADataset) -> pd.DataFrame:
    """The scores in float64 from the cached pixels, by the formulas of the module docstrings."""
    pixels = dataset.get_batch_numpy(np.arange(len(dataset)))[0].astype(np.float64)
    red = (pixels[..., 0] / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    a0, a1 = np.maximum(red, 0.0), np.maximum(-red, 0.0)
    logit = C * (a0.mean(axis=(1, 2)) - K * a1.mean(axis=(1, 2))) + B
    sign = np.where(logit > 0, 1.0, -1.0)[:, None, None]
    raw = np.maximum(sign * (C * a0 - C * K * a1) / SIZE**2, 0.0)
    lo, hi = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    cam = (raw - lo) / np.maximum(hi - lo, NORMALIZE_EPS)
    s = mask_to_input(region_mask(), SIZE).double().numpy()
    total = cam.sum(axis=(1, 2))
    inside = (cam * s).sum(axis=(1, 2)) / np.maximum(total, 1e-12)
    p = 1.0 / (1.0 + np.exp(-logit))
    dead = hi[:, 0, 0] - lo[:, 0, 0] == 0
    return pd.DataFrame({"logit": logit, "p": p, "outside_energy": 1.0 - inside, "dead": dead})


# float32 rounding along the model's path (Higham's γ_n, tests/_tolerance.py): a logit adds up the
# normalisation and the 1×1 convolution (a few terms) and the mean over the SIZE² positions; a CAM
# adds the channel weights (a mean of SIZE² gradients) and the energy share two sums over SIZE²
# pixels — a ratio, so the two relative errors add.
N_LOGIT = SIZE**2 + 8
N_CHAIN = 3 * SIZE**2 + 16
U = gamma(N_LOGIT, torch.float32) + gamma(N_LOGIT, torch.float64)
LOGIT_BOUND = U * (C * (2.3 + K * 2.2) + B)  # times Σ|terms| of a logit (|normalised red| ≤ 2.25)
P_BOUND = LOGIT_BOUND / 4  # |dσ/dl| ≤ 1/4
SHARE_BOUND = 2 * (gamma(N_CHAIN, torch.float32) + gamma(N_CHAIN, torch.float64))


def order_of(scores: np.ndarray, outside: np.ndarray) -> list[int]:
    """Descending by score, ties by outside energy (descending), then by index."""
    return list(np.lexsort((np.arange(len(scores)), -outside, -scores)))


def test_the_scores_match_a_float64_reference(dataset) -> None:
    ref = reference(dataset)
    got = rank_for_correction(squares_model(), dataset, A, region_mask(), device="cpu", batch_size=4)
    got = got.sort_values("index").reset_index(drop=True)
    assert got["index"].tolist() == list(range(len(SQUARES)))
    assert got["image"].tolist() == list(dataset.names)
    assert got["label"].tolist() == [a for _, _, a, _ in SQUARES]
    # the design: squares of 49 px and more are predicted positive, those of 40 px and less and the black face negative
    assert (ref.logit > 0).tolist() == [s >= 44 for s, _, _, _ in SQUARES]
    assert np.abs(ref.logit).min() > 0.3  # no decision near the threshold
    assert np.abs(got.p - ref.p).max() <= P_BOUND
    assert np.abs(got.outside_energy - ref.outside_energy).max() <= SHARE_BOUND
    assert np.abs(got.uncertainty - (1 - np.abs(2 * ref.p - 1))).max() <= 2 * P_BOUND
    assert got.correct.tolist() == [(lg > 0) == bool(a) for lg, (_, _, a, _) in zip(ref.logit, SQUARES)]
    # by construction: a positive's CAM is its square, a negative's the background, the black face's dead
    assert got.outside_energy[4] <= SHARE_BOUND and got.outside_energy[2] == 1.0
    assert got.dead_cam.tolist() == ref.dead.tolist() == [False] * 8 + [True]
    assert got.outside_energy[8] == 1.0  # a dead CAM has no mass in S
    assert 0.45 < got.outside_energy[0] < 0.6  # a negative: the share of the background outside S
    assert "group" not in got.columns and "worst_group" not in got.columns


@pytest.mark.parametrize("by", ["outside_energy", "uncertainty"])
def test_the_order_is_the_reference_order(dataset, by) -> None:
    ref = reference(dataset)
    score = ref.outside_energy.to_numpy() if by == "outside_energy" else 1 - np.abs(2 * ref.p.to_numpy() - 1)
    got = rank_for_correction(squares_model(), dataset, A, region_mask(), by=by, device="cpu")
    expected = order_of(score, ref.outside_energy.to_numpy())
    assert got["index"].tolist() == expected
    assert got["rank"].tolist() == list(range(1, len(SQUARES) + 1))
    assert got[by].is_monotonic_decreasing
    bound = SHARE_BOUND if by == "outside_energy" else 2 * P_BOUND
    gaps = np.diff(np.sort(np.unique(score)))
    assert gaps.min() > 2 * bound  # rounding cannot reorder them (the two tied at exactly 1 are ordered by index)
    if by == "outside_energy":
        # designed: the square right of S, then the dead face (tied at 1: by index), ..., the square inside S
        assert expected[:2] == [2, 8] and expected[-1] == 4


def test_worst_group_first_then_by_outside_energy(dataset) -> None:
    got = rank_for_correction(squares_model(), dataset, A, region_mask(), by="worst_group", shortcut=SHORTCUT,
                              device="cpu")
    # a_not_b: 1 of 3 right (0, 3 wrong) -> worst; not_a_b: 1 of 2; ab and not_a_not_b: all right
    accuracy = {"a_not_b": 1 / 3, "not_a_b": 1 / 2, "ab": 1.0, "not_a_not_b": 1.0}
    assert got["index"].tolist() == [0, 3, 4, 6, 5, 2, 8, 7, 1]
    assert got["group"].tolist() == ["a_not_b"] * 3 + ["not_a_b"] * 2 + ["ab", "not_a_not_b", "not_a_not_b", "ab"]
    assert np.allclose(got.group_accuracy, [accuracy[g] for g in got.group], rtol=0, atol=1e-15)
    assert np.allclose(got.worst_group, 1 - got.group_accuracy, rtol=0, atol=1e-15)
    # the other rankings' scores sit beside it, for the same images
    by_outside = rank_for_correction(squares_model(), dataset, A, region_mask(), shortcut=SHORTCUT, device="cpu")
    assert by_outside.set_index("index").outside_energy.sort_index().equals(
        got.set_index("index").outside_energy.sort_index())


def test_random_is_the_seeded_permutation(dataset) -> None:
    model = squares_model()
    runs = {seed: rank_for_correction(model, dataset, A, region_mask(), by="random", seed=seed, device="cpu")
            for seed in (0, 0, 1)}
    n = len(SQUARES)
    for seed, got in runs.items():
        assert got["index"].tolist() == np.random.default_rng(seed).permutation(n).tolist()
        assert np.allclose(np.sort(got.random), 1 - np.arange(n)[::-1] / n)
    again = rank_for_correction(model, dataset, A, region_mask(), by="random", seed=0, device="cpu")
    assert again["index"].tolist() == runs[0]["index"].tolist()
    assert runs[0]["index"].tolist() != runs[1]["index"].tolist()


def test_bad_requests_are_one_line_errors(dataset) -> None:
    model = squares_model()
    with pytest.raises(ValueError, match="unknown ranking 'energy': choose one of " + ", ".join(RANKINGS)):
        rank_for_correction(model, dataset, A, region_mask(), by="energy", device="cpu")
    with pytest.raises(ValueError, match="needs the shortcut attribute B"):
        rank_for_correction(model, dataset, A, region_mask(), by="worst_group", device="cpu")
    with pytest.raises(ValueError, match="another attribute"):
        rank_for_correction(model, dataset, A, region_mask(), shortcut=A, device="cpu")
    outside_view = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    outside_view[:10] = True
    with pytest.raises(ValueError, match="outside the model's view"):
        rank_for_correction(model, dataset, A, outside_view, device="cpu")
    with pytest.raises(ValueError, match="Wearing_Lipstick"):
        rank_for_correction(model, dataset, "Wearing_Lipstik", region_mask(), device="cpu")
    model.eval()
    rank_for_correction(model, dataset, A, region_mask(), device="cpu")
    assert not model.training  # the model's mode is left as it was given
    model.train()
    rank_for_correction(model, dataset, A, region_mask(), device="cpu")
    assert model.training


# -- the faces to draw on ---------------------------------------------------------------------


def full_crops(root, names) -> np.ndarray:
    """The 178×178 crops of the aligned JPEGs, decoded here, as float64."""
    folder = root / "celeba" / "img_align_celeba"
    crops = []
    for name in names:
        with Image.open(folder / name) as img:
            crops.append(np.asarray(img.convert("RGB"), dtype=np.float64)[20:198])
    return np.stack(crops)


def test_the_mean_face_is_the_float64_mean_of_the_images(synthetic_root) -> None:
    ds = CelebADataset(synthetic_root, "valid", image_size=178, num_workers=0, progress=False)
    crops = full_crops(synthetic_root, ds.names)
    face = mean_image(ds, chunk_size=5)  # chunks that do not divide the count
    assert face.shape == (218, 178, 3) and face.dtype == np.uint8
    assert np.array_equal(face[20:198], np.rint(crops.mean(axis=0)).astype(np.uint8))
    assert (face[:20] == 128).all() and (face[198:] == 128).all()  # outside the model's view
    some = mean_indices(len(ds), 7)
    assert some.tolist() == [i * len(ds) // 7 for i in range(7)]
    assert np.array_equal(mean_image(ds, max_images=7, fill=0)[20:198],
                          np.rint(crops[some].mean(axis=0)).astype(np.uint8))
    assert np.array_equal(mean_image(ds, max_images=10**6), face)
    with pytest.raises(ValueError, match="max_images must be at least 1"):
        mean_image(ds, max_images=0)


def test_the_mean_face_lands_where_the_faces_are(root, dataset) -> None:
    """At 64 px the mean goes back through a resize: a square's centroid stays within one input pixel."""
    face = mean_image(dataset).astype(np.float64)[20:198, :, 0]
    truth = full_crops(root, dataset.names).mean(axis=0)[..., 0]
    yy, xx = np.mgrid[:178, :178]
    for weights in (face, truth):
        assert weights.sum() > 0
    centroid = [((w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()) for w in (face, truth)]
    assert max(abs(a - b) for a, b in zip(*centroid)) < 178 / SIZE
    with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
        input_to_template(np.zeros((10, 12, 3)))


def test_a_dataset_image_is_its_aligned_jpeg(root, dataset) -> None:
    image = dataset_image(dataset, 2)
    with Image.open(root / "celeba" / "img_align_celeba" / dataset.names[2]) as img:
        assert np.array_equal(image, np.asarray(img.convert("RGB")))
    assert image[100:120, 130:150, 0].min() > 200 and image[100:120, 20:40, 0].max() < 40  # the square, right
    with pytest.raises(IndexError, match="out of range"):
        dataset_image(dataset, len(dataset))


def test_the_editor_draws_on_the_data_and_keeps_its_masks(tmp_path, dataset) -> None:
    editor = MaskEditor(A, mask_dir=tmp_path, scale=1, opacity=0.0, dataset=dataset)
    assert editor.background == "template"
    editor.stroke([(60.5, 150.5), (110.5, 150.5)])
    mask, undo = editor.mask, editor.can_undo
    for background, expected in (("mean", mean_image(dataset, max_images=2000)), (3, dataset_image(dataset, 3)),
                                 (_face(50, 100), _face(50, 100))):
        editor.set_background(background)
        assert np.array_equal(editor.background_image, expected)
        assert np.array_equal(editor.render(), expected)  # opacity 0: only the face shows, at scale 1
        assert np.array_equal(editor.mask, mask) and editor.can_undo == undo and editor.dirty
    assert editor.background == "image"
    editor.set_background("template")
    assert editor.background == "template" and not np.array_equal(editor.render(), expected)
    assert editor.undo() and not editor.mask.any()  # the history is the drawing's, not the background's
    shown = MaskEditor(A, mask_dir=tmp_path, background=5, dataset=dataset)
    assert shown.background == 5 and np.array_equal(shown.background_image, dataset_image(dataset, 5))
    with pytest.raises(ValueError, match="needs the dataset"):
        MaskEditor(A, mask_dir=tmp_path, background="mean")
    with pytest.raises(ValueError, match="image index: pass dataset="):
        MaskEditor(A, mask_dir=tmp_path, background=2)
    with pytest.raises(ValueError, match="'template', 'mean'"):
        MaskEditor(A, mask_dir=tmp_path, background="average")
    with pytest.raises(ValueError, match="178x218"):
        editor.set_background(np.zeros((64, 64, 3), dtype=np.uint8))
    assert editor.background == "template" and math.isclose(editor.area, 0.0)


def test_the_widget_offers_the_backgrounds_of_its_dataset(tmp_path, dataset) -> None:
    pytest.importorskip("ipycanvas")
    w = pytest.importorskip("ipywidgets")
    editor = MaskEditor(A, mask_dir=tmp_path, dataset=dataset)

    def walk(widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from walk(child)

    controls = {getattr(c, "description", ""): c for c in walk(editor.widget) if isinstance(c, w.Widget)}
    choice, index = controls["Background"], controls["Image"]
    assert (index.min, index.max) == (0, len(dataset) - 1)
    editor.stroke([(180.5, 450.5), (330.5, 450.5)])
    mask = editor.mask
    choice.value = "mean"
    assert editor.background == "mean" and np.array_equal(editor.background_image, mean_image(dataset, max_images=2000))
    index.value = 4
    assert editor.background == 4 and choice.value == "index"
    assert np.array_equal(editor.background_image, dataset_image(dataset, 4))
    editor.set_background("template")
    assert choice.value == "template" and np.array_equal(editor.mask, mask)
    assert "Background" not in {getattr(c, "description", "") for c in walk(MaskEditor(mask_dir=tmp_path).widget)}
