"""The mask editor's drawing state in NumPy: what is painted, for which attribute, and what is saved.

:class:`MaskCanvas` is the model behind :class:`cocam.widget.MaskEditor` and needs neither a
browser nor ipywidgets: every coordinate here is a **template** coordinate (the 178×218
aligned face, ``x`` to the right, ``y`` down, pixel ``(row i, column j)`` covering
``[j, j + 1) × [i, i + 1)``, its centre at ``(j + ½, i + ½)``). The view converts mouse
positions to these coordinates and redraws from :attr:`MaskCanvas.mask`.

**Brush.** A round brush of diameter ``d`` = :attr:`~MaskCanvas.brush_size` (a whole number of
template pixels, :data:`BRUSH_MIN` to :data:`BRUSH_MAX`). Moving it from ``p₀`` to ``p₁`` covers
the *capsule* of radius ``r = d / 2`` around the segment, so pixel ``(i, j)`` with centre ``c`` is
painted when

    dist(c, p₀p₁) = | c − p₀ − t* (p₁ − p₀) | ≤ r,
    t* = clip( (c − p₀)·(p₁ − p₀) / |p₁ − p₀|², 0, 1 )   (the nearest point of the segment),

with ``r`` raised to at least :data:`MIN_RADIUS` = √½: every point of the plane lies within √½ of
the nearest pixel centre (a pixel's corner is exactly that far from it), so even the smallest brush
paints the pixel under the pointer, and a press exactly on a corner paints the four pixels around
it. A stroke is the union of the capsules of its successive segments (a thick polyline with round
caps and joins), so a fast drag leaves no gap. The comparison carries a slack of 10⁻⁹ px² so that
pixel centres *on* the circle (the corner case above) are painted whatever the rounding of
``r²``; the result depends only on the points and the brush, never on how a drag was split into
events beyond the polyline it traces. The eraser is the same brush setting pixels to ``False``.

**One sheet per attribute.** Each attribute drawn in a session has its own mask, its own undo and
redo history and its own saved state; switching the attribute (:meth:`~MaskCanvas.set_attribute`)
keeps all of them, so an unsaved drawing is never dropped or carried under another attribute.
A sheet is created the first time its attribute is shown, as ``start`` says (empty, the saved
file, or the built-in region). Each stroke, clear, load and :meth:`~MaskCanvas.set_mask` is one
undo step of the attribute's sheet (at most ``max_history`` kept); :meth:`~MaskCanvas.redo`
re-applies undone steps until the next edit.

**Unsaved.** A sheet is *dirty* when its mask differs from its baseline: the content last saved
to, or loaded from, the attribute's file — or, for a sheet never tied to its file, the empty mask
(an empty canvas holds no work to lose). Undoing back to the saved content is clean again.

**Labels and views.** The attributes are CelebA's 40 by default; ``label_space=`` gives a
dataset's own labels (a folder dataset's, :mod:`cocam.folder`). cocam's built-in regions
(:func:`cocam.masks.default_mask`) exist for CelebA's attributes only. ``view="square"`` is a
folder dataset's frame: its masks are drawn on the square the model sees, which in template
coordinates is :data:`~cocam.geometry.CROP_BOX` (rows 20–197). The brush paints only inside
it, files are saved and read as that 178×178 square (:func:`cocam.masks.save_mask`,
:func:`cocam.masks.load_mask` with ``view="square"``), so a saved sheet is exactly its file.

**Saving, and the shipped masks.** :meth:`~MaskCanvas.save` writes ``<mask_dir>/<attribute>.png``
through :func:`cocam.masks.save_mask` (atomic: an interrupted save leaves the previous file
intact). An existing file is replaced only with ``overwrite=True``, with one exception: a
**shipped** mask (:func:`cocam.masks.is_shipped_mask` — a file of the project's ``data/masks``
that holds exactly cocam's built-in region of its attribute). The decision: shipped masks are not
user data. They are the defaults the user's drawing is meant to replace (the CLI and the
notebooks read ``data/masks`` so that a drawing saved there is the one they use); every pixel of
one is given back by :func:`cocam.masks.default_mask` (the "Built-in" button then Save), so
replacing it loses no one's work. Any other existing file — one the user saved, edited or
copied there, or a file that cannot be read — is the user's and is never replaced without
``overwrite=True``. :meth:`~MaskCanvas.file_state` tells the three cases apart, so a view can
say which one a save will meet.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cocam.geometry import CROP_BOX
from cocam.labels import CELEBA, LabelSpace, label_space_of
from cocam.masks import (
    MASK_VIEWS,
    TEMPLATE_SHAPE,
    default_mask,
    default_mask_dir,
    is_shipped_mask,
    load_mask,
    save_mask,
)

__all__ = ["BRUSH_MAX", "BRUSH_MIN", "DEFAULT_BRUSH", "MIN_RADIUS", "MaskCanvas"]

Mode = Literal["brush", "eraser"]
Start = Literal["empty", "saved", "default"]
FileState = Literal["none", "shipped", "user"]
#: ``(i0, i1, j0, j1)``: template rows ``i0:i1`` and columns ``j0:j1`` (half-open).
Box = tuple[int, int, int, int]

#: Smallest and largest brush diameter, in whole template pixels.
BRUSH_MIN: int = 1
BRUSH_MAX: int = 40
#: The brush a canvas (and the editor) starts with, in template pixels.
DEFAULT_BRUSH: int = 10
#: Smallest brush radius in template pixels: the pixel under the pointer is always painted.
MIN_RADIUS: float = math.sqrt(0.5)
_EPS = 1e-9


@dataclass
class _Sheet:
    """One attribute's drawing: the mask, its history and what its file holds."""

    mask: np.ndarray
    baseline: np.ndarray  # content last saved to / loaded from the file, else the empty mask
    tied: bool  # whether ``baseline`` is the attribute's file content
    undo: deque
    redo: list = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return not np.array_equal(self.mask, self.baseline)


