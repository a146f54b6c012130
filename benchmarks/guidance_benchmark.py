"""Does guidance beat the equal-step BCE-only control? Several settings × seeds, with intervals.

    python benchmarks/guidance_benchmark.py --root data/synthetic --out runs/bench_guidance \
        --set losses            # cocam.compare.METHODS: the four guidance losses
    python benchmarks/guidance_benchmark.py --set variants   # variants of the paper's IoU loss
    python benchmarks/guidance_benchmark.py --set weights    # the CAM losses at 3× and 10× their weight

The protocol is :func:`cocam.compare.compare_guidance` (the same as ``cocam compare``): a
baseline trained to convergence, then from its best checkpoint, for every seed, the control and
each setting with the same steps, learning rate and data order; every run is scored on the
validation split (where a setting is chosen) and on the test split (where it is reported).
Writes ``runs.csv`` and ``summary.csv`` to ``--out`` and prints the test table and the
validation-split choice per attribute.

One GPU is mostly idle with one fine-tuning run of a small model at a time; ``--jobs N`` (with
``--baseline``) runs the seeds in N processes at once, each into ``<out>/seed<k>``, then merges
their rows (a seed's runs are independent of the other seeds', so the numbers do not change)::

    python benchmarks/guidance_benchmark.py --baseline runs/compare/baseline/best.pt \
        --seeds 0 1 2 3 4 5 --finetune-epochs 6 --jobs 6 --out runs/bench_gpu
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from cocam.attributes import PAPER_PAIRS, parse_pairs
from cocam.compare import (
    METHODS,
    ComparisonConfig,
    compare_guidance,
    comparison_table,
    select_settings,
    summarize_comparison,
)
from cocam.dataset import CelebADataset

#: Variants of the paper's IoU loss (resolution, gradient mode, weight, target).
VARIANTS = {
    "iou, positives (paper)": dict(loss="iou", target="positive"),
    "iou, both classes": dict(loss="iou", target="both"),
    "iou, both classes, w_g=3": dict(loss="iou", target="both", w_g=3.0),
    "iou, both classes, feature resolution": dict(loss="iou", target="both", resolution="feature"),
    "iou, positives, feature resolution": dict(loss="iou", target="positive", resolution="feature"),
    "iou, both classes, first order": dict(loss="iou", target="both", exact=False),
}
#: The CAM-based losses with a stronger guidance term (× 3 and × 10 their default weights).
WEIGHTS = {
    "iou, positives (paper), w_g=3": dict(loss="iou", target="positive", w_g=3.0),
    "iou, both classes, w_g=3": dict(loss="iou", target="both", w_g=3.0),
    "energy, w_g=3": dict(loss="energy", target="both", w_g=3.0),
    "energy, w_g=10": dict(loss="energy", target="both", w_g=10.0),
    "rrr_cam, w_g=30": dict(loss="rrr_cam", target="both", w_g=30.0),
    "rrr_cam, w_g=100": dict(loss="rrr_cam", target="both", w_g=100.0),
}
#: Chosen from the validation-split numbers of ``weights``: the paper's loss gained with its weight
#: on lipstick (× 1 → × 3), and energy was the best for double chin; so × 10 and × 30, and energy
#: guiding the positives only.
FOLLOW_UP = {
    "iou, positives (paper), w_g=10": dict(loss="iou", target="positive", w_g=10.0),
    "iou, positives (paper), w_g=30": dict(loss="iou", target="positive", w_g=30.0),
    "energy, positives": dict(loss="energy", target="positive"),
    "energy, positives, w_g=3": dict(loss="energy", target="positive", w_g=3.0),
}
#: The settings chosen on the validation split from ``losses``, ``weights`` and ``follow-up``
#: (one per paper pair), e.g. for a longer budget (``--finetune-epochs 12``).
CHOSEN = {
    "iou, positives (paper), w_g=3": WEIGHTS["iou, positives (paper), w_g=3"],
    "iou, both classes, w_g=3": WEIGHTS["iou, both classes, w_g=3"],
    "energy": METHODS["energy"],
}
#: The three chosen settings in one run, each attribute guided with its own (the paper's pairs'
#: order: Wearing_Lipstick, High_Cheekbones, Double_Chin).
MIXED = {
    "per attribute (the chosen three)": dict(loss=("iou", "iou", "energy"), target=("positive", "both", "both"),
                                             w_g=(3.0, 3.0, 1.0)),
}
SETS = {"losses": METHODS, "variants": VARIANTS, "weights": WEIGHTS, "follow-up": FOLLOW_UP, "chosen": CHOSEN,
        "mixed": MIXED}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("data/synthetic"))
    p.add_argument("--out", type=Path, default=Path("runs/bench_guidance"))
    p.add_argument("--set", choices=sorted(SETS), default="losses")
    p.add_argument("--only", nargs="+", help="a subset of the set's setting names")
    p.add_argument("--pair", action="append", metavar="A:B",
                   help="guided pairs (repeatable; default: the paper's three, all guided in every run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--epochs", type=int, default=40, help="baseline epochs at most (early stopping)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--baseline", type=Path, help="a converged baseline checkpoint to start from")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once (needs --baseline)")
    args = p.parse_args()
    if args.jobs > 1:
        run_parallel(args)
        return

    settings = SETS[args.set]
    if args.only:
        settings = {k: settings[k] for k in args.only}
    pairs = tuple(parse_pairs(args.pair)) if args.pair else tuple(PAPER_PAIRS)
    config = ComparisonConfig(root=args.root, out=args.out, seeds=tuple(args.seeds), pairs=pairs,
                              image_size=args.image_size,
                              hidden=args.hidden, baseline_epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                              finetune_lr=args.finetune_lr, device=args.device)
    result = compare_guidance(config, settings, baseline=args.baseline)
    report(result.summary)


def report(summary: pd.DataFrame) -> None:
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        print(comparison_table(summary, "test").to_string(index=False))
        print("\nchosen on the valid split (largest worst-group gain, ≤ 1 point of accuracy lost):")
        print(select_settings(summary)[["attribute", "setting", "gain_worst_group", "gain_conflict_mean", "gain",
                                        "test_change"]].to_string(index=False))


def run_parallel(args: argparse.Namespace) -> None:
    """Each seed group in its own process (``<out>/seed<k>``), then one merged runs/summary table."""
    if args.baseline is None:
        raise SystemExit("--jobs needs --baseline: train the baseline once first (cocam train, or a --jobs 1 run).")
    for split in ("train", "valid", "test"):  # build the decoded cache once, not in every process at the same time
        CelebADataset(args.root, split, image_size=args.image_size)
    groups = [args.seeds[i::args.jobs] for i in range(args.jobs) if args.seeds[i::args.jobs]]
    procs = []
    for group in groups:  # argparse keeps an option's last value: these override the parent's
        child = [*sys.argv[1:], "--seeds", *map(str, group), "--out", str(args.out / f"seed{group[0]}"), "--jobs", "1"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        procs.append(subprocess.Popen([sys.executable, __file__, *child], env=env))
    failed = [p.args for p in procs if p.wait() != 0]
    files = [args.out / f"seed{group[0]}" / "runs.csv" for group in groups]
    parts = [pd.read_csv(f) for f in files if f.is_file()]
    if not parts:
        raise SystemExit("no process finished a run.")
    runs = pd.concat(parts, ignore_index=True).drop_duplicates(["setting", "seed", "split", "attribute"])
    summary = summarize_comparison(runs)
    runs.to_csv(args.out / "runs.csv", index=False)
    summary.to_csv(args.out / "summary.csv", index=False)
    report(summary)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(procs)} processes failed; the tables hold the runs that finished.")


if __name__ == "__main__":
    main()
