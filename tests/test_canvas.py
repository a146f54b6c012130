"""Tests for cocam.canvas.MaskCanvas: the mask editor's drawing state, without a browser or widgets.

Coordinates are template coordinates: pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
The expected pixels of the small cases are worked out by hand from the rule "a pixel is painted
when its centre lies within max(d / 2, √½) of the segment" (cocam.canvas's docstring).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cocam.attributes import UnknownAttributeError
from cocam.canvas import BRUSH_MAX, BRUSH_MIN, DEFAULT_BRUSH, MaskCanvas
from cocam.masks import TEMPLATE_SHAPE, default_mask, is_shipped_mask, load_mask, save_mask

ROOT = Path(__file__).resolve().parents[1]


def pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in np.argwhere(mask)}


def make(tmp_path, **kwargs) -> MaskCanvas:
    return MaskCanvas("Wearing_Lipstick", mask_dir=tmp_path / "masks", **kwargs)


# -- rasterisation: hand-computed small cases ---------------------------------------------------


def test_smallest_brush_paints_the_pixel_under_the_pointer(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=1)
    canvas.stroke([(10.5, 20.5)])  # the centre of pixel (20, 10): its neighbours are 1 > √½ away
    assert pixels(canvas.mask) == {(20, 10)}
    canvas.clear()
    canvas.stroke([(10.9, 20.1)])  # anywhere inside the pixel: still that pixel only
    assert pixels(canvas.mask) == {(20, 10)}


def test_a_press_on_a_pixel_corner_paints_the_four_pixels_around_it(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=1)
    canvas.stroke([(10.0, 20.0)])  # the four centres are exactly √(0.5² + 0.5²) = √½ away
    assert pixels(canvas.mask) == {(19, 9), (19, 10), (20, 9), (20, 10)}


def test_dots_of_diameter_two_and_three(tmp_path) -> None:
    plus = make(tmp_path, brush_size=2)  # r = 1: offsets with di² + dj² <= 1
    plus.stroke([(50.5, 60.5)])
    assert pixels(plus.mask) == {(60, 50), (59, 50), (61, 50), (60, 49), (60, 51)}
    square = make(tmp_path, brush_size=3)  # r = 1.5: the diagonals (2 <= 2.25) join, (±2, 0) (4) do not
    square.stroke([(50.5, 60.5)])
    assert pixels(square.mask) == {(60 + di, 50 + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)}


def test_a_segment_is_a_capsule_with_round_caps(tmp_path) -> None:
    thin = make(tmp_path, brush_size=1)
    thin.stroke([(10.5, 5.5), (14.5, 5.5)])
    assert pixels(thin.mask) == {(5, j) for j in range(10, 15)}

    thick = make(tmp_path, brush_size=2)  # r = 1: rows 4..6 along the segment, one pixel beyond each end
    thick.stroke([(10.5, 5.5), (13.5, 5.5)])
    expected = {(i, j) for i in (4, 5, 6) for j in range(10, 14)} | {(5, 9), (5, 14)}
    assert pixels(thick.mask) == expected  # (4, 9) is √2 from the end point: outside

    diagonal = make(tmp_path, brush_size=1)  # a 45° segment through pixel centres
    diagonal.stroke([(0.5, 0.5), (3.5, 3.5)])
    # (0, 1) is at distance 1/√2 = √½ from the line: exactly on the brush, so painted
    assert pixels(diagonal.mask) == {(k, k) for k in range(4)} | {(k, k + 1) for k in range(3)} | \
        {(k + 1, k) for k in range(3)}


def test_strokes_are_clipped_to_the_template(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=3)
    canvas.stroke([(-0.2, -0.2)])  # (0, 0) is 0.99 away (< 1.5); (0, 1) is √(1.7² + 0.7²) ≈ 1.84
    assert pixels(canvas.mask) == {(0, 0)}
    canvas.stroke([(1000.0, 1000.0), (1001.0, 1001.0)])  # nowhere near: no change, no undo step
    assert pixels(canvas.mask) == {(0, 0)}
    h, w = TEMPLATE_SHAPE
    canvas.stroke([(w + 0.4, h - 0.5)])  # off the right edge by 0.4 px: the last column's centre is 0.9 away
    assert (h - 1, w - 1) in pixels(canvas.mask)


def test_eraser_clears_the_same_pixels_the_brush_would_paint(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=3)
    canvas.stroke([(50.5, 60.5)])
    canvas.set_mode("eraser")
    canvas.set_brush(1)
    canvas.stroke([(50.5, 60.5)])
    assert pixels(canvas.mask) == {(60 + di, 50 + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)} - {(60, 50)}


def test_press_and_drag_report_the_box_they_changed(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=2)
    box = canvas.press(10.5, 5.5)
    i0, i1, j0, j1 = box
    before = canvas.mask
    assert pixels(before) and all(i0 <= i < i1 and j0 <= j < j1 for i, j in pixels(before))
    assert canvas.drag(10.5, 5.5) is None  # the same dot again changes nothing
    i0, i1, j0, j1 = canvas.drag(13.5, 5.5)
    changed = pixels(canvas.mask) - pixels(before)
    assert changed and all(i0 <= i < i1 and j0 <= j < j1 for i, j in changed)
    canvas.release()
    assert canvas.drag(20.0, 20.0) is None and pixels(canvas.mask) == pixels(before) | changed  # pen up


def test_rasterisation_depends_only_on_the_path(tmp_path) -> None:
    """A straight drag split into many events paints what one event does (the same capsule)."""
    one, many = make(tmp_path, brush_size=7), make(tmp_path, brush_size=7)
    one.stroke([(20.3, 30.1), (140.7, 170.4)])
    xs, ys = np.linspace(20.3, 140.7, 37), np.linspace(30.1, 170.4, 37)
    many.stroke(list(zip(xs, ys, strict=True)))
    # collinear capsules of equal radius union to the whole capsule; only pixel centres within
    # rounding of the boundary could differ, and the slack of 1e-9 px² covers the ~1e-13 of the sums
    assert np.array_equal(one.mask, many.mask)
    again = make(tmp_path, brush_size=7)
    again.stroke([(20.3, 30.1), (140.7, 170.4)])
    assert np.array_equal(one.mask, again.mask)


# -- brush -------------------------------------------------------------------------------------


def test_brush_sizes_are_whole_template_pixels_in_range(tmp_path) -> None:
    canvas = make(tmp_path)
    assert canvas.brush_size == DEFAULT_BRUSH
    canvas.set_brush(BRUSH_MIN)
    canvas.set_brush(np.int64(BRUSH_MAX))
    assert canvas.brush_size == BRUSH_MAX
    for bad in (0, BRUSH_MIN - 0.5, BRUSH_MAX + 1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"brush size must lie in"):
            canvas.set_brush(bad)
    with pytest.raises(ValueError, match=r"whole number.*use 3"):
        canvas.set_brush(2.6)
    with pytest.raises(TypeError, match="brush size"):
        canvas.set_brush("big")
    with pytest.raises(TypeError):
        canvas.set_brush(True)
    assert canvas.brush_size == BRUSH_MAX  # a refused size changes nothing
    with pytest.raises(ValueError, match="brush.*eraser"):
        canvas.set_mode("pen")
    with pytest.raises(ValueError, match="start"):
        make(tmp_path, start="nothing")
    with pytest.raises(ValueError, match="max_history"):
        make(tmp_path, max_history=0)


# -- history -------------------------------------------------------------------------------------


def test_undo_and_redo_round_trip_through_every_state(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=4)
    states = [canvas.mask]
    canvas.stroke([(30.5, 40.5), (80.5, 40.5)])
    states.append(canvas.mask)
    canvas.set_mode("eraser")
    canvas.stroke([(55.5, 30.5), (55.5, 50.5)])
    states.append(canvas.mask)
    canvas.clear()
    states.append(canvas.mask)
    canvas.set_mode("brush")
    canvas.load_default()
    states.append(canvas.mask)
    canvas.set_mask(np.eye(*TEMPLATE_SHAPE, dtype=bool))
    states.append(canvas.mask)
    assert all(not np.array_equal(a, b) for a, b in zip(states, states[1:]))  # each step changed the mask

    for expected in reversed(states[:-1]):
        assert canvas.undo() and np.array_equal(canvas.mask, expected)
    assert not canvas.undo() and not canvas.can_undo
    for expected in states[1:]:
        assert canvas.redo() and np.array_equal(canvas.mask, expected)
    assert not canvas.redo()
    canvas.undo()
    canvas.stroke([(5.5, 5.5)])  # a new edit drops the redo steps
    assert not canvas.can_redo


def test_steps_that_change_nothing_are_not_undo_steps(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=5)
    assert not canvas.clear()
    assert not canvas.stroke([])
    canvas.set_mode("eraser")
    assert not canvas.stroke([(40.5, 40.5)])
    assert not canvas.set_mask(np.zeros(TEMPLATE_SHAPE))
    assert not canvas.can_undo


def test_history_is_bounded_per_attribute(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=1, max_history=2)
    for k in range(4):
        canvas.stroke([(10.5 + k, 10.5)])
    assert [canvas.undo() for _ in range(3)] == [True, True, False]
    assert pixels(canvas.mask) == {(10, 10), (10, 11)}


# -- one sheet per attribute ---------------------------------------------------------------------


def test_each_attribute_keeps_its_drawing_history_and_unsaved_state(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=1)
    canvas.stroke([(10.5, 10.5)])
    canvas.stroke([(11.5, 10.5)])
    lips = canvas.mask
    canvas.set_attribute("High_Cheekbones")
    assert canvas.attribute == "High_Cheekbones" and not canvas.mask.any()  # start="empty"
    assert not canvas.can_undo and not canvas.undo()  # the lipstick strokes are not this sheet's
    assert canvas.unsaved == ("Wearing_Lipstick",) and not canvas.dirty
    canvas.stroke([(50.5, 50.5)])
    assert pixels(canvas.mask) == {(50, 50)}
    assert canvas.unsaved == ("Wearing_Lipstick", "High_Cheekbones")

    canvas.set_attribute("Wearing_Lipstick")  # back: the drawing and the whole history are there
    assert np.array_equal(canvas.mask, lips) and canvas.dirty
    assert canvas.undo() and pixels(canvas.mask) == {(10, 10)}
    canvas.set_attribute("High_Cheekbones")
    assert pixels(canvas.mask) == {(50, 50)}  # undo on one sheet leaves the other alone
    assert canvas.undo() and not canvas.mask.any() and not canvas.undo()
    assert canvas.redo() and pixels(canvas.mask) == {(50, 50)}

    path = canvas.save()
    assert path.name == "High_Cheekbones.png" and not canvas.dirty
    assert canvas.unsaved == ("Wearing_Lipstick",) and canvas.is_dirty("Wearing_Lipstick")
    assert not (tmp_path / "masks" / "Wearing_Lipstick.png").exists()  # saving one sheet writes only it
    assert not canvas.is_dirty("Double_Chin")  # never shown
    with pytest.raises(UnknownAttributeError):
        canvas.set_attribute("Lipstick")
    assert canvas.attribute == "High_Cheekbones"


def test_switching_ends_a_stroke_on_its_own_sheet(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=1)
    canvas.press(10.5, 10.5)
    canvas.drag(12.5, 10.5)
    canvas.set_attribute("Double_Chin")  # a lost mouse-up, then a switch
    assert not canvas.drawing and not canvas.mask.any()
    assert canvas.drag(30.5, 30.5) is None and not canvas.mask.any()
    canvas.set_attribute("Wearing_Lipstick")
    assert pixels(canvas.mask) == {(10, 10), (10, 11), (10, 12)}
    assert canvas.undo() and not canvas.mask.any()


def test_start_applies_to_each_attribute_when_first_shown(tmp_path) -> None:
    canvas = make(tmp_path, start="default")
    assert np.array_equal(canvas.mask, default_mask("Wearing_Lipstick")) and canvas.dirty  # not saved anywhere
    canvas.set_attribute("Double_Chin")
    assert np.array_equal(canvas.mask, default_mask("Double_Chin"))

    save_mask(tmp_path / "masks" / "High_Cheekbones.png", default_mask("Double_Chin"))
    saved = make(tmp_path, start="saved")
    assert not saved.mask.any() and saved.saved_path is None  # no Wearing_Lipstick.png: empty
    saved.set_attribute("High_Cheekbones")
    assert np.array_equal(saved.mask, default_mask("Double_Chin")) and not saved.dirty
    assert saved.saved_path == tmp_path / "masks" / "High_Cheekbones.png"

    (tmp_path / "masks" / "Double_Chin.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Double_Chin.png"):
        saved.set_attribute("Double_Chin")
    assert saved.attribute == "High_Cheekbones"  # an unreadable file leaves the current sheet shown


# -- files -----------------------------------------------------------------------------------------


def test_dirty_means_different_from_the_file(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=6)
    assert not canvas.dirty and canvas.saved_path is None  # an empty sheet holds nothing to lose
    canvas.stroke([(60.5, 150.5), (110.5, 150.5)])
    assert canvas.dirty
    path = canvas.save()
    assert path == tmp_path / "masks" / "Wearing_Lipstick.png" and canvas.saved_path == path
    assert np.array_equal(load_mask(path), canvas.mask)
    canvas.stroke([(60.5, 60.5)])
    assert canvas.dirty and canvas.saved_path is None
    canvas.undo()  # back to what the file holds
    assert not canvas.dirty and canvas.saved_path == path

    fresh = make(tmp_path)
    assert fresh.load() == str(path) and not fresh.dirty and fresh.saved_path == path
    assert fresh.undo() and not fresh.mask.any() and fresh.dirty  # the file is not empty
    other = save_mask(tmp_path / "other.png", default_mask("Double_Chin"))
    assert fresh.load(other) == str(other)
    assert fresh.dirty and fresh.saved_path is None  # another file's content is not this file's
    with pytest.raises(FileNotFoundError):
        fresh.load(tmp_path / "missing.png")
    empty = make(tmp_path / "elsewhere")
    assert empty.load() == "built-in" and np.array_equal(empty.mask, default_mask("Wearing_Lipstick"))


def test_a_users_file_is_replaced_only_with_overwrite(tmp_path) -> None:
    canvas = make(tmp_path, brush_size=8)
    canvas.stroke([(60.5, 150.5), (110.5, 150.5)])
    path = canvas.save()
    first = load_mask(path)
    assert canvas.file_state() == "user"
    canvas.stroke([(60.5, 60.5), (110.5, 60.5)])
    with pytest.raises(FileExistsError, match="overwrite"):
        canvas.save()
    assert np.array_equal(load_mask(path), first) and canvas.dirty
    canvas.save(overwrite=True)
    assert np.array_equal(load_mask(path), canvas.mask) and not canvas.dirty
    second = path.read_bytes()
    canvas.clear()
    with pytest.raises(ValueError, match="empty"):
        canvas.save(overwrite=True)
    assert path.read_bytes() == second and canvas.dirty  # nothing written, still unsaved


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder whose data/masks holds the shipped masks (cocam's built-in regions)."""
    monkeypatch.setenv("COCAM_PROJECT_DIR", str(tmp_path / "project"))
    for name in ("Wearing_Lipstick", "Double_Chin"):
        save_mask(tmp_path / "project" / "data" / "masks" / f"{name}.png", default_mask(name))
    return tmp_path / "project"


