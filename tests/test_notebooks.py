"""The notebooks: committed clean, and runnable top to bottom headless in smoke mode.

Plus the helpers of :mod:`cocam.notebook` they rely on (settings, workspace, verdict, figures).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cocam.notebook as nb
from cocam.masks import default_mask, load_mask

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _nbformat():
    return pytest.importorskip("nbformat", reason="nbformat is not installed (pip install 'cocam[notebooks]')")


def test_the_four_notebooks_exist() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_discover_bias.ipynb", "02_draw_region.ipynb", "03_fine_tune.ipynb", "04_evaluate.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nbformat = _nbformat()
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in notebook.metadata, "strip the saved widget state"
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"
        assert "execution" not in cell.metadata, f"cell {i} carries execution timing metadata"
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill)"
    params = tagged[0].source
    for name in ("DATA_ROOT", "RUN_DIR", "SMOKE"):
        assert f"{name} =" in params
    code = [c for c in notebook.cells if c.cell_type == "code"]
    markdown = [c for c in notebook.cells if c.cell_type == "markdown"]
    assert len(markdown) >= len(code) // 2, "tell the story: explain what the user sees"
    assert all(len(c.source.splitlines()) <= 12 for c in code), "keep code cells thin: call the library"


# -- running them ---------------------------------------------------------------------------------


def _execute(path: Path, project: Path):
    from nbclient import NotebookClient

    notebook = _nbformat().read(path, as_version=4)
    env = dict(os.environ, COCAM_SMOKE="1", COCAM_PROJECT_DIR=str(project), MPLBACKEND="agg",
               PYTHONWARNINGS="ignore")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(project / "notebooks")}})
    client.execute(env=env)
    return notebook


def _text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch copy of the project folder: the runs never write into the repository."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("ipycanvas")
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    (root / "pyproject.toml").write_text("# marks the project folder for cocam.notebook.project_dir\n")
    return root


def test_notebooks_run_headless_in_smoke_mode(project: Path) -> None:
    """All four, in one scratch project: 1 and 2, then 4 *before* 3.

    Notebook 4 thus finds only the baseline and the drawing and must train the guided run and
    the control itself (each notebook is self-sufficient); notebook 3 then resumes those runs.
    """
    runs = project / "runs" / "notebooks" / "smoke"
    order = ["01_discover_bias.ipynb", "02_draw_region.ipynb", "04_evaluate.ipynb", "03_fine_tune.ipynb"]
    assert sorted(order) == [p.name for p in NOTEBOOKS]
    ran = {}

    ran["01"] = _execute(ROOT / "notebooks" / order[0], project)
    assert (runs / "baseline" / "best.pt").is_file()
    assert _images(ran["01"]) >= 5  # heatmap, live curves, two Grad-CAM grids, the bias evidence
    assert "SMOKE" in _text(ran["01"])
    assert "bias_score" in _text(ran["01"])  # the model-side bias ranking

    ran["02"] = _execute(ROOT / "notebooks" / order[1], project)
    mask_path = runs / "masks" / "Wearing_Lipstick.png"
    assert mask_path.is_file(), "notebook 2 saves the drawing (into the run folder in smoke mode)"
    drawn = load_mask(mask_path)
    lips = default_mask("Wearing_Lipstick")
    assert (drawn & lips).sum() >= 0.95 * lips.sum()  # painted stroke by stroke, covering the lips
    assert not (project / "data" / "masks").exists()  # the shipped masks are never touched
    assert _images(ran["02"]) >= 1
    assert "landmarks" in _text(ran["02"]) and "soft_iou" in _text(ran["02"])  # template vs landmark transfer

    assert not list(runs.glob("guided-*"))
    ran["04"] = _execute(ROOT / "notebooks" / order[2], project)
    guided = list(runs.glob("guided-*/last.pt"))
    assert len(guided) == 1 and (runs / "control" / "last.pt").is_file()
    results = pd.read_csv(runs / "results.csv")
    assert set(results["model"]) == {nb.BASELINE, nb.CONTROL, nb.GUIDED}
    assert "Wearing_Lipstick: on the" in _text(ran["04"])  # the verdict
    assert "Notebook 3 has not trained a guided run" in _text(ran["04"])  # its defaults, said so
    assert f"not in the workspace yet, training it now: {nb.GUIDED}" in _text(ran["04"])
    assert not (runs / nb.GUIDANCE_RECORD).exists()  # only notebook 3 records the guided run
    assert _images(ran["04"]) >= 1
    assert "gain vs control" in _text(ran["04"])  # the method comparison ...
    summary = pd.read_csv(runs / "compare" / "summary.csv")
    assert {"valid", "test"} <= set(summary.split) and summary.setting.nunique() == 11  # 5 methods + 2 references + 4 controls and peers
    assert (runs / "paper" / "protocol.csv").is_file()  # ... and the paper's protocol
    assert "92.9" in _text(ran["04"])  # printed next to the paper's numbers

    stamp = guided[0].stat().st_mtime_ns
    ran["03"] = _execute(ROOT / "notebooks" / order[3], project)
    assert list(runs.glob("guided-*/last.pt")) == guided  # same drawing: the same run, resumed
    assert guided[0].stat().st_mtime_ns == stamp  # finished already: reloaded, not retrained
    import json

    assert json.loads((runs / nb.GUIDANCE_RECORD).read_text())["run"] == guided[0].parent.name  # for notebook 4
    assert _images(ran["03"]) >= 3


# -- the helpers ------------------------------------------------------------------------------------


def test_smoke_mode_reads_the_environment(monkeypatch) -> None:
    for value, expected in (("1", True), ("true", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(nb.SMOKE_ENV, value)
        assert nb.smoke_mode() is expected
    monkeypatch.delenv(nb.SMOKE_ENV)
    assert nb.smoke_mode() is False
    assert nb.default_settings().smoke is False


def test_default_settings() -> None:
    real, smoke = nb.default_settings(False), nb.default_settings(True)
    assert (real.preset, real.image_size, real.hidden) == ("default", 112, 512)
    assert (real.epochs, real.finetune_epochs) == (10, 2)
    assert (smoke.preset, smoke.image_size, smoke.hidden, smoke.epochs) == ("smoke", 64, 32, 1)
    config = smoke.finetune_config(n_train=96)
    assert config.max_steps == 3 and config.patience is None and config.lr == smoke.finetune_lr
    assert real.train_config().patience == 3 and real.spec().image_size == 112


def test_require_explains_what_to_do() -> None:
    nb.require(True, "unused")
    with pytest.raises(nb.NotebookOrderError, match="draw a mask first"):
        nb.require(np.zeros(3, bool).any(), "draw a mask first (run the cell above)")


def test_project_dir(tmp_path, monkeypatch) -> None:
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.delenv("COCAM_PROJECT_DIR", raising=False)
    monkeypatch.chdir(tmp_path / "notebooks")
    assert nb.project_dir() == tmp_path.resolve()
    monkeypatch.setenv("COCAM_PROJECT_DIR", str(tmp_path / "elsewhere"))
    assert nb.project_dir() == (tmp_path / "elsewhere").resolve()


@pytest.fixture
def workspace(synthetic_root, tmp_path) -> nb.Workspace:
    return nb.Workspace.create(synthetic_root, tmp_path / "runs", settings=nb.default_settings(True), progress=False)


def test_workspace_layout(workspace, tmp_path) -> None:
    assert workspace.run_dir == tmp_path / "runs" / "smoke"
    assert workspace.mask_dir == tmp_path / "runs" / "smoke" / "masks"  # smoke never uses data/masks
    assert workspace.synthetic
    assert workspace.dataset("test") is workspace.dataset("test")
    assert "SMOKE" in workspace.describe()
    with pytest.raises(FileNotFoundError):
        nb.ensure_dataset(tmp_path / "nothing", workspace.settings)


def test_guided_runs_are_named_by_their_masks(workspace) -> None:
    a = nb.guidance_for(workspace, ["Wearing_Lipstick"])
    b = nb.guidance_for(workspace, ["Wearing_Lipstick"])
    assert workspace.guided_dir(a) == workspace.guided_dir(b)
    from cocam.masks import save_mask

    other = default_mask("Wearing_Lipstick")
    other[:, :89] = False  # the left half of the lips
    save_mask(workspace.mask_dir / "Wearing_Lipstick.png", other)
    assert nb.mask_sources(workspace, ["Wearing_Lipstick"])["mask"][0].endswith("Wearing_Lipstick.png")
    c = nb.guidance_for(workspace, ["Wearing_Lipstick"])
    assert workspace.guided_dir(c) != workspace.guided_dir(a)  # a new drawing: a new run
    assert workspace.guided_dir(nb.guidance_for(workspace, ["Wearing_Lipstick"], w_g=2.0)) != workspace.guided_dir(c)


def test_the_cam_method_is_a_guidance_setting(workspace) -> None:
    """Notebook 3's ``CAM_METHOD`` reaches the Guidance, its record and its run folder; old records are Grad-CAM."""
    plain = nb.guidance_for(workspace, ["Wearing_Lipstick"])
    layer = nb.guidance_for(workspace, ["Wearing_Lipstick"], cam_method="layercam")
    assert (plain.cam_method, layer.cam_method) == ("gradcam", "layercam")
    assert workspace.guided_dir(layer) != workspace.guided_dir(plain)
    settings = nb.GuidanceSettings.of(layer)
    assert settings.cam_method == "layercam" and "CAM layercam" in settings.summary()
    assert nb.GuidanceSettings.from_dict(settings.to_dict()).guidance(workspace).fingerprint() == layer.fingerprint()
    older = nb.GuidanceSettings.of(plain).to_dict()
    del older["cam_method"]  # a record notebook 3 wrote before the setting existed
    assert nb.GuidanceSettings.from_dict(older).guidance(workspace).cam_method == "gradcam"
    nb3 = (Path(__file__).parent.parent / "notebooks" / "03_fine_tune.ipynb").read_text(encoding="utf-8")
    assert 'CAM_METHOD = \\"gradcam\\"' in nb3 and "cam_method=CAM_METHOD" in nb3