class MaskCanvas:
    """Masks in template coordinates, one sheet per attribute, painted with a round brush.

    Args:
        attribute: the attribute shown first (a name of ``label_space``).
        mask_dir: folder of ``<Attribute>.png``; ``None`` is :func:`cocam.masks.default_mask_dir`
            (``$COCAM_MASK_DIR``, else the project's ``data/masks``).
        brush_size: brush diameter, a whole number of template pixels in
            ``[BRUSH_MIN, BRUSH_MAX]``.
        mode: ``"brush"`` (paint) or ``"eraser"``.
        max_history: undo steps kept per attribute.
        start: how an attribute's sheet begins: ``"empty"``, ``"saved"`` (its file if there is
            one, else empty) or ``"default"`` (:func:`cocam.masks.default_mask`; CelebA only).
        label_space: the names that can be drawn for (default: CelebA's 40 attributes).
        view: ``"template"`` (the aligned template face, CelebA's) or ``"square"`` (the square
            model view, a folder dataset's; see the module docstring).

    Example::

        canvas = MaskCanvas("Wearing_Lipstick", mask_dir=tmp, brush_size=3)
        canvas.stroke([(60.5, 150.5), (110.5, 150.5)])   # template coordinates
        canvas.save()
    """

    def __init__(
        self,
        attribute: str = "Wearing_Lipstick",
        *,
        mask_dir: str | os.PathLike | None = None,
        brush_size: float = DEFAULT_BRUSH,
        mode: Mode = "brush",
        max_history: int = 50,
        start: Start = "empty",
        label_space: LabelSpace | Sequence[str] | None = None,
        view: str = "template",
    ) -> None:
        if view not in MASK_VIEWS:
            raise ValueError(f"view must be one of {', '.join(MASK_VIEWS)}, not {view!r}.")
        self._space = CELEBA if label_space is None else label_space_of(label_space)
        self._view = view
        if start == "default" and not self.has_builtin:
            raise ValueError("start='default' needs cocam's built-in regions, which exist for CelebA's attributes "
                             "only: start 'empty' or 'saved'.")
        if int(max_history) < 1:
            raise ValueError(f"max_history must be at least 1, got {max_history}.")
        if start not in ("empty", "saved", "default"):
            raise ValueError(f"start must be 'empty', 'saved' or 'default', not {start!r}.")
        self._mask_dir = Path(mask_dir) if mask_dir is not None else default_mask_dir()
        self._max_history = int(max_history)
        self._start: Start = start
        self._brush = float(DEFAULT_BRUSH)
        self._mode: Mode = "brush"
        self.set_brush(brush_size)
        self.set_mode(mode)
        self._sheets: dict[str, _Sheet] = {}
        self._down = False
        self._last: tuple[float, float] | None = None
        self._before: np.ndarray | None = None
        self._changed = False
        name = self._space.validate_one(attribute)
        self._sheets[name] = self._new_sheet(name)
        self._attribute = name

    # -- state -------------------------------------------------------------------------------

    @property
    def attribute(self) -> str:
        """The attribute whose sheet is shown and edited."""
        return self._attribute

    @property
    def mask(self) -> np.ndarray:
        """A copy of the current attribute's mask: ``(218, 178)`` bool."""
        return self._sheet.mask.copy()

    @property
    def label_space(self) -> LabelSpace:
        """The names that can be drawn for."""
        return self._space

    @property
    def view(self) -> str:
        """``"template"`` or ``"square"``: the frame drawn on and saved (see the module docstring)."""
        return self._view

    @property
    def has_builtin(self) -> bool:
        """Whether cocam has built-in regions for these labels (CelebA's attributes only)."""
        return self._space == CELEBA

    @property
    def mask_dir(self) -> Path:
        """Folder of the saved masks."""
        return self._mask_dir

    @property
    def mask_path(self) -> Path:
        """``<mask_dir>/<attribute>.png``."""
        return self.path_of(self._attribute)

    def path_of(self, attribute: str) -> Path:
        """``<mask_dir>/<attribute>.png`` for any attribute."""
        return self._mask_dir / f"{self._space.validate_one(attribute)}.png"

    @property
    def brush_size(self) -> float:
        """Brush diameter in template pixels (a whole number)."""
        return self._brush

    @property
    def mode(self) -> Mode:
        """``"brush"`` or ``"eraser"``."""
        return self._mode

    @property
    def drawing(self) -> bool:
        """Whether a stroke is in progress."""
        return self._down

    @property
    def dirty(self) -> bool:
        """Whether the current attribute's mask differs from what its file holds (or, never saved, from empty)."""
        return self._sheet.dirty

    def is_dirty(self, attribute: str) -> bool:
        """Whether ``attribute`` has an unsaved drawing (``False`` for an attribute not drawn yet)."""
        sheet = self._sheets.get(self._space.validate_one(attribute))
        return sheet is not None and sheet.dirty

    @property
    def unsaved(self) -> tuple[str, ...]:
        """The attributes with an unsaved drawing, in the order they were first shown."""
        return tuple(name for name, sheet in self._sheets.items() if sheet.dirty)

    @property
    def saved_path(self) -> Path | None:
        """The file that holds exactly the current mask (``None`` when the mask is not saved)."""
        sheet = self._sheet
        return self.mask_path if sheet.tied and not sheet.dirty else None

    @property
    def can_undo(self) -> bool:
        return bool(self._sheet.undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._sheet.redo)

    @property
    def pixels(self) -> int:
        """Number of template pixels in the current mask."""
        return int(self._sheet.mask.sum())

    @property
    def area(self) -> float:
        """Fraction of the template covered by the current mask."""
        return float(self._sheet.mask.mean())

    def file_state(self, attribute: str | None = None) -> FileState:
        """What :meth:`save` would meet at ``attribute``'s file (default: the current one).

        ``"none"`` (no file), ``"shipped"`` (a shipped mask: replaced without ``overwrite``, see
        the module docstring) or ``"user"`` (anything else: replaced only with ``overwrite``).
        """
        path = self.path_of(attribute or self._attribute)
        if not path.exists():
            return "none"
        return "shipped" if is_shipped_mask(path) else "user"

    # -- settings ----------------------------------------------------------------------------

    def set_brush(self, size: float) -> None:
        """Set the brush diameter: a whole number of template pixels in ``[BRUSH_MIN, BRUSH_MAX]``."""
        if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
            raise TypeError(f"brush size must be a number of template pixels, got {size!r}.")
        value = float(size)
        if not (math.isfinite(value) and BRUSH_MIN <= value <= BRUSH_MAX):
            raise ValueError(f"brush size must lie in [{BRUSH_MIN}, {BRUSH_MAX}] template pixels, got {value:g}.")
        if value != round(value):
            raise ValueError(f"brush size must be a whole number of template pixels, got {value:g}; "
                             f"use {round(value)}.")
        self._brush = value

    def set_mode(self, mode: Mode) -> None:
        """``"brush"`` paints the region, ``"eraser"`` removes from it."""
        if mode not in ("brush", "eraser"):
            raise ValueError(f"mode must be 'brush' or 'eraser', not {mode!r}.")
        self._mode = mode

    def set_attribute(self, name: str) -> None:
        """Show ``name``'s sheet (created as ``start`` says the first time); every sheet keeps its state.

        A stroke in progress ends on the previous attribute's sheet first. A sheet whose start
        fails (an unreadable saved file) raises and leaves the current attribute shown.
        """
        name = self._space.validate_one(name)
        if name == self._attribute:
            return
        self.release()
        if name not in self._sheets:
            self._sheets[name] = self._new_sheet(name)
        self._attribute = name

    # -- drawing (template coordinates) -----------------------------------------------------

    def press(self, x: float, y: float) -> Box | None:
        """Start a stroke at ``(x, y)`` and paint a dot there; returns the changed box (or ``None``)."""
        self.release()
        self._down = True
        self._before = self._sheet.mask.copy()
        self._changed = False
        point = (float(x), float(y))
        self._last = point
        return self._paint(point, point)

    def drag(self, x: float, y: float) -> Box | None:
        """Continue the stroke to ``(x, y)``; without a pressed pen this does nothing (returns ``None``)."""
        if not self._down or self._last is None:
            return None
        point = (float(x), float(y))
        box = self._paint(self._last, point)
        self._last = point
        return box

    def release(self) -> bool:
        """End the stroke; it becomes one undo step if it changed anything (returns whether it did)."""
        if not self._down:
            return False
        changed = self._changed and self._before is not None
        if changed:
            self._push_undo(self._before)
        self._down, self._last, self._before, self._changed = False, None, None, False
        return changed

    def stroke(self, points: Sequence[tuple[float, float]]) -> bool:
        """A whole stroke through ``points`` (press, drags, release); returns whether it changed the mask."""
        if len(points) == 0:
            return False
        self.press(*points[0])
        for p in points[1:]:
            self.drag(*p)
        return self.release()

    def clear(self) -> bool:
        """Erase the current mask (undoable); ``False`` if it was already empty."""
        self.release()
        return self._replace(np.zeros(TEMPLATE_SHAPE, dtype=bool))

    def set_mask(self, mask: np.ndarray) -> bool:
        """Replace the current mask with a ``(218, 178)`` array (non-zero = region), undoable."""
        arr = np.asarray(mask)
        if arr.shape != TEMPLATE_SHAPE:
            raise ValueError(f"a mask must have the template shape {TEMPLATE_SHAPE}, got {arr.shape}.")
        self.release()
        return self._replace(self._in_view(arr.astype(bool)))

    def undo(self) -> bool:
        """Undo the current attribute's last step; ``False`` if there is none."""
        return self._step(self._sheet.undo, self._sheet.redo)

    def redo(self) -> bool:
        """Re-apply the current attribute's last undone step; ``False`` if there is none."""
        return self._step(self._sheet.redo, self._sheet.undo)

    def _step(self, source: list, target: list) -> bool:
        """Move the current mask onto ``target`` and the last of ``source`` into its place."""
        self.release()
        if not source:
            return False
        target.append(self._sheet.mask)
        self._sheet.mask = source.pop()
        return True

    # -- files -------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike | None = None) -> str:
        """Load a mask into the current sheet (undoable) and return where it came from.

        ``path=None`` loads the attribute's file if it exists, else the built-in region
        (returns ``"built-in"``; a :class:`FileNotFoundError` for labels without one). An explicit ``path`` must exist (PNG or ``.npy``,
        :func:`cocam.masks.load_mask`). Loading the attribute's own file makes its content the
        saved state; another file's content is unsaved.
        """
        self.release()
        if path is None and not self.mask_path.is_file():
            if not self.has_builtin:
                raise FileNotFoundError(f"no saved mask of {self._attribute} in {self._mask_dir} (and no built-in "
                                        f"region for a label that is not CelebA's): draw it and save.")
            return self.load_default()
        source = Path(path) if path is not None else self.mask_path
        mask = self._in_view(load_mask(source, view=self._view))
        self._replace(mask)
        if source.resolve() == self.mask_path.resolve():
            self._sheet.baseline, self._sheet.tied = mask.copy(), True
        return str(source)

    def load_default(self) -> str:
        """Put cocam's built-in region of the attribute on the sheet (undoable); returns ``"built-in"``.

        Raises:
            ValueError: the labels are not CelebA's (there is no built-in region to give).
        """
        if not self.has_builtin:
            raise ValueError(f"{self._attribute} has no built-in region (cocam has them for CelebA's attributes "
                             f"only): draw it, or load a mask file.")
        self.release()
        self._replace(self._in_view(default_mask(self._attribute)))
        return "built-in"

    def save(self, overwrite: bool = False) -> Path:
        """Write the current mask to ``<mask_dir>/<attribute>.png`` atomically and return the path.

        A shipped mask at that path is replaced without ``overwrite`` (see the module
        docstring); any other existing file only with ``overwrite=True``.

        Raises:
            FileExistsError: the file is the user's and ``overwrite`` is false (nothing is written).
            ValueError: the mask is empty or covers the whole face (nothing is written).
            OSError: the write failed (the previous file is intact; the sheet stays unsaved).
        """
        self.release()
        replace = overwrite or self.file_state() == "shipped"
        sheet = self._sheet
        path = save_mask(self.mask_path, sheet.mask, overwrite=replace, view=self._view)
        sheet.baseline, sheet.tied = sheet.mask.copy(), True
        return path

    # -- internals ---------------------------------------------------------------------------

    @property
    def _sheet(self) -> _Sheet:
        return self._sheets[self._attribute]

    def _new_sheet(self, attribute: str) -> _Sheet:
        empty = np.zeros(TEMPLATE_SHAPE, dtype=bool)
        history: deque = deque(maxlen=self._max_history)
        path = self.path_of(attribute)
        if self._start == "saved" and path.is_file():
            mask = self._in_view(load_mask(path, view=self._view))
            return _Sheet(mask=mask, baseline=mask.copy(), tied=True, undo=history)
        mask = default_mask(attribute) if self._start == "default" else empty.copy()
        return _Sheet(mask=mask, baseline=empty, tied=False, undo=history)

    def _in_view(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` without the rows a square view does not hold (unchanged for the template view)."""
        if self._view == "template":
            return mask
        _, top, _, bottom = CROP_BOX
        out = np.zeros_like(mask)
        out[top:bottom] = mask[top:bottom]
        return out

    def _push_undo(self, snapshot: np.ndarray) -> None:
        sheet = self._sheet
        sheet.undo.append(snapshot)
        sheet.redo.clear()

    def _replace(self, mask: np.ndarray) -> bool:
        """Put ``mask`` on the current sheet as one undo step; ``False`` (no step) if nothing changes."""
        sheet = self._sheet
        if np.array_equal(mask, sheet.mask):
            return False
        self._push_undo(sheet.mask)
        sheet.mask = np.array(mask, dtype=bool, copy=True)
        return True

    def _paint(self, p0: tuple[float, float], p1: tuple[float, float]) -> Box | None:
        """Paint (or erase) the capsule of radius ``max(brush/2, √½)`` around ``p0 → p1``; the changed box."""
        h, w = TEMPLATE_SHAPE
        r = max(self._brush / 2.0, MIN_RADIUS)
        (x0, y0), (x1, y1) = p0, p1
        j0 = max(int(math.floor(min(x0, x1) - r)), 0)
        j1 = min(int(math.ceil(max(x0, x1) + r)) + 1, w)
        rows = (0, h) if self._view == "template" else (CROP_BOX[1], CROP_BOX[3])  # a square view: its rows only
        i0 = max(int(math.floor(min(y0, y1) - r)), rows[0])
        i1 = min(int(math.ceil(max(y0, y1) + r)) + 1, rows[1])
        if j0 >= j1 or i0 >= i1:
            return None
        px = (np.arange(j0, j1, dtype=np.float64) + 0.5)[None, :] - x0
        py = (np.arange(i0, i1, dtype=np.float64) + 0.5)[:, None] - y0
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        hit = (px - t * dx) ** 2 + (py - t * dy) ** 2 <= r * r + _EPS
        value = self._mode == "brush"
        window = self._sheet.mask[i0:i1, j0:j1]
        if not (window[hit] != value).any():
            return None
        window[hit] = value
        self._changed = True
        return i0, i1, j0, j1
