"""Draw the region ``S`` that should explain an attribute, on the template face, in a notebook.

:class:`MaskEditor` is a small paint program for one thing: marking, on the aligned template
face, where the evidence for an attribute lies (the lips for Wearing_Lipstick, …). The result
is a :mod:`cocam.masks` mask, saved as ``<mask_dir>/<Attribute>.png`` for guided fine-tuning.

**Where the mask lives.** The authoritative mask is a NumPy ``(218, 178)`` bool array in
template coordinates, held in Python and changed only by the editor's methods — the mouse
callbacks call the same :meth:`~MaskEditor.press` / :meth:`~MaskEditor.drag` /
:meth:`~MaskEditor.release` a test or a script can call. The canvas in the browser only
*shows* that array (every change repaints the touched rectangle from it); nothing is ever
read back from the browser, so what is saved is exactly what the Python side painted, however
slow the connection.

**Coordinates.** The template is shown enlarged ``scale`` times (e.g. 3×) for comfortable
drawing. Mouse positions arrive in *display* pixels and are divided by ``scale``; a template
pixel ``(row i, column j)`` covers display pixels ``[j, j + 1) · scale × [i, i + 1) · scale``.

**Brush.** A round brush of diameter :attr:`~MaskEditor.brush_size` template pixels. A stroke
paints every pixel whose centre lies within ``brush_size / 2`` of the polyline through the
successive mouse positions (a thick line with round caps and joins), so a fast drag leaves no
gaps. The smallest brush still paints the pixel under the pointer. The eraser is the same
brush setting pixels back to ``False``.

**History.** Each stroke, :meth:`~MaskEditor.clear`, load and attribute switch is one undo
step (at most ``max_history`` are kept); :meth:`~MaskEditor.redo` re-applies undone steps
until the next edit.

The drawing logic needs only NumPy; :attr:`MaskEditor.widget` additionally needs ``ipycanvas``
and ``ipywidgets`` (``pip install 'cocam[notebooks]'``).
"""

from __future__ import annotations

import contextlib
import html
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from cocam.attributes import CELEBA_ATTRIBUTES, validate_attribute
from cocam.errors import CocamError
from cocam.masks import TEMPLATE_SHAPE, default_mask, load_mask, save_mask

__all__ = ["MaskEditor", "MaskEditorUnavailableError"]

Mode = Literal["brush", "eraser"]
Start = Literal["empty", "saved", "default"]

#: Smallest brush radius in template pixels: the pixel under the pointer is always painted.
_MIN_RADIUS = math.sqrt(0.5)
#: Colour of the painted region on the canvas (RGB).
_MASK_COLOUR = (64, 230, 96)
_BRUSH_MAX = 40.0
_EPS = 1e-9


def _short(path: Path) -> str:
    """A path short enough for the status line: relative to the working folder, or its last parts."""
    try:
        rel = Path(os.path.relpath(path))
    except ValueError:  # another drive on Windows
        rel = path
    if not str(rel).startswith("..") and len(str(rel)) <= 48:
        return str(rel)
    return str(Path("…", *path.parts[-3:]))


class MaskEditorUnavailableError(CocamError, ImportError):
    """The interactive widget needs ipycanvas and ipywidgets, which are not installed."""


def _template_rgb(template: Image.Image | np.ndarray | str | os.PathLike | None) -> np.ndarray:
    """The template face as ``(218, 178, 3)`` uint8."""
    if template is None:
        from cocam.synthetic import render_template

        image = render_template()[0]
    elif isinstance(template, (str, os.PathLike)):
        with Image.open(template) as img:
            image = img.convert("RGB")
    elif isinstance(template, np.ndarray):
        image = Image.fromarray(np.asarray(template, dtype=np.uint8))
    else:
        image = template
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if rgb.shape[:2] != TEMPLATE_SHAPE:
        raise ValueError(
            f"the template must be {TEMPLATE_SHAPE[1]}x{TEMPLATE_SHAPE[0]} (width x height), the aligned "
            f"CelebA face, got {rgb.shape[1]}x{rgb.shape[0]}."
        )
    return rgb


