"""Tests for data-parallel training (cocam.distributed, fit under DDP) on the CPU with gloo.

Two worker processes are started with torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` on 127.0.0.1), so ``fit`` initialises the
process group itself through :func:`cocam.distributed.init_from_env`. The workers are this
file run as a script (``python tests/test_distributed.py --worker ...``); they run every
scenario in one launch and save what they trained, and the test compares it with the same
runs in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cocam.checkpoint import ModelSpec, load_checkpoint
from cocam.dataset import BatchLoader, CelebADataset
from cocam.distributed import (
    DistributedContext,
    check_global_batch,
    init_from_env,
    sharded_weighted_mean,
)
from cocam.masks import default_mask
from cocam.train import Guidance, TrainConfig, fit

SPEC = ModelSpec(image_size=64, hidden=32, dropout=0.0)  # no dropout: ranks and one process agree exactly
LIPSTICK, CHEEKS = "Wearing_Lipstick", "High_Cheekbones"
WORLD = 2

#: name -> (TrainConfig overrides, Guidance overrides or None, use the valid split)
SCENARIOS: dict[str, tuple[dict, dict | None, bool]] = {
    "bce": ({"max_steps": 2}, None, True),
    "iou_positive": ({"max_steps": 2}, {"loss": "iou", "target": "positive"}, False),
    "rrr_input": ({"max_steps": 1}, {"loss": "rrr_input", "target": "positive"}, False),
    # two targets: Grad-CAM's vmapped pullback runs inside DDP's forward
    "two_attributes": ({"max_steps": 1}, {"attributes": (LIPSTICK, CHEEKS), "target": "both"}, False),
    # a loss, target and weight per attribute: the per-attribute weights within the global mean
    "mixed": ({"max_steps": 2}, {"attributes": (LIPSTICK, CHEEKS), "loss": ("iou", "energy"),
                                 "target": ("positive", "both"), "w_g": (3.0, 1.0)}, False),
    # each attribute's own mean, then the mean over attributes: the counts are the global batch's
    "pool_attribute": ({"max_steps": 1}, {"attributes": (LIPSTICK, CHEEKS), "w_g": (3.0, 1.0),
                                          "pool": "attribute"}, False),
}
#: resume: one epoch of 2 steps, then resumed to two epochs (batch 48: 2 steps per epoch)
RESUME_CONFIG = {"batch_size": 48}


def _config(**overrides) -> TrainConfig:
    values = {"epochs": 1, "batch_size": 32, "lr": 1e-3, "device": "cpu", "patience": None, "seed": 0}
    values.update(overrides)
    return TrainConfig(**values)


def _guidance(attributes: tuple[str, ...] = (LIPSTICK,), **overrides) -> Guidance:
    return Guidance(attributes=attributes, masks=tuple(default_mask(a) for a in attributes), **overrides)


def _model():
    torch.manual_seed(0)
    return SPEC.build()


def _datasets(root: Path) -> tuple[CelebADataset, CelebADataset]:
    return (CelebADataset(root, "train", image_size=SPEC.image_size, progress=False),
            CelebADataset(root, "valid", image_size=SPEC.image_size, progress=False))


def _run(name: str, root: Path, run_dir: Path | None, *, progress: bool = False):
    train, valid = _datasets(root)
    config, guidance, use_valid = SCENARIOS[name]
    return fit(_model(), train, valid if use_valid else None, _config(**config), spec=SPEC,
               guidance=_guidance(**guidance) if guidance is not None else None, run_dir=run_dir,
               progress=progress)


# --------------------------------------------------------------------------------------------
# The worker (one rank)
# --------------------------------------------------------------------------------------------


def _worker(root: Path, out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    train, valid = _datasets(root)
    results: dict[str, dict] = {}

    def keep(name: str, result) -> None:
        results[name] = {"model": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
                         "steps": result.steps,
                         "history": result.history.drop(columns=["seconds"]).to_dict("list"),
                         "last_path": str(result.last_path) if result.last_path else None}

    for name in SCENARIOS:
        keep(name, _run(name, root, out / name, progress=True))

    first = fit(_model(), train, valid, _config(epochs=1, **RESUME_CONFIG), spec=SPEC, run_dir=out / "resume",
                progress=False)
    assert first.steps == 2, first.steps
    keep("resume", fit(_model(), train, valid, _config(epochs=2, **RESUME_CONFIG), spec=SPEC,
                       run_dir=out / "resume", resume=True, progress=False))
    keep("uninterrupted", fit(_model(), train, valid, _config(epochs=2, **RESUME_CONFIG), spec=SPEC,
                              progress=False))

    errors = {}
    try:
        fit(_model(), train, None, _config(batch_size=33), spec=SPEC, progress=False)
    except ValueError as err:
        errors["odd_batch"] = str(err)
    locked = out / "locked"
    locked.mkdir(exist_ok=True)
    if rank == 0:
        (locked / ".lock").write_text(str(os.getppid()))  # held by a live process: the test
    try:
        fit(_model(), train, None, _config(max_steps=1), spec=SPEC, run_dir=locked, progress=False)
    except Exception as err:  # noqa: BLE001 - the test checks the type by name
        errors["locked"] = f"{type(err).__name__}: {err}"
    results["errors"] = errors
    torch.save(results, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root: Path, out: Path, timeout: float = 240.0) -> list[dict]:
    """Run the worker as ``WORLD`` processes with torchrun's environment; return each rank's results."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(root), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD} workers did not finish within {timeout:.0f} s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


