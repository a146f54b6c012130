"""The dataset layouts users have (torchvision, official, Kaggle), optional landmarks, a read-only root."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _celeba_fixture import make_celeba, write_layout

import cocam.dataset as dataset_module
from cocam.celeba import (
    LANDMARKS_FILE,
    AnnotationError,
    DatasetNotFoundError,
    clear_annotation_cache,
    load_annotations,
)
from cocam.dataset import CelebADataset, default_cache_dir, user_cache_root

SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_celeba(tmp_path_factory.mktemp("layouts") / "torchvision", n=10, seed=5)


@pytest.fixture(scope="module")
def reference(data):
    return CelebADataset(data.root, "all", image_size=SIZE, progress=False, num_workers=0)


@pytest.mark.parametrize("layout,values", [("official", "pm1"), ("kaggle", "pm1"), ("kaggle", "01")])
def test_each_layout_reads_to_the_same_values(data, reference, tmp_path, layout, values):
    root = write_layout(data, tmp_path / layout, layout, kaggle_values=values)
    ann = load_annotations(root)
    assert ann.layout == layout and ann.root == root.resolve()
    pd.testing.assert_frame_equal(ann.attributes, data.attributes, check_index_type=False)
    pd.testing.assert_series_equal(ann.split, data.split, check_index_type=False)
    pd.testing.assert_frame_equal(ann.landmarks, data.landmarks, check_index_type=False)
    pd.testing.assert_frame_equal(ann.bbox, data.bbox, check_index_type=False)
    ds = CelebADataset(root, "all", image_size=SIZE, progress=False, num_workers=0)
    assert ds.names.tolist() == data.names
    np.testing.assert_array_equal(ds.get_batch_numpy(np.arange(len(ds)))[0],
                                  reference.get_batch_numpy(np.arange(len(reference)))[0])
    np.testing.assert_array_equal(ds.landmarks, reference.landmarks)
    # The folder holding celeba/ in the official or Kaggle layout is found too.
    holder = tmp_path / "holder"
    holder.mkdir()
    os.symlink(root, holder / "celeba")
    assert load_annotations(holder).layout == layout


def test_kaggle_csv_errors_name_file_and_line(data, tmp_path):
    root = write_layout(data, tmp_path / "k", "kaggle")
    attr = root / "list_attr_celeba.csv"
    lines = attr.read_text().splitlines()
    good = "\n".join(lines) + "\n"
    cells = lines[3].split(",")
    cells[5] = "0"  # a 0 in a -1/1 file
    attr.write_text("\n".join([*lines[:3], ",".join(cells), *lines[4:]]) + "\n")
    with pytest.raises(AnnotationError, match=rf"list_attr_celeba\.csv: line 4: image '{cells[0]}' "
                                              r"\(column 'Bald'\).*-1/1 or all 0/1"):
        load_annotations(root)
    cells[5] = "yes"
    attr.write_text("\n".join([*lines[:3], ",".join(cells), *lines[4:]]) + "\n")
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.csv: line 4: value 'Bald'.*'yes'"):
        load_annotations(root)
    attr.write_text(good.replace("image_id,", "name,", 1))
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.csv: line 1: expected the header 'image_id,"):
        load_annotations(root)
    attr.write_text(good)
    (root / "list_eval_partition.csv").write_text("image_id,partition\n000001.jpg,0\n")
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.csv: line 3: image '000002\.jpg' is not listed "
                                              r"in list_eval_partition\.csv"):
        load_annotations(root)


def test_missing_partition_names_the_layout_file(data, tmp_path):
    root = write_layout(data, tmp_path / "o", "official")
    (root / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_annotations(root)
    assert str(root.resolve() / "Eval" / "list_eval_partition.txt") in str(info.value)


def test_root_without_landmarks(tmp_path):
    d = make_celeba(tmp_path / "nolm", n=8, seed=3)
    (d.folder / LANDMARKS_FILE).unlink()
    ann = load_annotations(d.root)
    assert ann.landmarks is None
    ds = CelebADataset(d.root, "train", image_size=SIZE, progress=False, num_workers=0)
    assert not ds.has_landmarks and len(ds) > 0
    image, target, landmarks = ds[0]
    assert image.shape == (3, SIZE, SIZE) and target.shape == (40,) and landmarks.isnan().all()
    images, _, batch_landmarks = ds.get_batch(np.arange(len(ds)))
    assert images.shape[0] == len(ds) and batch_landmarks.isnan().all()
    with pytest.raises(DatasetNotFoundError, match=r"landmark mask transfer.*list_landmarks_align_celeba\.txt"):
        ds.landmarks  # noqa: B018 - the property is what the landmark transfer reads
    with pytest.raises(DatasetNotFoundError, match=r"--transfer landmarks needs the landmark file"):
        ds.require_landmarks("--transfer landmarks")


def test_read_only_root_is_never_written(tmp_path, monkeypatch):
    d = make_celeba(tmp_path / "shared", n=8, seed=4)
    before = sorted(p.relative_to(d.root) for p in d.root.rglob("*"))
    real_is_writable = dataset_module._is_writable
    # Tests run as root, for whom chmod'ed folders stay writable: say the dataset tree is read-only.
    monkeypatch.setattr(dataset_module, "_is_writable",
                        lambda p: not Path(p).resolve().is_relative_to(d.root.resolve()) and real_is_writable(p))
    ds = CelebADataset(d.root, "train", image_size=SIZE, progress=False, num_workers=0)
    assert ds.cache_path.parent == default_cache_dir(d.root)
    assert ds.cache_path.parent.parent == user_cache_root() and ds.cache_path.is_file()
    assert sorted(p.relative_to(d.root) for p in d.root.rglob("*")) == before
    # An explicit cache folder inside the read-only root is one clear error, nothing written.
    with pytest.raises(dataset_module.ImageCacheError, match=r"Cannot write the image cache folder .*--cache-dir"):
        CelebADataset(d.root, "valid", image_size=SIZE, progress=False, cache_dir=d.folder / "mine")
    assert sorted(p.relative_to(d.root) for p in d.root.rglob("*") if p.name != "mine") == before


def test_real_data_is_cached_outside_its_folder_even_when_writable(tmp_path):
    d = make_celeba(tmp_path / "real", n=6, seed=6)
    ds = CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=0)
    assert not ds.cache_path.is_relative_to(d.root.resolve())
    assert not any(p.name.startswith(".cocam") for p in d.folder.iterdir())


def test_cache_env_and_generated_folder(tmp_path, monkeypatch):
    d = make_celeba(tmp_path / "env", n=6, seed=7)
    monkeypatch.setenv("COCAM_CACHE_DIR", str(tmp_path / "caches"))
    where = default_cache_dir(d.root)
    assert where.parent == tmp_path / "caches" and where.name.startswith("celeba-")
    other = make_celeba(tmp_path / "env2", n=6, seed=7)
    assert default_cache_dir(other.root) != where  # keyed by the dataset's resolved path
    ds = CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=0)
    assert ds.cache_path.parent == where and ds.cache_path.is_file()
    monkeypatch.delenv("COCAM_CACHE_DIR")
    (d.folder / "cocam_synthetic.json").write_text("{}")  # what the generator writes last
    assert default_cache_dir(d.root) == d.folder / ".cocam_cache"
    monkeypatch.setattr(dataset_module, "_is_writable", lambda p: False)
    assert default_cache_dir(d.root).parent == user_cache_root()  # generated, but read-only
    clear_annotation_cache()


def test_fit_with_landmark_transfer_needs_the_landmark_file(tmp_path):
    from cocam.checkpoint import ModelSpec
    from cocam.masks import default_mask
    from cocam.train import Guidance, TrainConfig, fit

    d = make_celeba(tmp_path / "nolm", n=8, seed=8)
    (d.folder / LANDMARKS_FILE).unlink()
    ds = CelebADataset(d.root, "all", image_size=64, progress=False, num_workers=0)
    spec = ModelSpec(image_size=64, hidden=8)
    guidance = Guidance(("Wearing_Lipstick",), (default_mask("Wearing_Lipstick"),), transfer="landmarks")
    with pytest.raises(DatasetNotFoundError, match=r"landmark mask transfer.*list_landmarks_align_celeba\.txt"):
        fit(spec.build(), ds, ds, TrainConfig(epochs=1, batch_size=4, device="cpu"), spec=spec, guidance=guidance,
            run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()
