"""Tests for cocam.widget.MaskEditor: the drawing logic, files, and the ipycanvas wiring (no browser)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from PIL import Image

from cocam.attributes import UnknownAttributeError
from cocam.canvas import BRUSH_MAX, BRUSH_MIN, DEFAULT_BRUSH
from cocam.masks import TEMPLATE_SHAPE, default_mask, load_mask, save_mask
from cocam.widget import MaskEditor, MaskEditorUnavailableError

S = 3  # display pixels per template pixel in most tests


def make(tmp_path, **kwargs) -> MaskEditor:
    kwargs.setdefault("scale", S)
    return MaskEditor("Wearing_Lipstick", mask_dir=tmp_path / "masks", **kwargs)


def centre(col: float, row: float, scale: float = S) -> tuple[float, float]:
    """Display coordinates of the centre of template pixel (row, col)."""
    return (col + 0.5) * scale, (row + 0.5) * scale


def disc(row: float, col: float, radius: float) -> np.ndarray:
    """Pixels whose centres lie within ``radius`` of template point (col + .5, row + .5)."""
    yy, xx = np.mgrid[: TEMPLATE_SHAPE[0], : TEMPLATE_SHAPE[1]]
    return (yy - row) ** 2 + (xx - col) ** 2 <= radius**2 + 1e-9


# -- painting ---------------------------------------------------------------------------------


def test_starts_empty_with_template_shape(tmp_path) -> None:
    editor = make(tmp_path)
    assert editor.mask.shape == TEMPLATE_SHAPE and editor.mask.dtype == bool
    assert not editor.mask.any()
    assert editor.display_size == (178 * S, 218 * S)
    assert editor.mask_path == tmp_path / "masks" / "Wearing_Lipstick.png"


def test_scale_conversion_paints_the_template_pixel_under_the_pointer(tmp_path) -> None:
    editor = make(tmp_path, brush_size=1)
    editor.press(50 * S + 1, 100 * S + 1)  # inside template pixel (row 100, col 50)
    editor.release()
    assert np.argwhere(editor.mask).tolist() == [[100, 50]]

    other = MaskEditor("Wearing_Lipstick", mask_dir=tmp_path, scale=2.5, brush_size=1)
    other.press(*centre(20, 30, 2.5))
    other.release()
    assert np.argwhere(other.mask).tolist() == [[30, 20]]


def test_brush_size_is_a_diameter_in_template_pixels(tmp_path) -> None:
    for size in (4, 10, 21):
        editor = make(tmp_path, brush_size=size)
        editor.press(*centre(80, 120))
        editor.release()
        assert np.array_equal(editor.mask, disc(120, 80, size / 2)), size
    small, big = make(tmp_path, brush_size=4), make(tmp_path, brush_size=12)
    for e in (small, big):
        e.stroke([centre(60, 100), centre(100, 110)])
    assert (big.mask >= small.mask).all() and big.mask.sum() > small.mask.sum()


def test_the_mask_is_a_copy(tmp_path) -> None:
    editor = make(tmp_path)
    editor.mask[:] = True
    assert not editor.mask.any()


def test_a_fast_drag_leaves_no_gaps(tmp_path) -> None:
    editor = make(tmp_path, brush_size=3)
    editor.press(*centre(10, 100))
    editor.drag(*centre(160, 100))  # one mouse event across most of the face
    editor.release()
    assert editor.mask[100, 10:161].all()
    assert not editor.mask[100, :8].any() and not editor.mask[100, 163:].any()

    diagonal = make(tmp_path, brush_size=1)
    diagonal.stroke([centre(20, 20), centre(150, 190)])
    rows = np.flatnonzero(diagonal.mask.any(axis=1))
    cols = np.flatnonzero(diagonal.mask.any(axis=0))
    assert rows.min() == 20 and rows.max() == 190 and len(rows) == 171  # every row touched
    assert cols.min() == 20 and cols.max() == 150 and len(cols) == 131  # every column touched


def test_thick_stroke_is_the_union_of_discs_along_the_path(tmp_path) -> None:
    editor = make(tmp_path, brush_size=8)
    points = [(40, 60), (90, 70), (120, 150)]
    editor.stroke([centre(c, r) for c, r in points])
    expected = np.zeros(TEMPLATE_SHAPE, dtype=bool)
    for (c0, r0), (c1, r1) in zip(points[:-1], points[1:], strict=True):
        for t in np.linspace(0, 1, 400):
            expected |= disc(r0 + t * (r1 - r0), c0 + t * (c1 - c0), 4)
    # densely sampled discs approximate the capsule from inside: equal up to sampling
    assert (editor.mask >= expected).all()
    assert (editor.mask & ~expected).sum() <= 0.01 * expected.sum()


def test_strokes_outside_the_canvas_are_clipped(tmp_path) -> None:
    editor = make(tmp_path, brush_size=6)
    editor.stroke([(-50, -50), (-10, 20 * S)])
    editor.stroke([(10_000, 10_000), (10_001, 10_001)])
    editor.stroke([(-5, 100 * S), (3 * S, 100 * S)])
    assert editor.mask[97:104, 0:3].any()
    assert editor.mask.sum() < 60


def test_eraser_removes_only_where_it_passes(tmp_path) -> None:
    editor = make(tmp_path, brush_size=20)
    editor.stroke([centre(40, 100), centre(140, 100)])
    painted = editor.mask
    editor.set_mode("eraser")
    editor.set_brush(4)
    editor.stroke([centre(90, 80), centre(90, 120)])
    after = editor.mask
    assert not after[95:106, 89:92].any()
    assert np.array_equal(after[:, :80], painted[:, :80]) and np.array_equal(after[:, 100:], painted[:, 100:])
    assert (after <= painted).all()
    editor.set_mode("brush")
    editor.stroke([centre(90, 100), centre(90, 101)])
    assert editor.mask[100, 90]


def test_drag_without_press_only_hovers(tmp_path) -> None:
    editor = make(tmp_path)
    editor.drag(*centre(80, 80))
    editor.release()
    assert not editor.mask.any() and not editor.can_undo


# -- history ------------------------------------------------------------------------------------


def test_undo_and_redo_are_per_stroke(tmp_path) -> None:
    editor = make(tmp_path, brush_size=6)
    editor.stroke([centre(30, 60), centre(60, 60), centre(90, 60)])
    first = editor.mask
    editor.stroke([centre(30, 150), centre(90, 150)])
    second = editor.mask
    assert editor.undo() and np.array_equal(editor.mask, first)
    assert editor.undo() and not editor.mask.any()
    assert not editor.undo()
    assert editor.redo() and np.array_equal(editor.mask, first)
    assert editor.redo() and np.array_equal(editor.mask, second)
    assert not editor.redo()
    editor.undo()
    editor.stroke([centre(120, 120), centre(121, 121)])  # a new edit drops the redo steps
    assert not editor.can_redo


def test_clear_is_undoable(tmp_path) -> None:
    editor = make(tmp_path, brush_size=9)
    editor.stroke([centre(50, 50), centre(100, 100)])
    before = editor.mask
    editor.clear()
    assert not editor.mask.any()
    editor.undo()
    assert np.array_equal(editor.mask, before)
    editor.redo()
    assert not editor.mask.any()


def test_history_is_bounded(tmp_path) -> None:
    editor = make(tmp_path, brush_size=2, max_history=3)
    for k in range(6):
        editor.stroke([centre(20 + 20 * k, 50), centre(20 + 20 * k, 60)])
    assert [editor.undo() for _ in range(4)] == [True, True, True, False]
    assert editor.mask[50, [20, 40, 60]].all() and not editor.mask[50, [80, 100, 120]].any()


def test_a_stroke_that_changes_nothing_is_not_an_undo_step(tmp_path) -> None:
    editor = make(tmp_path, brush_size=10)
    editor.stroke([centre(80, 80)])
    editor.stroke([centre(80, 80)])  # paints the same pixels again
    editor.set_mode("eraser")
    editor.stroke([centre(10, 200)])  # erases nothing
    editor.undo()
    assert not editor.mask.any() and not editor.can_undo


def test_mouse_out_ends_the_stroke(tmp_path) -> None:
    editor = make(tmp_path, brush_size=4)
    editor._on_mouse_down(*centre(40, 40))
    editor._on_mouse_move(*centre(60, 40))
    editor._on_mouse_out(*centre(60, 40))
    assert not editor.drawing
    # the button may be released outside: coming back must not keep painting
    editor._on_mouse_move(*centre(60, 120))
    editor._on_mouse_move(*centre(100, 120))
    assert editor.mask[40, 40:61].all()
    assert not editor.mask[110:, :].any()
    assert editor.undo() and not editor.mask.any()


def test_press_while_drawing_starts_a_new_stroke(tmp_path) -> None:
    editor = make(tmp_path, brush_size=4)
    editor.press(*centre(30, 30))
    editor.drag(*centre(50, 30))
    editor.press(*centre(30, 100))  # a lost mouse-up
    editor.drag(*centre(50, 100))
    editor.release()
    assert not editor.mask[60:90].any()  # no line joining the two strokes
    editor.undo()
    assert editor.mask[30, 30:51].all() and not editor.mask[100].any()


# -- settings -----------------------------------------------------------------------------------


def test_settings_are_validated(tmp_path) -> None:
    editor = make(tmp_path)
    for bad in (0, -3, float("nan"), 1000):
        with pytest.raises(ValueError, match="brush size"):
            editor.set_brush(bad)
    with pytest.raises(TypeError):
        editor.set_brush("big")
    with pytest.raises(ValueError, match="brush.*eraser"):
        editor.set_mode("pen")
    for bad in (-0.1, 1.5, float("inf")):
        with pytest.raises(ValueError, match="opacity"):
            editor.set_opacity(bad)
    editor.set_opacity(0.2)
    assert editor.opacity == 0.2
    with pytest.raises(ValueError, match="scale"):
        MaskEditor(scale=0)
    with pytest.raises(ValueError, match="start"):
        MaskEditor(start="nothing")


def test_attribute_names_are_validated(tmp_path) -> None:
    with pytest.raises(UnknownAttributeError, match="Wearing_Lipstick"):
        MaskEditor("Lipstick", mask_dir=tmp_path)
    editor = make(tmp_path)
    with pytest.raises(UnknownAttributeError, match="High_Cheekbones"):
        editor.set_attribute("high cheekbones")
    assert editor.attribute == "Wearing_Lipstick"
    editor.stroke([centre(80, 150), centre(100, 150)])
    drawn = editor.mask
    editor.set_attribute("High_Cheekbones")
    assert editor.attribute == "High_Cheekbones"
    assert editor.mask_path.name == "High_Cheekbones.png"
    assert not editor.mask.any()  # start="empty": a fresh canvas for the new attribute
    assert "Wearing_Lipstick is not saved" in editor.status  # the view says the previous drawing is unsaved
    assert not editor.undo()  # ...with its own history: the other attribute's stroke is not undone here
    assert "not saved: Wearing_Lipstick" in editor.status  # and keeps saying so
    editor.set_attribute("Wearing_Lipstick")  # switching back: the drawing and its history are kept
    assert np.array_equal(editor.mask, drawn) and editor.dirty
    assert editor.undo() and not editor.mask.any()


# -- files ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path) -> None:
    editor = make(tmp_path, brush_size=12)
    editor.stroke([centre(60, 150), centre(118, 150)])
    assert editor.dirty and editor.saved_path is None
    path = editor.save()
    assert path == tmp_path / "masks" / "Wearing_Lipstick.png" and path.is_file()
    assert not editor.dirty and editor.saved_path == path
    assert np.array_equal(load_mask(path), editor.mask)
    with Image.open(path) as img:
        assert img.size == (178, 218) and img.mode == "L"

    fresh = make(tmp_path)
    assert fresh.load() == str(path)
    assert np.array_equal(fresh.mask, editor.mask) and not fresh.dirty
    assert np.array_equal(make(tmp_path, start="saved").mask, editor.mask)
    assert fresh.undo() and not fresh.mask.any()  # loading is undoable


def test_load_falls_back_to_the_built_in_region(tmp_path) -> None:
    editor = make(tmp_path)
    assert editor.load() == "built-in"
    assert np.array_equal(editor.mask, default_mask("Wearing_Lipstick"))
    assert editor.dirty  # not saved anywhere yet
    assert np.array_equal(make(tmp_path, start="default").mask, default_mask("Wearing_Lipstick"))
    assert not make(tmp_path, start="saved").mask.any()  # no file: empty
    with pytest.raises(FileNotFoundError):
        editor.load(tmp_path / "missing.png")
    other = save_mask(tmp_path / "other.png", default_mask("Double_Chin"))
    editor.load(other)
    assert np.array_equal(editor.mask, default_mask("Double_Chin")) and editor.dirty


def test_save_refuses_to_overwrite_without_intent(tmp_path) -> None:
    editor = make(tmp_path, brush_size=10)
    editor.stroke([centre(60, 150), centre(110, 150)])
    path = editor.save()
    first = load_mask(path)
    editor.stroke([centre(60, 60), centre(110, 60)])
    with pytest.raises(FileExistsError, match="overwrite"):
        editor.save()
    assert np.array_equal(load_mask(path), first)
    assert editor.dirty
    editor.save(overwrite=True)
    assert np.array_equal(load_mask(path), editor.mask)


def test_empty_mask_is_not_saved(tmp_path) -> None:
    editor = make(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        editor.save()
    assert not editor.mask_path.exists()


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    editor = make(tmp_path, brush_size=10)
    editor.stroke([centre(60, 150), centre(110, 150)])
    path = editor.save()
    original = path.read_bytes()
    editor.stroke([centre(60, 60), centre(110, 60)])

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        editor.save(overwrite=True)
    assert path.read_bytes() == original  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["Wearing_Lipstick.png"]  # no temporary left
    editor.set_attribute("Double_Chin")
    editor.stroke([centre(60, 190), centre(110, 190)])
    with pytest.raises(OSError):
        editor.save()
    assert not (path.parent / "Double_Chin.png").exists()
    assert editor.dirty


# -- display ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3, 2.5, 1])
def test_display_shows_exactly_the_mask(tmp_path, scale) -> None:
    editor = MaskEditor(mask_dir=tmp_path, scale=scale, brush_size=7, opacity=1.0)
    editor.stroke([centre(30, 40, scale), centre(150, 180, scale)])
    rgba, x0, y0 = editor._rgba(0, 218, 0, 178)
    width, height = editor.display_size
    assert (x0, y0) == (0, 0) and rgba.shape == (height, width, 4)
    yy, xx = np.mgrid[:height, :width]
    expected = editor.mask[np.floor(yy / scale + 1e-9).astype(int), np.floor(xx / scale + 1e-9).astype(int)]
    assert np.array_equal(rgba[..., 3] > 0, expected)
    shown = editor.render()
    assert shown.shape == (height, width, 3)


# -- the ipycanvas wiring --------------------------------------------------------------------


def frontend(editor: MaskEditor, event: str, x: float, y: float) -> None:
    """Deliver a mouse event the way ipycanvas does when the browser sends one."""
    canvas = editor.widget.children[0]
    canvas[-1]._handle_frontend_event(None, {"event": event, "x": x, "y": y}, [])


def test_canvas_events_update_the_numpy_mask(tmp_path) -> None:
    pytest.importorskip("ipycanvas")
    pytest.importorskip("ipywidgets")
    editor = make(tmp_path, brush_size=5)
    reference = make(tmp_path, brush_size=5)
    points = [centre(40, 140), centre(70, 150), centre(120, 145)]
    frontend(editor, "mouse_move", *centre(10, 10))  # hovering paints nothing
    frontend(editor, "mouse_down", *points[0])
    for p in points[1:]:
        frontend(editor, "mouse_move", *p)
    frontend(editor, "mouse_up", *points[-1])
    frontend(editor, "mouse_move", *centre(10, 200))
    reference.stroke(points)
    assert editor.mask.any() and np.array_equal(editor.mask, reference.mask)

    frontend(editor, "mouse_down", *centre(20, 20))
    frontend(editor, "mouse_move", *centre(30, 20))
    frontend(editor, "mouse_out", *centre(30, 20))
    frontend(editor, "mouse_move", *centre(60, 20))
    assert editor.mask[20, 20:31].all() and not editor.mask[20, 35:].any()


def test_callbacks_work_without_the_widget(tmp_path) -> None:
    editor = make(tmp_path, brush_size=5)
    editor._on_mouse_down(*centre(40, 40))
    editor._on_mouse_move(*centre(80, 40))
    editor._on_mouse_up(*centre(80, 40))
    assert editor.mask[40, 40:81].all() and not editor.drawing
    editor._on_touch_start([centre(40, 100)])
    editor._on_touch_move([centre(80, 100)])
    editor._on_touch_end([])
    assert editor.mask[100, 40:81].all()


def test_widget_controls_drive_the_editor(tmp_path) -> None:
    pytest.importorskip("ipycanvas")
    w = pytest.importorskip("ipywidgets")
    editor = make(tmp_path, brush_size=10)
    ui = editor.widget
    assert isinstance(ui, w.HBox)
    assert editor.widget is ui  # built once
    controls = {type(c).__name__ + ":" + getattr(c, "description", ""): c
                for c in _walk(ui) if isinstance(c, w.Widget)}
    controls["FloatSlider:Brush size"].value = 4
    assert editor.brush_size == 4
    editor.set_brush(7)
    assert controls["FloatSlider:Brush size"].value == 7
    controls["ToggleButtons:"].value = "eraser"
    assert editor.mode == "eraser"
    controls["ToggleButtons:"].value = "brush"
    controls["FloatSlider:Opacity"].value = 0.3
    assert editor.opacity == pytest.approx(0.3)

    status = editor._ui["status"]
    controls["Button:Save"].click()  # empty mask
    assert "empty" in status.value and not editor.mask_path.exists()
    editor.stroke([centre(60, 150), centre(110, 150)])
    controls["Button:Save"].click()
    assert editor.mask_path.is_file()
    saved = load_mask(editor.mask_path)
    controls["Button:Clear"].click()
    editor.stroke([centre(60, 60), centre(110, 60)])
    controls["Button:Save"].click()  # exists: asks for the checkbox
    assert "already exists" in status.value and np.array_equal(load_mask(editor.mask_path), saved)
    controls["Checkbox:overwrite existing file"].value = True
    controls["Button:Save"].click()
    assert np.array_equal(load_mask(editor.mask_path), editor.mask)
    assert controls["Checkbox:overwrite existing file"].value is False  # intent is per save

    controls["Button:Undo"].click()
    assert not editor.mask[60].any()
    controls["Button:Redo"].click()
    assert editor.mask[60, 60:111].all()
    controls["Dropdown:Attribute"].value = "Double_Chin"
    assert editor.attribute == "Double_Chin" and "Double_Chin.png" in editor._ui["where"].value
    controls["Button:Built-in"].click()
    assert np.array_equal(editor.mask, default_mask("Double_Chin"))
    controls["Button:Load saved"].click()  # no Double_Chin.png: the built-in region again
    assert np.array_equal(editor.mask, default_mask("Double_Chin"))


def test_the_brush_slider_shows_the_models_brush(tmp_path) -> None:
    pytest.importorskip("ipycanvas")
    w = pytest.importorskip("ipywidgets")
    editor = make(tmp_path, brush_size=10)
    slider = next(c for c in _walk(editor.widget) if isinstance(c, w.FloatSlider) and c.description == "Brush size")
    assert (slider.min, slider.max, slider.value) == (BRUSH_MIN, BRUSH_MAX, editor.brush_size) == (1, 40, 10)
    editor.set_brush(BRUSH_MIN)  # the smallest brush the model takes is the slider's smallest: no clamping
    assert slider.value == editor.brush_size == BRUSH_MIN
    slider.value = 2.5  # a size the model refuses: the slider goes back to the model's
    assert editor.brush_size == BRUSH_MIN and slider.value == BRUSH_MIN and "whole number" in editor.status
    with pytest.raises(ValueError):
        editor.set_brush(0.5)
    assert slider.value == editor.brush_size == BRUSH_MIN
    assert MaskEditor(mask_dir=tmp_path).brush_size == DEFAULT_BRUSH


def test_switching_attributes_in_the_widget_keeps_each_drawing(tmp_path) -> None:
    pytest.importorskip("ipycanvas")
    w = pytest.importorskip("ipywidgets")
    editor = make(tmp_path, brush_size=6)
    dropdown = next(c for c in _walk(editor.widget) if isinstance(c, w.Dropdown))
    editor.stroke([centre(60, 150), centre(110, 150)])
    lips = editor.mask
    dropdown.value = "Double_Chin"
    assert "Wearing_Lipstick is not saved" in editor.status
    assert not editor.mask.any() and editor._ui["undo"].disabled  # the new sheet has nothing to undo
    editor.stroke([centre(70, 190), centre(100, 190)])
    dropdown.value = "Wearing_Lipstick"
    assert np.array_equal(editor.mask, lips) and "Double_Chin is not saved" in editor.status
    rgba, _, _ = editor._rgba(0, 218, 0, 178)  # the canvas shows this attribute's drawing again
    assert np.array_equal(rgba[::S, ::S, 3] > 0, lips)
    editor.save()
    assert "Also not saved: Double_Chin" in editor.status


def test_saving_over_a_shipped_mask_needs_no_tick_and_says_so(tmp_path, monkeypatch) -> None:
    pytest.importorskip("ipycanvas")
    w = pytest.importorskip("ipywidgets")
    monkeypatch.setenv("COCAM_PROJECT_DIR", str(tmp_path))
    masks = tmp_path / "data" / "masks"
    save_mask(masks / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))  # as shipped
    editor = MaskEditor("Wearing_Lipstick", mask_dir=masks, scale=S, brush_size=6, start="saved")
    assert "shipped mask" in editor.status and "built-in region" in editor.status and not editor.dirty
    controls = {type(c).__name__ + ":" + getattr(c, "description", ""): c
                for c in _walk(editor.widget) if isinstance(c, w.Widget)}
    assert "replacing the shipped mask" in editor._ui["where"].value
    controls["Button:Clear"].click()
    editor.stroke([centre(70, 150), centre(105, 150)])
    controls["Button:Save"].click()  # no tick: the shipped mask is cocam's, not the user's
    assert np.array_equal(load_mask(masks / "Wearing_Lipstick.png"), editor.mask)
    assert "replaced the shipped mask" in editor.status and "Built-in" in editor.status
    assert "which exists" in editor._ui["where"].value  # now the user's file
    editor.stroke([centre(70, 160), centre(105, 160)])
    controls["Button:Save"].click()
    assert "already exists" in editor.status  # the user's drawing is not replaced without the tick
    assert not np.array_equal(load_mask(masks / "Wearing_Lipstick.png"), editor.mask)


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def test_missing_ipycanvas_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ipycanvas", None)  # makes `import ipycanvas` fail
    editor = make(tmp_path, brush_size=6)
    with pytest.raises(MaskEditorUnavailableError, match=r"cocam\[notebooks\]"):
        _ = editor.widget
    with pytest.raises(ImportError):
        _ = editor.widget
    editor.stroke([centre(60, 150), centre(110, 150)])  # drawing and saving still work
    assert load_mask(editor.save()).sum() == editor.mask.sum() > 0


def test_template_can_be_given(tmp_path) -> None:
    face = np.full((218, 178, 3), 200, dtype=np.uint8)
    editor = MaskEditor(mask_dir=tmp_path, scale=1, template=face, opacity=1.0)
    editor.stroke([(10.5, 10.5)])
    shown = editor.render()
    assert tuple(shown[100, 100]) == (200, 200, 200) and tuple(shown[10, 10]) != (200, 200, 200)
    with pytest.raises(ValueError, match="178x218"):
        MaskEditor(template=np.zeros((100, 100, 3), dtype=np.uint8))
    assert math.isclose(editor.area, editor.mask.mean())
