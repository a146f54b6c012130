"""Shared helpers of the CPU benchmarks (``cam_libraries.py``, ``guided_step.py``, ``input_pipeline.py``).

* :func:`machine_header` — the lines every benchmark prints first: CPU model, cores, torch
  version, threads, and the benchmark's own settings (batch, resolution, ...).
* :func:`interleaved_times` — time several callables round-robin (A, B, C, A, B, C, ...), so
  that load from other processes on a shared machine hits all of them alike; report medians
  and compare *ratios* measured in the same run, never absolute times across runs.
* :func:`print_table` / :func:`save_csv` — a pandas table on stdout and the same numbers in
  ``benchmarks/results/<name>_cpu.csv``.

Nothing here asserts on timings.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(**settings: Any) -> dict[str, Any]:
    """Machine and library facts plus the benchmark's settings, as a flat dict (also written to the CSV)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    info.update(settings)
    return info


def machine_header(title: str, **settings: Any) -> str:
    """A printable header: title, machine, versions, threads and the given settings."""
    info = machine_info(**settings)
    lines = [title, "=" * len(title)]
    lines.append(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, "
                 f"{info['threads']} threads; python {info['python']}")
    extra = [f"{k}={v}" for k, v in settings.items()]
    if extra:
        lines.append("settings: " + ", ".join(extra))
    return "\n".join(lines)


def time_call(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1, rotate: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each callable, measured round-robin ``reps`` times after ``warmup`` rounds.

    With ``rotate`` the starting callable changes every round (A B C, B C A, C A B, ...), so no
    callable always runs right after the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)] if rotate else names
        for name in order:
            out[name].append(time_call(fns[name]))
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_table(df: pd.DataFrame, title: str | None = None, floatfmt: str = "{:.3g}") -> None:
    """Print a DataFrame side by side (all columns, no wrapping)."""
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60,
                           "display.float_format", floatfmt.format):
        if title:
            print(f"\n{title}")
        print(df.to_string(index=False))


def save_csv(df: pd.DataFrame, name: str, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``df`` (plus the machine columns of ``info``) to ``benchmarks/results/<name>_cpu.csv``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    for key, value in (info or {}).items():
        if key not in out.columns:
            out[key] = value
    path = RESULTS_DIR / f"{name}_cpu.csv"
    out.to_csv(path, index=False)
    print(f"\nwrote {path}")
    return path
