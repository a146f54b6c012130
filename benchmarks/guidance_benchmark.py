"""Does guidance beat the equal-step BCE-only control? Several settings × seeds, with intervals.

    python benchmarks/guidance_benchmark.py --root data/synthetic --out runs/bench_guidance \
        --set losses            # cocam.compare.METHODS: the four guidance losses
    python benchmarks/guidance_benchmark.py --set variants   # variants of the paper's IoU loss

The protocol is :func:`cocam.compare.compare_guidance` (the same as ``cocam compare``): a
baseline trained to convergence, then from its best checkpoint, for every seed, the control and
each setting with the same steps, learning rate and data order; every run is scored on the
validation split (where a setting is chosen) and on the test split (where it is reported).
Writes ``runs.csv`` and ``summary.csv`` to ``--out`` and prints the test table and the
validation-split choice per attribute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cocam.compare import METHODS, ComparisonConfig, compare_guidance, comparison_table, select_settings

#: Variants of the paper's IoU loss (resolution, gradient mode, weight, target).
VARIANTS = {
    "iou, positives (paper)": dict(loss="iou", target="positive"),
    "iou, both classes": dict(loss="iou", target="both"),
    "iou, both classes, w_g=3": dict(loss="iou", target="both", w_g=3.0),
    "iou, both classes, feature resolution": dict(loss="iou", target="both", resolution="feature"),
    "iou, positives, feature resolution": dict(loss="iou", target="positive", resolution="feature"),
    "iou, both classes, first order": dict(loss="iou", target="both", exact=False),
}
SETS = {"losses": METHODS, "variants": VARIANTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("data/synthetic"))
    p.add_argument("--out", type=Path, default=Path("runs/bench_guidance"))
    p.add_argument("--set", choices=sorted(SETS), default="losses")
    p.add_argument("--only", nargs="+", help="a subset of the set's setting names")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--epochs", type=int, default=40, help="baseline epochs at most (early stopping)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    settings = SETS[args.set]
    if args.only:
        settings = {k: settings[k] for k in args.only}
    config = ComparisonConfig(root=args.root, out=args.out, seeds=tuple(args.seeds), image_size=args.image_size,
                              hidden=args.hidden, baseline_epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                              finetune_lr=args.finetune_lr, device=args.device)
    result = compare_guidance(config, settings)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        print(comparison_table(result.summary, "test").to_string(index=False))
        print("\nchosen on the valid split:")
        print(select_settings(result.summary)[["attribute", "setting", "gain", "test_change"]].to_string(index=False))


if __name__ == "__main__":
    main()