def test_the_first_save_replaces_a_shipped_mask_and_never_a_users(project) -> None:
    masks = project / "data" / "masks"
    canvas = MaskCanvas("Wearing_Lipstick", mask_dir=masks, brush_size=6, start="saved")
    assert np.array_equal(canvas.mask, default_mask("Wearing_Lipstick")) and not canvas.dirty
    assert canvas.file_state() == "shipped" and canvas.file_state("High_Cheekbones") == "none"
    canvas.clear()
    canvas.stroke([(70.5, 150.5), (105.5, 150.5)])
    path = canvas.save()  # no overwrite needed: the shipped mask is not user data
    assert np.array_equal(load_mask(path), canvas.mask) and not canvas.dirty
    assert canvas.file_state() == "user"  # from now on it is the user's drawing
    canvas.stroke([(70.5, 160.5), (105.5, 160.5)])
    with pytest.raises(FileExistsError):
        canvas.save()
    assert not np.array_equal(load_mask(path), canvas.mask)

    canvas.load_default()  # the built-in region, saved back: the file is a shipped mask again
    canvas.save(overwrite=True)
    assert is_shipped_mask(path) and canvas.file_state() == "shipped"

    other = MaskCanvas("Wearing_Lipstick", mask_dir=project / "mine", brush_size=6)
    save_mask(project / "mine" / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))
    other.stroke([(70.5, 150.5)])
    assert other.file_state() == "user"  # the same pixels outside data/masks: someone's file
    with pytest.raises(FileExistsError):
        other.save()


def test_the_model_imports_without_the_widget_libraries() -> None:
    code = ("import sys\n"
            "sys.modules['ipywidgets'] = None; sys.modules['ipycanvas'] = None\n"
            "import numpy as np\n"
            "import cocam.canvas, cocam.widget\n"
            "c = cocam.canvas.MaskCanvas(mask_dir='unused', brush_size=1)\n"
            "c.stroke([(3.5, 4.5)])\n"
            "print(np.argwhere(c.mask).tolist())\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[4, 3]]"