class MaskEditor:
    """Paint a template-coordinate mask with the mouse (or with method calls).

    Args:
        attribute: the attribute the region explains (one of the 40 CelebA names); the mask
            is saved as ``<mask_dir>/<attribute>.png``.
        mask_dir: folder of the saved masks.
        scale: display magnification of the 178×218 template (``> 0``; 3 gives a 534×654
            canvas).
        brush_size: brush diameter in template pixels.
        mode: ``"brush"`` (paint) or ``"eraser"``.
        opacity: opacity of the painted region over the face on the canvas, in ``[0, 1]``.
        max_history: how many undo steps are kept.
        start: the initial mask: ``"empty"``, ``"saved"`` (the saved file of ``attribute`` if
            there is one, else empty) or ``"default"`` (cocam's built-in region,
            :func:`cocam.masks.default_mask`). Switching the attribute applies it again.
        template: the face to draw on (default: cocam's template face,
            :func:`cocam.synthetic.render_template`); an image, array or path, 178×218.

    Example (no browser needed)::

        editor = MaskEditor("Wearing_Lipstick", mask_dir=tmp, scale=3)
        editor.press(240, 450); editor.drag(300, 455); editor.release()
        editor.save()
    """

    def __init__(
        self,
        attribute: str = "Wearing_Lipstick",
        *,
        mask_dir: str | os.PathLike = "data/masks",
        scale: float = 3.0,
        brush_size: float = 10.0,
        mode: Mode = "brush",
        opacity: float = 0.5,
        max_history: int = 50,
        start: Start = "empty",
        template: Image.Image | np.ndarray | str | os.PathLike | None = None,
    ) -> None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}.")
        if int(max_history) < 1:
            raise ValueError(f"max_history must be at least 1, got {max_history}.")
        if start not in ("empty", "saved", "default"):
            raise ValueError(f"start must be 'empty', 'saved' or 'default', not {start!r}.")
        self._attribute = validate_attribute(attribute)
        self._mask_dir = Path(mask_dir)
        self._scale = float(scale)
        self._start: Start = start
        self._template = _template_rgb(template)
        self._mask = np.zeros(TEMPLATE_SHAPE, dtype=bool)
        self._undo: deque[np.ndarray] = deque(maxlen=int(max_history))
        self._redo: list[np.ndarray] = []
        self._brush = 10.0
        self._mode: Mode = "brush"
        self._opacity = 0.5
        self._down = False
        self._last: tuple[float, float] | None = None
        self._stroke_before: np.ndarray | None = None
        self._stroke_changed = False
        self._dirty = False
        self._saved_path: Path | None = None
        self._status = ""
        self._ui: dict[str, Any] | None = None
        self._syncing = False
        self._holding = False
        self.set_brush(brush_size)
        self.set_mode(mode)
        self.set_opacity(opacity)
        self._apply_start(record=False)

    # -- read-only state -----------------------------------------------------------------------

    @property
    def mask(self) -> np.ndarray:
        """A copy of the current mask: ``(218, 178)`` bool in template coordinates."""
        return self._mask.copy()

    @property
    def attribute(self) -> str:
        """The attribute the region is drawn for."""
        return self._attribute

    @property
    def mask_dir(self) -> Path:
        """Folder where :meth:`save` writes and :meth:`load` reads."""
        return self._mask_dir

    @property
    def mask_path(self) -> Path:
        """``<mask_dir>/<attribute>.png``."""
        return self._mask_dir / f"{self._attribute}.png"

    @property
    def scale(self) -> float:
        """Display pixels per template pixel."""
        return self._scale

    @property
    def display_size(self) -> tuple[int, int]:
        """``(width, height)`` of the canvas in display pixels."""
        h, w = TEMPLATE_SHAPE
        return int(math.ceil(w * self._scale - _EPS)), int(math.ceil(h * self._scale - _EPS))

    @property
    def brush_size(self) -> float:
        """Brush diameter in template pixels."""
        return self._brush

    @property
    def mode(self) -> Mode:
        """``"brush"`` or ``"eraser"``."""
        return self._mode

    @property
    def opacity(self) -> float:
        """Opacity of the painted region on the canvas."""
        return self._opacity

    @property
    def drawing(self) -> bool:
        """Whether a stroke is in progress (the pen is down)."""
        return self._down

    @property
    def dirty(self) -> bool:
        """Whether the mask changed since it was last saved or loaded from a file."""
        return self._dirty

    @property
    def saved_path(self) -> Path | None:
        """Where the current mask was last saved (``None`` if not saved since the last change)."""
        return None if self._dirty else self._saved_path

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def status(self) -> str:
        """The last status message (also shown under the widget's controls)."""
        return self._status

    @property
    def area(self) -> float:
        """Fraction of the template covered by the mask."""
        return float(self._mask.mean())

    def __repr__(self) -> str:
        return (f"MaskEditor(attribute={self._attribute!r}, mask_dir='{self._mask_dir}', "
                f"pixels={int(self._mask.sum())}, mode={self._mode!r}, brush_size={self._brush:g})")

    # -- settings ----------------------------------------------------------------------------

    def set_brush(self, size: float) -> None:
        """Set the brush diameter in template pixels (``0 < size <= 40``)."""
        if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
            raise TypeError(f"brush size must be a number, got {size!r}.")
        size = float(size)
        if not (math.isfinite(size) and 0 < size <= _BRUSH_MAX):
            raise ValueError(f"brush size must lie in (0, {_BRUSH_MAX:g}] template pixels, got {size:g}.")
        self._brush = size
        self._sync_controls()

    def set_mode(self, mode: Mode) -> None:
        """``"brush"`` paints the region, ``"eraser"`` removes from it."""
        if mode not in ("brush", "eraser"):
            raise ValueError(f"mode must be 'brush' or 'eraser', not {mode!r}.")
        self._mode = mode
        self._sync_controls()

    def set_opacity(self, opacity: float) -> None:
        """Opacity of the painted region over the face, in ``[0, 1]`` (display only)."""
        opacity = float(opacity)
        if not (math.isfinite(opacity) and 0.0 <= opacity <= 1.0):
            raise ValueError(f"opacity must lie in [0, 1], got {opacity:g}.")
        self._opacity = opacity
        self._sync_controls()
        self._repaint()

    def set_attribute(self, name: str) -> None:
        """Draw for another attribute (validated); the mask is reset as ``start`` says (undoable)."""
        name = validate_attribute(name)
        if name == self._attribute:
            return
        self._end_stroke()
        self._attribute = name
        self._saved_path = None
        self._sync_controls()
        self._apply_start(record=True)

    # -- drawing -----------------------------------------------------------------------------

    def to_template(self, x: float, y: float) -> tuple[float, float]:
        """Display pixels → continuous template coordinates ``(x, y)``."""
        return float(x) / self._scale, float(y) / self._scale

    def press(self, x: float, y: float) -> None:
        """Start a stroke at display position ``(x, y)`` and paint a dot there."""
        self._end_stroke()
        self._down = True
        self._stroke_before = self._mask.copy()
        self._stroke_changed = False
        point = self.to_template(x, y)
        self._last = point
        self._paint(point, point)

    def drag(self, x: float, y: float) -> None:
        """Continue the stroke to ``(x, y)``; without a pressed pen this does nothing."""
        if not self._down or self._last is None:
            return
        point = self.to_template(x, y)
        self._paint(self._last, point)
        self._last = point

    def release(self) -> None:
        """End the stroke (one undo step if it changed anything)."""
        self._end_stroke()

    def stroke(self, points: Sequence[tuple[float, float]]) -> None:
        """A whole stroke through display positions ``points`` (press, drags, release)."""
        if len(points) == 0:
            return
        self.press(*points[0])
        for p in points[1:]:
            self.drag(*p)
        self.release()

    def clear(self) -> None:
        """Erase the whole mask (undoable)."""
        self._end_stroke()
        if not self._mask.any():
            self._set_status("Nothing to clear.")
            return
        self._replace(np.zeros(TEMPLATE_SHAPE, dtype=bool), record=True)
        self._set_status("Cleared (undo brings it back).")

    def set_mask(self, mask: np.ndarray) -> None:
        """Replace the mask with a ``(218, 178)`` array (non-zero = region), undoable."""
        arr = np.asarray(mask)
        if arr.shape != TEMPLATE_SHAPE:
            raise ValueError(f"a mask must have the template shape {TEMPLATE_SHAPE}, got {arr.shape}.")
        self._end_stroke()
        self._replace(arr.astype(bool), record=True)
        self._set_status(self._summary())

    def undo(self) -> bool:
        """Undo the last stroke, clear, load or attribute switch; ``False`` if nothing to undo."""
        self._end_stroke()
        if not self._undo:
            self._set_status("Nothing to undo.")
            return False
        self._redo.append(self._mask.copy())
        self._mask = self._undo.pop()
        self._dirty = True
        self._repaint()
        self._set_status("Undone. " + self._summary())
        return True

    def redo(self) -> bool:
        """Re-apply the last undone step; ``False`` if there is none."""
        self._end_stroke()
        if not self._redo:
            self._set_status("Nothing to redo.")
            return False
        self._undo.append(self._mask.copy())
        self._mask = self._redo.pop()
        self._dirty = True
        self._repaint()
        self._set_status("Redone. " + self._summary())
        return True

    # -- files -------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike | None = None) -> str:
        """Load a mask (undoable) and return where it came from.

        ``path=None`` loads ``<mask_dir>/<attribute>.png`` if it exists, else starts from the
        built-in region of the attribute (:func:`cocam.masks.default_mask`). An explicit
        ``path`` must exist (PNG or ``.npy``, see :func:`cocam.masks.load_mask`).
        """
        self._end_stroke()
        if path is None and not self.mask_path.is_file():
            return self.load_default()
        source = Path(path) if path is not None else self.mask_path
        mask = load_mask(source)
        self._replace(mask, record=True)
        same_file = source.resolve() == self.mask_path.resolve()
        self._dirty = not same_file
        self._saved_path = self.mask_path if same_file else None
        self._set_status(f"Loaded {_short(source)}. " + self._summary())
        return str(source)

    def load_default(self) -> str:
        """Start from cocam's built-in region of the attribute (undoable); returns ``"built-in"``."""
        self._end_stroke()
        self._replace(default_mask(self._attribute), record=True)
        self._set_status(f"Built-in region of {self._attribute} (not saved yet). " + self._summary())
        return "built-in"

    def save(self, overwrite: bool = False) -> Path:
        """Write the mask to ``<mask_dir>/<attribute>.png`` atomically and return the path.

        Raises:
            FileExistsError: the file exists and ``overwrite`` is false (nothing is written).
            ValueError: the mask is empty or covers the whole face (nothing is written).
        """
        self._end_stroke()
        path = save_mask(self.mask_path, self._mask, overwrite=overwrite)
        self._dirty = False
        self._saved_path = path
        self._set_status(f"Saved {_short(path)}. " + self._summary(saved=True))
        return path

    # -- internals: painting -------------------------------------------------------------------

    def _paint(self, p0: tuple[float, float], p1: tuple[float, float]) -> None:
        """Paint (or erase) the capsule of radius brush/2 around the segment p0→p1."""
        h, w = TEMPLATE_SHAPE
        r = max(self._brush / 2.0, _MIN_RADIUS)
        (x0, y0), (x1, y1) = p0, p1
        j0 = max(int(math.floor(min(x0, x1) - r)), 0)
        j1 = min(int(math.ceil(max(x0, x1) + r)) + 1, w)
        i0 = max(int(math.floor(min(y0, y1) - r)), 0)
        i1 = min(int(math.ceil(max(y0, y1) + r)) + 1, h)
        if j0 >= j1 or i0 >= i1:
            return
        px = (np.arange(j0, j1, dtype=np.float64) + 0.5)[None, :] - x0
        py = (np.arange(i0, i1, dtype=np.float64) + 0.5)[:, None] - y0
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        hit = (px - t * dx) ** 2 + (py - t * dy) ** 2 <= r * r + _EPS
        value = self._mode == "brush"
        window = self._mask[i0:i1, j0:j1]
        if not (window[hit] != value).any():
            return
        window[hit] = value
        self._stroke_changed = True
        self._repaint((i0, i1, j0, j1))

    def _end_stroke(self) -> None:
        if not self._down:
            return
        self._down = False
        self._last = None
        if self._stroke_changed and self._stroke_before is not None:
            self._push_undo(self._stroke_before)
            self._dirty = True
            self._set_status(self._summary())
        self._stroke_before = None
        self._stroke_changed = False

    def _push_undo(self, snapshot: np.ndarray) -> None:
        self._undo.append(snapshot)
        self._redo.clear()

    def _replace(self, mask: np.ndarray, *, record: bool) -> None:
        if record and not np.array_equal(mask, self._mask):
            self._push_undo(self._mask.copy())
        self._mask = np.array(mask, dtype=bool, copy=True)
        self._dirty = True
        self._repaint()

    def _apply_start(self, *, record: bool) -> None:
        if self._start == "default":
            self._replace(default_mask(self._attribute), record=record)
            self._set_status(f"{self._attribute}: started from the built-in region. " + self._summary())
        elif self._start == "saved" and self.mask_path.is_file():
            self._replace(load_mask(self.mask_path), record=record)
            self._dirty, self._saved_path = False, self.mask_path
            self._set_status(f"{self._attribute}: loaded {_short(self.mask_path)}. " + self._summary())
        else:
            self._replace(np.zeros(TEMPLATE_SHAPE, dtype=bool), record=record)
            self._dirty = False
            self._set_status(f"{self._attribute}: paint the region that shows it, then save.")

    def _summary(self, saved: bool = False) -> str:
        n = int(self._mask.sum())
        state = "saved" if saved or not self._dirty else "not saved"
        return f"{self._attribute}: {n} px ({100 * n / self._mask.size:.1f} % of the face), {state}."

    def _set_status(self, text: str, *, error: bool = False) -> None:
        self._status = text
        if self._ui is not None:
            colour = "#c62828" if error else "inherit"
            self._ui["status"].value = (f"<div style='line-height:1.35;overflow-wrap:anywhere;color:{colour}'>"
                                        f"{html.escape(text)}</div>")
            self._ui["undo"].disabled = not self._undo
            self._ui["redo"].disabled = not self._redo

    # -- internals: display --------------------------------------------------------------------

    def _rgba(self, i0: int, i1: int, j0: int, j1: int) -> tuple[np.ndarray, int, int] | None:
        """Display pixels of template rows i0:i1, columns j0:j1 as RGBA, with their top-left."""
        s = self._scale
        width, height = self.display_size
        y0, y1 = (min(int(math.ceil(v * s - _EPS)), height) for v in (i0, i1))
        x0, x1 = (min(int(math.ceil(v * s - _EPS)), width) for v in (j0, j1))
        if y1 <= y0 or x1 <= x0:
            return None
        rows = np.minimum((np.arange(y0, y1) / s + _EPS).astype(int), TEMPLATE_SHAPE[0] - 1)
        cols = np.minimum((np.arange(x0, x1) / s + _EPS).astype(int), TEMPLATE_SHAPE[1] - 1)
        painted = self._mask[np.ix_(rows, cols)]
        rgba = np.zeros((y1 - y0, x1 - x0, 4), dtype=np.uint8)
        rgba[painted] = (*_MASK_COLOUR, int(round(255 * self._opacity)))
        return rgba, x0, y0

    def render(self) -> np.ndarray:
        """What the canvas shows: the template with the mask blended in, ``(H, W, 3)`` uint8 at display size."""
        width, height = self.display_size
        face = np.asarray(Image.fromarray(self._template).resize((width, height), Image.Resampling.LANCZOS),
                          dtype=np.float64)
        rgba = self._rgba(0, TEMPLATE_SHAPE[0], 0, TEMPLATE_SHAPE[1])
        if rgba is None:
            return face.astype(np.uint8)
        alpha = rgba[0][..., 3:].astype(np.float64) / 255.0
        return np.clip(face * (1 - alpha) + rgba[0][..., :3] * alpha, 0, 255).round().astype(np.uint8)

    def _repaint(self, box: tuple[int, int, int, int] | None = None) -> None:
        """Show template rows/cols ``box`` (default: everything) of the mask on the canvas."""
        if self._ui is None:
            return
        layer = self._ui["canvas"][1]
        box = box if box is not None else (0, TEMPLATE_SHAPE[0], 0, TEMPLATE_SHAPE[1])
        patch = self._rgba(*box)
        if patch is None:
            return
        rgba, x0, y0 = patch
        with self._hold():
            layer.clear_rect(x0, y0, rgba.shape[1], rgba.shape[0])
            if rgba[..., 3].any():
                layer.put_image_data(rgba, x0, y0)

    def _draw_template(self) -> None:
        if self._ui is None:
            return
        width, height = self.display_size
        face = Image.fromarray(self._template).resize((width, height), Image.Resampling.LANCZOS)
        with self._hold():  # RGBA travels as PNG (lossless); RGB would be sent as JPEG
            self._ui["canvas"][0].put_image_data(np.asarray(face.convert("RGBA"), dtype=np.uint8), 0, 0)

    def _draw_cursor(self, x: float | None, y: float | None) -> None:
        if self._ui is None:
            return
        layer = self._ui["canvas"][2]
        with self._hold():
            layer.clear()
            if x is not None and y is not None:
                layer.line_width = 1.5
                layer.stroke_style = "#ffffff" if self._mode == "brush" else "#ff5050"
                layer.stroke_circle(x, y, max(self._brush / 2.0, _MIN_RADIUS) * self._scale)

    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        """Batch all canvas commands of the block into one message (re-entrant)."""
        if self._ui is None or self._holding:
            yield
            return
        from ipycanvas import hold_canvas

        self._holding = True
        try:
            with hold_canvas():
                yield
        finally:
            self._holding = False

    # -- ipycanvas callbacks (display pixels) -----------------------------------------------------

    def _on_mouse_down(self, x: float, y: float) -> None:
        with self._hold():
            self.press(x, y)
            self._draw_cursor(x, y)

    def _on_mouse_move(self, x: float, y: float) -> None:
        # ipycanvas reports no button state: a move is a drag only between down and up/out
        with self._hold():
            self.drag(x, y)
            self._draw_cursor(x, y)

    def _on_mouse_up(self, x: float, y: float) -> None:
        with self._hold():
            self.drag(x, y)
            self.release()

    def _on_mouse_out(self, x: float, y: float) -> None:
        with self._hold():
            self.release()
            self._draw_cursor(None, None)

    def _on_touch_start(self, touches: list[tuple[float, float]]) -> None:
        if touches:
            self.press(*touches[0])

    def _on_touch_move(self, touches: list[tuple[float, float]]) -> None:
        if touches:
            self.drag(*touches[0])

    def _on_touch_end(self, touches: list[tuple[float, float]]) -> None:
        self.release()

    # -- the widget ----------------------------------------------------------------------------

    @property
    def widget(self) -> Any:
        """The assembled UI (an ``ipywidgets.HBox``): canvas on the left, controls on the right.

        Raises:
            MaskEditorUnavailableError: ipycanvas or ipywidgets is not installed.
        """
        if self._ui is None:
            self._build_ui()
        return self._ui["root"]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _build_ui(self) -> None:
        try:
            import ipywidgets as w
            from ipycanvas import MultiCanvas
        except ImportError as err:
            raise MaskEditorUnavailableError(
                f"The mask editor's drawing widget needs ipycanvas and ipywidgets ({err}). Install them with "
                f"`pip install 'cocam[notebooks]'` (or `pip install ipycanvas ipywidgets`) and restart the "
                f"kernel. Without them, MaskEditor still works through press/drag/release/save."
            ) from err

        width, height = self.display_size
        canvas = MultiCanvas(3, width=width, height=height,
                             layout=w.Layout(width=f"{width}px", height=f"{height}px", flex="0 0 auto"))
        narrow = w.Layout(width="auto")
        mode = w.ToggleButtons(options=[("Brush", "brush"), ("Eraser", "eraser")], value=self._mode,
                               tooltips=["paint the region", "remove from the region"],
                               style={"button_width": "96px"})
        brush = w.FloatSlider(value=self._brush, min=1, max=_BRUSH_MAX, step=1, description="Brush size",
                              readout_format=".0f", continuous_update=False, style={"description_width": "80px"})
        opacity = w.FloatSlider(value=self._opacity, min=0.0, max=1.0, step=0.05, description="Opacity",
                                readout_format=".2f", style={"description_width": "80px"})
        undo = w.Button(description="Undo", icon="undo", layout=narrow, tooltip="undo the last step")
        redo = w.Button(description="Redo", icon="repeat", layout=narrow, tooltip="redo the undone step")
        clear = w.Button(description="Clear", icon="trash", layout=narrow, tooltip="erase everything (undoable)")
        attribute = w.Dropdown(options=list(CELEBA_ATTRIBUTES), value=self._attribute, description="Attribute",
                               style={"description_width": "80px"})
        load = w.Button(description="Load saved", icon="folder-open", layout=narrow,
                        tooltip="load <mask_dir>/<Attribute>.png (or the built-in region if none)")
        builtin = w.Button(description="Built-in", icon="magic", layout=narrow,
                           tooltip="start from cocam's built-in region of the attribute")
        save = w.Button(description="Save", icon="save", button_style="primary", layout=w.Layout(min_width="84px"),
                        tooltip="write <mask_dir>/<Attribute>.png")
        overwrite = w.Checkbox(value=False, description="overwrite existing file", indent=False)
        status = w.HTML(layout=w.Layout(width="310px", min_height="4.5em"))
        where = w.HTML(layout=w.Layout(width="310px"))

        controls = w.VBox(
            [
                w.HTML("<b>Paint where the evidence is</b>"),
                attribute,
                mode,
                brush,
                opacity,
                w.HBox([undo, redo, clear]),
                w.HBox([load, builtin]),
                w.HBox([save, overwrite]),
                where,
                status,
            ],
            layout=w.Layout(padding="0 0 0 12px", width="330px"),
        )
        root = w.HBox([canvas, controls], layout=w.Layout(align_items="flex-start"))
        for widget, name in ((root, "cocam-mask-editor"), (canvas, "cocam-mask-canvas"), (status, "cocam-mask-status"),
                             (save, "cocam-mask-save"), (overwrite, "cocam-mask-overwrite")):
            widget.add_class(name)  # stable hooks for styling and browser tests
        self._ui = {"root": root, "canvas": canvas, "mode": mode, "brush": brush, "opacity": opacity,
                    "attribute": attribute, "overwrite": overwrite, "status": status, "undo": undo, "redo": redo,
                    "where": where}

        canvas.on_mouse_down(self._on_mouse_down)
        canvas.on_mouse_move(self._on_mouse_move)
        canvas.on_mouse_up(self._on_mouse_up)
        canvas.on_mouse_out(self._on_mouse_out)
        canvas.on_touch_start(self._on_touch_start)
        canvas.on_touch_move(self._on_touch_move)
        canvas.on_touch_end(self._on_touch_end)
        canvas.on_touch_cancel(self._on_touch_end)
        canvas.on_client_ready(self._redraw)

        def on_value(name: str, setter):
            def handler(change: dict[str, Any]) -> None:
                if self._syncing:
                    return
                try:
                    setter(change["new"])
                except (ValueError, TypeError) as err:
                    self._set_status(str(err), error=True)
            self._ui[name].observe(handler, names="value")

        on_value("mode", self.set_mode)
        on_value("brush", self.set_brush)
        on_value("opacity", self.set_opacity)
        on_value("attribute", self.set_attribute)

        def guarded(action):
            def handler(_button: Any) -> None:
                try:
                    action()
                except FileExistsError:
                    self._set_status(f"{_short(self.mask_path)} already exists: tick 'overwrite existing file' "
                                     f"and press Save again to replace it.", error=True)
                except (OSError, ValueError) as err:
                    self._set_status(str(err), error=True)
            return handler

        def do_save() -> None:
            self.save(overwrite=overwrite.value)
            overwrite.value = False  # intent is per save

        undo.on_click(guarded(self.undo))
        redo.on_click(guarded(self.redo))
        clear.on_click(guarded(self.clear))
        load.on_click(guarded(self.load))
        builtin.on_click(guarded(self.load_default))
        save.on_click(guarded(do_save))
        self._redraw()
        self._sync_controls()
        self._set_status(self._status)

    def _redraw(self) -> None:
        self._draw_template()
        self._repaint()

    def _sync_controls(self) -> None:
        """Show programmatic changes (brush, mode, …) in the controls without feeding them back."""
        if self._ui is None:
            return
        self._syncing = True
        try:
            self._ui["mode"].value = self._mode
            self._ui["brush"].value = min(max(self._brush, self._ui["brush"].min), self._ui["brush"].max)
            self._ui["opacity"].value = self._opacity
            self._ui["attribute"].value = self._attribute
            self._ui["where"].value = (f"<div style='line-height:1.35;font-size:12px;color:#555' "
                                       f"title='{html.escape(str(self.mask_path), quote=True)}'>saves to "
                                       f"{html.escape(_short(self.mask_path))}</div>")
        finally:
            self._syncing = False