def test_training_waits_for_another_process_on_the_same_run(workspace, capsys, monkeypatch) -> None:
    lock = workspace.baseline_dir / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))  # a live process "holds" the run
    waits = []

    def other_process_finishes(seconds: float) -> None:  # the wait loop's sleep: the holder lets go
        waits.append(seconds)
        lock.unlink(missing_ok=True)

    monkeypatch.setattr(nb.time, "sleep", other_process_finishes)
    result = nb.train_baseline(workspace, progress=False)
    assert waits and result.best_path is not None and "waiting" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must be reloaded, not resumed")

    monkeypatch.setattr(nb, "fit", no_training)
    again = nb.train_baseline(workspace, progress=False)  # finished: just reloaded
    assert again.steps == result.steps and len(again.history) == len(result.history)
    assert again.best_path == result.best_path and again.last_path == result.last_path
    first = dict(result.model.state_dict())
    assert all(np.array_equal(first[k].cpu().numpy(), v.numpy()) for k, v in again.model.state_dict().items())


def test_mask_sources_tell_shipped_masks_from_drawings(workspace, tmp_path, monkeypatch) -> None:
    import dataclasses

    from cocam.masks import save_mask

    monkeypatch.setenv("COCAM_PROJECT_DIR", str(tmp_path / "project"))
    masks = tmp_path / "project" / "data" / "masks"
    save_mask(masks / "Wearing_Lipstick.png", default_mask("Wearing_Lipstick"))  # as shipped
    drawn = default_mask("Double_Chin")
    drawn[:, :89] = False
    save_mask(masks / "Double_Chin.png", drawn)
    table = nb.mask_sources(dataclasses.replace(workspace, mask_dir=masks),
                            ["Wearing_Lipstick", "Double_Chin", "High_Cheekbones"])
    assert list(table["whose"]) == ["shipped (built-in region)", "your drawing", "built-in"]
    assert list(table["mask"]) == [str(masks / "Wearing_Lipstick.png"), str(masks / "Double_Chin.png"), "built-in"]
    assert list(table["pixels"]) == [int(default_mask("Wearing_Lipstick").sum()), int(drawn.sum()),
                                     int(default_mask("High_Cheekbones").sum())]


