"""Draw the region ``S`` that should explain an attribute, on the template face, in a notebook.

:class:`MaskEditor` is a small paint program for one thing: marking, on the aligned template
face, where the evidence for an attribute lies (the lips for Wearing_Lipstick, …). The result
is a :mod:`cocam.masks` mask, saved as ``<mask_dir>/<Attribute>.png`` for guided fine-tuning.

**Model and view.** Everything that is drawn, undone, switched or saved lives in a
:class:`cocam.canvas.MaskCanvas` (:attr:`MaskEditor.model`): NumPy masks in template
coordinates, one sheet per attribute with its own undo history and saved state, the brush,
and the save rules (a shipped mask is replaced by a drawing, a user's file only with
"overwrite"; see :mod:`cocam.canvas`). The editor is the view: it turns mouse positions into
template coordinates, forwards them to the model — the mouse callbacks call the same
:meth:`~MaskEditor.press` / :meth:`~MaskEditor.drag` / :meth:`~MaskEditor.release` a test or
a script can call — and repaints from the model's mask (every change repaints the touched
rectangle). Nothing is ever read back from the browser, so what is saved is exactly what the
Python side painted, however slow the connection. The controls show the model's values (the
brush slider's range and readout are the model's brush sizes), never a copy of their own.

**Coordinates.** The template is shown enlarged ``scale`` times (e.g. 3×) for comfortable
drawing. Mouse positions arrive in *display* pixels and are divided by ``scale``; a template
pixel ``(row i, column j)`` covers display pixels ``[j, j + 1) · scale × [i, i + 1) · scale``.
The brush (a round brush of :attr:`~MaskEditor.brush_size` template pixels) and the
rasterisation of strokes are described in :mod:`cocam.canvas`.

**Attributes.** Switching the attribute shows that attribute's sheet and keeps the previous
one as it is, unsaved drawing and undo history included; the status line says when the
previous one is not saved.

**Background.** What the face under the drawing is — cocam's template (the default), the
dataset's mean aligned face (:func:`cocam.backgrounds.mean_image`) or one of its images
(:func:`cocam.backgrounds.dataset_image`) — is display only (``background=`` or
:meth:`~MaskEditor.set_background`): every one is a 178×218 image in the template frame, so the
mask, its undo history and what is saved do not change when it does.

The drawing logic needs only NumPy; :attr:`MaskEditor.widget` additionally needs ``ipycanvas``
and ``ipywidgets`` (``pip install 'cocam[notebooks]'``), imported only when the widget is built.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cocam.labels import CELEBA, label_space_of
from cocam.canvas import BRUSH_MAX, BRUSH_MIN, DEFAULT_BRUSH, MIN_RADIUS, MaskCanvas, Mode, Start
from cocam.errors import CocamError
from cocam.masks import TEMPLATE_SHAPE, is_shipped_mask

__all__ = ["MEAN_FACE_IMAGES", "MaskEditor", "MaskEditorUnavailableError"]

#: How many (evenly spread) images ``background="mean"`` averages (:func:`cocam.backgrounds.mean_image`).
MEAN_FACE_IMAGES: int = 2000

#: Colour of the painted region on the canvas (RGB).
_MASK_COLOUR = (64, 230, 96)
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
        attribute: the attribute the region explains (a name of the label space; default
            ``Wearing_Lipstick`` for CelebA, else the first label); the mask is saved as
            ``<mask_dir>/<attribute>.png``.
        mask_dir: folder of the saved masks; ``None`` is :func:`cocam.masks.default_mask_dir`
            (``$COCAM_MASK_DIR``, else the project's ``data/masks``).
        scale: display magnification of the 178×218 template (``> 0``; 3 gives a 534×654
            canvas).
        brush_size: brush diameter, a whole number of template pixels
            (:data:`cocam.canvas.BRUSH_MIN` to :data:`cocam.canvas.BRUSH_MAX`).
        mode: ``"brush"`` (paint) or ``"eraser"``.
        opacity: opacity of the painted region over the face on the canvas, in ``[0, 1]``.
        max_history: how many undo steps are kept per attribute.
        start: how each attribute's drawing begins the first time it is shown: ``"empty"``,
            ``"saved"`` (its saved file if there is one, else empty) or ``"default"`` (cocam's
            built-in region, :func:`cocam.masks.default_mask`).
        template: the face to draw on (default: cocam's template face,
            :func:`cocam.synthetic.render_template`); an image, array or path, 178×218.
        background: what is shown under the drawing (see :meth:`set_background`):
            ``"template"`` (``template``), ``"mean"`` (``dataset``'s mean aligned face), an
            ``int`` (that image of ``dataset``) or a 178×218 image, array or path. Default:
            ``"mean"`` for a square view with a dataset, else ``"template"``.
        dataset: the dataset (:class:`~cocam.dataset.CelebADataset` or
            :class:`~cocam.folder.FolderDataset`) that ``"mean"`` and an index refer to; its
            ``label_space`` and ``mask_view`` are the editor's unless given.
        label_space: the names that can be drawn for (default: the dataset's, else CelebA's).
        view: ``"template"`` or ``"square"`` (a folder dataset's frame: the square the model
            sees, rows 20–197 of the template; see :mod:`cocam.canvas`). Default: the dataset's
            ``mask_view``, else ``"template"``.

    Example (no browser needed)::

        editor = MaskEditor("Wearing_Lipstick", mask_dir=tmp, scale=3)
        editor.press(240, 450); editor.drag(300, 455); editor.release()
        editor.save()
    """

    def __init__(
        self,
        attribute: str | None = None,
        *,
        mask_dir: str | os.PathLike | None = None,
        scale: float = 3.0,
        brush_size: float = DEFAULT_BRUSH,
        mode: Mode = "brush",
        opacity: float = 0.5,
        max_history: int = 50,
        start: Start = "empty",
        template: Image.Image | np.ndarray | str | os.PathLike | None = None,
        background: str | int | Image.Image | np.ndarray | os.PathLike | None = None,
        dataset: Any = None,
        label_space: Any = None,
        view: str | None = None,
    ) -> None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}.")
        self._scale = float(scale)
        if label_space is None:
            label_space = dataset.label_space if dataset is not None else CELEBA
        label_space = label_space_of(label_space)
        view = view if view is not None else getattr(dataset, "mask_view", "template")
        if attribute is None:
            attribute = "Wearing_Lipstick" if label_space == CELEBA else label_space.names[0]
        if background is None:
            background = "mean" if view == "square" and dataset is not None else "template"
        self._model = MaskCanvas(attribute, mask_dir=mask_dir, brush_size=brush_size, mode=mode,
                                 max_history=max_history, start=start, label_space=label_space, view=view)
        self._start: Start = start
        self._template = _template_rgb(template)
        self._face = self._template
        self._background: str | int = "template"
        self._dataset = dataset
        self._opacity = 0.5
        self._status = ""
        self._ui: dict[str, Any] | None = None
        self._syncing = False
        self._holding = False
        self.set_opacity(opacity)
        self._face, self._background = self._resolve_background(background, dataset)
        self._set_status(self._shown_message())

    # -- read-only state (the model's) ---------------------------------------------------------

    @property
    def model(self) -> MaskCanvas:
        """The drawing state this editor shows: a :class:`cocam.canvas.MaskCanvas`."""
        return self._model

    @property
    def mask(self) -> np.ndarray:
        """A copy of the current mask: ``(218, 178)`` bool in template coordinates."""
        return self._model.mask

    @property
    def attribute(self) -> str:
        """The attribute the region is drawn for."""
        return self._model.attribute

    @property
    def mask_dir(self) -> Path:
        """Folder where :meth:`save` writes and :meth:`load` reads."""
        return self._model.mask_dir

    @property
    def mask_path(self) -> Path:
        """``<mask_dir>/<attribute>.png``."""
        return self._model.mask_path

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
        """Brush diameter in template pixels (the model's; the slider shows this value)."""
        return self._model.brush_size

    @property
    def mode(self) -> Mode:
        """``"brush"`` or ``"eraser"``."""
        return self._model.mode

    @property
    def opacity(self) -> float:
        """Opacity of the painted region on the canvas."""
        return self._opacity

    @property
    def drawing(self) -> bool:
        """Whether a stroke is in progress (the pen is down)."""
        return self._model.drawing

    @property
    def dirty(self) -> bool:
        """Whether the current attribute's mask differs from what its file holds (see :mod:`cocam.canvas`)."""
        return self._model.dirty

    @property
    def saved_path(self) -> Path | None:
        """The file holding exactly the current mask (``None`` if it is not saved)."""
        return self._model.saved_path

    @property
    def can_undo(self) -> bool:
        return self._model.can_undo

    @property
    def can_redo(self) -> bool:
        return self._model.can_redo

    @property
    def status(self) -> str:
        """The last status message (also shown under the widget's controls)."""
        return self._status

    @property
    def area(self) -> float:
        """Fraction of the template covered by the mask."""
        return self._model.area

    @property
    def background(self) -> str | int:
        """What is shown under the drawing: ``"template"``, ``"mean"``, an image index, or ``"image"`` (given)."""
        return self._background

    @property
    def background_image(self) -> np.ndarray:
        """A copy of the face shown under the drawing: ``(218, 178, 3)`` uint8 in template coordinates."""
        return self._face.copy()

    def __repr__(self) -> str:
        return (f"MaskEditor(attribute={self.attribute!r}, mask_dir='{self.mask_dir}', "
                f"pixels={self._model.pixels}, mode={self.mode!r}, brush_size={self.brush_size:g})")

    # -- settings ----------------------------------------------------------------------------

    def set_brush(self, size: float) -> None:
        """Set the brush diameter: a whole number of template pixels (see :meth:`cocam.canvas.MaskCanvas.set_brush`)."""
        try:
            self._model.set_brush(size)
        finally:
            self._sync_controls()

    def set_mode(self, mode: Mode) -> None:
        """``"brush"`` paints the region, ``"eraser"`` removes from it."""
        try:
            self._model.set_mode(mode)
        finally:
            self._sync_controls()

    def set_opacity(self, opacity: float) -> None:
        """Opacity of the painted region over the face, in ``[0, 1]`` (display only)."""
        opacity = float(opacity)
        if not (math.isfinite(opacity) and 0.0 <= opacity <= 1.0):
            raise ValueError(f"opacity must lie in [0, 1], got {opacity:g}.")
        self._opacity = opacity
        self._sync_controls()
        self._repaint()

    def set_background(self, background: str | int | Image.Image | np.ndarray | os.PathLike = "template",
                       dataset: Any = None) -> None:
        """Show another face under the drawing; the masks, their history and files are untouched.

        Args:
            background: ``"template"`` (the editor's template face), ``"mean"`` (the mean aligned
                face of ``dataset``: :func:`cocam.backgrounds.mean_image` over
                :data:`MEAN_FACE_IMAGES` evenly spread images), an ``int`` (that image of
                ``dataset``: :func:`cocam.backgrounds.dataset_image`) or a 178×218 image, array
                or path.
            dataset: the dataset ``"mean"`` and an index refer to (default: the editor's).

        Raises:
            ValueError: ``"mean"`` or an index without a dataset, an unknown name, a wrong size.
            IndexError: an index outside the dataset.
        """
        if dataset is not None:
            self._dataset = dataset
        self._face, self._background = self._resolve_background(background, self._dataset)
        self._sync_controls()
        self._draw_template()
        self._set_status(f"Background: {self._describe_background()}. " + self._summary())

    def _resolve_background(self, background: Any, dataset: Any) -> tuple[np.ndarray, str | int]:
        """The face to show and how to name it."""
        from cocam.backgrounds import dataset_image, mean_image

        if isinstance(background, str) and background in ("template", "mean"):
            if background == "template":
                return self._template, "template"
            if dataset is None:
                raise ValueError("background='mean' needs the dataset to average: pass dataset=.")
            return mean_image(dataset, max_images=MEAN_FACE_IMAGES), "mean"
        if isinstance(background, (int, np.integer)) and not isinstance(background, bool):
            if dataset is None:
                raise ValueError(f"background={background} is an image index: pass dataset= "
                                 f"to take it from.")
            return dataset_image(dataset, int(background)), int(background)
        if isinstance(background, str) and not os.path.exists(background):
            raise ValueError(f"background must be 'template', 'mean', an image index, or a 178x218 image or path; "
                             f"got {background!r} (no such file).")
        return _template_rgb(background), "image"

    def _describe_background(self) -> str:
        b = self._background
        if b == "template":
            return "the template face"
        if b == "mean":
            return "the dataset's mean aligned face"
        if isinstance(b, int):
            return f"image {b} of the dataset ({self._dataset.names[b]})"
        return "the given image"

    def set_attribute(self, name: str) -> None:
        """Draw for another attribute (validated). The previous attribute's drawing and undo history
        are kept; the new one's are shown (created as ``start`` says the first time)."""
        previous = self._model.attribute
        try:
            self._model.set_attribute(name)
        finally:
            self._sync_controls()
        if self._model.attribute == previous:
            return
        self._show_where()
        self._repaint()
        message = self._shown_message()
        if self._model.is_dirty(previous):
            message += f" {previous} is not saved: switch back to it and press Save to keep it."
        self._set_status(message + self._others_unsaved(besides=[previous]))

    # -- drawing -----------------------------------------------------------------------------

    def to_template(self, x: float, y: float) -> tuple[float, float]:
        """Display pixels → continuous template coordinates ``(x, y)``."""
        return float(x) / self._scale, float(y) / self._scale

    def press(self, x: float, y: float) -> None:
        """Start a stroke at display position ``(x, y)`` and paint a dot there."""
        self._end_stroke()
        box = self._model.press(*self.to_template(x, y))
        if box is not None:
            self._repaint(box)

    def drag(self, x: float, y: float) -> None:
        """Continue the stroke to ``(x, y)``; without a pressed pen this does nothing."""
        box = self._model.drag(*self.to_template(x, y))
        if box is not None:
            self._repaint(box)

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
        if not self._model.clear():
            self._set_status("Nothing to clear." + self._others_unsaved())
            return
        self._repaint()
        self._set_status("Cleared (undo brings it back).")

    def set_mask(self, mask: np.ndarray) -> None:
        """Replace the mask with a ``(218, 178)`` array (non-zero = region), undoable."""
        self._end_stroke()
        self._model.set_mask(mask)
        self._repaint()
        self._set_status(self._summary())

    def undo(self) -> bool:
        """Undo the current attribute's last stroke, clear, load or replacement; ``False`` if nothing to undo."""
        self._end_stroke()
        if not self._model.undo():
            self._set_status("Nothing to undo." + self._others_unsaved())
            return False
        self._repaint()
        self._set_status("Undone. " + self._summary())
        return True

    def redo(self) -> bool:
        """Re-apply the last undone step; ``False`` if there is none."""
        self._end_stroke()
        if not self._model.redo():
            self._set_status("Nothing to redo." + self._others_unsaved())
            return False
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
        source = self._model.load(path)
        self._repaint()
        if source == "built-in":
            self._set_status(f"No saved mask of {self.attribute}: the built-in region (not saved yet). "
                             + self._summary())
        else:
            self._set_status(f"Loaded {self._describe_file(Path(source))}. " + self._summary())
        return source

    def load_default(self) -> str:
        """Start from cocam's built-in region of the attribute (undoable); returns ``"built-in"``."""
        self._end_stroke()
        self._model.load_default()
        self._repaint()
        self._set_status(f"Built-in region of {self.attribute} (not saved yet). " + self._summary())
        return "built-in"

    def save(self, overwrite: bool = False) -> Path:
        """Write the mask to ``<mask_dir>/<attribute>.png`` atomically and return the path.

        A shipped mask (cocam's built-in region in the project's ``data/masks``, see
        :mod:`cocam.canvas`) is replaced without ``overwrite``, and the status says so; any other
        existing file only with ``overwrite=True``.

        Raises:
            FileExistsError: the file exists, is not a shipped mask, and ``overwrite`` is false
                (nothing is written).
            ValueError: the mask is empty or covers the whole face (nothing is written).
        """
        self._end_stroke()
        before = self._model.file_state()
        path = self._model.save(overwrite=overwrite)
        replaced = (" It replaced the shipped mask (cocam's built-in region; 'Built-in' then Save brings it "
                    "back).") if before == "shipped" else ""
        self._show_where()
        self._set_status(f"Saved {_short(path)}. " + self._summary() + replaced)
        return path

    # -- internals: model ↔ status -------------------------------------------------------------

    def _end_stroke(self) -> None:
        if self._model.release():
            self._set_status(self._summary())

    def _describe_file(self, path: Path) -> str:
        if is_shipped_mask(path):
            return f"the shipped mask {_short(path)} (cocam's built-in region)"
        return _short(path)

    def _shown_message(self) -> str:
        """What the status says when an attribute's drawing is first shown (or shown again)."""
        model = self._model
        name = model.attribute
        if model.saved_path is not None:
            return f"Shows {self._describe_file(model.saved_path)}. " + self._own_summary()
        if model.pixels == 0 and not model.can_undo:
            return f"{name}: paint the region that shows it, then save."
        if self._start == "default" and not model.can_undo:
            return f"{name}: started from the built-in region. " + self._own_summary()
        return self._own_summary()

    def _own_summary(self) -> str:
        model = self._model
        n = model.pixels
        state = "saved" if model.saved_path is not None else "not saved"
        return f"{model.attribute}: {n} px ({100 * model.area:.1f} % of the face), {state}."

    def _summary(self) -> str:
        return self._own_summary() + self._others_unsaved()

    def _others_unsaved(self, *, besides: Sequence[str] = ()) -> str:
        """A reminder of the other attributes' unsaved drawings (empty when there are none)."""
        others = [a for a in self._model.unsaved if a != self._model.attribute and a not in besides]
        return f" Also not saved: {', '.join(others)}." if others else ""

    def _set_status(self, text: str, *, error: bool = False) -> None:
        self._status = text
        if self._ui is not None:
            colour = "#c62828" if error else "inherit"
            self._ui["status"].value = (f"<div style='line-height:1.35;overflow-wrap:anywhere;color:{colour}'>"
                                        f"{html.escape(text)}</div>")
            self._ui["undo"].disabled = not self._model.can_undo
            self._ui["redo"].disabled = not self._model.can_redo

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
        painted = self._model.mask[np.ix_(rows, cols)]
        rgba = np.zeros((y1 - y0, x1 - x0, 4), dtype=np.uint8)
        rgba[painted] = (*_MASK_COLOUR, int(round(255 * self._opacity)))
        return rgba, x0, y0

    def render(self) -> np.ndarray:
        """What the canvas shows: the background face with the mask blended in, ``(H, W, 3)`` uint8 at display size."""
        width, height = self.display_size
        face = np.asarray(Image.fromarray(self._face).resize((width, height), Image.Resampling.LANCZOS),
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
        face = Image.fromarray(self._face).resize((width, height), Image.Resampling.LANCZOS)
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
                layer.stroke_style = "#ffffff" if self.mode == "brush" else "#ff5050"
                layer.stroke_circle(x, y, max(self.brush_size / 2.0, MIN_RADIUS) * self._scale)

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
        mode = w.ToggleButtons(options=[("Brush", "brush"), ("Eraser", "eraser")], value=self.mode,
                               tooltips=["paint the region", "remove from the region"],
                               style={"button_width": "96px"})
        # the model's brush sizes are whole pixels in [BRUSH_MIN, BRUSH_MAX]: the readout is the model's value
        brush = w.FloatSlider(value=self.brush_size, min=BRUSH_MIN, max=BRUSH_MAX, step=1, description="Brush size",
                              readout_format=".0f", continuous_update=False, style={"description_width": "80px"})
        opacity = w.FloatSlider(value=self._opacity, min=0.0, max=1.0, step=0.05, description="Opacity",
                                readout_format=".2f", style={"description_width": "80px"})
        undo = w.Button(description="Undo", icon="undo", layout=narrow, tooltip="undo the last step")
        redo = w.Button(description="Redo", icon="repeat", layout=narrow, tooltip="redo the undone step")
        clear = w.Button(description="Clear", icon="trash", layout=narrow, tooltip="erase everything (undoable)")
        attribute = w.Dropdown(options=list(self._model.label_space.names), value=self.attribute, description="Attribute",
                               style={"description_width": "80px"})
        load = w.Button(description="Load saved", icon="folder-open", layout=narrow,
                        tooltip="load <mask_dir>/<Attribute>.png (or the built-in region if none)")
        builtin = w.Button(description="Built-in", icon="magic", layout=narrow, disabled=not self._model.has_builtin,
                           tooltip="start from cocam's built-in region of the attribute" if self._model.has_builtin
                           else "no built-in regions for these labels (cocam has them for CelebA's only)")
        save = w.Button(description="Save", icon="save", button_style="primary", layout=w.Layout(min_width="84px"),
                        tooltip="write <mask_dir>/<Attribute>.png")
        overwrite = w.Checkbox(value=False, description="overwrite existing file", indent=False)
        status = w.HTML(layout=w.Layout(width="310px", min_height="4.5em"))
        where = w.HTML(layout=w.Layout(width="310px"))
        shown: list[Any] = []
        if self._dataset is not None:  # the faces of the data to draw on (display only)
            background = w.Dropdown(options=[("template", "template"), ("mean face", "mean"), ("image", "index")],
                                    description="Background", style={"description_width": "80px"})
            image_index = w.BoundedIntText(value=0, min=0, max=max(len(self._dataset) - 1, 0), description="Image",
                                           style={"description_width": "80px"}, layout=w.Layout(width="200px"))
            shown = [background, image_index]

        controls = w.VBox(
            [
                w.HTML("<b>Paint where the evidence is</b>"),
                attribute,
                mode,
                brush,
                opacity,
                *shown,
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
        if shown:
            self._ui["background"], self._ui["image_index"] = shown

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
                except (ValueError, TypeError, OSError) as err:
                    self._set_status(str(err), error=True)
                    self._sync_controls()  # back to the model's value
            self._ui[name].observe(handler, names="value")

        on_value("mode", self.set_mode)
        on_value("brush", self.set_brush)
        on_value("opacity", self.set_opacity)
        on_value("attribute", self.set_attribute)
        if shown:
            on_value("background", lambda value: self.set_background(
                int(self._ui["image_index"].value) if value == "index" else value))
            on_value("image_index", lambda value: self.set_background(int(value)))

        def guarded(action):
            def handler(_button: Any) -> None:
                try:
                    action()
                except FileExistsError:
                    self._set_status(f"{_short(self.mask_path)} already exists (a mask saved earlier, not a shipped "
                                     f"one): tick 'overwrite existing file' and press Save again to replace it.",
                                     error=True)
                except (OSError, ValueError) as err:
                    self._set_status(str(err), error=True)
            return handler

        def do_save() -> None:
            wanted = overwrite.value
            overwrite.value = False  # intent is per save; untick before the status says "Saved"
            self.save(overwrite=wanted)

        undo.on_click(guarded(self.undo))
        redo.on_click(guarded(self.redo))
        clear.on_click(guarded(self.clear))
        load.on_click(guarded(self.load))
        builtin.on_click(guarded(self.load_default))
        save.on_click(guarded(do_save))
        self._redraw()
        self._sync_controls()
        self._show_where()
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
            self._ui["mode"].value = self.mode
            self._ui["brush"].value = self.brush_size
            self._ui["opacity"].value = self._opacity
            self._ui["attribute"].value = self.attribute
            if "background" in self._ui:
                b = self._background
                self._ui["background"].value = "index" if isinstance(b, int) else (b if b != "image" else None)
                if isinstance(b, int):
                    self._ui["image_index"].value = b
        finally:
            self._syncing = False

    def _show_where(self) -> None:
        """The line under the buttons: the file Save writes, and what is there now."""
        if self._ui is None:
            return
        state = self._model.file_state()
        note = {"none": "",
                "shipped": ", replacing the shipped mask (the built-in region)",
                "user": ", which exists: tick 'overwrite existing file' to replace it"}[state]
        self._ui["where"].value = (f"<div style='line-height:1.35;font-size:12px;color:#555' "
                                   f"title='{html.escape(str(self.mask_path), quote=True)}'>saves to "
                                   f"{html.escape(_short(self.mask_path))}{html.escape(note)}</div>")
