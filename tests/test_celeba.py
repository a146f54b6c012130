"""CelebA annotation files: exact parsing, errors, writers, loading and subset selection."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from _celeba_fixture import (
    LITERAL_ATTR,
    LITERAL_ATTR_ROWS,
    LITERAL_BBOX,
    LITERAL_FILES,
    LITERAL_LANDMARKS,
    make_celeba,
    write_literal_celeba,
)

from cocam.attributes import CELEBA_ATTRIBUTES, UnknownAttributeError
from cocam.celeba import (
    ATTR_FILE,
    BBOX_COLUMNS,
    BBOX_FILE,
    IDENTITY_FILE,
    LANDMARK_COLUMNS,
    LANDMARKS_FILE,
    PARTITION_FILE,
    SPLITS,
    AnnotationError,
    CelebAAnnotations,
    DatasetNotFoundError,
    clear_annotation_cache,
    find_celeba_dir,
    load_annotations,
    parse_conditions,
    read_attributes,
    read_bbox,
    read_identity,
    read_landmarks,
    read_partition,
    select_images,
    write_attributes,
    write_bbox,
    write_identity,
    write_landmarks,
    write_partition,
)


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    return make_celeba(tmp_path_factory.mktemp("celeba_ann"), n=30, seed=3)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("ascii") if isinstance(text, str) else text)
    return path


# --------------------------------------------------------------------------------------------
# Exact parsing of the real format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_literal_attributes(tmp_path, ending):
    df = read_attributes(_write(tmp_path, ATTR_FILE, LITERAL_ATTR.replace("\r\n", ending)))
    assert list(df.columns) == list(CELEBA_ATTRIBUTES)
    assert df.index.name == "image_id"
    assert list(df.index) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert all(dtype == np.uint8 for dtype in df.dtypes)
    for name, row in LITERAL_ATTR_ROWS.items():
        assert df.loc[name].tolist() == row
    assert df.loc["000001.jpg", "Young"] == 1 and df.loc["000001.jpg", "5_o_Clock_Shadow"] == 0


@pytest.mark.parametrize("ending", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_literal_other_files(tmp_path, ending):
    def path(name):
        return _write(tmp_path, name, LITERAL_FILES[name].replace("\r\n", ending))

    split = read_partition(path(PARTITION_FILE))
    assert split.tolist() == ["train", "valid", "test"]
    assert isinstance(split.dtype, pd.CategoricalDtype)
    assert list(split.cat.categories) == list(SPLITS)
    assert split.index.name == "image_id"

    lm = read_landmarks(path(LANDMARKS_FILE))
    assert list(lm.columns) == list(LANDMARK_COLUMNS)
    assert lm.loc["000001.jpg"].tolist() == [69, 109, 106, 113, 77, 142, 73, 152, 108, 154]
    assert lm.loc["000003.jpg", "rightmouth_y"] == 158
    assert all(np.issubdtype(t, np.integer) for t in lm.dtypes)

    bbox = read_bbox(path(BBOX_FILE))
    assert list(bbox.columns) == list(BBOX_COLUMNS)
    assert bbox.loc["000001.jpg"].tolist() == [95, 71, 226, 313]
    assert bbox.loc["000003.jpg"].tolist() == [216, 59, 91, 126]

    identity = read_identity(path(IDENTITY_FILE))
    assert identity.tolist() == [2880, 2937, 8692]
    assert np.issubdtype(identity.dtype, np.integer)


def test_writers_reproduce_literal_bytes(tmp_path):
    """Parsing the literal files and writing them back gives the same bytes."""
    folder = write_literal_celeba(tmp_path / "src")
    out = tmp_path / "out"
    write_attributes(out / ATTR_FILE, read_attributes(folder / ATTR_FILE))
    write_partition(out / PARTITION_FILE, read_partition(folder / PARTITION_FILE))
    write_landmarks(out / LANDMARKS_FILE, read_landmarks(folder / LANDMARKS_FILE))
    write_bbox(out / BBOX_FILE, read_bbox(folder / BBOX_FILE))
    write_identity(out / IDENTITY_FILE, read_identity(folder / IDENTITY_FILE))
    for name, text in LITERAL_FILES.items():
        assert (out / name).read_bytes() == text.encode("ascii"), name


def test_header_quirks(tmp_path):
    lines = LITERAL_ATTR.split("\r\n")
    expected = read_attributes(_write(tmp_path, "a.txt", LITERAL_ATTR))
    # No trailing space, extra spaces between names, trailing spaces after the count.
    variants = [
        "\r\n".join([lines[0], lines[1].rstrip(), *lines[2:]]),
        "\r\n".join([lines[0] + "  ", lines[1].replace(" ", "   "), *lines[2:]]),
    ]
    for i, text in enumerate(variants):
        assert read_attributes(_write(tmp_path, f"v{i}.txt", text)).equals(expected)
    # Landmark / bbox headers with a trailing space, bbox header without image_id.
    lm = LITERAL_LANDMARKS.replace("rightmouth_y\r\n", "rightmouth_y \r\n")
    reference = read_landmarks(_write(tmp_path, "l0.txt", LITERAL_LANDMARKS))
    assert read_landmarks(_write(tmp_path, "lm.txt", lm)).equals(reference)
    bb = LITERAL_BBOX.replace("image_id x_1", "x_1")
    assert read_bbox(_write(tmp_path, "bb.txt", bb)).equals(read_bbox(_write(tmp_path, "b0.txt", LITERAL_BBOX)))


def test_irregular_whitespace_matches_fixed_width(tmp_path):
    """Tabs, runs of spaces, no final newline, trailing blank lines: same result (general path)."""
    expected = read_attributes(_write(tmp_path, "a.txt", LITERAL_ATTR))
    rows = LITERAL_ATTR.split("\r\n")
    messy = rows[:2] + [rows[2].replace(" ", "\t", 3), "  " + rows[3].replace("  ", "    ") + "  ", rows[4]]
    assert read_attributes(_write(tmp_path, "m1.txt", "\r\n".join(messy))).equals(expected)
    assert read_attributes(_write(tmp_path, "m2.txt", LITERAL_ATTR + "\r\n\r\n")).equals(expected)
    lm = LITERAL_LANDMARKS.replace("    69  109", " 69\t109")
    reference = read_landmarks(_write(tmp_path, "l0.txt", LITERAL_LANDMARKS))
    assert read_landmarks(_write(tmp_path, "lm.txt", lm)).equals(reference)


def test_negative_and_wide_values(tmp_path):
    text = "2\r\n" + " ".join(LANDMARK_COLUMNS) + "\r\n"
    text += "a.jpg -5 0 123456 -70000 1 2 3 4 5 6\r\nb.jpg 7 8 9 10 11 12 13 14 15 -16\r\n"
    lm = read_landmarks(_write(tmp_path, "lm.txt", text))
    assert lm.loc["a.jpg"].tolist() == [-5, 0, 123456, -70000, 1, 2, 3, 4, 5, 6]
    assert lm.loc["b.jpg", "rightmouth_y"] == -16
    assert lm.dtypes.iloc[0] == np.int64


def test_fast_and_general_paths_agree(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    index = pd.Index([f"{i:06d}.jpg" for i in range(n)], name="image_id")
    attrs = pd.DataFrame(rng.integers(0, 2, (n, 40)).astype(np.uint8), index=index, columns=list(CELEBA_ATTRIBUTES))
    lms = pd.DataFrame(rng.integers(-50, 300, (n, 10)), index=index, columns=list(LANDMARK_COLUMNS))
    write_attributes(tmp_path / "a.txt", attrs)
    write_landmarks(tmp_path / "l.txt", lms)
    fast_a, fast_l = read_attributes(tmp_path / "a.txt"), read_landmarks(tmp_path / "l.txt")
    pd.testing.assert_frame_equal(fast_a, attrs, check_index_type=False)
    pd.testing.assert_frame_equal(fast_l, lms, check_index_type=False)
    # Append a space to one row: rows are no longer all the same length.
    for name in ("a.txt", "l.txt"):
        data = (tmp_path / name).read_bytes().replace(b"000100.jpg", b"000100.jpg ", 1)
        (tmp_path / ("g" + name)).write_bytes(data)
    pd.testing.assert_frame_equal(read_attributes(tmp_path / "ga.txt"), fast_a)
    pd.testing.assert_frame_equal(read_landmarks(tmp_path / "gl.txt"), fast_l)


# --------------------------------------------------------------------------------------------
# Equality with torchvision's parser
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "valid", "test", "all"])
def test_matches_torchvision(fixture_data, monkeypatch, split):
    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    tv = torchvision.datasets.CelebA(
        str(fixture_data.root), split=split, target_type=["attr", "landmarks"], download=False
    )
    ann = load_annotations(fixture_data.root)
    names = ann.names(None if split == "all" else split)
    assert list(names) == list(tv.filename)
    assert len(names) > 0
    ours = torch.from_numpy(np.array(ann.attributes.loc[names], dtype=np.int64))
    assert torch.equal(ours, tv.attr.long())
    assert [h for h in tv.attr_names if h] == list(ann.attributes.columns)
    lm = torch.from_numpy(np.array(ann.landmarks.loc[names]))
    assert torch.equal(lm, tv.landmarks_align.long())
    assert torch.equal(torch.from_numpy(np.array(ann.bbox.loc[names])), tv.bbox.long())
    assert torch.equal(torch.from_numpy(np.array(ann.identity.loc[names])), tv.identity[:, 0].long())
    image, (attr, landmarks) = tv[0]
    assert image.size == (178, 218)
    assert torch.equal(attr.long(), ours[0])


def test_literal_files_match_torchvision(tmp_path, monkeypatch):
    write_literal_celeba(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    tv = torchvision.datasets.CelebA(str(tmp_path), split="all", target_type=["attr", "landmarks"])
    ann = load_annotations(tmp_path)
    assert torch.equal(torch.from_numpy(np.array(ann.attributes, dtype=np.int64)), tv.attr.long())
    assert torch.equal(torch.from_numpy(np.array(ann.landmarks)), tv.landmarks_align.long())
    assert torch.equal(torch.from_numpy(np.array(ann.bbox)), tv.bbox.long())


# --------------------------------------------------------------------------------------------
# Malformed content
# --------------------------------------------------------------------------------------------


def test_truncated_attribute_file(tmp_path):
    # Fewer rows than the count line says.
    text = LITERAL_ATTR.replace("3\r\n", "5\r\n", 1)
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.txt: line 1: truncated.*5 images.*only 3") as info:
        read_attributes(_write(tmp_path, ATTR_FILE, text))
    assert info.value.line == 1 and info.value.path.name == ATTR_FILE
    # Cut in the middle of the last row: that row has too few columns.
    cut = LITERAL_ATTR[: LITERAL_ATTR.rindex("000003.jpg") + 40]
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.txt: line 5: expected 41 fields.*found 11"):
        read_attributes(_write(tmp_path, ATTR_FILE, cut))
    # Nothing but the count line.
    with pytest.raises(AnnotationError, match=r"line 2: file ends before the header"):
        read_attributes(_write(tmp_path, ATTR_FILE, "3\r\n"))


def test_more_rows_than_count(tmp_path):
    text = LITERAL_ATTR.replace("3\r\n", "2\r\n", 1)
    with pytest.raises(AnnotationError, match=r"line 1 says 2 images but the file has 3"):
        read_attributes(_write(tmp_path, ATTR_FILE, text))


def test_wrong_column_count(tmp_path):
    text = LITERAL_ATTR.replace("000002.jpg -1 -1", "000002.jpg -1 -1 -1", 1)
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.txt: line 4: expected 41 fields.*found 42"):
        read_attributes(_write(tmp_path, ATTR_FILE, text))
    text = LITERAL_LANDMARKS.replace("  154\r\n", "\r\n", 1)
    with pytest.raises(AnnotationError, match=r"line 3: expected 11 fields .*found 10"):
        read_landmarks(_write(tmp_path, LANDMARKS_FILE, text))


@pytest.mark.parametrize("bad", ["0", " 2", "+1", " x", "1-"])
def test_bad_attribute_value(tmp_path, bad):
    row = "000002.jpg -1 -1 -1  1"
    text = LITERAL_ATTR.replace(row, row[:-3] + bad.rjust(3), 1)
    expected = r"list_attr_celeba\.txt: line 4: (image '000002\.jpg' \(column 'Bags_Under_Eyes'\)|value 4 )"
    with pytest.raises(AnnotationError, match=expected):
        read_attributes(_write(tmp_path, ATTR_FILE, text))


def test_bad_attribute_value_names_column(tmp_path):
    text = LITERAL_ATTR.replace("000003.jpg 1", "000003.jpg 0", 1)
    with pytest.raises(AnnotationError, match=r"line 5: image '000003\.jpg' \(column '5_o_Clock_Shadow'\).*-1 or 1"):
        read_attributes(_write(tmp_path, ATTR_FILE, text))


def test_header_errors(tmp_path):
    text = LITERAL_ATTR.replace("Wearing_Lipstick", "Wearing_Lipstik", 1)
    with pytest.raises(AnnotationError, match=r"line 2: .*Wearing_Lipstik.*Did you mean 'Wearing_Lipstick'"):
        read_attributes(_write(tmp_path, ATTR_FILE, text))
    text = LITERAL_ATTR.replace("Bald ", "Bangs ", 1)
    with pytest.raises(AnnotationError, match=r"line 2: .*Bangs more than once"):
        read_attributes(_write(tmp_path, ATTR_FILE, text))
    with pytest.raises(AnnotationError, match=r"line 1: expected the number of images"):
        read_attributes(_write(tmp_path, ATTR_FILE, LITERAL_ATTR.replace("3\r\n", "three\r\n", 1)))
    text = LITERAL_LANDMARKS.replace("nose_x nose_y", "nose_y nose_x", 1)
    with pytest.raises(AnnotationError, match=r"line 2: expected the header"):
        read_landmarks(_write(tmp_path, LANDMARKS_FILE, text))


def test_other_content_errors(tmp_path):
    with pytest.raises(AnnotationError, match=r"line 2: duplicate image '000001\.jpg' \(first listed on line 1\)"):
        read_partition(_write(tmp_path, PARTITION_FILE, "000001.jpg 0\r\n000001.jpg 1\r\n"))
    with pytest.raises(AnnotationError, match=r"line 2: .*split code must be 0, 1 or 2, found 3"):
        read_partition(_write(tmp_path, PARTITION_FILE, "000001.jpg 0\r\n000002.jpg 3\r\n"))
    with pytest.raises(AnnotationError, match=r"line 2: blank line"):
        read_identity(_write(tmp_path, IDENTITY_FILE, "000001.jpg 1\r\n\r\n000002.jpg 3\r\n"))
    text = LITERAL_LANDMARKS.replace(" 77 ", "7a7 ", 1)
    with pytest.raises(AnnotationError, match=r"line 3: value 5 \('7a7'\) is not an integer"):
        read_landmarks(_write(tmp_path, LANDMARKS_FILE, text))
    with pytest.raises(DatasetNotFoundError, match="nope.txt"):
        read_attributes(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_writer_round_trip(fixture_data, tmp_path, ending):
    d = fixture_data
    write_attributes(tmp_path / ATTR_FILE, d.attributes, line_ending=ending)
    write_partition(tmp_path / PARTITION_FILE, d.split, line_ending=ending)
    write_landmarks(tmp_path / LANDMARKS_FILE, d.landmarks, line_ending=ending)
    write_bbox(tmp_path / BBOX_FILE, d.bbox, line_ending=ending)
    write_identity(tmp_path / IDENTITY_FILE, d.identity, line_ending=ending)
    pd.testing.assert_frame_equal(read_attributes(tmp_path / ATTR_FILE), d.attributes, check_index_type=False)
    pd.testing.assert_series_equal(read_partition(tmp_path / PARTITION_FILE), d.split, check_index_type=False)
    pd.testing.assert_frame_equal(read_landmarks(tmp_path / LANDMARKS_FILE), d.landmarks, check_index_type=False)
    pd.testing.assert_frame_equal(read_bbox(tmp_path / BBOX_FILE), d.bbox, check_index_type=False)
    pd.testing.assert_series_equal(read_identity(tmp_path / IDENTITY_FILE), d.identity, check_index_type=False)
    raw = (tmp_path / ATTR_FILE).read_bytes()
    lines = raw.split(ending.encode())
    assert lines[0] == b"30" and lines[1].endswith(b"Young ") and lines[-1] == b""
    first_positive = d.attributes.iloc[:, 0].to_numpy() == 1
    assert first_positive.any() and not first_positive.all()  # both row lengths are exercised
    for line, positive in zip(lines[2:-1], first_positive):
        assert len(line) == 10 + 40 * 3 - int(positive)  # a positive first value is unpadded
    if ending == "\n":
        assert b"\r" not in raw
    else:
        assert raw.count(b"\r\n") == raw.count(b"\n") == 32


def test_writer_validation(tmp_path, fixture_data):
    attrs = fixture_data.attributes
    with pytest.raises(ValueError, match="0/1"):
        write_attributes(tmp_path / "a.txt", attrs.astype(np.int64) * 2 - 1)
    with pytest.raises(UnknownAttributeError, match="Young"):
        write_attributes(tmp_path / "a.txt", attrs.rename(columns={"Young": "Yuong"}))
    with pytest.raises(ValueError, match="40 attributes"):
        write_attributes(tmp_path / "a.txt", attrs.drop(columns=["Young"]))
    with pytest.raises(ValueError, match="whitespace"):
        write_identity(tmp_path / "i.txt", pd.Series([1], index=["a b.jpg"]))
    with pytest.raises(ValueError, match="more than once"):
        write_identity(tmp_path / "i.txt", pd.Series([1, 2], index=["a.jpg", "a.jpg"]))
    with pytest.raises(ValueError, match="train/valid/test"):
        write_partition(tmp_path / "p.txt", pd.Series(["train", "val"], index=["a.jpg", "b.jpg"]))
    write_partition(tmp_path / "p.txt", pd.Series([0, 2], index=["a.jpg", "b.jpg"]))
    assert (tmp_path / "p.txt").read_bytes() == b"a.jpg 0\r\nb.jpg 2\r\n"
    write_attributes(tmp_path / "bool.txt", attrs.astype(bool))
    assert read_attributes(tmp_path / "bool.txt").equals(read_attributes(fixture_data.folder / ATTR_FILE))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------


def test_load_annotations(fixture_data):
    d = fixture_data
    ann = load_annotations(d.root)
    assert isinstance(ann, CelebAAnnotations)
    assert ann.root == d.folder.resolve()
    assert load_annotations(d.folder) is ann  # celeba/ itself, served from the cache
    assert load_annotations(str(d.root)) is ann
    pd.testing.assert_frame_equal(ann.attributes, d.attributes, check_index_type=False)
    assert ann.split.tolist() == d.split.tolist()
    for split in SPLITS:
        assert list(ann.names(split)) == [n for n, s in zip(d.names, d.split) if s == split]
    assert list(ann.names()) == d.names and list(ann.names("all")) == d.names
    assert len(ann) == 30
    with pytest.raises(ValueError, match="Did you mean 'valid'"):
        ann.names("validation")


def test_cache_invalidated_by_rewrite(tmp_path):
    d = make_celeba(tmp_path, n=8, images=False)
    first = load_annotations(tmp_path)
    changed = d.split.copy()
    changed.iloc[0] = "test" if changed.iloc[0] != "test" else "train"
    write_partition(d.folder / PARTITION_FILE, changed)
    second = load_annotations(tmp_path)
    assert second is not first
    assert second.split.iloc[0] == changed.iloc[0]
    clear_annotation_cache()
    assert load_annotations(tmp_path) is not second


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_annotations(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "img_align_celeba" in message and "cocam generate" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"empty[/\\]celeba"):
        load_annotations(tmp_path / "empty")
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("missing", [ATTR_FILE, PARTITION_FILE])
def test_missing_required_file(tmp_path, missing):
    d = make_celeba(tmp_path, n=6, images=False)
    (d.folder / missing).unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_annotations(tmp_path)
    message = str(info.value)
    assert f"not found: {d.folder.resolve() / missing}. " in message and "\n" not in message
    assert "list_attr_celeba.txt" in message and "cocam generate" in message


@pytest.mark.parametrize("missing", [BBOX_FILE, IDENTITY_FILE, LANDMARKS_FILE])
def test_optional_files(tmp_path, missing):
    d = make_celeba(tmp_path, n=6, images=False)
    (d.folder / missing).unlink()
    ann = load_annotations(tmp_path)
    assert (ann.bbox is None) == (missing == BBOX_FILE)
    assert (ann.identity is None) == (missing == IDENTITY_FILE)
    assert (ann.landmarks is None) == (missing == LANDMARKS_FILE)
    pd.testing.assert_frame_equal(ann.attributes, d.attributes, check_index_type=False)
    if missing == LANDMARKS_FILE:
        with pytest.raises(DatasetNotFoundError, match=r"the landmark transfer needs the landmark file .*"
                                                       r"list_landmarks_align_celeba\.txt.*--transfer template"):
            ann.require_landmarks("the landmark transfer")
    else:
        pd.testing.assert_frame_equal(ann.require_landmarks("x"), d.landmarks, check_index_type=False)
    with pytest.raises(DatasetNotFoundError, match=missing):
        load_annotations(tmp_path, require_optional=True)


def test_image_missing_from_partition(tmp_path):
    d = make_celeba(tmp_path, n=8, images=False)
    write_partition(d.folder / PARTITION_FILE, d.split.drop("000005.jpg"))
    expected = r"list_attr_celeba\.txt: line 7: image '000005\.jpg' is not listed in list_eval_partition\.txt"
    with pytest.raises(AnnotationError, match=expected):
        load_annotations(tmp_path)


def test_extra_image_in_landmarks(tmp_path):
    d = make_celeba(tmp_path, n=8, images=False)
    extra = pd.concat([d.landmarks, d.landmarks.iloc[:1].rename(index={"000001.jpg": "999999.jpg"})])
    write_landmarks(d.folder / LANDMARKS_FILE, extra)
    expected = r"list_landmarks_align_celeba\.txt: line 11: image '999999\.jpg' is not listed in list_attr_celeba\.txt"
    with pytest.raises(AnnotationError, match=expected):
        load_annotations(tmp_path)


def test_files_in_different_orders_are_aligned(tmp_path):
    d = make_celeba(tmp_path, n=10, images=False)
    write_landmarks(d.folder / LANDMARKS_FILE, d.landmarks.iloc[::-1])
    write_partition(d.folder / PARTITION_FILE, d.split.iloc[::-1])
    ann = load_annotations(tmp_path)
    assert list(ann.landmarks.index) == d.names
    pd.testing.assert_frame_equal(ann.landmarks, d.landmarks, check_index_type=False)
    assert ann.split.tolist() == d.split.tolist()


def test_find_celeba_dir(fixture_data):
    assert find_celeba_dir(fixture_data.root) == fixture_data.folder.resolve()
    assert find_celeba_dir(fixture_data.folder) == fixture_data.folder.resolve()


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def test_select_images(fixture_data):
    attrs = fixture_data.attributes
    chosen = select_images(attrs, {"Wearing_Lipstick": 1, "Heavy_Makeup": 0})
    expected = attrs.index[(attrs["Wearing_Lipstick"] == 1) & (attrs["Heavy_Makeup"] == 0)]
    assert list(chosen) == list(expected) and len(chosen) > 0
    assert list(select_images(attrs, {"5_o_Clock_Shadow": True})) == list(attrs.index[attrs["5_o_Clock_Shadow"] == 1])
    assert list(select_images(attrs, {"Young": np.int64(0)})) == list(attrs.index[attrs["Young"] == 0])
    assert list(select_images(attrs, {})) == list(attrs.index)
    with pytest.raises(UnknownAttributeError, match="Did you mean 'Wearing_Lipstick'"):
        select_images(attrs, {"Wearing_Lipstik": 1})
    for bad in (2, -1, "1", 0.5):
        with pytest.raises(ValueError, match="must be 0, 1, True or False"):
            select_images(attrs, {"Smiling": bad})


def test_parse_conditions():
    assert parse_conditions("Wearing_Lipstick=1,Heavy_Makeup=0") == {"Wearing_Lipstick": 1, "Heavy_Makeup": 0}
    assert parse_conditions(" Smiling = true , 5_o_Clock_Shadow=no ") == {"Smiling": 1, "5_o_Clock_Shadow": 0}
    assert parse_conditions("") == {}
    with pytest.raises(UnknownAttributeError, match="Did you mean 'Heavy_Makeup'"):
        parse_conditions("Wearing_Lipstick=1,Heavy_Make_up=0")
    with pytest.raises(ValueError, match="expected NAME=0 or NAME=1"):
        parse_conditions("Wearing_Lipstick")
    with pytest.raises(ValueError, match="expected NAME=0 or NAME=1"):
        parse_conditions("Smiling=1,,Young=0")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        parse_conditions("Smiling=2")
    with pytest.raises(ValueError, match="twice"):
        parse_conditions("Smiling=1,Smiling=0")


def test_many_rows_take_the_vectorised_path(tmp_path, monkeypatch):
    """20k rows of the real layout parse without the per-line tokenizer (the speed is measured in benchmarks)."""
    import cocam.celeba as celeba

    rng = np.random.default_rng(0)
    n = 20_000
    index = pd.Index([f"{i:06d}.jpg" for i in range(1, n + 1)], name="image_id")
    attrs = pd.DataFrame(rng.integers(0, 2, (n, 40)).astype(np.uint8), index=index, columns=list(CELEBA_ATTRIBUTES))
    write_attributes(tmp_path / ATTR_FILE, attrs)

    def no_general(*args, **kwargs):
        raise AssertionError("the general tokenizer was used")

    monkeypatch.setattr(celeba, "_parse_general", no_general)
    result = read_attributes(tmp_path / ATTR_FILE)
    assert result.shape == (n, 40)
    assert np.array_equal(result.to_numpy(), attrs.to_numpy())


def test_fast_parser_reads_rows_of_mixed_padding(fixture_data, tmp_path, monkeypatch):
    """Rows whose first value is an unpadded ``1`` (one byte shorter) stay on the fast path."""
    import cocam.celeba as celeba

    write_attributes(tmp_path / ATTR_FILE, fixture_data.attributes)
    raw = (tmp_path / ATTR_FILE).read_bytes()
    assert b".jpg 1 " in raw and b".jpg -1 " in raw

    def no_general(*args, **kwargs):
        raise AssertionError("the general tokenizer was used")

    monkeypatch.setattr(celeba, "_parse_general", no_general)
    pd.testing.assert_frame_equal(read_attributes(tmp_path / ATTR_FILE), fixture_data.attributes,
                                  check_index_type=False)
    literal = read_attributes(_write(tmp_path, "literal.txt", LITERAL_ATTR))
    for name, row in LITERAL_ATTR_ROWS.items():
        assert literal.loc[name].tolist() == row


def test_fast_parser_rejects_a_value_glued_to_the_name(tmp_path):
    """A row ``name-1 ...`` has no separator: an error, never the name ``name`` with a value -1."""
    text = LITERAL_ATTR.replace("000003.jpg 1 -1", "000003.jpg-1 -1", 1)
    with pytest.raises(AnnotationError, match=r"line 5: expected 41 fields"):
        read_attributes(_write(tmp_path, ATTR_FILE, text))
