"""Builders of tiny CelebA-format folders for the data-layer tests.

``make_celeba`` writes random-ish 178x218 JPEGs and the five annotation files (with the
writers of :mod:`cocam.celeba`, CRLF by default) in torchvision's layout ``<root>/celeba/...``.
The ``LITERAL_*`` strings are a few rows typed in the real files' exact format, independent of
the writers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.celeba import (
    BBOX_COLUMNS,
    LANDMARK_COLUMNS,
    SPLITS,
    write_attributes,
    write_bbox,
    write_identity,
    write_landmarks,
    write_partition,
)

# Three rows in the format of the real list_attr_celeba.txt: count, names with a trailing space,
# the first value after one space unpadded (so the row of 000003.jpg, whose first attribute is
# positive, is one byte shorter, as in the real file), the others right-aligned in width 3, CRLF.
LITERAL_ATTR = (
    "3\r\n"
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young \r\n"
    "000001.jpg -1  1  1 -1 -1 -1 -1 -1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1  1  1 -1  1 -1 -1  1 -1 -1  1 -1 -1 -1  1  1 -1  1 -1  1 -1 -1  1\r\n"  # noqa: E501
    "000002.jpg -1 -1 -1  1 -1 -1 -1  1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1 -1  1 -1  1 -1 -1  1 -1 -1 -1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1 -1  1\r\n"  # noqa: E501
    "000003.jpg 1 -1 -1 -1 -1 -1  1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1 -1 -1 -1  1 -1 -1  1  1 -1 -1  1 -1 -1 -1 -1 -1  1 -1 -1 -1 -1 -1  1\r\n"  # noqa: E501
)

#: The +-1 values of the three literal rows, as 0/1.
LITERAL_ATTR_ROWS = {
    "000001.jpg": [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1,
                   0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1],
    "000002.jpg": [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1,
                   0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
    "000003.jpg": [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                   1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
}  # fmt: skip

LITERAL_PARTITION = "000001.jpg 0\r\n000002.jpg 1\r\n000003.jpg 2\r\n"

LITERAL_LANDMARKS = (
    "3\r\n"
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\r\n"
    "000001.jpg    69  109  106  113   77  142   73  152  108  154\r\n"
    "000002.jpg    69  110  107  112   81  135   70  151  108  153\r\n"
    "000003.jpg    76  112  104  106  108  128   74  156   98  158\r\n"
)

LITERAL_BBOX = (
    "3\r\n"
    "image_id x_1 y_1 width height\r\n"
    "000001.jpg    95  71 226 313\r\n"
    "000002.jpg    72  94 221 306\r\n"
    "000003.jpg   216  59  91 126\r\n"
)

LITERAL_IDENTITY = "000001.jpg 2880\r\n000002.jpg 2937\r\n000003.jpg 8692\r\n"

LITERAL_FILES = {
    "list_attr_celeba.txt": LITERAL_ATTR,
    "list_eval_partition.txt": LITERAL_PARTITION,
    "list_landmarks_align_celeba.txt": LITERAL_LANDMARKS,
    "list_bbox_celeba.txt": LITERAL_BBOX,
    "identity_CelebA.txt": LITERAL_IDENTITY,
}


@dataclass
class FixtureData:
    """What :func:`make_celeba` wrote."""

    root: Path  # the folder containing celeba/
    folder: Path  # root / "celeba"
    names: list[str]
    attributes: pd.DataFrame
    split: pd.Series
    landmarks: pd.DataFrame
    bbox: pd.DataFrame
    identity: pd.Series


def random_face(rng: np.random.Generator) -> Image.Image:
    """A smooth random 178x218 RGB image (a JPEG of it decodes reproducibly)."""
    coarse = rng.integers(0, 256, size=(14, 11, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((178, 218), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, size=(218, 178, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def make_celeba(
    root: Path,
    *,
    n: int = 24,
    seed: int = 0,
    line_ending: str = "\r\n",
    optional: bool = True,
    images: bool = True,
) -> FixtureData:
    """Write a CelebA-format folder with ``n`` images under ``root/celeba``."""
    rng = np.random.default_rng(seed)
    folder = root / "celeba"
    image_dir = folder / "img_align_celeba"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    index = pd.Index(names, name="image_id")
    if images:
        for name in names:
            random_face(rng).save(image_dir / name, quality=90)
    attributes = pd.DataFrame(
        rng.integers(0, 2, size=(n, len(CELEBA_ATTRIBUTES))).astype(np.uint8),
        index=index,
        columns=list(CELEBA_ATTRIBUTES),
    )
    codes = rng.integers(0, 3, size=n)
    codes[:6] = [0, 1, 2, 0, 1, 2]  # every split present, interleaved
    split = pd.Series(pd.Categorical.from_codes(codes, categories=list(SPLITS)), index=index, name="split")
    base = np.array([69, 109, 106, 113, 77, 142, 73, 152, 108, 154])
    landmarks = pd.DataFrame(
        base + rng.integers(-6, 7, size=(n, 10)), index=index, columns=list(LANDMARK_COLUMNS)
    )
    bbox = pd.DataFrame(
        np.column_stack(
            [
                rng.integers(0, 400, n),
                rng.integers(0, 300, n),
                rng.integers(40, 1500, n),  # some widths over 999 break the fixed-width layout
                rng.integers(50, 600, n),
            ]
        ),
        index=index,
        columns=list(BBOX_COLUMNS),
    )
    identity = pd.Series(rng.integers(1, 10178, size=n), index=index, name="identity")
    write_attributes(folder / "list_attr_celeba.txt", attributes, line_ending=line_ending)
    write_partition(folder / "list_eval_partition.txt", split, line_ending=line_ending)
    write_landmarks(folder / "list_landmarks_align_celeba.txt", landmarks, line_ending=line_ending)
    if optional:
        write_bbox(folder / "list_bbox_celeba.txt", bbox, line_ending=line_ending)
        write_identity(folder / "identity_CelebA.txt", identity, line_ending=line_ending)
    return FixtureData(root, folder, names, attributes, split, landmarks, bbox, identity)


def write_literal_celeba(root: Path, *, line_ending: str = "\r\n") -> Path:
    """Write the ``LITERAL_*`` annotation files (and three JPEGs) under ``root/celeba``."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in LITERAL_ATTR_ROWS:
        random_face(rng).save(folder / "img_align_celeba" / name, quality=90)
    for file_name, text in LITERAL_FILES.items():
        (folder / file_name).write_bytes(text.replace("\r\n", line_ending).encode("ascii"))
    return folder


