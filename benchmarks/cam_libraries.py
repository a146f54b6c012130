"""Batched Grad-CAM inference throughput: cocam against pytorch-grad-cam, captum and torchcam.

    /work/benchvenv/bin/python benchmarks/cam_libraries.py            # full: batch 1/16/64, 128 and 224 px
    /work/benchvenv/bin/python benchmarks/cam_libraries.py --quick    # smoke run (< 60 s)

(any Python with cocam, ``pip install -e .[bench]``; ``--python`` picks the interpreter of the workers.)

What is compared, on the SAME model and inputs: cocam's AlexNet ``SplitModel``
(``build_model("alexnet", hidden=512)``, ``torch.manual_seed(0)`` weights, eval mode), images
``torch.randn`` (seed 1), one target attribute (output 9, Blond_Hair), CAMs for the whole batch:

* ``cocam``: ``grad_cam(model, images, 9, output_size=S).cams`` — normalised per image at
  feature resolution, upsampled to the input size;
* ``pytorch-grad-cam`` (grad-cam 1.5.x): ``GradCAM(model, [layer])(images, targets)`` —
  normalised, resized to the input size with cv2, numpy;
* ``captum``: ``LayerGradCam(model, layer).attribute(images, target=9, relu_attributions=True)``
  — raw map at feature resolution;
* ``torchcam``: ``scores = model(images); GradCAM(model, layer)(9, scores)`` — normalised at
  feature resolution.

The hook libraries get the SplitModel wrapped as one plain module whose ``layer`` is the ReLU
after conv5 (``model.trunk[-1]``), with all trunk ReLUs made out-of-place so the hooked tensor
is unambiguous (see ``_cam_worker.PlainAlexNet``).

Each library runs in its own process (``_cam_worker.py``, one per library, resolution and
round, covering the batch sizes in turn), which first checks the library's maps against cocam's (max abs difference of the raw ReLU'd map at feature
resolution, and of the library's own output against cocam's map normalised/upsampled the same
way), then times the library's call interleaved with the **floor**: one forward plus
``torch.autograd.grad`` of the target logit sum w.r.t. the conv5 activation, no CAM arithmetic.
Ratios are taken against the floor measured in the same process (the machine is shared, so
absolute times drift): ``peer/cocam = (peer/floor) / (cocam/floor)``. The cocam worker also
times the CAMs of all 40 attributes in one call, ``grad_cam(model, images, list(range(40)))``,
against one attribute, both at feature resolution (target: at most 3x). Output: two tables and ``benchmarks/results/cam_libraries_cpu.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, machine_info, median, print_table, save_csv  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_cam_worker.py"
LIBRARIES = ("cocam", "pytorch-grad-cam", "captum", "torchcam")
DEFAULT_PYTHON = "/work/benchvenv/bin/python"


def run_worker(python: str, library: str, batches: list[int], size: int, reps: int, threads: int) -> list[dict]:
    """Run one worker process (one library, one resolution, the given batch sizes); parse its JSON lines."""
    cmd = [python, str(WORKER), "--library", library, "--batch", *map(str, batches), "--size", str(size),
           "--reps", str(reps), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]


def summarise(results: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The library table (one row per batch, size, library) and the all-40 table (cocam)."""
    df = pd.DataFrame(results)
    df["lib_over_floor"] = df["t_library"] / df["t_floor"]
    rows, rows40 = [], []
    for (batch, size), grp in df.groupby(["batch", "size"], sort=True):
        cocam = grp[grp.library == "cocam"]
        cocam_ratio = median(cocam["lib_over_floor"].tolist())
        for library in LIBRARIES:
            g = grp[grp.library == library]
            if g.empty:
                continue
            ratio = median(g["lib_over_floor"].tolist())
            t = median(g["t_library"].tolist())
            rows.append({
                "batch": batch, "size": size, "library": library,
                "ms_per_batch": 1000 * t, "images_per_s": batch / t,
                "floor_ms": 1000 * median(g["t_floor"].tolist()),
                "x_floor": ratio, "x_cocam": ratio / cocam_ratio,
                "max_abs_diff_raw": g["max_abs_diff_raw"].max(),
                "rel_diff_raw": g["max_abs_diff_raw"].max() / g["ref_raw_max"].max(),
                "max_abs_diff_output": g["max_abs_diff_output"].max(),
                "output": g["output"].iloc[0], "processes": len(g),
            })
        if "t_all40" in cocam:
            one = [s for samples in cocam["samples_one"] for s in samples]
            all40 = [s for samples in cocam["samples_all40"] for s in samples]
            rows40.append({
                "batch": batch, "size": size, "one_attr_ms": 1000 * median(one), "all40_ms": 1000 * median(all40),
                "all40_over_one": median([a / o for a, o in zip(all40, one)]),
                "per_attr_ms": 1000 * median(all40) / 40, "target_max": 3.0,
            })
    return pd.DataFrame(rows), pd.DataFrame(rows40)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 and 16 at 128 px, 1 rep, 1 round (smoke run)")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    p.add_argument("--reps", type=int, default=None, help="timed calls per process (default 5; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="processes per (library, config) (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable,
                   help="interpreter of the workers (needs cocam, grad-cam, captum, torchcam)")
    p.add_argument("--name", default=None, help="CSV name under benchmarks/results/ (default cam_libraries[_quick])")
    args = p.parse_args()
    batches = args.batches or ([1, 16] if args.quick else [1, 16, 64])
    sizes = args.sizes or ([128] if args.quick else [128, 224])
    reps = args.reps or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 2)
    name = args.name or ("cam_libraries_quick" if args.quick else "cam_libraries")

    probe = subprocess.run([args.python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True, check=True).stdout.strip()
    settings = dict(batch=batches, resolution=sizes, threads=args.threads, reps=reps, rounds=rounds,
                    model="alexnet hidden=512 eval", target="Blond_Hair (9)", worker_torch=probe)
    print(machine_header("Grad-CAM libraries: batched inference (CPU)", **settings), flush=True)

    results = []
    for size in sizes:
        for r in range(rounds):
            order = args.libraries[r % len(args.libraries):] + args.libraries[: r % len(args.libraries)]
            for library in order:  # one process per library (and resolution, round), all batch sizes
                for res in run_worker(args.python, library, batches, size, reps, args.threads):
                    print(f"  {library:>16} batch {res['batch']:>3} {size}px: {1000 * res['t_library']:8.1f} ms "
                          f"(floor {1000 * res['t_floor']:.1f} ms)", flush=True)
                    results.append(res)
    table, table40 = summarise(results)
    print_table(table, "Grad-CAM of one attribute for a batch (medians; x_floor and x_cocam are same-process ratios)")
    print_table(table40, "cocam: CAMs of all 40 attributes in one call vs one attribute (target <= 3x)")
    out = table.merge(table40, on=["batch", "size"], how="left") if not table40.empty else table
    save_csv(out, name, machine_info(**{k: str(v) for k, v in settings.items()}))


if __name__ == "__main__":
    main()