def test_paint_with_strokes_covers_the_region(tmp_path) -> None:
    from cocam.widget import MaskEditor

    editor = MaskEditor("Double_Chin", mask_dir=tmp_path, scale=3, brush_size=10)
    editor.set_mode("eraser")
    region = default_mask("Double_Chin")
    nb.paint_with_strokes(editor, region, brush=6)
    assert (editor.mask & region).sum() == region.sum()
    assert editor.mask.sum() < 1.6 * region.sum()
    assert editor.can_undo
    assert (editor.brush_size, editor.mode) == (10, "eraser")  # the editor's own settings are put back

    own = MaskEditor("Double_Chin", mask_dir=tmp_path, scale=3, brush_size=10)
    nb.paint_with_strokes(own, region)  # the editor's brush
    assert (own.mask & region).sum() == region.sum() and own.brush_size == 10


def _table(guided_worst: float, control_ci: tuple[float, float] = (40.0, 60.0), n: int = 200,
           test_drop: float = 0.0, iou: tuple[float, float] = (0.1, 0.4), guided_ci: tuple[float, float] | None = None,
           reverse: float = 80.0) -> pd.DataFrame:
    """The numbers of :func:`nb.evaluate_models` for one pair, in percent here and fractions in the frame."""
    rows = []
    g_ci = guided_ci or (guided_worst - 6.0, guided_worst + 6.0)
    for model, worst, ci, test, soft, rev in (
        (nb.BASELINE, 45.0, (38.0, 52.0), 90.0, iou[0], 80.0),
        (nb.CONTROL, 50.0, control_ci, 90.5, iou[0], 80.0),
        (nb.GUIDED, guided_worst, g_ci, 90.0 - test_drop, iou[1], reverse),
    ):
        rows.append({"attribute": "Wearing_Lipstick", "shortcut": "Heavy_Makeup", "model": model,
                     "acc_worst_group": worst / 100, "acc_worst_group_low": ci[0] / 100,
                     "acc_worst_group_high": ci[1] / 100, "worst_group": "a_not_b", "n_a_not_b": n,
                     "acc_a_not_b": worst / 100, "acc_not_a_b": rev / 100, "n_not_a_b": 300,
                     "acc_all": test / 100, "n_all": 4000, "mask soft_iou": soft})
    return pd.DataFrame(rows)


