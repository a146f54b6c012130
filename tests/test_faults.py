"""Faults while a run folder is written: a kill at every write point of an epoch, races for its lock, a full disk.

The epoch's files (``last.pt``, ``best.pt``, ``history.csv``, ``run.json``) are one transaction
(:func:`cocam.train._commit_epoch`): whichever write a process dies at, the next run in the
folder finds the files of one epoch, all of them, and a resume ends exactly where an
uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import cocam.train as train_module
from cocam.checkpoint import ModelSpec, load_checkpoint
from cocam.cli import main
from cocam.dataset import CelebADataset
from cocam.model import SplitModel
from cocam.io import DiskFullError, LockedError, atomic_write_text, exclusive_lock, pid_alive
from cocam.train import RUN_FILES, TrainConfig, fit

SPEC = ModelSpec(image_size=64, hidden=32)
#: What the checkpoints of the tiny model record. The run-folder logic under test does not depend on
#: the model, so these tests train a few hundred weights (``_model``) instead of an AlexNet: many runs
#: in a few seconds. Nothing here rebuilds a model from the spec.

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(synthetic_root):
    train = CelebADataset(synthetic_root, "train", image_size=SPEC.image_size, progress=False)
    valid = CelebADataset(synthetic_root, "valid", image_size=SPEC.image_size, progress=False)
    return train, valid


def _config(**overrides) -> TrainConfig:
    # batch = the whole training set (96 images): one step per epoch keeps the many runs below cheap
    values = {"epochs": 2, "batch_size": 96, "lr": 1e-3, "device": "cpu", "patience": None, "seed": 0}
    values.update(overrides)
    return TrainConfig(**values)


def _model(seed: int = 0) -> SplitModel:
    """A tiny classifier with dropout (so that resuming must restore the RNG to be bit-identical)."""
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.ReLU())
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(4, 40))
    return SplitModel(trunk, head, num_outputs=40)


class Killed(BaseException):
    """Stands for SIGKILL: not an ``Exception``, so no ``except Exception`` handler intercepts it."""


@contextlib.contextmanager
def _write_points(monkeypatch, kill_at: tuple[int, int] | None = None):
    """Record (and optionally die at) every file-system write point inside the epoch commits of a run.

    A write point is an ``fsync``, ``replace`` or ``unlink``; ``kill_at = (commit, point)`` raises
    :class:`Killed` *instead of* that point of that commit. The temporary file of the write in
    progress is first linked to a second name, as a real kill would leave it behind (the atomic
    writer's cleanup removes the first). Yields ``{commit: [points]}``.
    """
    real = {name: getattr(os, name) for name in ("fsync", "replace", "unlink")}
    points: dict[int, list[str]] = {}
    state = {"commit": None, "count": 0}

    def wrapped(name):
        def call(*args, **kwargs):
            commit = state["commit"]
            if commit is not None:
                here = points.setdefault(commit, [])
                here.append(name)
                if kill_at == (commit, len(here) - 1):
                    state["commit"] = None
                    tmp = args[0] if name == "replace" else _fd_path(args[0]) if name == "fsync" else None
                    if tmp is not None and ".tmp-" in os.fspath(tmp):
                        os.link(tmp, f"{os.fspath(tmp)}-left-by-kill")
                    raise Killed
            return real[name](*args, **kwargs)
        return call

    real_commit = train_module._commit_epoch

    def commit(*args, **kwargs):
        state["commit"] = state["count"]
        state["count"] += 1
        try:
            return real_commit(*args, **kwargs)
        finally:
            state["commit"] = None

    for name in real:
        monkeypatch.setattr(os, name, wrapped(name))
    monkeypatch.setattr(train_module, "_commit_epoch", commit)
    try:
        yield points
    finally:
        monkeypatch.undo()


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _state(run: Path) -> dict:
    """What a run folder says, file by file (weights as tensors, the history as a table)."""
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    return {"last": last, "best": best, "history": pd.read_csv(run / "history.csv").drop(columns=["seconds"]),
            "run.json": (run / "run.json").read_text()}


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = _state(run), _state(reference)
    pd.testing.assert_frame_equal(a["history"], b["history"])
    assert a["run.json"] == b["run.json"]
    for which in ("last", "best"):
        assert (a[which]["epoch"], a[which]["step"]) == (b[which]["epoch"], b[which]["step"]), which
        for k, v in b[which]["model"].items():
            assert torch.equal(a[which]["model"][k], v), (which, k)  # bit-identical
    assert torch.equal(a["last"]["rng"], b["last"]["rng"])
    for i, s in b["last"]["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(a["last"]["optimizer"]["state"][i][k], v), (i, k)


def test_a_kill_at_every_write_point_of_an_epoch_resumes_bit_identically(data, tmp_path, monkeypatch) -> None:
    train, valid = data
    full = tmp_path / "full"
    with _write_points(monkeypatch) as points:
        fit(_model(0), train, valid, _config(), spec=SPEC, run_dir=full, progress=False)
    assert sorted(points) == [0, 1] and len(points[1]) >= 10  # 4 files × (fsync, replace), marker, renames...
    assert sorted(p.name for p in full.iterdir()) == sorted(RUN_FILES)

    plan = [(1, k) for k in range(len(points[1]))] + [(0, 0), (0, len(points[0]) - 1)]
    for commit, k in plan:
        run = tmp_path / f"killed_{commit}_{k}"
        with _write_points(monkeypatch, kill_at=(commit, k)), pytest.raises(Killed):
            fit(_model(0), train, valid, _config(), spec=SPEC, run_dir=run, progress=False)
        # whatever the folder holds now is one epoch's files, all of them (or nothing yet)
        survivors = {p.name for p in run.iterdir()} & set(RUN_FILES)
        assert survivors in (set(), set(RUN_FILES)) or (run / ".commit.json").exists(), (commit, k, survivors)
        torch.manual_seed(1234)  # the resuming process's RNG state does not matter
        fit(_model(0), train, valid, _config(), spec=SPEC, run_dir=run, resume=True, progress=False)
        assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES), (commit, k)  # no temp, marker or lock
        _assert_same_run(run, full)


def test_temporary_files_of_earlier_kills_are_removed_on_start(data, tmp_path) -> None:
    train, valid = data
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [".last.pt.tmp-k1ll3d", ".best.pt.tmp-x", ".history.csv.tmp-y", ".run.json.tmp-z",
                 ".last.pt.pending", "..last.pt.pending.tmp-w", "..commit.json.tmp-v"]
    for name in leftovers:
        (run / name).write_bytes(b"half a file")
    mine = run / "notes.tmp-keep.txt"  # not the run's: left alone
    mine.write_text("my notes")
    fit(_model(0), train, valid, _config(epochs=1), spec=SPEC, run_dir=run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted([*RUN_FILES, mine.name])


def test_a_real_kill_9_while_saving_is_recovered(data, synthetic_root, tmp_path) -> None:
    """The process really dies (``os._exit``: no cleanup runs) in the middle of writing the second ``last.pt``."""
    train, valid = data
    run = tmp_path / "run"
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import cocam.checkpoint as checkpoint
from cocam.dataset import CelebADataset
from cocam.train import TrainConfig, fit
from test_faults import SPEC, _model
torch.set_num_threads(1)
saves = {{"n": 0}}
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    saves["n"] += 1
    if saves["n"] == 3:  # epoch 0 wrote last.pt and best.pt; epoch 1's last.pt dies half-written
        f.write(b"PK half a checkpoint")
        f.flush()
        os._exit(137)
    return real_save(obj, f, *args, **kwargs)
checkpoint.torch.save = dying_save
root = {str(synthetic_root)!r}
train = CelebADataset(root, "train", image_size=64, progress=False)
valid = CelebADataset(root, "valid", image_size=64, progress=False)
fit(_model(0), train, valid, TrainConfig(epochs=2, batch_size=96, lr=1e-3, device="cpu", patience=None, seed=0),
    spec=SPEC, run_dir={str(run)!r}, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 137, proc.stderr
    left = {p.name for p in run.iterdir()}
    assert ".lock" in left and any(".tmp-" in name for name in left)  # what a kill leaves: stale lock, temp file
    assert load_checkpoint(run / "last.pt")["epoch"] == 0

    fit(_model(0), train, valid, _config(), spec=SPEC, run_dir=run, resume=True, progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    full = tmp_path / "full"
    fit(_model(0), train, valid, _config(), spec=SPEC, run_dir=full, progress=False)
    _assert_same_run(run, full)


# --------------------------------------------------------------------------------------------
# The lock under contention
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True)
    pid = int(out.stdout)
    if pid_alive(pid):
        pytest.skip("the PID of the finished process was reused")
    return pid


def _stress_worker(lock: str, flag: str, start, done, trials: int, results) -> None:
    held = overlaps = 0
    for trial in range(trials):
        start.wait()  # the main process has set the trial up (a stale lock, or none)
        try:
            with exclusive_lock(lock):
                held += 1
                try:  # nobody else may be inside: the flag file is created exclusively
                    fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.close(fd)
                    time.sleep(0.002)
                    os.unlink(flag)
                except FileExistsError:
                    overlaps += 1
        except LockedError:
            pass
        done.wait()
    results.put((held, overlaps))


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="the race-free takeover needs flock (POSIX); the stress test forks")
def test_the_lock_is_race_free_under_contention(tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")
    n, trials = 4, 30
    lock, flag = tmp_path / "run" / ".lock", tmp_path / "inside"
    lock.parent.mkdir()
    dead = _dead_pid()
    start, done, results = ctx.Barrier(n + 1), ctx.Barrier(n + 1), ctx.Queue()
    workers = [ctx.Process(target=_stress_worker, args=(str(lock), str(flag), start, done, trials, results))
               for _ in range(n)]
    for w in workers:
        w.start()
    try:
        for trial in range(trials):
            if trial % 2 == 0:  # half the trials start from a stale lock of a dead process
                lock.write_text(str(dead))
            start.wait(timeout=60)
            done.wait(timeout=60)
            assert not lock.exists()  # released by whoever held it
        counts = [results.get(timeout=60) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=60)
    held = sum(h for h, _ in counts)
    assert sum(o for _, o in counts) == 0  # never two holders at once
    assert trials <= held  # every trial someone got it (the stale lock was taken over)
    assert [p.name for p in lock.parent.iterdir()] == []  # no lock temp file left behind


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------


def test_disk_full_while_saving_is_one_line_naming_enospc(synthetic_root, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "--root", str(synthetic_root), "--out", str(out), "--image-size", "64", "--hidden", "32",
            "--batch-size", "96", "--epochs", "2", "--device", "cpu"]
    assert main([*args, "--epochs", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full_disk(obj, f, *a, **k):  # as torch reports it: its own error, the ENOSPC only in the chain
        f.write(b"PK partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from err

    monkeypatch.setattr(torch, "save", full_disk)
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if "error" in line]  # (the rest is the progress bar)
    assert len(errors) == 1 and errors[0].startswith("cocam train: error: ") and "Traceback" not in err
    assert "ENOSPC" in errors[0] and "last.pt" in errors[0] and "unexpected pos" not in errors[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous epoch intact, no temp left

    # The error is an OSError with the errno, for callers of the API.
    monkeypatch.undo()

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(DiskFullError) as info:
        atomic_write_text(tmp_path / "x.txt", "data")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob(".x.txt.tmp-*")) and not (tmp_path / "x.txt").exists()