def write_layout(data: FixtureData, dest: Path, layout: str, *, kaggle_values: str = "pm1") -> Path:
    """Copy what :func:`make_celeba` wrote into ``dest`` in another layout; returns ``dest``.

    ``layout`` is ``"official"`` (``Anno/``, ``Eval/``, ``Img/img_align_celeba/``, the text files)
    or ``"kaggle"`` (CSV files with an ``image_id`` header and the images in
    ``img_align_celeba/img_align_celeba/``); ``kaggle_values`` is ``"pm1"`` (-1/1) or ``"01"``.
    The CSV files are written here with plain string formatting, independent of cocam's writers.
    """
    import shutil

    if layout == "official":
        (dest / "Anno").mkdir(parents=True)
        (dest / "Eval").mkdir()
        (dest / "Img").mkdir()
        for name in ("list_attr_celeba.txt", "list_landmarks_align_celeba.txt", "list_bbox_celeba.txt",
                     "identity_CelebA.txt"):
            shutil.copy(data.folder / name, dest / "Anno" / name)
        shutil.copy(data.folder / "list_eval_partition.txt", dest / "Eval" / "list_eval_partition.txt")
        shutil.copytree(data.folder / "img_align_celeba", dest / "Img" / "img_align_celeba")
        return dest
    if layout != "kaggle":
        raise ValueError(layout)
    dest.mkdir(parents=True)
    values = data.attributes.to_numpy().astype(int)
    if kaggle_values == "pm1":
        values = 2 * values - 1
    rows = [",".join(["image_id", *data.attributes.columns])]
    rows += [",".join([name, *map(str, row)]) for name, row in zip(data.names, values.tolist())]
    (dest / "list_attr_celeba.csv").write_text("\n".join(rows) + "\n")
    codes = {"train": 0, "valid": 1, "test": 2}
    rows = ["image_id,partition"] + [f"{n},{codes[s]}" for n, s in zip(data.names, data.split.astype(str))]
    (dest / "list_eval_partition.csv").write_text("\n".join(rows) + "\n")
    for file_name, frame in (("list_landmarks_align_celeba.csv", data.landmarks),
                             ("list_bbox_celeba.csv", data.bbox)):
        rows = [",".join(["image_id", *frame.columns])]
        rows += [",".join([n, *map(str, r)]) for n, r in zip(data.names, frame.to_numpy().tolist())]
        (dest / file_name).write_text("\r\n".join(rows) + "\r\n")
    shutil.copytree(data.folder / "img_align_celeba", dest / "img_align_celeba" / "img_align_celeba")
    return dest