def test_verdict_in_plain_words() -> None:
    helped = nb.verdict(_table(70.0))
    assert helped.startswith("Guided fine-tuning helped on all 1 attribute")
    assert "45.0 % (pre-trained) to 70.0 %" in helped and "+25.0 points" in helped
    assert "control reached 50.0 %" in helped and "moved into the drawn region" in helped
    assert "no real cost" in helped

    # Above the control's interval but overlapping it: no conclusion (the old rule said "helped").
    overlap = nb.verdict(_table(62.0, guided_ci=(55.0, 69.0)))
    assert "no clear difference" in overlap and "nothing is concluded" in overlap

    same = nb.verdict(_table(55.0))
    assert "no clear difference" in same

    hurt = nb.verdict(_table(20.0, test_drop=5.0))
    assert "did not help" in hurt and "a cost of 5.0 points" in hurt

    small = nb.verdict(_table(70.0, n=12))
    assert "only 12 images" in small

    # The paper's column rose because the reverse group was given up: said so.
    gamed = nb.verdict(_table(55.0, reverse=20.0))
    assert "predicts the attribute more often" in gamed
    assert "predicts the attribute more often" not in same

    empty = _table(float("nan"), n=0).assign(worst_group=None)
    assert "cannot be judged" in nb.verdict(empty)

    no_control = _table(70.0)
    no_control = no_control[no_control["model"] != nb.CONTROL]
    text = nb.verdict(no_control)
    assert "helped" in text and "control" not in text.split("\n", 1)[1]

    with pytest.raises(ValueError, match="columns"):
        nb.verdict(pd.DataFrame({"attribute": ["x"]}))
    with pytest.raises(ValueError, match="not a display table"):
        nb.verdict(nb.results_table(_table(70.0)).reset_index())


