"""CelebADataset: image pipeline, memory-mapped cache, subsets, batches and DataLoader use."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from _celeba_fixture import make_celeba
from PIL import Image

import cocam.dataset as dataset_module
from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.celeba import PARTITION_FILE, DatasetNotFoundError, clear_annotation_cache, write_partition
from cocam.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchLoader,
    CelebADataset,
    ImageReadError,
    iterate_batches,
    normalize_uint8,
)
from cocam.geometry import CROP_BOX, aligned_to_input

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_celeba(tmp_path_factory.mktemp("celeba_ds"), n=24, seed=5)


@pytest.fixture(scope="module")
def train(data):
    return CelebADataset(data.root, "train", image_size=SIZE, progress=False, num_workers=0)


def _reference_pixels(path, size):
    """The crop + resize pipeline done independently with PIL."""
    with Image.open(path) as image:
        view = image.convert("RGB").crop((0, 20, 178, 198)).resize((size, size), Image.BILINEAR)
    return np.asarray(view)


def _denormalise(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


class _CountingDecode:
    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, path, size):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash while decoding")
        self.calls += 1
        return dataset_module.decode_image(path, size)


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


def test_item_shapes_and_values(data, train):
    names = [n for n, s in zip(data.names, data.split) if s == "train"]
    assert list(train.names) == names and len(train) == len(names)
    assert train.image_size == SIZE
    for i in (0, len(train) - 1):
        image, target, landmarks = train[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert target.shape == (40,) and target.dtype == torch.float32
        assert landmarks.shape == (5, 2) and landmarks.dtype == torch.float32
        expected = _reference_pixels(data.folder / "img_align_celeba" / names[i], SIZE)
        np.testing.assert_allclose(_denormalise(image), expected, atol=1e-3)
        assert target.tolist() == data.attributes.loc[names[i], list(CELEBA_ATTRIBUTES)].astype(float).tolist()
        aligned = data.landmarks.loc[names[i]].to_numpy().reshape(5, 2)
        np.testing.assert_allclose(landmarks.numpy(), aligned_to_input(aligned, SIZE), rtol=1e-6)
    # Negative index and out-of-range index.
    assert torch.equal(train[-1][0], train[len(train) - 1][0])
    with pytest.raises(IndexError):
        train[len(train)]


def test_full_size_and_landmark_mapping(data, tmp_path):
    ds = CelebADataset(data.root, "valid", image_size=178, cache_dir=tmp_path, progress=False)
    image, _, landmarks = ds[0]
    expected = _reference_pixels(data.folder / "img_align_celeba" / ds.names[0], 178)
    with Image.open(data.folder / "img_align_celeba" / ds.names[0]) as raw:
        np.testing.assert_array_equal(expected, np.asarray(raw.convert("RGB"))[20:198])
    np.testing.assert_allclose(_denormalise(image), expected, atol=1e-3)
    # At full size the crop only shifts y by the top of the crop box.
    aligned = ds.landmarks_aligned.iloc[0].to_numpy().reshape(5, 2)
    np.testing.assert_allclose(landmarks.numpy(), aligned - np.array([CROP_BOX[0], CROP_BOX[1]]), atol=1e-4)
    # At 64 px: pixel-centre scaling of the crop.
    small = CelebADataset(data.root, "valid", image_size=64, cache_dir=tmp_path, progress=False)
    x, y = aligned[2]
    expected_nose = [(x + 0.5) * 64 / 178 - 0.5, (y - 20 + 0.5) * 64 / 178 - 0.5]
    np.testing.assert_allclose(small[0][2][2].numpy(), expected_nose, rtol=1e-5)


def test_transform_and_repr(data, train):
    ds = CelebADataset(data.root, "train", image_size=SIZE, progress=False, transform=lambda t: t.flip(-1))
    assert torch.equal(ds[0][0], train[0][0].flip(-1))
    text = repr(train)
    assert "split='train'" in text and f"n={len(train)}" in text and f"image_size={SIZE}" in text
    assert str(train.root) in text


def test_properties(data, train):
    assert list(train.attributes.columns) == list(CELEBA_ATTRIBUTES)
    pd.testing.assert_frame_equal(train.attributes, data.attributes.loc[train.names], check_index_type=False)
    pd.testing.assert_frame_equal(train.landmarks_aligned, data.landmarks.loc[train.names], check_index_type=False)
    # Not a generated dataset: cached under the user's cache folder, not in the dataset folder.
    assert train.cache_path.parent == dataset_module.default_cache_dir(data.root)
    assert train.cache_path.parent.parent == dataset_module.user_cache_root()
    assert not (data.folder / ".cocam_cache").exists()
    assert train.targets.shape == (len(train), 40) and not train.targets.flags.writeable


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="Did you mean 'valid'"):
        CelebADataset(data.root, "val", image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="positive"):
        CelebADataset(data.root, image_size=0, progress=False)
    other = next(n for n, s in zip(data.names, data.split) if s == "test")
    with pytest.raises(ValueError, match=rf"{other}.*belongs to the test split"):
        CelebADataset(data.root, "train", image_size=SIZE, images=[other], progress=False)
    with pytest.raises(ValueError, match="nope.jpg"):
        CelebADataset(data.root, "train", image_size=SIZE, images=["nope.jpg"], progress=False)
    with pytest.raises(DatasetNotFoundError, match="cocam generate"):
        CelebADataset(data.root / "missing", progress=False)


def test_images_argument(data, train):
    picked = list(train.names[[3, 0, 2]])
    ds = CelebADataset(data.root, "train", image_size=SIZE, images=picked, progress=False)
    assert list(ds.names) == picked
    assert ds.cache_path == train.cache_path
    for i, name in enumerate(picked):
        j = list(train.names).index(name)
        assert torch.equal(ds[i][0], train[j][0]) and torch.equal(ds[i][1], train[j][1])
    everything = CelebADataset(data.root, "all", image_size=SIZE, progress=False)
    assert len(everything) == len(data.names)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def test_cache_built_once_then_reused(data, tmp_path, monkeypatch):
    counter = _CountingDecode()
    monkeypatch.setattr(dataset_module, "_decode_image", counter)
    ds = CelebADataset(data.root, "test", image_size=SIZE, cache_dir=tmp_path, progress=False, num_workers=0)
    assert counter.calls == len(ds) > 0
    meta = json.loads((tmp_path / f"test_{SIZE}px.json").read_text())
    assert meta["count"] == len(ds) and meta["image_size"] == SIZE and meta["shape"] == [len(ds), SIZE, SIZE, 3]
    assert len(meta["fingerprint"]) == 64
    assert (tmp_path / f"test_{SIZE}px.uint8").stat().st_size == len(ds) * SIZE * SIZE * 3

    def explode(path, size):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(dataset_module, "_decode_image", explode)
    again = CelebADataset(data.root, "test", image_size=SIZE, cache_dir=tmp_path, progress=False)
    assert torch.equal(again[0][0], ds[0][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"test_{SIZE}px.json", f"test_{SIZE}px.uint8"]


def test_stale_cache_rebuilt(tmp_path, monkeypatch):
    d = make_celeba(tmp_path / "data", n=10, seed=9)
    cache = tmp_path / "cache"
    first = CelebADataset(d.root, "train", image_size=16, cache_dir=cache, progress=False)
    # Move an image from valid to train: same split name, other images -> fingerprint mismatch.
    moved = d.split.copy()
    name = moved.index[moved == "valid"][0]
    moved[name] = "train"
    write_partition(d.folder / PARTITION_FILE, moved)
    clear_annotation_cache()
    counter = _CountingDecode()
    monkeypatch.setattr(dataset_module, "_decode_image", counter)
    second = CelebADataset(d.root, "train", image_size=16, cache_dir=cache, progress=False)
    assert len(second) == len(first) + 1 and counter.calls == len(second)
    row = list(second.names).index(name)
    reference = _reference_pixels(d.folder / "img_align_celeba" / name, 16)
    np.testing.assert_allclose(_denormalise(second[row][0]), reference, atol=1e-3)
    # A corrupted sidecar also forces a rebuild.
    (cache / "train_16px.json").write_text("{not json")
    CelebADataset(d.root, "train", image_size=16, cache_dir=cache, progress=False)
    assert counter.calls == 2 * len(second)


def test_interrupted_build_leaves_no_valid_cache(data, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "_decode_image", _CountingDecode(fail_after=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        CelebADataset(data.root, "train", image_size=SIZE, cache_dir=tmp_path, progress=False, num_workers=0)
    assert list(tmp_path.iterdir()) == []  # no sidecar, no data file, no temporary left behind
    counter = _CountingDecode()
    monkeypatch.setattr(dataset_module, "_decode_image", counter)
    ds = CelebADataset(data.root, "train", image_size=SIZE, cache_dir=tmp_path, progress=False)
    assert counter.calls == len(ds)


def test_interrupted_rebuild_invalidates_old_sidecar(data, tmp_path, monkeypatch):
    CelebADataset(data.root, "valid", image_size=SIZE, cache_dir=tmp_path, progress=False)
    meta_path = tmp_path / f"valid_{SIZE}px.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setattr(dataset_module, "_decode_image", _CountingDecode(fail_after=1))
    with pytest.raises(RuntimeError):
        CelebADataset(data.root, "valid", image_size=SIZE, cache_dir=tmp_path, progress=False)
    assert not meta_path.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_pool_build_matches_in_process(data, tmp_path, monkeypatch, train):
    monkeypatch.setattr(dataset_module, "_MIN_IMAGES_FOR_POOL", 0)
    monkeypatch.setattr(dataset_module, "_CHUNK", 4)
    pooled = CelebADataset(data.root, "train", image_size=SIZE, cache_dir=tmp_path, progress=False, num_workers=2)
    np.testing.assert_array_equal(np.fromfile(pooled.cache_path, np.uint8), np.fromfile(train.cache_path, np.uint8))


def test_missing_jpeg_names_the_file(tmp_path):
    d = make_celeba(tmp_path, n=6, seed=2)
    victim = d.folder / "img_align_celeba" / "000002.jpg"
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"000002\.jpg") as info:
        CelebADataset(d.root, "all", image_size=SIZE, progress=False)
    assert str(victim) in str(info.value)
    victim.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match=r"000002\.jpg"):
        CelebADataset(d.root, "all", image_size=SIZE, progress=False)
    Image.new("RGB", (100, 100)).save(victim)
    with pytest.raises(ImageReadError, match=r"000002\.jpg is 100x100"):
        CelebADataset(d.root, "all", image_size=SIZE, progress=False)
    assert not (dataset_module.default_cache_dir(d.root) / f"all_{SIZE}px.json").exists()


# --------------------------------------------------------------------------------------------
# Subsets and batches
# --------------------------------------------------------------------------------------------


def test_subset_shares_cache(data, train, monkeypatch):
    monkeypatch.setattr(dataset_module, "_decode_image", None)  # any decode would fail
    sub = train.subset({"5_o_Clock_Shadow": 1}, Smiling=0)
    attrs = train.attributes
    expected = attrs.index[(attrs["5_o_Clock_Shadow"] == 1) & (attrs["Smiling"] == 0)]
    assert list(sub.names) == list(expected)
    assert sub.cache_path == train.cache_path
    for i, name in enumerate(sub.names):
        j = list(train.names).index(name)
        assert torch.equal(sub[i][0], train[j][0])
        assert torch.equal(sub[i][1], train[j][1]) and torch.equal(sub[i][2], train[j][2])
    assert (sub.attributes["5_o_Clock_Shadow"] == 1).all()
    nested = sub.subset_names(list(sub.names[:1]))
    assert list(nested.names) == list(sub.names[:1])
    assert len(train.subset()) == len(train)
    with pytest.raises(ValueError, match="not part of this subset|not in this"):
        sub.subset_names([n for n in train.names if n not in set(sub.names)][:1])
    with pytest.raises(ValueError, match="twice"):
        train.subset({"Smiling": 1}, Smiling=1)


def test_get_batch_equals_items(train):
    for indices in ([0, 1, 2], [4, 0, 3, 0, -1], np.arange(len(train))[::-1], torch.tensor([2, 1]), []):
        images, targets, landmarks = train.get_batch(indices)
        idx = [int(i) % len(train) for i in indices]
        assert images.dtype == torch.uint8 and images.shape == (len(idx), 3, SIZE, SIZE)
        assert images.is_contiguous()
        assert targets.shape == (len(idx), 40) and landmarks.shape == (len(idx), 5, 2)
        if idx:
            stacked = torch.stack([train[i][0] for i in idx])
            assert torch.equal(normalize_uint8(images), stacked)
            assert torch.equal(targets, torch.stack([train[i][1] for i in idx]))
            assert torch.equal(landmarks, torch.stack([train[i][2] for i in idx]))
            raw = np.stack([np.asarray(train._images[train._rows[i]]) for i in idx])
            assert torch.equal(images, torch.from_numpy(raw).permute(0, 3, 1, 2))
    channels_last, _, _ = train.get_batch([1, 0], channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, train.get_batch([1, 0])[0])
    with pytest.raises(IndexError):
        train.get_batch([len(train)])


def test_iterate_batches(train):
    n = len(train)
    runs = [list(iterate_batches(train, 5, shuffle=True, seed=1, epoch=e)) for e in (0, 0, 1)]
    first, again, other = runs

    def order(batches):
        return torch.cat([t for _, t, _ in batches])

    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(order(first), order(other))
    # Every index exactly once per epoch: match targets + landmarks rows back to indices.
    seen = torch.cat([lm.reshape(len(lm), -1) for _, _, lm in first])
    reference = torch.from_numpy(train.landmarks.reshape(n, -1).copy())
    matches = (seen[:, None, :] == reference[None, :, :]).all(-1).float()
    assert matches.shape == (n, n) and torch.equal(matches.sum(0), torch.ones(n))
    # The images are the normalised get_batch images.
    images, targets, landmarks = first[0]
    rows = [int(torch.nonzero(matches[i]).item()) for i in range(len(images))]
    assert torch.equal(images, normalize_uint8(train.get_batch(rows)[0]))
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    # Unshuffled: in order, last batch partial unless drop_last.
    plain = list(iterate_batches(train, 5))
    assert [len(b[0]) for b in plain] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert torch.equal(torch.cat([b[0] for b in plain]), torch.stack([train[i][0] for i in range(n)]))
    assert all(len(b[0]) == 5 for b in iterate_batches(train, 5, drop_last=True))
    cl = next(iter(iterate_batches(train, 4, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, plain[0][0][:4])


def test_batch_loader(train):
    loader = BatchLoader(train, 4, shuffle=True, seed=3)
    assert len(loader) == -(-len(train) // 4)
    assert len(BatchLoader(train, 4, drop_last=True)) == len(train) // 4
    epoch0 = [t for _, t, _ in loader]
    assert len(epoch0) == len(loader)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, [t for _, t, _ in loader]))
    loader.set_epoch(1)
    expected = [t for _, t, _ in iterate_batches(train, 4, shuffle=True, seed=3, epoch=1)]
    assert all(torch.equal(a, b) for a, b in zip([t for _, t, _ in loader], expected))
    with pytest.raises(ValueError):
        BatchLoader(train, 0)


def test_normalize_uint8():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    out = normalize_uint8(x)
    for c in range(3):
        expected = [(0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]]
        np.testing.assert_allclose(out[0, c, 0].numpy(), expected, rtol=1e-6)
    with pytest.raises(TypeError):
        normalize_uint8(x.float())


def test_dataloader_compatibility(train):
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=False, num_workers=0)
    images, targets, landmarks = next(iter(loader))
    assert images.shape == (4, 3, SIZE, SIZE) and targets.shape == (4, 40) and landmarks.shape == (4, 5, 2)
    assert torch.equal(images, torch.stack([train[i][0] for i in range(4)]))
    workers = torch.utils.data.DataLoader(train, batch_size=5, num_workers=2)
    assert torch.equal(torch.cat([t for _, t, _ in workers]), torch.from_numpy(train.targets.copy()))
    clone = pickle.loads(pickle.dumps(train))
    assert clone._memmap is None or isinstance(clone._memmap, np.ndarray)
    assert torch.equal(clone[1][0], train[1][0])


# --------------------------------------------------------------------------------------------
# Faults while building the cache: partial image sets, corrupt files, staleness, space, temporaries
# --------------------------------------------------------------------------------------------


def _pool(monkeypatch):
    """Decode with worker processes even for a tiny dataset, two images per task."""
    monkeypatch.setattr(dataset_module, "_MIN_IMAGES_FOR_POOL", 0)
    monkeypatch.setattr(dataset_module, "_CHUNK", 2)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "pool"])
def test_partial_image_set_names_the_first_missing_file(tmp_path, monkeypatch, workers):
    _pool(monkeypatch)
    d = make_celeba(tmp_path, n=16, seed=11)
    gone = ["000004.jpg", "000009.jpg", "000010.jpg", "000015.jpg"]
    for name in gone:
        (d.folder / "img_align_celeba" / name).unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=workers)
    message = str(info.value)
    assert "000004.jpg" in message and "4 of the 16 listed images are missing" in message
    assert "--skip-unreadable" in message and "\n" not in message

    cache = tmp_path / "cache"
    with pytest.warns(UserWarning) as record:
        ds = CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=workers, cache_dir=cache,
                           skip_unreadable=True)
    listing = cache / f"all_{SIZE}px.unreadable.txt"
    warning = str(record[0].message)
    assert "Skipping 4 missing or unreadable" in warning and str(listing) in warning
    assert "000004.jpg, 000009.jpg, 000010.jpg, 000015.jpg" in warning
    assert listing.read_text().split() == gone
    assert ds.names.tolist() == [n for n in d.names if n not in gone]


def test_skip_warning_is_short_for_many_images(tmp_path, monkeypatch):
    d = make_celeba(tmp_path, n=12, seed=12, images=False)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning) as record:
        ds = CelebADataset(d.root, "all", image_size=SIZE, progress=False, cache_dir=cache, skip_unreadable=True)
    assert len(ds) == 0
    warning = str(record[0].message)
    assert "Skipping 12 " in warning and "000005.jpg, ..." in warning and "000006.jpg" not in warning
    assert (cache / f"all_{SIZE}px.unreadable.txt").read_text().split() == d.names
    # The environment variable the CLI's --skip-unreadable sets has the same effect.
    monkeypatch.setenv("COCAM_SKIP_UNREADABLE", "1")
    with pytest.warns(UserWarning, match="Skipping 12 "):
        CelebADataset(d.root, "all", image_size=SIZE, progress=False, cache_dir=tmp_path / "c2")


def test_corrupt_jpeg_in_a_worker_is_one_clear_error(tmp_path, monkeypatch):
    _pool(monkeypatch)
    d = make_celeba(tmp_path, n=12, seed=13)
    victim = d.folder / "img_align_celeba" / "000007.jpg"
    victim.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageReadError) as info:
        CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=2)
    message = str(info.value)
    assert str(victim) in message and "--skip-unreadable" in message
    assert "\n" not in message and "Traceback" not in message
    assert info.value.__cause__ is None and "RemoteTraceback" not in repr(info.value.__context__)


def test_cache_rebuilt_when_any_image_is_replaced(tmp_path, monkeypatch):
    """The fingerprint covers every image's size and modification time, not a sample."""
    monkeypatch.setattr(dataset_module, "_decode_image", _CountingDecode())
    d = make_celeba(tmp_path, n=40, seed=14)
    first = CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=0)
    victim = d.folder / "img_align_celeba" / "000020.jpg"
    donor = d.folder / "img_align_celeba" / "000031.jpg"
    stat = victim.stat()
    victim.write_bytes(donor.read_bytes())
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    counter = _CountingDecode()
    monkeypatch.setattr(dataset_module, "_decode_image", counter)
    second = CelebADataset(d.root, "all", image_size=SIZE, progress=False, num_workers=0)
    assert counter.calls == len(second) == len(first)
    row = second.names.tolist().index("000020.jpg")
    np.testing.assert_array_equal(second.get_batch_numpy([row])[0][0], _reference_pixels(donor, SIZE))


def test_stale_temporaries_are_removed_by_the_next_build(data, tmp_path):
    stale = [tmp_path / f".test_{SIZE}px.uint8.tmp-deadbeef", tmp_path / f".test_{SIZE}px.uint8.tmp-1234"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # what a kill -9 during a build leaves
    other = tmp_path / f".train_{SIZE}px.uint8.tmp-keep"
    other.write_bytes(b"")
    CelebADataset(data.root, "test", image_size=SIZE, cache_dir=tmp_path, progress=False)
    assert not any(p.exists() for p in stale)
    assert other.exists()  # another cache's temporary: its own build removes it
    assert not list(tmp_path.glob("*.lock"))


def test_too_little_space_for_the_cache_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(dataset_module.ImageCacheError) as info:
        CelebADataset(data.root, "train", image_size=SIZE, cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "Not enough disk space" in message and "--cache-dir" in message and "\n" not in message
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.suffix == ".json"]
