"""Cost of a Grad-CAM guided fine-tuning step against a plain BCE step (CPU).

    .venv/bin/python benchmarks/guided_step.py            # full: 112 and 128 px, 1 and 3 attributes, 5 variants
    .venv/bin/python benchmarks/guided_step.py --quick    # smoke run (< 60 s)

What is compared, on the same model (``build_model("alexnet", hidden=512)``, seed 0, training
mode as in ``cocam.train.fit``), the same batch (64 ``torch.randn`` images, random 0/1 labels)
and one AdamW optimiser:

* **plain step** — what ``fit`` does per step without guidance: ``BCE(model(x))``, backward,
  ``AdamW.step``;
* **guided step** — what ``fit`` does per step with guidance, through the library:
  ``cocam.train.guided_terms(model, images, targets, guidance, target_idx, masks)`` (masks from
  ``cocam.train.guidance_masks`` of ``cocam.masks.default_mask``), ``terms.total.backward()``,
  ``AdamW.step``; for 1 (Wearing_Lipstick) and 3 (+ High_Cheekbones, Double_Chin) guided
  attributes and the variants of ``Guidance``: exact (double backprop) vs first order,
  resolution input vs feature, target both vs positive.

Each guided step is timed right after a plain step (pairs, the order of the variants rotating
every round), and the reported ratio is the median over rounds of guided/plain within a pair,
so load from other processes on the shared machine cancels out (target: guided/plain <= 1.4).

Then, on one configuration (112 px, 3 attributes, exact, input resolution, both classes), the
components of the step are timed (interleaved) to see where the extra time goes, and
``torch.profiler`` prints the top operators by self CPU time of the plain and the guided step.
Writes ``benchmarks/results/guided_step_cpu.csv``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine_header, machine_info, median, print_table, save_csv, time_call  # noqa: E402

from cocam import train as cocam_train  # noqa: E402
from cocam.attributes import attribute_index  # noqa: E402
from cocam.gradcam import grad_cam  # noqa: E402
from cocam.masks import default_mask  # noqa: E402
from cocam.model import SplitModel, build_model  # noqa: E402
from cocam.train import Guidance  # noqa: E402

ATTRIBUTES = ("Wearing_Lipstick", "High_Cheekbones", "Double_Chin")

#: name -> Guidance keyword arguments (the default is Guidance's own: exact, input, both).
VARIANTS: dict[str, dict[str, Any]] = {
    "exact, input, both (default)": {},
    "first order": {"exact": False},
    "feature resolution": {"resolution": "feature"},
    "positive (paper)": {"target": "positive"},
    "first order + feature": {"exact": False, "resolution": "feature"},
}


class Bench:
    """One model, optimiser and batch; builds the plain and guided step callables."""

    def __init__(self, size: int, batch: int, hidden: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model: SplitModel = build_model("alexnet", hidden=hidden).train()
        # A tiny learning rate: the weights hardly move while we time hundreds of steps.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-7, weight_decay=1e-5)
        gen = torch.Generator().manual_seed(seed + 1)
        self.images = torch.randn(batch, 3, size, size, generator=gen)
        self.targets = (torch.rand(batch, 40, generator=gen) < 0.4).float()
        self.landmarks = torch.full((batch, 5, 2), size / 2.0)
        self.size = size

    def plain_step(self) -> None:
        """cocam.train.fit's step without guidance."""
        loss = F.binary_cross_entropy_with_logits(self.model(self.images).float(), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def guidance(self, n_attributes: int, **kwargs: Any) -> tuple[Guidance, list[int], torch.Tensor]:
        attrs = ATTRIBUTES[:n_attributes]
        guidance = Guidance(attrs, tuple(default_mask(a) for a in attrs), **kwargs)
        target_idx = [attribute_index(a) for a in attrs]
        masks = cocam_train.guidance_masks(guidance, self.model, self.size, torch.device("cpu"))
        return guidance, target_idx, masks

    def terms_fn(self, n_attributes: int, **kwargs: Any) -> Callable[[], Any]:
        """``guided_terms`` for this batch (the loss terms of one guided step, no backward)."""
        guidance, target_idx, masks = self.guidance(n_attributes, **kwargs)
        extra = {}
        if "landmarks" in inspect.signature(cocam_train.guided_terms).parameters:
            extra["landmarks"] = self.landmarks  # newer signature; unused by transfer="template"
        return lambda: cocam_train.guided_terms(self.model, self.images, self.targets, guidance, target_idx,
                                                 masks, **extra)

    def guided_step_fn(self, n_attributes: int, **kwargs: Any) -> Callable[[], None]:
        """cocam.train.fit's step with guidance."""
        terms_fn = self.terms_fn(n_attributes, **kwargs)

        def step() -> None:
            terms = terms_fn()
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            self.optimizer.step()

        return step


def paired_ratios(plain: Callable[[], None], variants: dict[str, Callable[[], None]], reps: int,
                  warmup: int = 1) -> dict[str, dict[str, float]]:
    """For each variant, median seconds and median of (variant / plain step timed just before it)."""
    names = list(variants)
    for _ in range(warmup):
        plain()
        for name in names:
            variants[name]()
    t_plain: dict[str, list[float]] = {n: [] for n in names}
    t_var: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t_plain[name].append(time_call(plain))
            t_var[name].append(time_call(variants[name]))
    return {n: {"guided_s": median(t_var[n]), "plain_s": median(t_plain[n]),
                "ratio": median([v / p for v, p in zip(t_var[n], t_plain[n])])} for n in names}


def components(bench: Bench, n_attributes: int, reps: int) -> pd.DataFrame:
    """Time the pieces of a guided step (default variant) and of a plain step, interleaved."""
    guidance, target_idx, _ = bench.guidance(n_attributes)
    model, x, y = bench.model, bench.images, bench.targets
    labels = y[:, target_idx]
    signs = 2 * labels - 1  # target="both"
    terms_fn = bench.terms_fn(n_attributes)
    guided_step = bench.guided_step_fn(n_attributes)

    def forward() -> None:  # forward + BCE, graph kept (dropped at return)
        F.binary_cross_entropy_with_logits(model(x).float(), y)

    def forward_grad() -> None:  # forward + d(scores)/dA with create_graph, CAM weights einsum only
        grad_cam(model, x, target_idx, signs=signs, create_graph=True, relu=False, normalize=False)

    def cam_full() -> None:  # + ReLU, min-max normalisation, bilinear upsampling to the input size
        grad_cam(model, x, target_idx, signs=signs, create_graph=True, output_size=bench.size)

    def adam() -> None:
        bench.optimizer.step()

    fns = {"plain forward (+BCE)": forward, "plain step": bench.plain_step,
           "forward + grad to A (create_graph)": forward_grad, "+ CAM arithmetic (grad_cam)": cam_full,
           "+ loss (guided_terms)": terms_fn, "guided step": guided_step, "AdamW step alone": adam}
    times = {k: median(v) for k, v in interleaved_times(fns, reps=reps, warmup=1).items()}
    plain_bwd = times["plain step"] - times["plain forward (+BCE)"] - times["AdamW step alone"]
    guided_bwd = times["guided step"] - times["+ loss (guided_terms)"] - times["AdamW step alone"]
    rows = [(k, v) for k, v in times.items()] + [
        ("= grad to A with create_graph (extra)", times["forward + grad to A (create_graph)"] - times["plain forward (+BCE)"]),
        ("= CAM arithmetic (extra)", times["+ CAM arithmetic (grad_cam)"] - times["forward + grad to A (create_graph)"]),
        ("= loss_g forward (extra)", times["+ loss (guided_terms)"] - times["+ CAM arithmetic (grad_cam)"]),
        ("= plain backward", plain_bwd),
        ("= guided backward (double backprop)", guided_bwd),
        ("= extra backward", guided_bwd - plain_bwd),
        ("= total extra (guided - plain step)", times["guided step"] - times["plain step"]),
    ]
    df = pd.DataFrame(rows, columns=["component", "seconds"])
    df["x_plain_step"] = df["seconds"] / times["plain step"]
    return df


def profile_steps(bench: Bench, n_attributes: int, rows: int) -> None:
    """Print the top operators by self CPU time of one plain and one guided step."""
    from torch.profiler import ProfilerActivity, profile

    guided_step = bench.guided_step_fn(n_attributes)
    for name, fn in (("plain step", bench.plain_step), (f"guided step ({n_attributes} attributes, default)", guided_step)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\ntorch.profiler, {name}: top {rows} operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=55))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 16, 112 px, 3 attributes, 2 variants, 2 rounds")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--attributes", type=int, nargs="+", default=None, choices=[1, 2, 3])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--reps", type=int, default=None, help="rounds of (plain, guided) pairs (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--name", default=None, help="CSV name under benchmarks/results/ (default guided_step[_quick])")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([112] if args.quick else [112, 128])
    batch = args.batch or (16 if args.quick else 64)
    n_attrs = args.attributes or ([3] if args.quick else [1, 3])
    reps = args.reps or (2 if args.quick else 5)
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    name = args.name or ("guided_step_quick" if args.quick else "guided_step")
    settings = dict(batch=batch, resolution=sizes, threads=torch.get_num_threads(), reps=reps,
                    model=f"alexnet hidden={args.hidden} train mode", optimizer="AdamW",
                    guided=",".join(ATTRIBUTES[: max(n_attrs)]))
    print(machine_header("Guided fine-tuning step vs plain BCE step (CPU)", **settings), flush=True)

    rows = []
    for size in sizes:
        bench = Bench(size, batch, args.hidden)
        steps = {(n, v): bench.guided_step_fn(n, **kw) for n in n_attrs for v, kw in variants.items()}
        labelled = {f"{n} attr | {v}": fn for (n, v), fn in steps.items()}
        res = paired_ratios(bench.plain_step, labelled, reps)
        for (n, v), key in zip(steps, labelled):
            r = res[key]
            rows.append({"size": size, "batch": batch, "attributes": n, "variant": v,
                         "plain_ms": 1000 * r["plain_s"], "guided_ms": 1000 * r["guided_s"],
                         "guided_over_plain": r["ratio"], "target_max": 1.4})
            print(f"  {size}px {key:>40}: {r['ratio']:.2f}x", flush=True)
    table = pd.DataFrame(rows)
    print_table(table, f"Guided step / plain step (batch {batch}; median of paired ratios)")

    comp_size, comp_attrs = sizes[0], max(n_attrs)
    comp = components(Bench(comp_size, batch, args.hidden), comp_attrs, reps)
    print_table(comp, f"Components ({comp_size}px, {comp_attrs} attributes, exact, input resolution, both; "
                      f"medians of interleaved runs)")
    if not args.no_profile:
        profile_steps(Bench(comp_size, batch, args.hidden), comp_attrs, rows=8 if args.quick else 15)

    comp_rows = comp.rename(columns={"component": "variant", "seconds": "guided_ms"}).assign(
        guided_ms=lambda d: 1000 * d.guided_ms, size=comp_size, batch=batch, attributes=comp_attrs,
        table="components")
    out = pd.concat([table.assign(table="ratios"), comp_rows], ignore_index=True)
    save_csv(out, name, machine_info(**{k: str(v) for k, v in settings.items()}))


if __name__ == "__main__":
    main()
