"""A real-CelebA-size guided epoch on a GPU: AMP (bf16), channels_last, optionally torch.compile.

    python benchmarks/gpu_epoch.py                      # on the GPU: 224 px, batch 256, full AlexNet head
    python benchmarks/gpu_epoch.py --root /data/celeba_root   # also time the input path on real files
    python benchmarks/gpu_epoch.py --quick --device cpu # smoke run of the script itself

What is measured, in one process, on the same model and batch:

* **steps** — a plain BCE step and a guided step (the three paper attributes, the paper's IoU
  loss, exact double backprop: ``cocam.train.guided_terms``, what ``fit`` runs) in fp32, and
  with bf16 autocast + ``channels_last`` (cocam's default on CUDA), and with ``torch.compile`` of
  the trunk when ``--compile`` is given; each as the median of ``--reps`` timed steps after a
  warm-up, synchronised. Reported: images/s, the ratio to the fp32 plain step, and the
  estimated time of one epoch of CelebA's training split (162,770 images; target ≤ 2 min).
* **input** — images/s delivered to the device by cocam's loader (uint8 rows → pinned memory →
  non-blocking copy → normalised on the device), so the estimate is of a step-bound epoch only
  if the loader is faster than the step; with ``--root``, also batched JPEG decoding on the GPU
  (``torchvision.io.decode_jpeg(device="cuda")``) of the dataset's files, the path for building
  the decode cache.

The epoch estimate assumes the step time measured here holds for the whole epoch (the data
comes from cocam's decoded cache, so there is no per-epoch JPEG decoding). Writes
``benchmarks/results/gpu_epoch_<device>.csv``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, machine_header, print_table  # noqa: E402

from cocam import train as cocam_train  # noqa: E402
from cocam.attributes import attribute_index  # noqa: E402
from cocam.dataset import normalize_uint8  # noqa: E402
from cocam.evaluate import resolve_device  # noqa: E402
from cocam.masks import default_mask  # noqa: E402
from cocam.model import build_model  # noqa: E402
from cocam.train import Guidance  # noqa: E402

CELEBA_TRAIN = 162_770
ATTRIBUTES = ("Wearing_Lipstick", "High_Cheekbones", "Double_Chin")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_timings(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    variants = [("fp32", False, False, False), ("bf16 + channels_last", True, True, False)]
    if args.compile:
        variants.append(("bf16 + channels_last + compile", True, True, True))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    targets = (torch.rand(args.batch, 40, generator=gen) < 0.4).float().to(device)
    landmarks = torch.full((args.batch, 5, 2), args.size / 2.0, device=device)
    guidance = Guidance(ATTRIBUTES, tuple(default_mask(a) for a in ATTRIBUTES), target="positive")
    idx = [attribute_index(a) for a in ATTRIBUTES]
    for name, amp, channels_last, compile_trunk in variants:
        torch.manual_seed(0)
        model = build_model("alexnet", hidden=args.hidden).to(device).train()
        x = images
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
        if compile_trunk:
            model.trunk = torch.compile(model.trunk)
        masks = cocam_train.guidance_masks(guidance, model, args.size, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-7)

        def plain() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.binary_cross_entropy_with_logits(model(x).float(), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def guided() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = cocam_train.guided_terms(model, x, targets, guidance, idx, masks, landmarks).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for step_name, fn in (("plain BCE step", plain), ("guided step (3 attributes, exact)", guided)):
            s = median_seconds(fn, device, args.reps, args.warmup)
            rows.append({"variant": name, "step": step_name, "seconds/step": s, "images/s": args.batch / s,
                         "CelebA epoch (min)": CELEBA_TRAIN / (args.batch / s) / 60})
    df = pd.DataFrame(rows)
    ref = df[(df.variant == "fp32") & (df.step == "plain BCE step")]["seconds/step"].iloc[0]
    df["× fp32 plain step"] = df["seconds/step"] / ref
    return df.to_dict("records")


def loader_rate(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of cocam's device path: pinned uint8 rows → device → normalised (channels_last)."""
    n = args.batch * 4
    rows = torch.randint(0, 256, (n, args.size, args.size, 3), dtype=torch.uint8)
    if device.type == "cuda":
        rows = rows.pin_memory()

    def deliver() -> None:
        for i in range(0, n, args.batch):
            batch = rows[i:i + args.batch].to(device, non_blocking=True).permute(0, 3, 1, 2)
            normalize_uint8(batch, channels_last=device.type == "cuda")

    s = median_seconds(deliver, device, max(3, args.reps // 2), 1)
    return {"variant": "input", "step": "uint8 cache rows → device, normalised", "seconds/step": s * args.batch / n,
            "images/s": n / s}


def jpeg_rate(args: argparse.Namespace, device: torch.device) -> dict | None:
    if args.root is None or device.type != "cuda":
        return None
    from torchvision.io import decode_jpeg, read_file

    from cocam.celeba import find_celeba_dir

    files = sorted((find_celeba_dir(args.root) / "img_align_celeba").glob("*.jpg"))[: args.batch]
    data = [read_file(str(f)) for f in files]
    s = median_seconds(lambda: decode_jpeg(data, device=device), device, max(3, args.reps // 2), 1)
    return {"variant": "input", "step": f"decode_jpeg on {device} ({len(data)} files/batch)",
            "seconds/step": s, "images/s": len(data) / s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=0, help="classifier width (0 = AlexNet's 4096, the paper's)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the trunk")
    p.add_argument("--root", help="a CelebA-layout root: also time GPU JPEG decoding of its files")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    args = p.parse_args()
    if args.quick:
        args.size, args.batch, args.reps, args.warmup = 64, 8, 2, 1
        args.hidden = args.hidden or 64
    args.hidden = args.hidden or None
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(machine_header("Guided fine-tuning step and CelebA epoch estimate", device=name, size=args.size,
                         batch=args.batch, hidden=args.hidden or 4096))
    rows = step_timings(args, device)
    rows.append(loader_rate(args, device))
    if (jpeg := jpeg_rate(args, device)) is not None:
        rows.append(jpeg)
    df = pd.DataFrame(rows)
    print_table(df, "steps and input path (median, synchronised)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = "quick_" if args.quick else ""
    out = RESULTS_DIR / f"gpu_epoch_{tag}{device.type}.csv"
    df.assign(device=name, size=args.size, batch=args.batch, torch=torch.__version__).to_csv(out, index=False)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