if __name__ == "__main__" and "--worker" in sys.argv:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("ROOT", "OUT"))
    _worker(*parser.parse_args().worker)
    raise SystemExit(0)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_ddp_runs_equal_a_single_process_run(synthetic_root, tmp_path: Path, single_process) -> None:
    ranks = _launch(synthetic_root, tmp_path / "ddp")
    train, valid = _datasets(synthetic_root)

    for name in SCENARIOS:
        reference = _run(name, synthetic_root, None)
        for rank, result in enumerate(ranks):
            assert result[name]["steps"] == reference.steps, (name, rank)
            # every rank holds the same weights: those of one process on the same global batches
            _assert_same(result[name]["model"], ranks[0][name]["model"], atol=0)
            # Adam (lr 1e-3) turns reduction-order rounding of near-zero gradients into weight
            # differences of a few 1e-5 on isolated elements; a synchronisation error (e.g. averaging
            # per-rank guidance means) moves weights by ~lr on many elements.
            _assert_same(result[name]["model"], reference.model.state_dict(), atol=1e-4)
            # the history is the global batch's (losses averaged over the ranks), validation is shared
            history = pd.DataFrame(result[name]["history"])
            expected = reference.history.drop(columns=["seconds"])
            pd.testing.assert_frame_equal(history, expected, check_exact=False, rtol=1e-5, atol=1e-6)
        # a guided run really moved the weights (the comparison is not vacuous)
        assert not torch.equal(ranks[0][name]["model"]["trunk.0.weight"], _model().state_dict()["trunk.0.weight"])

    # only rank 0 wrote the run folder; the checkpoint holds the plain model (no "module." prefix)
    run = tmp_path / "ddp" / "bce"
    assert {"last.pt", "best.pt", "history.csv", "run.json"} <= {p.name for p in run.iterdir()}
    state = load_checkpoint(run / "last.pt")
    assert not any(k.startswith("module.") for k in state["model"])
    _assert_same(state["model"], ranks[0]["bce"]["model"], atol=0)
    assert len(state["rng_ranks"]) == WORLD
    info = json.loads((run / "run.json").read_text())
    assert info["distributed"] == {"world_size": WORLD, "backend": "gloo", "batch_size_per_process": 16}
    assert all(r["bce"]["last_path"] == str(run / "last.pt") for r in ranks)

    # resume: one epoch, then resumed to two, equals two uninterrupted epochs with DDP (exactly: the
    # same computation) and in one process (to rounding, which four Adam steps amplify to ~3e-5 in
    # the few weights whose gradients are ~0: Adam divides by their tiny second moment)
    full = fit(_model(), train, valid, _config(epochs=2, **RESUME_CONFIG), spec=SPEC, progress=False)
    for result in ranks:
        assert result["resume"]["steps"] == result["uninterrupted"]["steps"] == full.steps == 4
        _assert_same(result["resume"]["model"], result["uninterrupted"]["model"], atol=0)
        _assert_same(result["resume"]["model"], full.model.state_dict(), atol=1e-4)
        pd.testing.assert_frame_equal(pd.DataFrame(result["resume"]["history"]),
                                      full.history.drop(columns=["seconds"]), check_exact=False, rtol=1e-5,
                                      atol=1e-6)

    # errors are raised on every rank, with the reason
    for result in ranks:
        assert "must be divisible by the 2 processes" in result["errors"]["odd_batch"]
        assert result["errors"]["locked"].startswith("RunLockedError")


def test_batch_loader_shards_each_global_batch(synthetic_root) -> None:
    train, _ = _datasets(synthetic_root)
    whole = BatchLoader(train, 32, shuffle=True, seed=3, drop_last=True)
    shards = [BatchLoader(train, 32, shuffle=True, seed=3, drop_last=True, rank=r, num_replicas=4) for r in range(4)]
    for loader in (whole, *shards):
        loader.set_epoch(2)
    assert all(len(s) == len(whole) == 3 and s.local_batch_size == 8 for s in shards)
    for batch, *parts in zip(whole, *shards):
        for full, pieces in zip(batch, zip(*parts)):
            assert torch.equal(full, torch.cat(pieces))
    with pytest.raises(ValueError, match="not divisible"):
        BatchLoader(train, 30, drop_last=True, rank=0, num_replicas=4)
    with pytest.raises(ValueError, match="drop_last"):
        BatchLoader(train, 32, rank=0, num_replicas=4)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(train, 32, drop_last=True, rank=4, num_replicas=4)


@dataclasses.dataclass(frozen=True)
class _TwoRanks(DistributedContext):
    """A stand-in for rank r of two whose all-reduce returns a known global sum."""

    world_size: int = 2
    total: torch.Tensor | None = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.total.clone()


def test_single_process_context_and_helpers(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_from_env("cpu")
    assert context == DistributedContext(device=torch.device("cpu"))
    assert not context.enabled and context.is_main
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert sharded_weighted_mean(values, weight, context).item() == pytest.approx(8 / 3)
    assert sharded_weighted_mean(values, torch.zeros_like(weight), context).item() == 0.0
    # two ranks holding one row each, with different numbers of guided pairs (1 and 2): their shares
    # average to the global weighted mean 8/3, where the average of per-rank means would be (1 + 3.5) / 2
    shares = [sharded_weighted_mean(values[i:i + 1], weight[i:i + 1], _TwoRanks(total=weight.sum())).item()
              for i in range(2)]
    assert np.mean(shares) == pytest.approx(8 / 3)
    assert check_global_batch(64, 4) == 16
    with pytest.raises(ValueError, match="divisible"):
        check_global_batch(30, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_from_env("cpu")


def test_one_process_has_no_batch_constraint(synthetic_root, monkeypatch) -> None:
    """A group of one process is not data-parallel: no batch constraint, no DDP."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train, _ = _datasets(synthetic_root)
    result = fit(_model(), train, None, _config(batch_size=33, max_steps=1), spec=SPEC, progress=False)
    assert result.steps == 1


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
