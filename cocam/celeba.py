"""CelebA annotation files: fast readers, writers of the same layout, loading and subset selection.

Three layouts are read, each with the same content (:data:`LAYOUTS`):

* ``torchvision`` (what ``torchvision.datasets.CelebA(root)`` uses)::

    <root>/celeba/
        img_align_celeba/000001.jpg ...        aligned JPEGs, 178 wide x 218 high
        list_attr_celeba.txt                   required
        list_eval_partition.txt                required
        list_landmarks_align_celeba.txt        needed only by the landmark features
        list_bbox_celeba.txt                   optional
        identity_CelebA.txt                    optional

* ``official`` (the folders of the CelebA download): ``Anno/list_attr_celeba.txt``,
  ``Anno/list_landmarks_align_celeba.txt``, ``Anno/list_bbox_celeba.txt``,
  ``Anno/identity_CelebA.txt``, ``Eval/list_eval_partition.txt``, ``Img/img_align_celeba/``.
* ``kaggle`` (the widely used Kaggle copy): ``list_attr_celeba.csv`` (values 0/1 or -1/1),
  ``list_eval_partition.csv``, ``list_landmarks_align_celeba.csv``, ``list_bbox_celeba.csv``,
  each with a header row starting ``image_id``, and the images in
  ``img_align_celeba/img_align_celeba/`` (or ``img_align_celeba/``).

``root`` may point at the folder containing ``celeba/`` or at the dataset folder itself.
Only the attribute and partition files are required; the landmark file is loaded when present
and demanded (by :meth:`CelebAAnnotations.require_landmarks`, naming the feature) only where
landmarks are used: the ``landmarks`` mask transfer and its quality measurement.

File formats (the real files use CRLF line endings; LF is accepted too):

* ``list_attr_celeba.txt``: the image count, then the 40 attribute names separated by single
  spaces with a trailing space, then one row per image: the file name followed by 40 values
  ``-1``/``1``. The first value follows the name after one space, unpadded (``1`` or ``-1``,
  so rows differ in length by one byte); the others are right-aligned in fields of width 3.
  Any other whitespace is accepted too. Read as 0/1 ``uint8``.
* ``list_eval_partition.txt``: no header, rows ``000001.jpg 0`` (0 train, 1 valid, 2 test).
* ``list_landmarks_align_celeba.txt``: the count, a header of the 10 coordinate names, then the
  file name and 10 integers per row, padded with spaces.
* ``list_bbox_celeba.txt``: the count, the header ``image_id x_1 y_1 width height``, then the
  file name and 4 integers per row.
* ``identity_CelebA.txt``: no header, rows ``000001.jpg 2880``.

The readers parse the whole file with numpy (no per-row Python on the common fixed-width files)
and report malformed content as :class:`AnnotationError` with the file and the 1-based line.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cocam.attributes import CELEBA_ATTRIBUTES, UnknownAttributeError, validate_attribute, validate_attributes
from cocam.errors import CocamError
from cocam.io import atomic_write_bytes

__all__ = [
    "ATTR_FILE",
    "BBOX_COLUMNS",
    "BBOX_FILE",
    "IDENTITY_FILE",
    "IMAGE_DIR",
    "LANDMARKS_FILE",
    "LANDMARK_COLUMNS",
    "LAYOUTS",
    "PARTITION_FILE",
    "SPLITS",
    "AnnotationError",
    "CelebAAnnotations",
    "DatasetNotFoundError",
    "clear_annotation_cache",
    "detect_layout",
    "find_celeba_dir",
    "load_annotations",
    "parse_conditions",
    "read_attributes",
    "read_bbox",
    "read_identity",
    "read_landmarks",
    "read_partition",
    "select_images",
    "validate_split",
    "write_attributes",
    "write_bbox",
    "write_identity",
    "write_landmarks",
    "write_partition",
]

#: The three evaluation splits, in the order of their codes 0, 1, 2 in ``list_eval_partition.txt``.
SPLITS: tuple[str, str, str] = ("train", "valid", "test")

#: File and folder names inside the ``celeba/`` folder.
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"
BBOX_FILE = "list_bbox_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
IMAGE_DIR = "img_align_celeba"

#: Column names of the aligned landmark file (x, y of left eye, right eye, nose, mouth corners).
LANDMARK_COLUMNS: tuple[str, ...] = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)  # fmt: skip

#: Column names of the bounding-box file (after ``image_id``).
BBOX_COLUMNS: tuple[str, ...] = ("x_1", "y_1", "width", "height")

#: The dataset layouts cocam reads: for each, the path of every file (and of the image folder)
#: relative to the dataset folder. ``images`` lists candidates, the first existing one is used.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "torchvision": {
        "attributes": (ATTR_FILE,), "partition": (PARTITION_FILE,), "landmarks": (LANDMARKS_FILE,),
        "bbox": (BBOX_FILE,), "identity": (IDENTITY_FILE,), "images": (IMAGE_DIR,),
    },
    "official": {
        "attributes": (f"Anno/{ATTR_FILE}",), "partition": (f"Eval/{PARTITION_FILE}",),
        "landmarks": (f"Anno/{LANDMARKS_FILE}",), "bbox": (f"Anno/{BBOX_FILE}",),
        "identity": (f"Anno/{IDENTITY_FILE}",), "images": (f"Img/{IMAGE_DIR}",),
    },
    "kaggle": {
        "attributes": ("list_attr_celeba.csv",), "partition": ("list_eval_partition.csv",),
        "landmarks": ("list_landmarks_align_celeba.csv",), "bbox": ("list_bbox_celeba.csv",),
        "identity": (IDENTITY_FILE,), "images": (f"{IMAGE_DIR}/{IMAGE_DIR}", IMAGE_DIR),
    },
}  # fmt: skip

_REQUIRED_KINDS = ("attributes", "partition")
_OPTIONAL_KINDS = ("landmarks", "bbox", "identity")

_LAYOUT = (
    f"Expected the CelebA layout of torchvision (<root>/celeba/{ATTR_FILE}, {PARTITION_FILE}, "
    f"{IMAGE_DIR}/000001.jpg ...), the official one (<root>/Anno/{ATTR_FILE}, <root>/Eval/{PARTITION_FILE}, "
    f"<root>/Img/{IMAGE_DIR}/) or Kaggle's (<root>/list_attr_celeba.csv, list_eval_partition.csv, "
    f"{IMAGE_DIR}/{IMAGE_DIR}/); `root` may be the folder that contains celeba/ or the dataset folder itself. "
    "To use the synthetic CelebA-format dataset instead, generate it with `cocam generate`."
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class DatasetNotFoundError(CocamError, FileNotFoundError):
    """A CelebA folder or file is missing; the message names it and shows the expected layout."""


class AnnotationError(CocamError, ValueError):
    """Malformed content in a CelebA annotation file.

    The message names the file, the 1-based line number (when one applies) and what is wrong.
    ``path`` and ``line`` are also available as attributes.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line = line


