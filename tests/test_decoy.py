"""Tests for cocam.decoy: the Decoy-FashionMNIST generator."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cocam.decoy import (CLASSES, DEFAULT_SOURCE, MARKER, DecoyConfig, DecoySourceError, box_corners, corner_boxes,
                         generate_decoy_fmnist, read_idx)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(3)
    data = {"train": (rng.integers(0, 100, (40, 28, 28)), np.arange(40) % 10),
            "test": (rng.integers(0, 100, (30, 28, 28)), (np.arange(30) * 7) % 10)}
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", data[split][0])
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", data[split][1])
    return folder, data


def _image(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / name))


def test_the_decoy_is_the_class_at_training_time_and_random_at_test_time(source, tmp_path: Path) -> None:
    folder, data = source
    root = generate_decoy_fmnist(tmp_path / "decoy", DecoyConfig(n_valid=8, seed=1), source=folder)
    labels = pd.read_csv(root / "labels.csv")
    boxes = pd.read_csv(root / "decoy_boxes.csv").set_index("image")
    assert list(labels.columns) == ["image", *CLASSES, "split"]
    assert labels.split.value_counts().to_dict() == {"train": 32, "test": 30, "valid": 8}
    assert (labels[list(CLASSES)].sum(axis=1) == 1).all()  # one-hot
    cls = labels[list(CLASSES)].to_numpy().argmax(1)
    # the images are the source's (with the patch): train/valid come from a permutation of the pool
    perm = np.random.default_rng(1).permutation(40)
    train = labels[labels.split == "train"].reset_index(drop=True)
    for k in (0, 5, 31):
        img = _image(root, train.image[k])
        b = boxes.loc[train.image[k]]
        outside = np.ones((28, 28), bool)
        outside[b.y0:b.y1, b.x0:b.x1] = False
        assert np.array_equal(img[outside], data["train"][0][perm[k]][outside])
        assert (img[~outside] == 255 - 25 * data["train"][1][perm[k]]).all()  # the class's grey
    for split in ("train", "valid"):
        rows = labels.split == split
        assert (boxes.loc[labels.image[rows], "grey"].to_numpy() == 255 - 25 * cls[rows]).all()
    test = labels.split == "test"
    grey_class = (255 - boxes.loc[labels.image[test], "grey"].to_numpy()) // 25
    assert (grey_class != cls[test]).mean() > 0.5  # at test time the patch says a random class
    assert np.array_equal(cls[test], data["test"][1])
    # each patch is a 4×4 corner
    assert ((boxes.x1 - boxes.x0) == 4).all() and ((boxes.y1 - boxes.y0) == 4).all()
    assert set(boxes.x0) <= {0, 24} and set(boxes.y0) <= {0, 24} and len(set(zip(boxes.x0, boxes.y0))) == 4


def test_generation_is_deterministic_atomic_and_never_replaces_a_foreign_folder(source, tmp_path: Path) -> None:
    folder, _ = source
    config = DecoyConfig(n_valid=8, n_train=20, n_test=10)
    a = generate_decoy_fmnist(tmp_path / "a", config, source=folder)
    b = generate_decoy_fmnist(tmp_path / "b", config, source=folder)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert len(list((a / "images").iterdir())) == 38
    # the same configuration is reused as is; another needs overwrite
    stamp = (a / MARKER).stat().st_mtime_ns
    assert generate_decoy_fmnist(a, config, source=folder) == a and (a / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="another configuration"):
        generate_decoy_fmnist(a, DecoyConfig(n_valid=8, seed=5), source=folder)
    generate_decoy_fmnist(a, DecoyConfig(n_valid=8, seed=5), source=folder, overwrite=True)
    assert '"seed": 5' in (a / MARKER).read_text()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never replaced"):
        generate_decoy_fmnist(foreign, config, source=folder, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    # a failure leaves nothing behind
    with pytest.raises(ValueError, match="more than"):
        generate_decoy_fmnist(tmp_path / "c", DecoyConfig(n_valid=8, n_test=31), source=folder)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.tmp-*"))


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DecoySourceError, match="apt-get install dataset-fashion-mnist"):
        generate_decoy_fmnist(tmp_path / "x", source=tmp_path / "nowhere")
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + bytes(3)))
    with pytest.raises(DecoySourceError, match="truncated"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x0d\x01")
    with pytest.raises(DecoySourceError, match="magic"):
        read_idx(bad)
    with pytest.raises(ValueError, match="patch"):
        DecoyConfig(patch=20)


@pytest.mark.skipif(not (DEFAULT_SOURCE / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_fashion_mnist_files(tmp_path: Path) -> None:
    labels = read_idx(DEFAULT_SOURCE / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60_000,) and np.bincount(labels).tolist() == [6_000] * 10
    assert read_idx(DEFAULT_SOURCE / "t10k-images-idx3-ubyte.gz").shape == (10_000, 28, 28)
    root = generate_decoy_fmnist(tmp_path / "d", DecoyConfig(n_train=50, n_valid=10, n_test=20))
    assert len(pd.read_csv(root / "labels.csv")) == 80


def test_the_decoy_command(source, tmp_path: Path, capsys) -> None:
    from cocam.cli import main

    folder, _ = source
    assert main(["decoy", "--root", str(tmp_path / "d"), "--source", str(folder), "--n-valid", "8"]) == 0
    assert "32 train" in capsys.readouterr().out
    assert main(["decoy", "--root", str(tmp_path / "e"), "--source", str(tmp_path / "none")]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_corner_boxes_and_box_corners_are_inverse() -> None:
    boxes = corner_boxes(np.array([0, 1, 2, 3]), 4)
    assert boxes.tolist() == [[0, 0, 4, 4], [24, 0, 28, 4], [0, 24, 4, 28], [24, 24, 28, 28]]
    assert box_corners(boxes).tolist() == [0, 1, 2, 3]
