"""Dead CAMs under guidance alone, from a random model: with and without the revive branch and clipping.

The setting in which every CAM used to die: a randomly initialised AlexNet trained with the
guidance term alone (``w_a = 0``) at Adam's default learning rate, the paper's target (the
CAM of the logit on the images that have the attribute) and the paper's three attributes with
their built-in regions. For each CAM loss it runs

* ``revive=off`` — the losses as they were before the revive branch (the branch is patched
  out: ``iou``/``energy`` are then the clamped ``-ln`` with zero gradient at a dead CAM and
  ``rrr_cam`` scores a dead CAM 0), and
* ``revive=on`` — the losses of :mod:`cocam.losses`,

each without clipping and with ``clip_grad_norm``; it records, per epoch, the share of guided
(image, attribute) pairs whose CAM was dead (``dead_cam`` of :func:`cocam.train.fit`'s history)
and the mean pre-clip gradient norm. Nothing here asserts anything; the numbers go to
``benchmarks/results/dead_cam_cpu.csv`` (one row per run and epoch).

Usage (12 runs of 24 steps: about 7 minutes of CPU time with 2 threads at the defaults, much
longer in wall time on a shared machine; ``--losses iou`` runs a third of it)::

    python benchmarks/dead_cam.py [--image-size 64] [--epochs 12] [--clip 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cocam.losses as losses_module  # noqa: E402
from cocam.checkpoint import ModelSpec  # noqa: E402
from cocam.dataset import CelebADataset  # noqa: E402
from cocam.io import atomic_write_text  # noqa: E402
from cocam.masks import default_mask  # noqa: E402
from cocam.synthetic import PRESETS, generate_synthetic_celeba  # noqa: E402
from cocam.train import Guidance, TrainConfig, fit  # noqa: E402
from common import RESULTS_DIR, machine_header, machine_info  # noqa: E402

ATTRIBUTES = ("Wearing_Lipstick", "High_Cheekbones", "Double_Chin")


@contextlib.contextmanager
def revive(enabled: bool):
    """With ``enabled=False`` the CAM losses lose their revive branch (the definitions before it)."""
    original = losses_module._alive_or_revive
    if not enabled:
        losses_module._alive_or_revive = lambda alive, *args, **kwargs: alive
    try:
        yield
    finally:
        losses_module._alive_or_revive = original


def run(train: CelebADataset, loss: str, revive_on: bool, clip: float | None, args) -> pd.DataFrame:
    spec = ModelSpec(image_size=args.image_size, hidden=512)
    torch.manual_seed(args.seed)  # the same random model in every run
    model = spec.build()
    guidance = Guidance(ATTRIBUTES, tuple(default_mask(a) for a in ATTRIBUTES), w_a=0.0, loss=loss,
                        target="positive")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=None, seed=args.seed,
                         device="cpu", clip_grad_norm=clip)
    with revive(revive_on):
        result = fit(model, train, None, config, spec=spec, guidance=guidance, progress=False)
    h = result.history[["epoch", "step", "dead_cam", "grad_norm", "train_loss_g"]].copy()
    h.insert(0, "clip_grad_norm", clip if clip is not None else "none")
    h.insert(0, "revive", "on" if revive_on else "off")
    h.insert(0, "loss", loss)
    return h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="a CelebA-layout dataset (default: a fresh smoke-size synthetic one)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12, help="epochs of 3 steps (96 images, batch 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=1.0, help="the clip_grad_norm of the clipped runs")
    p.add_argument("--losses", nargs="+", default=["iou", "energy", "rrr_cam"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_header("dead CAMs under guidance alone, random AlexNet", image_size=args.image_size,
                         batch=args.batch_size, lr=args.lr, epochs=args.epochs, clip=args.clip))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            generate_synthetic_celeba(root, PRESETS["smoke"], workers=args.threads, progress=False)
        train = CelebADataset(root, "train", image_size=args.image_size, progress=False)
        rows = []
        for loss in args.losses:
            for revive_on in (False, True):
                for clip in (None, args.clip):
                    h = run(train, loss, revive_on, clip, args)
                    rows.append(h)
                    print(f"{loss:8s} revive {'on ' if revive_on else 'off'} clip {str(clip):5s}  dead share per "
                          f"epoch: {' '.join(f'{v:.2f}' for v in h['dead_cam'])}", flush=True)
    table = pd.concat(rows, ignore_index=True)
    for key, value in machine_info(image_size=args.image_size, batch=args.batch_size, lr=args.lr).items():
        table[key] = value
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "dead_cam_cpu.csv"
    atomic_write_text(out, table.to_csv(index=False))
    last = table.groupby(["loss", "revive", "clip_grad_norm"], sort=False).tail(1)
    print("\nlast epoch:")
    print(last[["loss", "revive", "clip_grad_norm", "step", "dead_cam", "grad_norm"]].to_string(index=False))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