def _not_found(path: Path, what: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{what} not found: {path}. {_LAYOUT}")


def _annotation_error(path: Path, line: int | None, what: str) -> AnnotationError:
    where = f"{path}: line {line}" if line is not None else f"{path}"
    return AnnotationError(f"{where}: {what}", path=path, line=line)


def _show(raw: bytes | str, limit: int = 80) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------------------------
# Low-level parsing
# --------------------------------------------------------------------------------------------

_PAD = 4  # spaces appended after the data so look-ahead never runs off the end
_TOKEN_RE = re.compile(rb"[^\x00-\x20]+")
_MAX_DIGITS = 18  # int64-safe


@dataclass
class _Table:
    """A parsed annotation file: optional count and header, names and integer values."""

    path: Path
    count: int | None
    header: list[str] | None
    names: pd.Index
    values: np.ndarray  # (n, n_values) integers
    first_line: int  # 1-based line number of the first data row


def _read_raw(path: str | os.PathLike) -> tuple[Path, bytes]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _not_found(path, "Annotation file") from None
    except IsADirectoryError:
        raise _not_found(path, "Annotation file (found a folder instead)") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return path, data


def _split_preamble(path: Path, data: bytes, n_lines: int) -> tuple[list[bytes], int]:
    """Return the first ``n_lines`` lines and the byte offset where the data rows start."""
    lines: list[bytes] = []
    pos = 0
    for i in range(n_lines):
        nl = data.find(b"\n", pos)
        if nl < 0:
            if pos < len(data) and i == n_lines - 1:
                lines.append(data[pos:])
                pos = len(data)
                break
            what = "the image count" if i == 0 else "the header line"
            raise _annotation_error(path, i + 1, f"file ends before {what} (the file is truncated or empty)")
        lines.append(data[pos:nl])
        pos = nl + 1
    return lines, pos


def _parse_uniform(
    body: np.ndarray, nbytes: int, n_values: int, *, plus_minus_one: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Fast path for files whose rows have right-aligned columns and one length (or two, see below).

    The real attribute file has rows of two lengths: its first value is written ``1`` after a
    single space where ``-1`` takes two characters, so rows whose first attribute is positive
    are one byte shorter. Those rows get the missing padding space back after the name (one
    boolean-mask copy of the whole file), and the table is parsed as a fixed-width one with a
    few column gathers. Returns (names as a numpy unicode array, values (n, n_values)
    integers) in file order, or ``None`` when the file does not have that shape or anything
    looks wrong; the caller then falls back to the general tokenizer, which also produces the
    precise error message. With ``plus_minus_one`` only the tokens ``1`` and ``-1`` are
    accepted (the attribute file is the largest one).
    """
    if nbytes == 0 or body[nbytes - 1] != 10:
        return None
    data = body[:nbytes]
    newlines = np.flatnonzero(data == 10)
    n = len(newlines)
    lengths = np.diff(newlines, prepend=-1)
    longest = int(lengths.max())
    short = lengths != longest
    if not short.any():
        return _parse_fixed_rows(data.reshape(n, longest), n_values, plus_minus_one)
    if (lengths[short] != longest - 1).any():
        return None
    # The name ends at the first whitespace of a full-length row; a short row lacks one space there.
    full = int(np.flatnonzero(~short)[0])
    row = data[newlines[full] + 1 - longest : newlines[full] + 1]
    name_end = int(np.argmax(row <= 32))
    if name_end == 0:
        return None
    keep = np.ones((n, longest), dtype=bool)
    keep[short, name_end] = False
    rows = np.full((n, longest), 32, dtype=np.uint8)
    rows[keep] = data  # row-major: each row's bytes in order, with a space at name_end in short rows
    if name_end + 1 >= longest or (rows[short, name_end + 1] > 32).any():
        return None  # a short row whose name is not followed by whitespace ("name-1 ..."): not this shape
    return _parse_fixed_rows(rows, n_values, plus_minus_one)


def _parse_fixed_rows(
    rows: np.ndarray, n_values: int, plus_minus_one: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse ``(n, length)`` rows of one length whose tokens all sit in the columns of the first row."""
    n = len(rows)
    spans = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(rows[0].tobytes())]
    if len(spans) != n_values + 1 or spans[0][0] != 0:
        return None
    name_end = spans[0][1]
    last_end = spans[-1][1]
    # Names: left-aligned, no whitespace; everything after the last value: whitespace only.
    if not (rows[:, :name_end] > 32).all() or (rows[:, last_end:] > 32).any():
        return None
    # The column right after each token of the first row separates it from the next one.
    separators = np.array([spans[k][1] for k in range(n_values)])
    if (rows[:, separators] > 32).any():
        return None
    names_bytes = np.ascontiguousarray(rows[:, :name_end]).view(f"S{name_end}").ravel()
    try:
        names = names_bytes.astype(f"U{name_end}")
    except UnicodeError:
        return None
    if plus_minus_one:
        values = _parse_uniform_plus_minus_one(rows, spans)
        return None if values is None else (names, values)
    values = np.empty((n, n_values), dtype=np.int64)
    windows: dict[int, list[int]] = {}
    for k in range(n_values):
        start, end = spans[k][1], spans[k + 1][1]
        if end - start > _MAX_DIGITS:
            return None
        windows.setdefault(end - start, []).append(k)
    for width, ks in windows.items():
        cols = np.array([np.arange(spans[k][1], spans[k + 1][1]) for k in ks])  # (K, width)
        win = rows[:, cols]  # (n, K, width)
        nonws = win > 32
        if nonws[:, :, 0].any() or not nonws[:, :, -1].all():
            return None  # a value runs into its neighbour, or a column ends early
        if not (~nonws[:, :, :-1] | nonws[:, :, 1:]).all():
            return None  # whitespace inside a value
        digit = win - np.uint8(48)
        is_digit = digit <= 9
        first = nonws.copy()
        first[:, :, 1:] &= ~nonws[:, :, :-1]
        minus = first & (win == 45)
        if not (~nonws | is_digit | minus).all() or not is_digit[:, :, -1].all():
            return None
        acc = np.zeros((n, len(ks)), dtype=np.int64)
        for j in range(width):
            acc *= 10
            acc += np.where(is_digit[:, :, j], digit[:, :, j], 0)
        negative = minus.any(axis=2)
        acc[negative] *= -1
        values[:, ks] = acc
    return names, values


def _parse_uniform_plus_minus_one(rows: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray | None:
    """Values of fixed-width ``-1``/``1`` cells as int8, or ``None`` if any cell is anything else."""
    starts = np.array([spans[k][1] for k in range(len(spans) - 1)])  # separator column of each cell
    ends = np.array([spans[k + 1][1] for k in range(len(spans) - 1)])  # exclusive end of each value
    if ((ends - starts) < 2).any():
        return None
    if not (rows[:, ends - 1] == 49).all():  # every value ends in '1'
        return None
    sign = rows[:, ends - 2]
    negative = sign == 45
    if not (negative | (sign <= 32)).all():
        return None
    padding = [np.arange(a, e - 2) for a, e in zip(starts.tolist(), ends.tolist())]
    if padding and (rows[:, np.concatenate(padding)] > 32).any():
        return None
    return 1 - 2 * negative.view(np.int8)


def _parse_general(
    path: Path, body: np.ndarray, nbytes: int, n_values: int, first_line: int
) -> tuple[list[str], np.ndarray]:
    """General whitespace tokenizer; raises :class:`AnnotationError` on malformed rows."""
    n_fields = n_values + 1
    nonws = body > 32  # body is padded with spaces past nbytes
    rise = nonws.copy()
    rise[1:] &= ~nonws[:-1]
    starts = np.flatnonzero(rise)
    del rise
    lengths = np.flatnonzero(nonws[:-1] & ~nonws[1:])
    lengths += 1
    lengths -= starts  # token lengths (ends - starts), computed in place
    del nonws
    newlines = np.flatnonzero(body[:nbytes] == 10)
    before = np.searchsorted(starts, newlines)
    counts = np.diff(np.concatenate(([0], before, [len(starts)])))
    nonblank = np.flatnonzero(counts)
    if nonblank.size == 0:
        return [], np.zeros((0, n_values), dtype=np.int64)
    n = int(nonblank[-1]) + 1  # trailing blank lines are fine
    counts = counts[:n]
    line_starts = np.concatenate(([0], newlines + 1))

    def line_text(i: int) -> bytes:
        end = newlines[i] if i < len(newlines) else nbytes
        return body[line_starts[i] : end].tobytes()

    bad = np.flatnonzero(counts != n_fields)
    if bad.size:
        i = int(bad[0])
        if counts[i] == 0:
            raise _annotation_error(path, first_line + i, "blank line in the middle of the data rows")
        raise _annotation_error(
            path,
            first_line + i,
            f"expected {n_fields} fields (image name and {n_values} values), found {counts[i]}: "
            f"{_show(line_text(i))}",
        )
    starts = starts.reshape(n, n_fields)
    lengths = lengths.reshape(n, n_fields)
    raw = body.tobytes()
    name_starts = starts[:, 0].tolist()
    name_ends = (starts[:, 0] + lengths[:, 0]).tolist()
    try:
        names = [raw[s:e].decode("utf-8") for s, e in zip(name_starts, name_ends)]
    except UnicodeDecodeError as exc:
        raise _annotation_error(path, None, f"image names are not valid UTF-8 ({exc})") from None
    values, bad_tok = _parse_int_tokens(body, starts, lengths)
    if bad_tok is not None:
        row, col = bad_tok
        token = raw[starts[row, col] : starts[row, col] + lengths[row, col]]
        raise _annotation_error(
            path, first_line + row, f"value {col} ({_show(token)}) is not an integer: {_show(line_text(row))}"
        )
    return names, values


def _parse_int_tokens(
    body: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Parse the integer tokens in columns ``1:`` of the (n, 1 + k) token tables.

    Tokens are processed in groups of equal length (one gather per length), so the work is a
    few vectorised passes. Returns ((n, k) values, (row, column) of the first bad token or None);
    the value dtype is the smallest signed integer that holds every token.
    """
    n, n_fields = starts.shape
    k = n_fields - 1
    value_lengths = lengths[:, 1:]
    longest = int(value_lengths.max(initial=0))
    dtype = np.int8 if longest <= 2 else np.int16 if longest <= 4 else np.int32 if longest <= 9 else np.int64
    values = np.zeros((n, k), dtype=dtype)
    flat_values = values.reshape(-1)
    first_bad: int | None = None
    if longest > _MAX_DIGITS + 1:
        first_bad = int(np.flatnonzero((value_lengths > _MAX_DIGITS + 1).ravel())[0])
    flat_starts = starts.reshape(-1)
    for length in range(1, min(longest, _MAX_DIGITS + 1) + 1):
        sel = np.flatnonzero(value_lengths == length)  # flat index into (n, k)
        if sel.size == 0:
            continue
        chars = body[flat_starts[sel + sel // k + 1, None] + np.arange(length)]  # (m, length) uint8
        digits = chars - np.uint8(48)
        is_digit = digits <= 9
        negative = chars[:, 0] == 45
        ok = is_digit[:, 1:].all(axis=1) & (is_digit[:, 0] | (negative & (length > 1)))
        if not ok.all():
            bad = int(sel[np.argmin(ok)])
            first_bad = bad if first_bad is None else min(first_bad, bad)
            continue
        if length == 1:
            flat_values[sel] = digits[:, 0]
            continue
        powers = 10 ** np.arange(length - 1, -1, -1, dtype=np.int64)
        number = np.where(is_digit, digits, 0).astype(np.int64) @ powers
        flat_values[sel] = np.where(negative, -number, number)
    if first_bad is not None:
        return values, (first_bad // k, first_bad % k + 1)
    return values, None


def _read_table(
    path: str | os.PathLike, *, n_values: int, has_header: bool, plus_minus_one: bool = False
) -> _Table:
    """Read a whole annotation file: optional count + header lines, then name + ints per row."""
    path, data = _read_raw(path)
    count: int | None = None
    header: list[str] | None = None
    offset = 0
    if has_header:
        (count_line, header_line), offset = _split_preamble(path, data, 2)
        fields = count_line.split()
        if len(fields) != 1 or not fields[0].isdigit():
            raise _annotation_error(path, 1, f"expected the number of images, found {_show(count_line)}")
        count = int(fields[0])
        header = header_line.decode("utf-8", "replace").split()
    first_line = 3 if has_header else 1
    nbytes = len(data) - offset
    body = np.empty(nbytes + _PAD, dtype=np.uint8)
    body[:nbytes] = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
    body[nbytes:] = 32
    parsed = _parse_uniform(body, nbytes, n_values, plus_minus_one=plus_minus_one)
    if parsed is None:
        names, values = _parse_general(path, body, nbytes, n_values, first_line)
    else:
        names, values = parsed
    index = pd.Index(names, name="image_id")
    if index.has_duplicates:
        dup_pos = np.flatnonzero(index.duplicated())
        name = index[dup_pos[0]]
        first = int(np.flatnonzero(index == name)[0])
        raise _annotation_error(
            path, first_line + int(dup_pos[0]), f"duplicate image {name!r} (first listed on line {first_line + first})"
        )
    n = len(index)
    if count is not None and count != n:
        if n < count:
            raise _annotation_error(
                path, 1, f"truncated file: line 1 says {count} images but only {n} data rows follow"
            )
        raise _annotation_error(path, 1, f"line 1 says {count} images but the file has {n} data rows")
    return _Table(path, count, header, index, values, first_line)


def _first_bad(path: Path, table: _Table, bad: np.ndarray, what: str, columns: Sequence[str] | None = None) -> None:
    """Raise for the first True entry of ``bad`` (n, k), if any."""
    if not bad.any():
        return
    flat = int(np.flatnonzero(bad.ravel())[0])
    row, col = divmod(flat, bad.shape[1])
    value = int(table.values[row, col])
    column = f" (column {columns[col]!r})" if columns is not None else ""
    raise _annotation_error(
        path, table.first_line + row, f"image {table.names[row]!r}{column}: {what}, found {value}"
    )


def _read_csv_table(path: str | os.PathLike, columns: Sequence[str] | None, *, n_values: int) -> _Table:
    """Read a comma-separated annotation file (the Kaggle copy): a header ``image_id,...``, then rows.

    ``columns`` are the expected names after ``image_id`` (``None``: any ``n_values`` names,
    returned as the header). Values must be integers; errors name the file and the 1-based line.
    """
    path, data = _read_raw(path)
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise _annotation_error(path, None, f"not a readable CSV file ({str(exc).strip().splitlines()[0]})") from None
    header = [str(c).strip() for c in frame.columns]
    if not header or header[0] != "image_id" or len(header) != n_values + 1:
        wanted = "image_id," + (",".join(columns) if columns is not None else f"<{n_values} names>")
        raise _annotation_error(path, 1, f"expected the header {wanted!r}, found {','.join(header)!r}")
    if columns is not None and header[1:] != list(columns):
        raise _annotation_error(path, 1, f"expected the header {'image_id,' + ','.join(columns)!r}, "
                                         f"found {','.join(header)!r}")
    names = frame.iloc[:, 0].str.strip()
    cells = frame.iloc[:, 1:].apply(lambda col: col.str.strip())
    numeric = cells.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna().to_numpy() | (numeric.to_numpy() != np.round(numeric.to_numpy()))
    if bad.any():
        row, col = divmod(int(np.flatnonzero(bad.ravel())[0]), bad.shape[1])
        raise _annotation_error(path, row + 2, f"value {header[col + 1]!r} of image {names.iloc[row]!r} is not an "
                                               f"integer: {cells.iat[row, col]!r}")
    if (names == "").any():
        row = int(np.flatnonzero((names == "").to_numpy())[0])
        raise _annotation_error(path, row + 2, "empty image name")
    index = pd.Index(names.to_numpy(dtype=object), name="image_id")
    if index.has_duplicates:
        pos = int(np.flatnonzero(index.duplicated())[0])
        first = int(np.flatnonzero(index == index[pos])[0])
        raise _annotation_error(path, pos + 2, f"duplicate image {index[pos]!r} (first listed on line {first + 2})")
    values = numeric.to_numpy().astype(np.int64)
    return _Table(path, None, header[1:], index, values, 2)


def _is_csv(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".csv"


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read_attributes(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``list_attr_celeba.txt`` (or the Kaggle ``list_attr_celeba.csv``, values 0/1 or -1/1).

    Returns:
        DataFrame indexed by image file name (index name ``"image_id"``) with the 40 attribute
        columns in file order, dtype ``uint8``, values 0/1 (the file's -1 becomes 0).

    Raises:
        DatasetNotFoundError: the file does not exist.
        AnnotationError: malformed content (header, counts, columns, values other than +-1).
    """
    if _is_csv(path):
        return _read_attributes_csv(path)
    table = _read_table(path, n_values=len(CELEBA_ATTRIBUTES), has_header=True, plus_minus_one=True)
    path = table.path
    header = table.header or []
    try:
        validate_attributes(header)
    except UnknownAttributeError as exc:
        raise _annotation_error(path, 2, f"bad attribute header: {exc}") from exc
    if len(set(header)) != len(header):
        dups = sorted({h for h in header if header.count(h) > 1})
        raise _annotation_error(path, 2, f"attribute header lists {', '.join(dups)} more than once")
    if len(header) != len(CELEBA_ATTRIBUTES):
        missing = [a for a in CELEBA_ATTRIBUTES if a not in header]
        raise _annotation_error(
            path, 2, f"attribute header has {len(header)} names, expected 40; missing: {', '.join(missing)}"
        )
    values = table.values
    _first_bad(path, table, (values != 1) & (values != -1), "attribute values must be -1 or 1", header)
    frame = pd.DataFrame((values == 1).view(np.uint8), index=table.names, columns=pd.Index(header))
    return frame


def _read_attributes_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``list_attr_celeba.csv`` (Kaggle): header ``image_id,<40 names>``, values all -1/1 or all 0/1."""
    table = _read_csv_table(path, None, n_values=len(CELEBA_ATTRIBUTES))
    header = table.header or []
    try:
        validate_attributes(header)
    except UnknownAttributeError as exc:
        raise _annotation_error(table.path, 1, f"bad attribute header: {exc}") from exc
    if sorted(header) != sorted(CELEBA_ATTRIBUTES):
        missing = [a for a in CELEBA_ATTRIBUTES if a not in header]
        raise _annotation_error(table.path, 1, f"attribute header must name the 40 attributes once each; missing: "
                                               f"{', '.join(missing) or 'none (some are repeated)'}")
    values = table.values
    if (values == -1).any():  # the +-1 convention: 0 is not a value of it
        _first_bad(table.path, table, (values != 1) & (values != -1),
                   "attribute values must be all -1/1 or all 0/1 (this file uses -1)", header)
    else:
        _first_bad(table.path, table, (values != 1) & (values != 0), "attribute values must be 0/1 or -1/1", header)
    return pd.DataFrame((values == 1).astype(np.uint8), index=table.names, columns=pd.Index(header))


def read_partition(path: str | os.PathLike) -> pd.Series:
    """Read ``list_eval_partition.txt`` (or the Kaggle ``list_eval_partition.csv``).

    Returns:
        Series indexed by image name (``"image_id"``) named ``"split"``: a Categorical with
        categories ``("train", "valid", "test")`` (file codes 0, 1, 2).
    """
    if _is_csv(path):
        table = _read_csv_table(path, ("partition",), n_values=1)
    else:
        table = _read_table(path, n_values=1, has_header=False)
    codes = table.values[:, 0]
    _first_bad(table.path, table, ((codes < 0) | (codes > 2))[:, None], "split code must be 0, 1 or 2")
    categorical = pd.Categorical.from_codes(codes.astype(np.int8), categories=list(SPLITS))
    return pd.Series(categorical, index=table.names, name="split")


def _check_header(path: Path, header: list[str] | None, expected: Sequence[str]) -> None:
    got = list(header or [])
    if got[:1] == ["image_id"] and len(got) == len(expected) + 1:
        got = got[1:]
    if got != list(expected):
        raise _annotation_error(
            path, 2, f"expected the header {' '.join(expected)!r}, found {' '.join(header or [])!r}"
        )


def read_landmarks(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``list_landmarks_align_celeba.txt`` (or the Kaggle ``.csv``).

    Returns:
        DataFrame indexed by image name with the 10 int64 columns of :data:`LANDMARK_COLUMNS`
        (pixel coordinates in the aligned 178x218 image).
    """
    if _is_csv(path):
        table = _read_csv_table(path, LANDMARK_COLUMNS, n_values=len(LANDMARK_COLUMNS))
    else:
        table = _read_table(path, n_values=len(LANDMARK_COLUMNS), has_header=True)
        _check_header(table.path, table.header, LANDMARK_COLUMNS)
    return pd.DataFrame(table.values.astype(np.int64), index=table.names, columns=pd.Index(LANDMARK_COLUMNS))


def read_bbox(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``list_bbox_celeba.txt`` (or the Kaggle ``.csv``).

    Returns:
        DataFrame indexed by image name with int64 columns ``x_1, y_1, width, height``
        (coordinates in the original, unaligned images).
    """
    if _is_csv(path):
        table = _read_csv_table(path, BBOX_COLUMNS, n_values=len(BBOX_COLUMNS))
    else:
        table = _read_table(path, n_values=len(BBOX_COLUMNS), has_header=True)
        _check_header(table.path, table.header, BBOX_COLUMNS)
    return pd.DataFrame(table.values.astype(np.int64), index=table.names, columns=pd.Index(BBOX_COLUMNS))


def read_identity(path: str | os.PathLike) -> pd.Series:
    """Read ``identity_CelebA.txt``: an int64 Series of identity ids named ``"identity"``."""
    table = _read_table(path, n_values=1, has_header=False)
    return pd.Series(table.values[:, 0].astype(np.int64), index=table.names, name="identity")


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


_BAD_NAME_RE = re.compile(r"[\s]")


def _names_for_writing(index: pd.Index, what: str) -> list[str]:
    names = [str(n) for n in index]
    if _BAD_NAME_RE.search("\0".join(names)) or any(not name for name in names):
        bad = next(n for n in names if not n or _BAD_NAME_RE.search(n))
        raise ValueError(f"{what}: image name {bad!r} is empty or contains whitespace")
    if len(set(names)) != len(names):
        dup = pd.Index(names)[pd.Index(names).duplicated()][0]
        raise ValueError(f"{what}: image {dup!r} is listed more than once")
    return names


def _int_matrix(frame: pd.DataFrame | pd.Series, what: str) -> np.ndarray:
    values = np.asarray(frame.to_numpy())
    if values.dtype == bool:
        return values.astype(np.int64)
    if values.dtype.kind not in "iu":
        try:
            as_int = values.astype(np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: values must be integers, got dtype {values.dtype}") from None
        if not np.array_equal(as_int, values):
            raise ValueError(f"{what}: values must be integers")
        return as_int
    return values.astype(np.int64)


def _write_rows(
    path: str | os.PathLike,
    names: list[str],
    row_format: str,
    values: np.ndarray,
    preamble: Sequence[str],
    line_ending: str,
) -> None:
    if line_ending not in ("\r\n", "\n"):
        raise ValueError(f"line_ending must be '\\r\\n' (as CelebA) or '\\n', got {line_ending!r}")
    fmt = "%s" + row_format + line_ending
    parts = [p + line_ending for p in preamble]
    parts.extend(fmt % (name, *row) for name, row in zip(names, values.tolist()))
    atomic_write_bytes(path, "".join(parts).encode("utf-8"))


def write_attributes(path: str | os.PathLike, df: pd.DataFrame, *, line_ending: str = "\r\n") -> None:
    """Write ``list_attr_celeba.txt`` in the layout of the distributed file, atomically.

    The layout is the one described in this module: the count, the 40 names with a trailing
    space, then per row the name and the values. The first value follows the name after one
    space, unpadded (``-1`` or ``1``: the real file's rows whose first attribute is positive
    are one byte shorter); each later value is right-aligned in width 3 (`` -1`` / ``  1``).
    :func:`read_attributes` reads it back exactly. Only this layout is promised, not byte
    identity with the distributed file (whose other details, e.g. trailing whitespace, are not
    checked here).

    Args:
        path: destination file.
        df: indexed by image name, the 40 attribute columns (any order; written in that order),
            values 0/1 or bool.
        line_ending: ``"\\r\\n"`` (CelebA's) or ``"\\n"``.
    """
    columns = validate_attributes([str(c) for c in df.columns])
    if sorted(columns) != sorted(CELEBA_ATTRIBUTES):
        missing = [a for a in CELEBA_ATTRIBUTES if a not in columns]
        raise ValueError(f"write_attributes needs each of the 40 attributes exactly once; missing: {missing}")
    names = _names_for_writing(df.index, "write_attributes")
    values = _int_matrix(df, "write_attributes")
    if not np.isin(values, (0, 1)).all():
        raise ValueError("write_attributes: values must be 0/1 (or bool); convert -1/1 with (x + 1) // 2")
    if line_ending not in ("\r\n", "\n"):
        raise ValueError(f"line_ending must be '\\r\\n' (as CelebA) or '\\n', got {line_ending!r}")
    header = " ".join(columns) + " "  # CelebA's header line ends with a space
    n = len(names)
    cells = np.frombuffer(b" -1  1", dtype=np.uint8).reshape(2, 3)[values].reshape(n, -1)
    encoded = [name.encode("utf-8") for name in names]
    ending = line_ending.encode("ascii")
    preamble = f"{n}{line_ending}{header}{line_ending}".encode("ascii")
    if encoded and len({len(e) for e in encoded}) == 1:
        name_block = np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(n, -1)
        end_block = np.broadcast_to(np.frombuffer(ending, dtype=np.uint8), (n, len(ending)))
        table = np.concatenate([name_block, cells, end_block], axis=1)
        keep = np.ones(table.shape, dtype=bool)
        keep[:, name_block.shape[1]] = values[:, 0] == 0  # a positive first value loses its padding space
        rows = table[keep].tobytes()
    else:
        rows = b"".join(e + (c[1:] if v else c).tobytes() + ending for e, c, v in zip(encoded, cells, values[:, 0]))
    atomic_write_bytes(path, preamble + rows)


def write_partition(path: str | os.PathLike, series: pd.Series, *, line_ending: str = "\r\n") -> None:
    """Write ``list_eval_partition.txt`` (rows ``000001.jpg 0``), atomically.

    ``series`` is indexed by image name with values ``"train"``/``"valid"``/``"test"`` (strings or
    categorical) or the codes 0/1/2.
    """
    names = _names_for_writing(series.index, "write_partition")
    raw = series.astype(object).to_numpy()
    codes = np.empty(len(raw), dtype=np.int64)
    lookup = {name: i for i, name in enumerate(SPLITS)}
    for i, value in enumerate(raw):
        if isinstance(value, str) and value in lookup:
            codes[i] = lookup[value]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) <= 2:
            codes[i] = int(value)
        else:
            raise ValueError(f"write_partition: split of {names[i]!r} is {value!r}; use train/valid/test or 0/1/2")
    _write_rows(path, names, " %d", codes[:, None], [], line_ending)


def write_landmarks(path: str | os.PathLike, df: pd.DataFrame, *, line_ending: str = "\r\n") -> None:
    """Write ``list_landmarks_align_celeba.txt``, atomically.

    ``df`` holds the 10 :data:`LANDMARK_COLUMNS` (integers). Rows are padded like CelebA's:
    the first value right-aligned in width 5, the others in width 4, each after one space.
    """
    missing = [c for c in LANDMARK_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"write_landmarks: missing columns {missing}")
    names = _names_for_writing(df.index, "write_landmarks")
    values = _int_matrix(df[list(LANDMARK_COLUMNS)], "write_landmarks")
    row_format = " %5d" + " %4d" * (len(LANDMARK_COLUMNS) - 1)
    _write_rows(path, names, row_format, values, [str(len(names)), " ".join(LANDMARK_COLUMNS)], line_ending)


def write_bbox(path: str | os.PathLike, df: pd.DataFrame, *, line_ending: str = "\r\n") -> None:
    """Write ``list_bbox_celeba.txt``, atomically.

    ``df`` holds integer columns ``x_1, y_1, width, height``. Rows are padded like CelebA's:
    ``x_1`` right-aligned in width 5, the others in width 3, each after one space.
    """
    missing = [c for c in BBOX_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"write_bbox: missing columns {missing}")
    names = _names_for_writing(df.index, "write_bbox")
    values = _int_matrix(df[list(BBOX_COLUMNS)], "write_bbox")
    header = " ".join(("image_id", *BBOX_COLUMNS))
    _write_rows(path, names, " %5d %3d %3d %3d", values, [str(len(names)), header], line_ending)


def write_identity(path: str | os.PathLike, series: pd.Series, *, line_ending: str = "\r\n") -> None:
    """Write ``identity_CelebA.txt`` (rows ``000001.jpg 2880``), atomically."""
    names = _names_for_writing(series.index, "write_identity")
    values = _int_matrix(series, "write_identity")
    _write_rows(path, names, " %d", values.reshape(-1, 1), [], line_ending)


# --------------------------------------------------------------------------------------------
# Loading a whole dataset folder
# --------------------------------------------------------------------------------------------


def validate_split(split: str, *, allow_all: bool = True) -> str:
    """Return ``split`` if it is ``train``/``valid``/``test`` (or ``all``), else raise ValueError."""
    valid = (*SPLITS, "all") if allow_all else SPLITS
    if isinstance(split, str) and split in valid:
        return split
    close = difflib.get_close_matches(str(split).lower(), valid, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown split {split!r}.{hint} Choose one of {', '.join(valid)}.")


def _layout_files(folder: Path, layout: str) -> dict[str, Path]:
    """Paths of every file of ``layout`` in ``folder`` (the first existing image folder candidate)."""
    files = {}
    for kind, candidates in LAYOUTS[layout].items():
        paths = [folder / c for c in candidates]
        files[kind] = next((p for p in paths if p.is_dir()), paths[-1]) if kind == "images" else paths[0]
    return files


def detect_layout(folder: str | os.PathLike) -> str | None:
    """The name of the :data:`LAYOUTS` entry whose attribute file ``folder`` holds, or ``None``."""
    folder = Path(folder)
    for name in LAYOUTS:
        if _layout_files(folder, name)["attributes"].is_file():
            return name
    return None


def find_celeba_dir(root: str | os.PathLike) -> Path:
    """Resolve ``root`` (the folder containing ``celeba/``, or the dataset folder) to the dataset folder.

    ``root/celeba`` is preferred when it exists; otherwise ``root`` itself, when it holds the
    files of one of the :data:`LAYOUTS` (or is named ``celeba``, or holds ``img_align_celeba``).

    Raises:
        DatasetNotFoundError: ``root`` does not exist or holds no CelebA folder.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise _not_found(root, "Dataset folder")
    if not root.is_dir():
        raise _not_found(root, "Dataset folder (the path is a file, not a folder)")
    nested = root / "celeba"
    if nested.is_dir():
        return nested.resolve()
    if root.name == "celeba" or detect_layout(root) is not None or (root / IMAGE_DIR).is_dir():
        return root.resolve()
    raise _not_found(nested, "CelebA folder")


@dataclass(frozen=True, eq=False)  # compared by identity: the fields are DataFrames
class CelebAAnnotations:
    """All annotations of one CelebA folder, aligned to the attribute file's image order.

    The frames are shared by every user of the in-process cache: treat them as read-only.

    Attributes:
        root: the dataset folder (``celeba/`` in the torchvision layout).
        attributes: 0/1 ``uint8`` attributes (see :func:`read_attributes`).
        split: categorical ``train``/``valid``/``test`` per image.
        landmarks: aligned landmarks, 10 int columns, or ``None`` when the file is absent (see
            :meth:`require_landmarks`).
        bbox: bounding boxes, or ``None`` when the optional file is absent.
        identity: identity ids, or ``None`` when the optional file is absent.
        layout: the :data:`LAYOUTS` name the folder was read as.
        files: the path of each file of that layout (``attributes``, ``partition``,
            ``landmarks``, ``bbox``, ``identity``, ``images``), present or not.
    """

    root: Path
    attributes: pd.DataFrame
    split: pd.Series
    landmarks: pd.DataFrame | None = None
    bbox: pd.DataFrame | None = None
    identity: pd.Series | None = None
    layout: str = "torchvision"
    files: Mapping[str, Path] | None = None

    @property
    def image_dir(self) -> Path:
        """The folder of the aligned JPEGs (``img_align_celeba`` of the layout)."""
        if self.files is not None:
            return self.files["images"]
        return self.root / IMAGE_DIR

    def require_landmarks(self, feature: str) -> pd.DataFrame:
        """The landmarks, or a :class:`DatasetNotFoundError` saying that ``feature`` needs the file."""
        if self.landmarks is None:
            path = (self.files or {}).get("landmarks", self.root / LANDMARKS_FILE)
            raise DatasetNotFoundError(
                f"{feature} needs the landmark file {path}, which this dataset lacks: put CelebA's "
                f"{Path(path).name} there, or use a feature without landmarks (e.g. --transfer template)."
            )
        return self.landmarks

    def names(self, split: str | None = None) -> pd.Index:
        """Image names of ``split`` (``train``/``valid``/``test``; ``None`` or ``all`` for every image)."""
        if split is None or validate_split(split) == "all":
            return self.attributes.index
        mask = (self.split == split).to_numpy()
        return self.attributes.index[mask]

    def __len__(self) -> int:
        return len(self.attributes)


def _align(
    ref: pd.Index,
    ref_file: Path,
    ref_first_line: int,
    other: pd.DataFrame | pd.Series,
    other_file: Path,
    other_first_line: int,
) -> pd.DataFrame | pd.Series:
    """Check ``other`` lists the same images as ``ref`` and return it in ``ref``'s order."""
    if other.index.equals(ref):
        return other
    in_other = ref.isin(other.index)
    if not in_other.all():
        pos = int(np.flatnonzero(~in_other)[0])
        raise _annotation_error(
            ref_file, ref_first_line + pos, f"image {ref[pos]!r} is not listed in {other_file.name}"
        )
    in_ref = other.index.isin(ref)
    if not in_ref.all():
        pos = int(np.flatnonzero(~in_ref)[0])
        raise _annotation_error(
            other_file, other_first_line + pos, f"image {other.index[pos]!r} is not listed in {ref_file.name}"
        )
    return other.reindex(ref)


_CACHE: OrderedDict[tuple, CelebAAnnotations] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def clear_annotation_cache() -> None:
    """Forget every annotation set cached by :func:`load_annotations`."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _first_line(path: Path, kind: str) -> int:
    """1-based line of the first data row of an annotation file of ``kind``."""
    if _is_csv(path):
        return 2
    return 1 if kind in ("partition", "identity") else 3


_READERS = {"attributes": read_attributes, "partition": read_partition, "landmarks": read_landmarks,
            "bbox": read_bbox, "identity": read_identity}


def load_annotations(root: str | os.PathLike, *, require_optional: bool = False) -> CelebAAnnotations:
    """Load and cross-check the annotation files of a CelebA folder (any of the :data:`LAYOUTS`).

    The attribute and partition files are required; the landmark, bbox and identity files are
    loaded when present (all required when ``require_optional``). A missing landmark file is
    reported only by the features that use landmarks (:meth:`CelebAAnnotations.require_landmarks`).
    Every loaded file must list the same images; they are returned in the attribute file's
    order. Results are cached in-process per (folder, file modification times, sizes and
    inodes), so constructing datasets repeatedly is cheap.

    Raises:
        DatasetNotFoundError: the folder or a required file is missing (the first one is named).
        AnnotationError: malformed files, or files that disagree about the images.
    """
    folder = find_celeba_dir(root)
    layout = detect_layout(folder) or "torchvision"
    files = _layout_files(folder, layout)
    for kind in _REQUIRED_KINDS + (_OPTIONAL_KINDS if require_optional else ()):
        if not files[kind].is_file():
            what = "Required annotation file" if kind in _REQUIRED_KINDS else "Annotation file"
            raise _not_found(files[kind], what)
    kinds = _REQUIRED_KINDS + _OPTIONAL_KINDS
    key = (str(folder), layout, tuple(_stat_key(files[kind]) for kind in kinds))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return cached

    attributes = read_attributes(files["attributes"])
    ref = attributes.index
    ref_file, ref_line = files["attributes"], _first_line(files["attributes"], "attributes")
    loaded: dict[str, pd.DataFrame | pd.Series | None] = {}
    for kind in ("partition", *_OPTIONAL_KINDS):
        path = files[kind]
        if kind != "partition" and not path.is_file():
            loaded[kind] = None
            continue
        loaded[kind] = _align(ref, ref_file, ref_line, _READERS[kind](path), path, _first_line(path, kind))
    result = CelebAAnnotations(folder, attributes, loaded["partition"], loaded["landmarks"], loaded["bbox"],
                               loaded["identity"], layout=layout, files=files)
    with _CACHE_LOCK:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def _condition_value(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    raise ValueError(f"Condition {name}={value!r}: the value must be 0, 1, True or False")


def select_images(attributes: pd.DataFrame, conditions: Mapping[str, int | bool], labels=None) -> pd.Index:
    """Names of the images whose attributes match every ``name -> 0/1`` condition.

    Example: ``select_images(ann.attributes, {"Wearing_Lipstick": 1, "Heavy_Makeup": 0})``.
    An empty mapping selects every image. ``labels`` (a :class:`cocam.labels.LabelSpace`,
    default CelebA's 40 attributes) is what the names are checked against.

    Raises:
        UnknownAttributeError: a condition names no label of ``labels`` (closest names suggested).
        ValueError: a value other than 0/1/True/False, or an attribute missing from the frame.
    """
    mask = np.ones(len(attributes), dtype=bool)
    for name, value in conditions.items():
        validate_attribute(name) if labels is None else labels.validate_one(name)
        wanted = _condition_value(name, value)
        if name not in attributes.columns:
            raise ValueError(f"Condition on {name!r}, but the attribute table has no such column")
        mask &= attributes[name].to_numpy() == wanted
    return attributes.index[mask]


_CONDITION_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*([^=\s]+)\s*$")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def parse_conditions(text: str) -> dict[str, int]:
    """Parse ``"Wearing_Lipstick=1,Heavy_Makeup=0"`` into ``{"Wearing_Lipstick": 1, "Heavy_Makeup": 0}``.

    Values may be ``0``/``1`` (or ``true``/``false``, ``yes``/``no``). An empty string means no
    condition.

    Raises:
        UnknownAttributeError: an unknown attribute name (closest names suggested).
        ValueError: bad syntax, a bad value, or an attribute given twice.
    """
    result: dict[str, int] = {}
    if not text.strip():
        return result
    for part in text.split(","):
        match = _CONDITION_RE.match(part)
        if match is None:
            raise ValueError(
                f"Cannot parse condition {part.strip()!r} in {text!r}: expected NAME=0 or NAME=1 items "
                "separated by commas, e.g. 'Wearing_Lipstick=1,Heavy_Makeup=0'"
            )
        name, raw = match.groups()
        name = validate_attribute(name)
        if raw.lower() in _TRUE:
            value = 1
        elif raw.lower() in _FALSE:
            value = 0
        else:
            raise ValueError(f"Condition {name}={raw!r} in {text!r}: the value must be 0 or 1")
        if name in result:
            raise ValueError(f"Attribute {name!r} appears twice in {text!r}")
        result[name] = value
    return result
