"""Does guidance beat the equal-step BCE-only control? Several settings × seeds, with intervals.

    python benchmarks/guidance_benchmark.py --root data/synthetic --out runs/bench_guidance

Protocol (nothing is tuned on the test split):
1. a baseline trained to convergence (early stopping on the validation BCE; reused if present);
2. from its best checkpoint, for every seed: the BCE-only control and each guidance setting,
   all with the same number of steps, learning rate and data order (the seed);
3. accuracy of each guided attribute on the whole test split and on its conflict subset A∧¬B,
   and Grad-CAM IoU with the ground-truth region (synthetic data) on test positives.
Prints the per-setting mean over seeds with a 95 % t-interval, and the per-seed gain over
the control; writes every number to ``<out>/runs.csv`` and the summary to ``<out>/summary.csv``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cocam.attributes import PAPER_PAIRS
from cocam.checkpoint import ModelSpec, load_model
from cocam.dataset import CelebADataset
from cocam.evaluate import attention_metrics, pair_accuracy, predict
from cocam.io import atomic_write_text
from cocam.masks import resolve_mask
from cocam.train import Guidance, TrainConfig, fit

SETTINGS = {
    "seed paper (positive, w_g=1)": dict(target="positive", w_g=1.0),
    "both classes (w_g=1)": dict(target="both", w_g=1.0),
    "both classes (w_g=3)": dict(target="both", w_g=3.0),
    "both classes, feature resolution (w_g=1)": dict(target="both", w_g=1.0, resolution="feature"),
    "seed paper, feature resolution (w_g=1)": dict(target="positive", w_g=1.0, resolution="feature"),
    "both classes, first order (w_g=1)": dict(target="both", w_g=1.0, exact=False),
}


def t_interval(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, float)
    if len(x) < 2:
        return float("nan"), float("nan")
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(x), 2.0)
    half = t * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("data/synthetic"))
    p.add_argument("--out", type=Path, default=Path("runs/bench_guidance"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--epochs", type=int, default=15, help="baseline epochs at most (early stopping)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS)[:3], choices=list(SETTINGS))
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    spec = ModelSpec(image_size=args.image_size, hidden=args.hidden)
    train = CelebADataset(args.root, "train", image_size=spec.image_size)
    valid = CelebADataset(args.root, "valid", image_size=spec.image_size)
    test = CelebADataset(args.root, "test", image_size=spec.image_size)
    from cocam.synthetic import EvidenceRegions

    regions = EvidenceRegions(args.root)
    attrs = [a for a, _ in PAPER_PAIRS]
    masks = tuple(resolve_mask(a)[0] for a in attrs)

    t0 = time.perf_counter()
    base = fit(spec.build(), train, valid, TrainConfig(epochs=args.epochs, device=args.device), spec=spec,
               run_dir=args.out / "baseline", resume=True)
    print(f"baseline: {len(base.history)} epochs, best valid BCE {base.history.valid_bce.min():.4f} "
          f"({time.perf_counter() - t0:.0f}s)")

    def score(name: str, seed: int, path: Path) -> list[dict]:
        model, _, _ = load_model(path)
        acc = pair_accuracy(predict(model, test, device=args.device), test.attributes, PAPER_PAIRS)
        rows = []
        for a, b in PAPER_PAIRS:
            s = acc[(acc.a == a)].set_index("subset")
            pos = test.subset({a: 1})
            truth = regions.masks(list(pos.names), a, spec.image_size).float()
            att = attention_metrics(model, pos, a, truth, device=args.device)
            rows.append({"setting": name, "seed": seed, "attribute": a, "shortcut": b,
                         "test": 100 * s.loc["all", "accuracy"], "conflict": 100 * s.loc["A∧¬B", "accuracy"],
                         "reverse": 100 * s.loc["¬A∧B", "accuracy"], "worst_group": 100 * s.loc["worst group", "accuracy"],
                         "n_test": int(s.loc["all", "n"]), "n_conflict": int(s.loc["A∧¬B", "n"]),
                         "truth_iou": att["soft_iou"], "truth_pointing": att["pointing_game"]})
        return rows

    rows = score("pre-trained", -1, base.best_path)
    for seed in args.seeds:
        runs = {"BCE-only control": None} | {k: SETTINGS[k] for k in args.settings}
        for name, setting in runs.items():
            guidance = None if setting is None else Guidance(tuple(attrs), masks, **setting)
            model, _, _ = load_model(base.best_path)
            t = time.perf_counter()
            cfg = TrainConfig.fine_tuning(len(train), args.finetune_epochs, lr=args.finetune_lr, seed=seed,
                                          device=args.device)
            tag = "control" if setting is None else f"setting{list(SETTINGS).index(name)}"
            r = fit(model, train, valid, cfg, spec=spec, guidance=guidance, run_dir=args.out / f"{tag}_seed{seed}",
                    resume=True, progress=False)
            rows += score(name, seed, r.last_path)
            print(f"seed {seed} {name}: {time.perf_counter() - t:.0f}s", flush=True)
            atomic_write_text(args.out / "runs.csv", pd.DataFrame(rows).to_csv(index=False))

    df = pd.DataFrame(rows)
    control = df[df.setting == "BCE-only control"].set_index(["seed", "attribute"])
    summary = []
    for (name, a), g in df.groupby(["setting", "attribute"], sort=False):
        entry = {"setting": name, "attribute": a, "seeds": len(g), "n_conflict": int(g.n_conflict.iloc[0])}
        for col in ("test", "conflict", "truth_iou"):
            lo, hi = t_interval(g[col].to_numpy())
            entry[col] = g[col].mean()
            entry[f"{col}_ci"] = f"[{lo:.1f}, {hi:.1f}]" if col != "truth_iou" else f"[{lo:.3f}, {hi:.3f}]"
        if name not in ("pre-trained", "BCE-only control"):
            gain = g.set_index(["seed", "attribute"]).conflict - control.conflict
            lo, hi = t_interval(gain.dropna().to_numpy())
            entry["conflict_gain_vs_control"] = gain.mean()
            entry["gain_ci"] = f"[{lo:.1f}, {hi:.1f}]"
            dtest = g.set_index(["seed", "attribute"]).test - control.test
            entry["test_change_vs_control"] = dtest.mean()
        summary.append(entry)
    summary = pd.DataFrame(summary)
    atomic_write_text(args.out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(args.out / "bench.json", json.dumps(vars(args), default=str, indent=2))
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.2f}".format):
        print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
