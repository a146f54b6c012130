"""Where does each method win? Worst-group accuracy against bias strength, one line per method.

    python benchmarks/bias_strength.py --data data/bias_strength --out runs/bias_strength \
        --strengths 1 0.25 0.05 0 --baseline-seeds 0 1 2 --seeds 0 1 2

For every bias strength (the synthetic generator's ``train_conflict_scale``: 1 = CelebA's
rates, 0 = not one conflict image in the training split) this script generates the dataset
(``<data>/strength_<s>``, reused when complete), then runs :func:`cocam.compare.compare_guidance`
on it — the same protocol as ``cocam compare``: converged baselines (one per baseline seed),
and from each, for every fine-tuning seed, the BCE-only control, the guidance setting(s) and
the peers (random region, group-balanced, guided + balanced, last-layer retraining), all with
the same steps, learning rate and data order, all scored on the validation and test splits.

The **oracle** is the baseline trained at CelebA's rates (strength 1): the same architecture
and budget without the amplified co-occurrence. The generator draws the validation and test
splits independently of the strength (same labels, same images: checked, see
:func:`same_evaluation_splits`), so the strength-1 baselines' scores are the ceiling of every
strength; they appear as the setting ``oracle (CelebA rates)``.

Writes, into ``--out``: ``runs.csv`` (every run, with a ``strength`` column), ``summary.csv``
(:func:`cocam.compare.summarize_comparison` per strength), ``bias_strength.png`` (test
worst-group accuracy against strength, one panel per attribute, one line per method, 95 %
intervals over baselines × seeds), and prints the table. Runs resume, so the sweep can be
grown (more strengths, seeds or baselines) by running it again.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cocam.attributes import PAPER_PAIRS, parse_pairs
from cocam.celeba import read_attributes, read_partition
from cocam.compare import CONTROL, PEERS, PRE_TRAINED, ComparisonConfig, compare_guidance, summarize_comparison
from cocam.synthetic import PRESETS, generate_synthetic_celeba

#: The guidance setting of the sweep: the paper's loss and target (IoU on the positives) at
#: three times the paper's weight, the weight chosen on the validation split for lipstick in the
#: earlier loss comparison (``guidance_benchmark.py --set weights``).
SETTINGS = {"guided (paper's IoU, positives, w_g=3)": dict(loss="iou", target="positive", w_g=3.0)}

ORACLE = "oracle (CelebA rates)"
DECORRELATED = "oracle (decorrelated)"


def strength_root(data: Path, strength: float) -> Path:
    return data / f"strength_{strength:g}"


def same_evaluation_splits(a: Path, b: Path) -> bool:
    """Whether two generated datasets have identical validation and test splits (labels and image bytes)."""
    digests = []
    for root in (a, b):
        celeba = root / "celeba"
        split = read_partition(celeba / "list_eval_partition.txt")
        names = split.index[split.isin(["valid", "test"])]
        labels = read_attributes(celeba / "list_attr_celeba.txt").loc[names]
        h = hashlib.sha1(pd.util.hash_pandas_object(labels, index=True).values.tobytes())
        for name in names[:: max(1, len(names) // 50)]:  # 50 images spread over both splits
            h.update((celeba / "img_align_celeba" / name).read_bytes())
        digests.append(h.hexdigest())
    return digests[0] == digests[1]


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = summary[summary.split == "test"]
    attrs = list(dict.fromkeys(test.attribute))
    fig, axes = plt.subplots(1, len(attrs), figsize=(5 * len(attrs), 4), squeeze=False, sharey=True)
    for ax, attr in zip(axes[0], attrs):
        rows = test[test.attribute == attr]
        for setting, g in rows.groupby("setting", sort=False):
            g = g.sort_values("strength")
            err = np.vstack([g.worst_group - g.worst_group_low, g.worst_group_high - g.worst_group]).clip(min=0)
            style = dict(ls="--", color="k" if setting == ORACLE else "grey") if setting in (ORACLE, DECORRELATED) \
                else dict(marker="o")
            ax.errorbar(g.strength, g.worst_group, yerr=np.nan_to_num(err), capsize=3, label=setting, **style)
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("bias strength (train conflict scale; 1 = CelebA's rates)")
        ax.set_title(attr)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test worst-group accuracy, %")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("synthetic CelebA-format benchmark: mean over baselines × seeds, 95 % intervals")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/bias_strength"), help="where the datasets are generated")
    p.add_argument("--out", type=Path, default=Path("runs/bias_strength"))
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.25, 0.05, 0.0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="dataset size")
    p.add_argument("--pair", action="append", metavar="A:B", help="guided pairs (default: the paper's three at once)")
    p.add_argument("--baseline-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--peers", nargs="*", default=list(PEERS), help=f"of: {', '.join(PEERS)}")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=40, help="baseline epochs at most (early stopping)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="processes that render the images")
    p.add_argument("--decorrelated-oracle", action="store_true",
                   help="also train baselines on a training split where each pair's A is independent of its B "
                        "(cocam generate --train-decorrelated): the oracle 'oracle (decorrelated)'")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: merge the runs.csv each strength's comparison has written so far")
    args = p.parse_args()

    pairs = tuple(parse_pairs(args.pair)) if args.pair else tuple(PAPER_PAIRS)
    preset = PRESETS[args.preset]
    runs = []

    def budget(root: Path, out: Path, seeds: tuple[int, ...], peers: tuple[str, ...]) -> ComparisonConfig:
        """The same comparison budget for every dataset of the sweep."""
        return ComparisonConfig(root=root, out=out, seeds=seeds, pairs=pairs, image_size=args.image_size,
                                baseline_epochs=args.epochs, patience=args.patience,
                                finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                                device=args.device, baseline_seeds=tuple(args.baseline_seeds), peers=peers)

    for strength in args.strengths:
        root = strength_root(args.data, strength)
        if args.report_only:
            done = args.out / f"strength_{strength:g}" / "runs.csv"
            if done.is_file():
                runs.append(pd.read_csv(done).assign(strength=strength))
            continue
        generate_synthetic_celeba(root, type(preset)(**{**preset.to_dict(), "difficulty": preset.difficulty,
                                                        "train_conflict_scale": strength}), workers=args.workers)
        config = budget(root, args.out / f"strength_{strength:g}", tuple(args.seeds), tuple(args.peers))
        result = compare_guidance(config, SETTINGS, log=lambda line, s=strength: print(f"strength {s:g} · {line}"))
        runs.append(result.runs.assign(strength=strength))
    if args.decorrelated_oracle:
        root = args.data / "decorrelated"
        if not args.report_only:
            generate_synthetic_celeba(root, type(preset)(**{**preset.to_dict(), "difficulty": preset.difficulty,
                                                            "train_decorrelated": True}), workers=args.workers)
            # only the baselines are needed (one control per baseline comes with them)
            config = budget(root, args.out / "decorrelated", (args.seeds[0],), ())
            compare_guidance(config, {}, log=lambda line: print(f"decorrelated · {line}"))
        done = args.out / "decorrelated" / "runs.csv"
        if done.is_file():
            oracle = pd.read_csv(done)
            oracle = oracle[oracle.setting == PRE_TRAINED].assign(setting=DECORRELATED)
            runs += [oracle.assign(strength=s) for s in args.strengths
                     if same_evaluation_splits(root, strength_root(args.data, s))]
    runs_df = pd.concat(runs, ignore_index=True)
    if 1.0 in args.strengths:
        oracle = runs_df[(runs_df.strength == 1.0) & (runs_df.setting == PRE_TRAINED)]
        for strength in args.strengths:
            if strength != 1.0 and same_evaluation_splits(strength_root(args.data, 1.0),
                                                          strength_root(args.data, strength)):
                runs_df = pd.concat([runs_df, oracle.assign(strength=strength, setting=ORACLE)], ignore_index=True)
        runs_df = pd.concat([runs_df, oracle.assign(setting=ORACLE)], ignore_index=True)
    summary = pd.concat([summarize_comparison(g).assign(strength=s) for s, g in runs_df.groupby("strength")],
                        ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_df.to_csv(args.out / "runs.csv", index=False)
    summary.to_csv(args.out / "summary.csv", index=False)
    plot(summary, args.out / "bias_strength.png")
    cols = ["strength", "attribute", "setting", "seeds", "worst_group", "worst_group_low", "worst_group_high",
            "gain_worst_group", "gain_worst_group_low", "gain_worst_group_high", "conflict", "test", "test_change"]
    view = summary[summary.split == "test"][[c for c in cols if c in summary]]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.1f}".format):
        print(view.to_string(index=False))
    print(f"\n{CONTROL!r} is the reference of every gain; runs, summary and figure in {args.out}")


if __name__ == "__main__":
    main()
