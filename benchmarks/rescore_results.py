"""Re-score the landed comparison results on the worst-group accuracy, from their per-run rows.

The summaries in ``benchmarks/results/`` chose and reported settings by the gain on the paper's
conflict subset A∧¬B, which a model raises by predicting A more often. Every runs CSV there also
holds each run's worst-group accuracy (``worst_group``, the lowest of the four (A, B) groups), and
the ``guidance_*`` runs the reverse group ¬A∧B (``reverse``), so the headline can be recomputed
without retraining: this script writes, next to each ``*_runs_*.csv``, a ``*_rescored_*.csv`` with
:func:`cocam.compare.summarize_comparison` over the same runs (worst-group gain over the control,
conflict-mean gain where ``reverse`` exists, t-intervals over seeds), one block per ``set`` and
``steps`` where the runs have them. It also prints, per block and attribute, the setting that
:func:`cocam.compare.select_settings` chooses on the worst group where a valid split was scored.

Nothing is overwritten: an existing ``*_rescored_*.csv`` is left as it is unless ``--force``.

    python benchmarks/rescore_results.py [--results benchmarks/results] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cocam.compare import select_settings, summarize_comparison  # noqa: E402
from cocam.io import atomic_write_text  # noqa: E402


def rescore(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`summarize_comparison` per (``set``, ``steps``) block, with the worst-group gains."""
    runs = runs.copy()
    if "split" not in runs:  # the guidance_* benchmarks scored the test split only
        runs["split"] = "test"
    if "reverse" in runs and "conflict_mean" not in runs:
        runs["conflict_mean"] = (runs["conflict"] + runs["reverse"]) / 2
    blocks = [c for c in ("set", "steps") if c in runs]
    if not blocks:
        return summarize_comparison(runs)
    parts = []
    for key, g in runs.groupby(blocks, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        parts.append(summarize_comparison(g).assign(**dict(zip(blocks, key))))
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--force", action="store_true", help="rewrite existing *_rescored_*.csv files")
    args = p.parse_args()
    for path in sorted(args.results.glob("*_runs_*.csv")):
        runs = pd.read_csv(path)
        if "worst_group" not in runs:
            print(f"{path.name}: no per-run worst-group accuracy; cannot be re-scored")
            continue
        target = path.with_name(path.name.replace("_runs_", "_rescored_"))
        summary = rescore(runs)
        if target.exists() and not args.force:
            print(f"{target.name}: exists, left as it is (--force rewrites it)")
        else:
            atomic_write_text(target, summary.to_csv(index=False))
            print(f"{target.name}: written ({len(summary)} rows)")
        if "valid" in set(summary.split):
            blocks = [c for c in ("set", "steps") if c in summary]
            for key, g in (summary.groupby(blocks, sort=False) if blocks else [((), summary)]):
                try:
                    chosen = select_settings(g)
                except ValueError as err:
                    print(f"  {key}: {err}")
                    continue
                cols = ["attribute", "setting", "gain_worst_group", "gain_worst_group_low", "gain_worst_group_high",
                        "gain", "test_change"]
                print(f"  {key} chosen on valid by worst group:\n{chosen[cols].round(1).to_string(index=False)}")


if __name__ == "__main__":
    main()
