"""A dataset of another kind in the generic layout (cocam.folder) and the label space it brings.

The shapes dataset drawn here has three labels: ``square`` (a bright square in the centre, the
true object), ``stripe`` (a band along the top, present with the square in most images: the
spurious label) and ``corner_patch`` (a patch in the lower right, independent). Images are
72x64, so the centre square drops 4 columns on each side, where a red strip is painted that the
model must never see.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cocam import CELEBA, CELEBA_ATTRIBUTES, LabelSpace, attribute_index
from cocam.checkpoint import load_model
from cocam.cli import main
from cocam.compare import CONTROL, PRE_TRAINED, ComparisonConfig, compare_guidance
from cocam.dataset import LabelledImages, cache_files, default_cache_dir
from cocam.folder import (
    EmptySplitError,
    FolderDataset,
    LabelTableError,
    hash_split,
    open_dataset,
    read_folder_labels,
)
from cocam.celeba import DatasetNotFoundError
from cocam.labels import LabelSpaceError, UnknownAttributeError
from cocam.masks import MaskNotFoundError, load_mask, mask_to_input, resolve_mask
from cocam.train import Guidance

from _shapes import HEIGHT, LABELS, SIZE, WIDTH, make_shapes, square_mask


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "shapes")


# --------------------------------------------------------------------------------------------
# The label space
# --------------------------------------------------------------------------------------------


def test_label_space_names_index_and_errors() -> None:
    space = LabelSpace(LABELS)
    assert space.names == LABELS and len(space) == 3 and list(space) == list(LABELS)
    assert [space.index(n) for n in LABELS] == [0, 1, 2]
    assert space.validate(["stripe", "square"]) == ["stripe", "square"]
    assert space.validate("corner_patch") == ["corner_patch"]
    with pytest.raises(UnknownAttributeError, match=r"Unknown attribute 'stripes'\. Did you mean 'stripe'\?"):
        space.index("stripes")
    with pytest.raises(UnknownAttributeError, match="'square', 'stripe', 'corner_patch'"):
        space.validate(["circle"])
    for bad in ([], ["a", "a"], ["a", ""], ["a", 3]):
        with pytest.raises(LabelSpaceError):
            LabelSpace(bad)
    assert LabelSpace(LABELS) == space and LabelSpace(LABELS[::-1]) != space
    assert pickle.loads(pickle.dumps(space)) == space


def test_celeba_space_is_the_40_attributes() -> None:
    assert CELEBA.names == CELEBA_ATTRIBUTES and len(CELEBA) == 40
    assert all(CELEBA.index(a) == attribute_index(a) for a in CELEBA_ATTRIBUTES)
    with pytest.raises(UnknownAttributeError, match="Did you mean 'Wearing_Lipstick'.*40 CelebA attributes"):
        CELEBA.index("Wearing_Lipstik")
    with pytest.raises(UnknownAttributeError, match="Did you mean 'square'"):
        Guidance(("squar",), (np.ones((218, 178), bool),), label_space=LabelSpace(LABELS))
    with pytest.raises(UnknownAttributeError, match="40 CelebA attributes"):  # the default space
        Guidance(("square",), (np.ones((218, 178), bool),))


# --------------------------------------------------------------------------------------------
# The reader and its errors
# --------------------------------------------------------------------------------------------


def test_reader_labels_values_and_protocol(shapes: Path) -> None:
    table = pd.read_csv(shapes / "labels.csv")
    ds = FolderDataset(shapes, "train", image_size=SIZE, progress=False)
    assert isinstance(ds, LabelledImages)
    assert ds.label_space == LabelSpace(LABELS) and ds.mask_view == "square"
    assert len(ds) == 64 and list(ds.names) == table.image[:64].tolist()
    assert list(ds.attributes.columns) == list(LABELS)
    expected = np.stack([table.square, (table.stripe > 0).astype(int), table.corner_patch], 1)[:64]
    np.testing.assert_array_equal(ds.targets, expected)
    np.testing.assert_array_equal(ds.attributes.to_numpy(), expected)
    image, target, landmarks = ds[3]
    assert image.shape == (3, SIZE, SIZE) and target.tolist() == expected[3].tolist()
    assert torch.isnan(landmarks).all() and landmarks.shape == (5, 2)
    positives = ds.subset(square=1)
    assert len(positives) == int(expected[:, 0].sum()) and (positives.targets[:, 0] == 1).all()
    assert ds.resampled([5, 5, 0]).names.tolist() == [ds.names[5], ds.names[5], ds.names[0]]
    with pytest.raises(UnknownAttributeError, match="Did you mean 'square'"):
        ds.subset(squares=1)
    with pytest.raises(DatasetNotFoundError, match="--transfer template"):
        ds.require_landmarks("--transfer landmarks")
    assert isinstance(open_dataset(shapes, "valid", image_size=SIZE, progress=False), FolderDataset)


def test_the_centre_square_is_what_the_model_sees(shapes: Path) -> None:
    ds = FolderDataset(shapes, "train", image_size=SIZE, progress=False)
    pixels = ds.get_batch_numpy(np.arange(len(ds)))[0]
    assert pixels.shape == (64, SIZE, SIZE, 3)
    # 72x64 → columns 4..67 at full size: exactly the file's pixels, and no red strip
    for i in (0, 7):
        with Image.open(shapes / "images" / ds.names[i]) as im:
            np.testing.assert_array_equal(pixels[i], np.asarray(im.convert("RGB"))[:, 4:68])
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)
    assert not red.any()
    # downscaled, the edge columns mix only pixels of the centre square: grey noise (R <= 99), the blue
    # stripe and the green patch (R = 0) — any red column let in would lift R there (a weight of 1/8 ≈ +20)
    small = FolderDataset(shapes, "train", image_size=16, progress=False).get_batch_numpy(np.arange(64))[0]
    assert small[:, :, [0, -1], 0].max() <= 99


def _write(root: Path, text: str, images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / name)
    (root / "labels.csv").write_text(text)
    return root


def test_reader_errors(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetNotFoundError, match="labels.csv not found"):
        FolderDataset(tmp_path / "none")
    with pytest.raises(DatasetNotFoundError, match="labels.csv"):  # neither layout: both are named
        open_dataset(tmp_path / "none")
    with pytest.raises(LabelTableError, match="no 'image' column .*file, square"):
        read_folder_labels(_write(tmp_path / "noimage", "file,square\na.png,1\n"))
    with pytest.raises(LabelTableError, match="label column 'square' is not binary: it holds '2', 'yes'"):
        read_folder_labels(_write(tmp_path / "values", "image,square\na.png,2\nb.png,yes\n"))
    with pytest.raises(LabelTableError, match="label column 'square' is not binary: it holds ''"):
        read_folder_labels(_write(tmp_path / "blank", "image,square\na.png,\nb.png,1\n"))
    with pytest.raises(LabelTableError, match="'square' mixes 0 and -1"):
        read_folder_labels(_write(tmp_path / "mixed", "image,square\na.png,0\nb.png,-1\n"))
    with pytest.raises(LabelTableError, match="no label column"):
        read_folder_labels(_write(tmp_path / "nolabel", "image,split\na.png,train\n"))
    with pytest.raises(LabelTableError, match="'a.png' is listed more than once"):
        read_folder_labels(_write(tmp_path / "twice", "image,square\na.png,1\na.png,0\n"))
    with pytest.raises(LabelTableError, match="'dev'"):
        read_folder_labels(_write(tmp_path / "split", "image,square,split\na.png,1,dev\n"))
    empty = _write(tmp_path / "empty", "image,square,split\na.png,1,train\nb.png,0,train\n")
    with pytest.raises(EmptySplitError, match="the test split .* has no image"):
        FolderDataset(empty, "test", image_size=8, progress=False)


def test_a_listed_image_that_is_missing_is_named_or_skipped(tmp_path: Path) -> None:
    root = _write(tmp_path / "gone", "image,square,split\na.png,1,train\nb.png,0,train\nc.png,1,train\n")
    with pytest.raises(DatasetNotFoundError, match=r"c\.png.*--skip-unreadable"):
        FolderDataset(root, "train", image_size=8, progress=False)
    with pytest.warns(UserWarning, match=r"Skipping 1 missing or unreadable image.*c\.png"):
        ds = FolderDataset(root, "train", image_size=8, progress=False, skip_unreadable=True)
    assert ds.names.tolist() == ["a.png", "b.png"] and ds.targets[:, 0].tolist() == [1, 0]


# --------------------------------------------------------------------------------------------
# The split rule and the cache
# --------------------------------------------------------------------------------------------


def test_hash_split_rule(tmp_path: Path) -> None:
    def by_hand(name: str) -> str:
        u = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 16**16
        return "train" if u < 0.8 else "valid" if u < 0.9 else "test"

    names = [f"img_{i:04d}.jpg" for i in range(2000)]
    assert [hash_split(n) for n in names] == [by_hand(n) for n in names]
    counts = pd.Series([hash_split(n) for n in names]).value_counts()
    # binomial: 4 standard deviations of 2000 draws at p = 0.8 and 0.1 (≈ 72 and 54 images)
    assert abs(counts["train"] - 1600) < 4 * (2000 * 0.8 * 0.2) ** 0.5
    assert abs(counts["valid"] - 200) < 4 * (2000 * 0.1 * 0.9) ** 0.5
    root = make_shapes(tmp_path / "nosplit", 40, split_column=False)
    labels = read_folder_labels(root)
    assert labels.split.tolist() == [by_hand(n) for n in labels.attributes.index]
    shuffled = pd.read_csv(root / "labels.csv").sample(frac=1.0, random_state=1)
    shuffled.head(25).to_csv(root / "labels.csv", index=False)  # other order, fewer images: no image moves
    again = read_folder_labels(root)
    assert all(again.split[n] == labels.split[n] for n in again.split.index)
    train = FolderDataset(root, "train", image_size=8, progress=False)
    assert set(train.names) == {n for n in again.split.index if by_hand(n) == "train"}


def test_cache_location_reuse_and_rebuild(tmp_path: Path, monkeypatch) -> None:
    root = make_shapes(tmp_path / "cached", 24, split_column=False)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    ds = FolderDataset(root, "all", image_size=16, progress=False)
    data, meta = cache_files(default_cache_dir(root), "all", 16)
    assert ds.cache_path == data and data.is_file() and meta.is_file()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the dataset
    assert json.loads(meta.read_text())["crop_box"] == "centre-square"
    built = data.stat().st_mtime_ns
    FolderDataset(root, "all", image_size=16, progress=False)
    assert data.stat().st_mtime_ns == built  # reused, not rebuilt
    first = ds.names[0]
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 7, np.uint8)).save(root / "images" / first)
    rebuilt = FolderDataset(root, "all", image_size=16, progress=False)
    assert (rebuilt.get_batch_numpy([0])[0] == 7).all()  # the replaced image, decoded again
    monkeypatch.setenv("COCAM_CACHE_DIR", str(tmp_path / "elsewhere"))
    moved = FolderDataset(root, "all", image_size=16, progress=False)
    assert moved.cache_path.is_relative_to(tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------
# Masks for labels without a built-in region
# --------------------------------------------------------------------------------------------


def test_square_masks_reach_the_input_as_drawn(tmp_path: Path) -> None:
    mask = load_mask(square_mask(tmp_path / "square.png"), view="square")
    expected = np.zeros((SIZE, SIZE), np.float32)
    expected[24:40, 24:40] = 1
    got = mask_to_input(mask, SIZE).numpy()
    # 64 → 178 (binarised) → 64 (area means): only the region's 4·16 border pixels can be fractional, each
    # off by less than one pixel's area
    assert np.array_equal(got > 0.5, expected > 0.5)
    assert abs(float(got.sum()) - expected.sum()) <= 4 * 16
    with pytest.raises(ValueError, match="square"):
        load_mask(square_mask(tmp_path / "square.png"), view="template")  # a square file is no template mask
    with pytest.raises(MaskNotFoundError, match="--mask"):
        resolve_mask("square", tmp_path / "nothing-here", view="square")
    assert resolve_mask("square", tmp_path, view="square")[1] == str(tmp_path / "square.png")


def test_the_canvas_draws_a_folder_datasets_labels_on_the_square_view(tmp_path: Path) -> None:
    from cocam.canvas import MaskCanvas
    from cocam.geometry import CROP_BOX

    left, top, right, bottom = CROP_BOX
    canvas = MaskCanvas("square", mask_dir=tmp_path, label_space=LABELS, view="square", brush_size=4)
    assert canvas.label_space.names == LABELS and not canvas.has_builtin
    with pytest.raises(UnknownAttributeError, match="Did you mean 'square'"):
        canvas.set_attribute("squares")
    assert not canvas.stroke([(20.5, 5.5), (150.5, 5.5)])  # above the square the model sees: nothing painted
    # a vertical stroke from row 10 to row 60 (4 px brush): painted from the square's first row only
    assert canvas.stroke([(89.5, 10.5), (89.5, 60.5)])
    rows = np.flatnonzero(canvas.mask.any(axis=1))
    assert rows[0] == top and rows[-1] == 62  # 60.5 + 2 = 62.5: row 62's centre is inside the brush
    # the square region of _shapes (rows and columns 24..39 of 64) in template coordinates, filled in
    scale = (right - left) / SIZE
    i0, i1 = top + round(24 * scale), top + round(40 * scale)
    j0, j1 = left + round(24 * scale), left + round(40 * scale)
    canvas.clear()
    canvas.set_brush(1)  # radius √½: a stroke through pixel centres paints exactly its row's pixels
    for y in range(i0, i1):
        canvas.stroke([(j0 + 0.5, y + 0.5), (j1 - 0.5, y + 0.5)])
    path = canvas.save()
    from PIL import Image as _Image

    with _Image.open(path) as img:
        assert img.size == (right - left, bottom - top)  # the file is the square, as load_mask(view="square") reads it
    assert np.array_equal(load_mask(path, view="square"), canvas.mask) and canvas.saved_path == path
    assert canvas.pixels == (i1 - i0) * (j1 - j0)
    drawn = mask_to_input(canvas.mask, SIZE).numpy() > 0.5
    truth = mask_to_input(load_mask(square_mask(tmp_path / "truth.png"), view="square"), SIZE).numpy() > 0.5
    assert (drawn & truth).sum() / (drawn | truth).sum() > 0.9  # the drawn square is the image's square
    with pytest.raises(ValueError, match="no built-in region"):
        canvas.load_default()
    canvas.set_attribute("stripe")
    with pytest.raises(FileNotFoundError, match="no saved mask of stripe"):
        canvas.load()
    with pytest.raises(ValueError, match="CelebA"):
        MaskCanvas("square", mask_dir=tmp_path, label_space=LABELS, start="default")
    again = MaskCanvas("square", mask_dir=tmp_path, label_space=LABELS, view="square", start="saved")
    assert np.array_equal(again.mask, load_mask(path, view="square"))
    assert not again.dirty


def test_the_editor_takes_labels_view_and_faces_from_a_folder_dataset(shapes: Path, tmp_path: Path) -> None:
    from cocam.backgrounds import dataset_image, input_to_template
    from cocam.widget import MaskEditor

    train = FolderDataset(shapes, "train", image_size=SIZE)
    editor = MaskEditor(mask_dir=tmp_path, dataset=train)
    assert editor.attribute == "square" and editor.model.view == "square"  # the first label; the dataset's view
    assert editor.background == "mean"  # the cartoon face would say nothing about these images
    pixels = train.get_batch_numpy(np.arange(len(train)))[0].astype(np.float64)
    assert np.array_equal(editor.background_image, input_to_template(pixels.mean(axis=0)))
    editor.set_background(3)
    assert np.array_equal(editor.background_image, input_to_template(train.get_batch_numpy(np.array([3]))[0][0]))
    assert np.array_equal(dataset_image(train, 3), editor.background_image)


# --------------------------------------------------------------------------------------------
# The pipeline on it: cocam train, finetune, evaluate; compare_guidance
# --------------------------------------------------------------------------------------------

TINY = ["--epochs", "1", "--batch-size", "16", "--device", "cpu", "--image-size", str(SIZE), "--hidden", "32"]


def test_cli_train_finetune_evaluate(shapes: Path, tmp_path: Path, monkeypatch, capsys, one_thread) -> None:
    monkeypatch.setenv("COCAM_MASK_DIR", str(tmp_path))  # an empty mask folder: no built-in region to fall to
    base = tmp_path / "baseline"
    assert main(["train", "--root", str(shapes), "--out", str(base), *TINY]) == 0
    model, spec, _ = load_model(base / "best.pt")
    assert spec.attributes == LABELS and model.num_outputs == 3  # the checkpoint knows its label space

    mask = square_mask(tmp_path / "drawn.png")
    common = ["finetune", "--root", str(shapes), "--checkpoint", str(base / "best.pt"), "--max-steps", "2",
              "--batch-size", "16", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "guided"), "--attribute", "square", "--mask", str(mask)]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "nomask"), "--attribute", "square"]) == 1
    err = capsys.readouterr().err
    assert "cocam finetune: error: no mask for 'square'" in err and "--mask" in err and len(err.splitlines()) == 1
    assert main([*common, "--out", str(tmp_path / "typo"), "--attribute", "squares", "--mask", str(mask)]) == 1
    assert "Did you mean 'square'" in capsys.readouterr().err
    guided = torch.load(tmp_path / "guided" / "last.pt", weights_only=True)
    assert guided["guidance"]["attributes"] == ["square"] and guided["spec"]["attributes"] == list(LABELS)

    out = tmp_path / "table.csv"
    assert main(["evaluate", "--root", str(shapes), "--checkpoint", f"before={base / 'best.pt'}",
                 "--checkpoint", f"after={tmp_path / 'guided' / 'last.pt'}", "--pair", "square:stripe",
                 "--no-attention", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table.model) == {"before", "after"} and set(table.attribute) == {"square"}
    test = pd.read_csv(shapes / "labels.csv").iloc[80:]
    stripe = test.stripe > 0
    # the four (square, stripe) groups of the 16 test images, counted by hand
    assert (table.n_a_not_b == int(((test.square == 1) & ~stripe).sum())).all()
    assert (table.n_not_a_b == int(((test.square == 0) & stripe).sum())).all()
    assert (table.n_all == 16).all()
    capsys.readouterr()
    # without --pair: the dataset's most co-occurring pairs on train (the paper's are CelebA's), said in the output
    default = tmp_path / "default-pairs.csv"
    assert main(["evaluate", "--root", str(shapes), "--checkpoint", str(base / "best.pt"), "--no-attention",
                 "--out", str(default)]) == 0
    out = capsys.readouterr().out
    assert "pairs: square:stripe" in out and "--pair A:B to choose" in out
    assert pd.read_csv(default).attribute.iloc[0] == "square"
    attention = ["evaluate", "--root", str(shapes), "--checkpoint", str(base / "best.pt"), "--pair", "square:stripe"]
    assert main(attention) == 1  # attention needs a mask, and the mask folder has no square.png
    assert "no mask for 'square'" in capsys.readouterr().err
    square_mask(tmp_path / "square.png")
    assert main([*attention, "--out", str(tmp_path / "attention.csv")]) == 0
    scored = pd.read_csv(tmp_path / "attention.csv")
    assert scored["mask soft_iou"].between(0, 1).all() and (scored["n positives"] == test.square.sum()).all()


def test_cli_stats_bias_rank_on_a_folder_dataset_named_by_the_environment(
        shapes: Path, tmp_path: Path, monkeypatch, capsys, one_thread) -> None:
    monkeypatch.setenv("COCAM_DATA_ROOT", str(shapes))  # no --root anywhere below
    monkeypatch.setenv("COCAM_MASK_DIR", str(tmp_path))
    base = tmp_path / "baseline"
    assert main(["train", "--out", str(base), *TINY]) == 0
    capsys.readouterr()

    assert main(["stats", "--pair", "square:stripe", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert f"in {shapes.resolve()}" in out and "celeba" not in out.lower()  # no CelebA reference beside these labels
    rows = pd.read_csv(shapes / "labels.csv")
    train = rows[rows.split == "train"]
    square, stripe = train.square == 1, train.stripe == 1
    # P(stripe | square) on the train split, by hand, as printed (3 decimals)
    assert f"{(square & stripe).sum() / square.sum():.3f}" in out

    ranking = tmp_path / "bias.csv"
    assert main(["bias", "--checkpoint", str(base / "best.pt"), "--split", "train", "--min-group", "1",
                 "--device", "cpu", "--out", str(ranking)]) == 0
    table = pd.read_csv(ranking)
    assert set(table.a) <= set(LABELS) and {"square", "stripe"} <= set(table.a) | set(table.b)
    row = table[(table.a == "square") & (table.b == "stripe")].iloc[0]
    assert (row.n_ab, row.n_a_not_b) == ((square & stripe).sum(), (square & ~stripe).sum())

    capsys.readouterr()
    ranked = tmp_path / "rank.csv"
    mask = square_mask(tmp_path / "drawn.png")
    assert main(["rank", "--checkpoint", str(base / "best.pt"), "--attribute", "square", "--shortcut", "stripe",
                 "--by", "worst_group", "--mask", str(mask), "--split", "valid", "--device", "cpu",
                 "--out", str(ranked)]) == 0
    table = pd.read_csv(ranked)
    valid = rows[rows.split == "valid"]
    assert len(table) == len(valid) and set(table.image) == set(valid.image)
    assert (table.label.to_numpy() == valid.set_index("image").loc[table.image, "square"].to_numpy()).all()
    assert table.outside_energy.between(0, 1).all() and table.worst_group.is_monotonic_decreasing
    capsys.readouterr()
    assert main(["rank", "--checkpoint", str(base / "best.pt"), "--attribute", "squares", "--mask", str(mask)]) == 1
    assert "Did you mean 'square'" in capsys.readouterr().err
    assert main(["rank", "--checkpoint", str(base / "best.pt"), "--attribute", "square"]) == 1
    assert "no mask for 'square'" in capsys.readouterr().err  # the (empty) mask folder has no square.png


def test_compare_guidance_on_a_folder_dataset(shapes: Path, tmp_path: Path, one_thread) -> None:
    square_mask(tmp_path / "square.png")
    config = ComparisonConfig(root=shapes, out=tmp_path / "cmp", seeds=(0,), pairs=(("square", "stripe"),),
                              image_size=SIZE, hidden=32, baseline_epochs=1, finetune_epochs=1, batch_size=16,
                              splits=("valid", "test"), device="cpu", peers=("random region",),
                              mask_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny valid split: empty conflict groups warn nowhere else
        result = compare_guidance(config, {"energy": {"loss": "energy"}}, log=None)
    runs = result.runs
    assert set(runs.setting) == {PRE_TRAINED, CONTROL, "energy", "random region"}
    assert set(runs.attribute) == {"square"} and set(runs.split) == {"valid", "test"}
    assert (runs[runs.split == "test"].n_images == 16).all()
    assert runs.mask_iou.notna().all()  # attention scored against the drawn mask
    assert load_model(result.baseline)[1].attributes == LABELS
    with pytest.raises(UnknownAttributeError, match="Did you mean 'stripe'"):
        ComparisonConfig(root=shapes, out=tmp_path, pairs=(("square", "stripes"),))