def test_figures_are_returned_headless(workspace) -> None:
    from matplotlib.figure import Figure

    from cocam.celeba import load_annotations
    from cocam.cooccurrence import cooccurrence

    ann = load_annotations(workspace.data_root)
    stats = cooccurrence(ann.attributes, ann.split)
    assert isinstance(nb.plot_cooccurrence_heatmap(stats, "train"), Figure)
    with pytest.raises(ValueError, match="split"):
        nb.plot_cooccurrence_heatmap(stats, "nope")

    spec = workspace.settings.spec()
    model = spec.build().eval()
    test = workspace.dataset("test")
    fig = nb.show_cam_grid(model, test, "Wearing_Lipstick", n=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert isinstance(nb.show_cam_grid(model, test.subset_names([]), "Wearing_Lipstick"), Figure)
    fig = nb.show_cam_comparison({"a": model, "b": model}, test, "Smiling", n=2)
    assert len(fig.axes) == 6
    assert len(nb.show_mask_on_images(default_mask("Wearing_Lipstick"), test, n=2).axes) == 3
    assert len(nb.show_masks({"x": default_mask("Double_Chin")}).axes) == 1
    mistakes = nb.conflict_mistakes(model, test, "Wearing_Lipstick", "Heavy_Makeup")
    labels = mistakes.attributes
    assert ((labels["Wearing_Lipstick"] == 1) & (labels["Heavy_Makeup"] == 0)).all()

    live = nb.LivePlot("t", display=False)
    assert isinstance(live.figure, Figure)  # "waiting for the first epoch"
    live.update({"epoch": 0, "step": 3, "train_bce": 0.7, "valid_bce": 0.6, "valid_accuracy": 0.6})
    live({"epoch": 1, "step": 6, "train_bce": 0.6, "train_loss_g": 2.0, "valid_bce": 0.5, "valid_accuracy": 0.7})
    assert len(live.history) == 2 and len(live.figure.axes) == 3
    live.complete(pd.DataFrame([{"epoch": 0, "step": 3, "train_bce": 0.7}]))
    assert len(live.history) == 1
    assert isinstance(nb.plot_history({"a": live.history}), Figure)


@pytest.mark.skipif(sys.platform == "win32", reason="fork-based rendering")
def test_evaluate_models_and_results_table(workspace) -> None:
    result = nb.train_baseline(workspace, progress=False)
    checkpoints = {nb.BASELINE: result.best_path, nb.GUIDED: result.last_path}
    table, long = nb.evaluate_models(workspace, checkpoints, [("Wearing_Lipstick", "Heavy_Makeup")])
    assert set(table["model"]) == {nb.BASELINE, nb.GUIDED}
    assert {"mask soft_iou", "truth soft_iou", "n positives"} <= set(table.columns)
    shown = nb.results_table(table)
    assert shown.index.names == ["attribute", "model"]
    assert "No clear" in nb.verdict(table) or "no clear" in nb.verdict(table)


# -- cells run out of order, and the settings notebook 4 evaluates --------------------------------


def _cells_after_the_workspace(path: Path) -> list[str]:
    import json

    cells = [("".join(c["source"]), c["cell_type"]) for c in json.loads(path.read_text())["cells"]]
    start = next(i for i, (s, kind) in enumerate(cells) if kind == "code" and "nb.Workspace.create(" in s)
    return [s for s, kind in cells[start + 1:] if kind == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_later_cell_after_a_kernel_restart_says_what_to_run(path: Path, monkeypatch) -> None:
    # A restart clears every name: each later cell, run alone in an empty namespace, must stop with the
    # guard's message (it used to raise NameError: nb).
    monkeypatch.setattr(nb, "_CURRENT", [])
    cells = _cells_after_the_workspace(path)
    assert cells
    for source in cells:
        with pytest.raises(nb.NotebookOrderError, match="run the notebook from the top") as info:
            exec(compile(source, f"{path.name} cell", "exec"), {})
        assert len(info.value._render_traceback_()) == 1


def test_current_is_the_workspace_this_kernel_made(workspace, monkeypatch) -> None:
    assert nb.current() is workspace
    monkeypatch.setattr(nb, "_CURRENT", [])
    with pytest.raises(nb.NotebookOrderError, match="Workspace.create"):
        nb.current()


def test_ipython_shows_the_guard_as_one_line(monkeypatch) -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setattr(nb, "_CURRENT", [])
    shell = InteractiveShell.instance()
    try:
        with capture_output() as out:
            shell.run_cell("import cocam.notebook as nb\nws = nb.current()")
    finally:
        InteractiveShell.clear_instance()
    shown = out.stdout + out.stderr
    lines = [line for line in shown.splitlines() if line.strip()]
    assert len(lines) == 1 and "Stopped:" in lines[0] and "run the notebook from the top" in lines[0], shown
    assert "Traceback" not in shown and "NotebookOrderError" not in shown


def test_notebook_4_evaluates_the_run_notebook_3_recorded(workspace, capsys) -> None:
    attrs = ["Wearing_Lipstick", "Double_Chin"]
    # Before notebook 3: its defaults, said so.
    first = nb.trained_guidance(workspace)
    assert first.attributes == tuple(a for a, _ in nb.PAPER_PAIRS) and first.loss == "iou"
    assert "has not trained a guided run" in capsys.readouterr().out
    # Notebook 3 records what it trains; notebook 4, given nothing, evaluates exactly that run.
    trained = nb.guidance_for(workspace, attrs, loss="energy", w_g=2.0, transfer="landmarks")
    record = nb.record_guidance(workspace, trained)
    assert record == workspace.run_dir / nb.GUIDANCE_RECORD
    again = nb.trained_guidance(workspace)
    assert workspace.guided_dir(again) == workspace.guided_dir(trained)
    assert (again.loss, again.w_g, again.transfer, again.attributes) == ("energy", 2.0, "landmarks", tuple(attrs))
    out = capsys.readouterr()
    assert "Evaluating the guided run notebook 3 trained" in out.out and out.err == ""
    # The same settings given explicitly: no warning.
    nb.trained_guidance(workspace, nb.GuidanceSettings(tuple(attrs), loss="energy", w_g=2.0, transfer="landmarks"))
    assert capsys.readouterr().err == ""
    # Other settings: loudly another run.
    other = nb.trained_guidance(workspace, nb.GuidanceSettings(tuple(attrs), loss="energy", transfer="landmarks"))
    err = capsys.readouterr().err
    assert "ANOTHER guided run" in err and "w_g 2.0 → 1.0" in err and workspace.guided_dir(other).name in err
    # A new drawing since notebook 3 trained: loudly a new run.
    from cocam.masks import save_mask

    region = default_mask("Double_Chin")
    region[:, :89] = False
    save_mask(workspace.mask_dir / "Double_Chin.png", region)
    moved = nb.trained_guidance(workspace)
    assert workspace.guided_dir(moved) != workspace.guided_dir(trained)
    assert "masks changed since notebook 3" in capsys.readouterr().err
    # A damaged record is one clear error.
    record.write_text("{not json")
    with pytest.raises(ValueError, match="guidance.json is not a guidance record"):
        nb.trained_guidance(workspace)


def test_fine_tune_records_the_guided_run_before_training(workspace, monkeypatch) -> None:
    import json

    seen = {}

    def fit_when_free(run_dir, *args, **kwargs):  # what the record says when training starts
        record = workspace.run_dir / nb.GUIDANCE_RECORD
        seen["record"] = json.loads(record.read_text()) if record.is_file() else None
        seen["run_dir"] = run_dir
        return "trained"

    monkeypatch.setattr(nb, "_baseline_checkpoint", lambda ws, progress: ws.baseline_dir / "best.pt")
    monkeypatch.setattr(nb, "_fit_when_free", fit_when_free)
    guidance = nb.guidance_for(workspace, ["Wearing_Lipstick"], loss="rrr_cam")
    assert nb.fine_tune(workspace, None) == "trained"
    assert not (workspace.run_dir / nb.GUIDANCE_RECORD).exists()  # neither the control nor record=False writes it
    nb.fine_tune(workspace, guidance, record=True)
    assert seen["run_dir"] == workspace.guided_dir(guidance)
    assert seen["record"]["run"] == seen["run_dir"].name and seen["record"]["settings"]["loss"] == "rrr_cam"
    assert seen["record"]["masks"] == {"Wearing_Lipstick": "built-in"}


def test_gathering_checkpoints_says_what_it_trains_with_progress(workspace, capsys, monkeypatch) -> None:
    from types import SimpleNamespace

    done, trained = set(), []

    def fit_when_free(run_dir, make_model, train, valid, config, **kwargs):  # stands in for the training
        if run_dir not in done:  # like the real one: a finished run is reloaded, not trained
            trained.append((run_dir, kwargs["progress"]))
            done.add(run_dir)
        return SimpleNamespace(best_path=run_dir / "best.pt", last_path=run_dir / "last.pt")

    monkeypatch.setattr(nb, "_finished_run", lambda run_dir, config, n: "done" if run_dir in done else None)
    monkeypatch.setattr(nb, "_fit_when_free", fit_when_free)
    guidance = nb.guidance_for(workspace, ["Wearing_Lipstick"])
    done.add(workspace.baseline_dir)  # the baseline of notebook 1 is there; the two fine-tunings are not
    checkpoints = nb.ensure_checkpoints(workspace, guidance)
    out = capsys.readouterr().out
    assert f"1/2 not in the workspace yet, training it now: {nb.CONTROL} → {workspace.control_dir}" in out
    assert f"2/2 not in the workspace yet, training it now: {nb.GUIDED} → {workspace.guided_dir(guidance)}" in out
    assert nb.BASELINE not in out
    assert [r for r, _ in trained] == [workspace.control_dir, workspace.guided_dir(guidance)]
    assert all(progress for _, progress in trained)  # each run shows fit's progress bar
    assert checkpoints == {nb.BASELINE: workspace.baseline_dir / "best.pt",
                           nb.CONTROL: workspace.control_dir / "last.pt",
                           nb.GUIDED: workspace.guided_dir(guidance) / "last.pt"}
    nb.ensure_checkpoints(workspace, guidance)
    assert "nothing to train" in capsys.readouterr().out and len(trained) == 2


def test_comparing_guidance_losses_shows_one_bar_and_no_lines(workspace, capsys, monkeypatch) -> None:
    import cocam.compare

    def compare_guidance(config, settings, *, baseline, progress, log):  # stands in for the six runs
        assert progress is False  # no bar per training run
        log(f"baseline: {baseline}")
        for name in ("BCE-only control", *settings):
            log(f"seed 0 · {name}: 12 s")
        return "result"

    monkeypatch.setattr(cocam.compare, "compare_guidance", compare_guidance)
    monkeypatch.setattr(nb, "_baseline_checkpoint", lambda ws, progress: ws.baseline_dir / "best.pt")
    pairs = [("Wearing_Lipstick", "Heavy_Makeup")]
    assert nb.compare_methods(workspace, pairs, methods=["energy", "rrr_cam"]) == "result"
    out, err = capsys.readouterr()
    assert out == ""  # no line per finished run ...
    assert "comparing guidance losses" in err and "3/3" in err and "seed 0 · rrr_cam" in err  # ... one bar


# -- a dataset of your own ------------------------------------------------------------------------


def _with_parameters(path: Path, **values: str):
    """The notebook with ``NAME = ...`` lines of its parameters cell replaced (as papermill injects them)."""
    notebook = _nbformat().read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name} =")]
        assert len(hits) == 1, f"the parameters cell has no single {name} line"
        lines[hits[0]] = f"{name} = {value}"
    cell.source = "\n".join(lines)
    return notebook


def test_notebook_1_runs_on_a_folder_dataset(tmp_path: Path) -> None:
    """``DATA_ROOT`` at a labels.csv + images/ folder: the same notebook, the dataset's own labels and pairs."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    from _shapes import LABELS, make_shapes
    from cocam.checkpoint import load_model

    data = make_shapes(tmp_path / "shapes")
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("# marks the project folder for cocam.notebook.project_dir\n")
    notebook = _with_parameters(ROOT / "notebooks" / "01_discover_bias.ipynb", DATA_ROOT=repr(str(data)))
    env = dict(os.environ, COCAM_SMOKE="1", COCAM_PROJECT_DIR=str(project), MPLBACKEND="agg",
               PYTHONWARNINGS="ignore", COCAM_CACHE_DIR=str(tmp_path / "cache"))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(project / "notebooks")}}).execute(env=env)

    text = _text(notebook)
    assert "your dataset (labels.csv): square, stripe, corner_patch" in text
    assert "pairs     : square / stripe" in text  # the train split's strongest co-occurrence (φ ≈ 0.7)
    assert "celeba_p_b_given_a" not in text  # no CelebA reference beside labels of another kind
    _, spec, _ = load_model(project / "runs" / "notebooks" / "smoke" / "baseline" / "best.pt")
    assert spec.attributes == LABELS  # one output per label of labels.csv, not CelebA's 40
    assert _images(notebook) >= 5
    assert not any(out.get("output_type") == "error" for c in notebook.cells for out in c.get("outputs", []))
    assert not list(data.rglob(".*")), "nothing is written into the dataset (the cache is the user's)"


def test_a_run_folder_of_another_dataset_is_refused_and_kept(tmp_path: Path, monkeypatch) -> None:
    """Pointing the same RUN_DIR at another dataset does not reuse (or replace) the finished baseline."""
    from _shapes import make_shapes

    monkeypatch.setenv("COCAM_CACHE_DIR", str(tmp_path / "cache"))
    first = make_shapes(tmp_path / "shapes")
    ws = nb.Workspace.create(first, tmp_path / "runs", smoke=True, progress=False)
    assert ws.pairs()[0] == ("square", "stripe") and len(ws.pairs()) <= 3
    nb.train_baseline(ws, progress=False)
    best = ws.baseline_dir / "best.pt"
    before = best.read_bytes()

    other = tmp_path / "other"
    make_shapes(other, seed=1)
    table = pd.read_csv(other / "labels.csv").rename(columns={"corner_patch": "patch"})
    table.to_csv(other / "labels.csv", index=False)
    ws2 = nb.Workspace.create(other, tmp_path / "runs", smoke=True, progress=False)
    with pytest.raises(nb.ResumeMismatchError, match=r"other settings \(attributes differ.*RUN_DIR another folder"):
        nb.train_baseline(ws2, progress=False)
    assert best.read_bytes() == before
    with pytest.raises(ValueError, match=r"Unknown .*'Wearing_Lipstick'"):
        ws2.pairs([("Wearing_Lipstick", "Heavy_Makeup")])  # names are checked against this dataset's labels
