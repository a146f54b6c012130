import filecmp
import json
import os

import numpy as np
import pytest
import torch

import cocam.synthetic.generate as gen
from cocam.celeba import load_annotations
from cocam.synthetic import (
    EvidenceRegions,
    SyntheticConfig,
    generate_synthetic_celeba,
    is_synthetic_complete,
    render_template,
    template_region,
)

TINY = SyntheticConfig(n_train=20, n_valid=6, n_test=6, seed=5)


def _tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_layout_is_celeba_and_loads(synthetic_root):
    folder = synthetic_root / "celeba"
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "list_landmarks_align_celeba.txt",
                 "list_bbox_celeba.txt", "identity_CelebA.txt"):
        assert (folder / name).read_bytes().count(b"\r\n") > 0, f"{name} must use CRLF like CelebA"
    assert (folder / "img_align_celeba" / "000001.jpg").is_file()
    ann = load_annotations(synthetic_root)
    assert len(ann.attributes) == 192
    assert (ann.split == "train").sum() == 96 and (ann.split == "valid").sum() == 32 and (ann.split == "test").sum() == 64
    # CelebA order: train images first, then valid, then test
    assert list(ann.split.iloc[[0, 95, 96, 128, 191]]) == ["train", "train", "valid", "test", "test"]
    assert is_synthetic_complete(synthetic_root)


def test_deterministic_and_independent_of_workers(tmp_path):
    a = generate_synthetic_celeba(tmp_path / "a", TINY, workers=1, progress=False)
    b = generate_synthetic_celeba(tmp_path / "b", TINY, workers=2, progress=False)
    assert _tree(a) == _tree(b)
    for rel in _tree(a):
        if rel.endswith(".json"):
            continue
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_landmarks_and_regions_agree_with_the_pixels(synthetic_root):
    ann = load_annotations(synthetic_root)
    regions = EvidenceRegions(synthetic_root)
    names = list(ann.attributes.index[:20])
    lips = regions.ellipses_for(names, "Wearing_Lipstick")[:, 0]  # (N, 4) first ellipse
    lm = ann.landmarks.loc[names].to_numpy(dtype=float)
    mouth_centre = (lm[:, 6:8] + lm[:, 8:10]) / 2
    assert np.abs(lips[:, :2].numpy() - mouth_centre).max() <= 1.5  # ellipse centred on the mouth landmarks
    masks = regions.masks(names, "Heavy_Makeup", 64)
    assert masks.shape == (20, 64, 64) and masks.dtype == torch.bool
    rows = masks.any(dim=2).float().argmax(dim=1)  # first masked row: around the eyes, upper half
    assert (rows > 12).all() and (rows < 40).all()


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "_render_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_celeba(tmp_path, TINY, workers=1, progress=False)
    assert not (tmp_path / "celeba").exists()
    assert os.listdir(tmp_path) == []
    assert not is_synthetic_complete(tmp_path)


def test_existing_dataset_is_reused_refused_or_replaced(tmp_path):
    folder = generate_synthetic_celeba(tmp_path, TINY, workers=1, progress=False)
    marker = folder / gen.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    assert generate_synthetic_celeba(tmp_path, TINY, workers=1, progress=False) == folder
    assert marker.stat().st_mtime_ns == stamp  # same config: reused, not rewritten
    other = SyntheticConfig(n_train=20, n_valid=6, n_test=6, seed=6)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_celeba(tmp_path, other, workers=1, progress=False)
    generate_synthetic_celeba(tmp_path, other, workers=1, progress=False, overwrite=True)
    assert json.loads(marker.read_text())["config"]["seed"] == 6


def test_template_face_is_canonical():
    image, landmarks, regions = render_template()
    again, _, _ = render_template()
    assert image.size == (178, 218)
    assert np.array_equal(np.asarray(image), np.asarray(again))  # exact: the same code twice, in one process
    assert landmarks[0].tolist() == [69.0, 111.0] and landmarks[1].tolist() == [108.0, 111.0]
    (cx, cy, _, _), = [e for e in template_region("Wearing_Lipstick")]
    assert (cx, cy) == (88.5, 152.0)
    with pytest.raises(ValueError, match="global"):
        template_region("Attractive")
