"""The ``cocam`` command line: the batch path through the method.

    cocam generate   write the synthetic CelebA (the embedded default)
    cocam stats      co-occurrence statistics of a dataset, next to real CelebA's
    cocam template   write the template face (and its landmarks) for drawing masks
    cocam train      train the baseline 40-attribute classifier
    cocam finetune   Grad-CAM guided fine-tuning from a checkpoint (or the BCE-only control)
    cocam evaluate   accuracy on the test split and the conflict subsets, before vs after
    cocam bias       rank attribute pairs by the accuracy gap of a trained model (model-side bias)
    cocam compare    the guidance losses and the BCE-only control side by side (several seeds)
    cocam paper      the paper's protocol on a real CelebA (AlexNet 224², three pairs), next to its numbers
    cocam demo       the main job on the embedded default: all of the above, end to end
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from cocam.attributes import PAPER_PAIRS, parse_pairs, validate_attributes

DEFAULT_ROOT = Path("data/synthetic")


def _pairs(values: list[str] | None) -> list[tuple[str, str]]:
    return parse_pairs(values) if values else list(PAPER_PAIRS)


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cocam.synthetic import PRESETS, generate_synthetic_celeba

    config = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("n_train", "n_valid", "n_test", "seed", "train_conflict_scale")
                 if getattr(args, k) is not None}
    config = replace(config, **overrides)
    folder = generate_synthetic_celeba(args.root, config, workers=args.workers, overwrite=args.overwrite)
    print(f"synthetic CelebA ({config.n_train}/{config.n_valid}/{config.n_test} train/valid/test images) in {folder}")
    return 0


def stats_report(root: Path, pairs: list[tuple[str, str]], top: int = 10) -> str:
    """The co-occurrence summary printed by ``cocam stats`` and ``cocam demo``."""
    from cocam.celeba import load_annotations
    from cocam.cooccurrence import celeba_reference, cooccurrence, pair_summary, rank_pairs

    ann = load_annotations(root)
    stats = cooccurrence(ann.attributes, ann.split)
    summary = pair_summary(stats, pairs, reference=celeba_reference())
    cols = ["split", "a", "b", "n_a", "p_b_given_a", "celeba_p_b_given_a", "p_a_given_b", "celeba_p_a_given_b",
            "n_conflict"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        lines = [
            f"Co-occurrence of the guided pairs in {ann.root} (P(B|A) and P(A|B), next to real CelebA's):",
            summary[cols].to_string(index=False),
            "",
            f"Most co-occurring pairs (test split, phi coefficient, top {top}):",
            rank_pairs(stats, split="test", top=top).drop(columns=["split"]).to_string(index=False),
        ]
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    print(stats_report(args.root, _pairs(args.pair), args.top))
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    from cocam.io import atomic_write, atomic_write_text
    from cocam.synthetic import render_template

    image, landmarks, _ = render_template()
    out = Path(args.out)
    with atomic_write(out / "template.png") as fh:
        image.save(fh, format="PNG")
    atomic_write_text(out / "template_landmarks.json", json.dumps(
        {"names": ["lefteye", "righteye", "nose", "leftmouth", "rightmouth"],
         "xy": [[round(float(v), 2) for v in p] for p in landmarks]}, indent=2) + "\n")
    print(f"template face written to {out / 'template.png'}")
    return 0


def _train_config(args: argparse.Namespace, **override):
    from cocam.train import TrainConfig

    values = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "device", "max_steps", "patience",
                                            "clip_grad_norm")
              if getattr(args, k, None) is not None}
    values.update(override)
    return TrainConfig(**values)


def _datasets(root: Path, image_size: int, splits=("train", "valid")):
    from cocam.dataset import CelebADataset

    return [CelebADataset(root, s, image_size=image_size) for s in splits]


def cmd_train(args: argparse.Namespace) -> int:
    from cocam.checkpoint import ModelSpec
    from cocam.train import fit

    import torch

    hidden = None if args.hidden == 0 or args.arch == "resnet18" else args.hidden
    spec = ModelSpec(arch=args.arch, image_size=args.image_size, hidden=hidden)
    train, valid = _datasets(args.root, spec.image_size)
    config = _train_config(args)
    torch.manual_seed(args.seed)  # --seed also fixes the initial weights
    result = fit(spec.build(pretrained=args.pretrained), train, valid, config, spec=spec, run_dir=args.out,
                 resume=args.resume)
    print(result.history.to_string(index=False))
    print(f"best checkpoint: {result.best_path}")
    return 0


def _guidance(args: argparse.Namespace):
    from cocam.masks import load_mask, resolve_mask
    from cocam.train import Guidance

    attributes = validate_attributes(args.attribute)
    if args.mask and len(args.mask) != len(attributes):
        raise ValueError(f"--mask given {len(args.mask)} times for {len(attributes)} --attribute: give one each, "
                         f"or none to use {args.mask_dir}/<Attribute>.png (or the built-in region).")
    masks = []
    for i, a in enumerate(attributes):
        if args.mask:
            masks.append(load_mask(args.mask[i]))
            print(f"{a}: mask {args.mask[i]}")
        else:
            mask, source = resolve_mask(a, args.mask_dir)
            masks.append(mask)
            print(f"{a}: mask {source}")
    def one_or_each(values):  # one value for all attributes, or one per --attribute
        return values[0] if values is not None and len(values) == 1 else values

    return Guidance(tuple(attributes), tuple(masks), w_a=args.w_a, w_g=one_or_each(args.w_g),
                    target=one_or_each(args.target), exact=not args.first_order, loss=one_or_each(args.loss),
                    transfer=args.transfer)


def cmd_finetune(args: argparse.Namespace) -> int:
    from cocam.checkpoint import load_model
    from cocam.train import fit

    if not args.control and not args.attribute:
        raise ValueError("give at least one --attribute to guide (e.g. --attribute Wearing_Lipstick), "
                         "or --control for the BCE-only control.")
    model, spec, _ = load_model(args.checkpoint)
    train, valid = _datasets(args.root, spec.image_size)
    guidance = None if args.control else _guidance(args)
    result = fit(model, train, valid, _train_config(args, patience=None), spec=spec, guidance=guidance,
                 run_dir=args.out, resume=args.resume)
    print(result.history.to_string(index=False))
    print(f"fine-tuned checkpoint: {result.last_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cocam.compare import METHODS, ComparisonConfig, compare_guidance, comparison_table, select_settings

    names = args.method or list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from: {', '.join(repr(m) for m in METHODS)}.")
    config = ComparisonConfig(root=args.root, out=args.out, seeds=tuple(args.seeds), pairs=tuple(_pairs(args.pair)),
                              image_size=args.image_size, hidden=args.hidden or None,
                              baseline_epochs=args.epochs, patience=args.patience,
                              finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                              batch_size=args.batch_size, mask_dir=args.mask_dir, device=args.device)
    result = compare_guidance(config, {m: METHODS[m] for m in names}, baseline=args.baseline,
                              progress=not args.quiet)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        for split in config.splits:
            print(f"\n{split} split (mean over {len(config.seeds)} seeds, 95 % t-intervals; gain = conflict-subset "
                  f"accuracy minus the same seed's BCE-only control):")
            print(comparison_table(result.summary, split).to_string(index=False))
        if "valid" in config.splits:
            chosen = select_settings(result.summary, split="valid")
            print("\nchosen on the valid split (largest conflict gain, ≤ 1 point of accuracy lost):")
            print(chosen[["attribute", "setting", "gain", "test_change"]].to_string(index=False))
    print(f"\nruns: {config.out / 'runs.csv'}; summary: {config.out / 'summary.csv'}")
    return 0


def cmd_bias(args: argparse.Namespace) -> int:
    from cocam.bias import rank_biases
    from cocam.checkpoint import load_model
    from cocam.dataset import CelebADataset
    from cocam.evaluate import predict, write_results

    model, spec, _ = load_model(args.checkpoint)
    dataset = CelebADataset(args.root, args.split, image_size=spec.image_size)
    ranking = rank_biases(predict(model, dataset, device=args.device), dataset.attributes,
                          attributes=args.attribute or None, min_group=args.min_group)
    print(f"Biases of {args.checkpoint} on the {args.split} split ({len(dataset)} images): recall of A with B "
          f"present vs absent, 95 % bootstrap interval of the gap, Singh et al.'s bias score; groups of at least "
          f"{args.min_group} images.")
    cols = ["a", "b", "n_ab", "n_a_not_b", "acc_ab", "acc_a_not_b", "gap", "gap_low", "gap_high", "bias_score"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(ranking[cols].head(args.top).to_string(index=False))
    if args.out:
        write_results(args.out, ranking, {"model": args.checkpoint})
        print(f"full ranking ({len(ranking)} pairs): {args.out}")
    return 0


def _format_table(table: pd.DataFrame) -> str:
    cols = [c for c in ["attribute", "model", "test %", "conflict A∧¬B %", "conflict 95% CI", "n conflict",
                        "reverse ¬A∧B %", "worst group %", "truth soft_iou", "mask soft_iou"] if c in table.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        return table[cols].to_string(index=False)


def cmd_evaluate(args: argparse.Namespace) -> int:
    checkpoints = {}
    for item in args.checkpoint:
        name, _, path = item.rpartition("=")
        checkpoints[name or Path(path).parent.name] = Path(path)
    from cocam.evaluate import evaluate_checkpoints

    table, long = evaluate_checkpoints(args.root, checkpoints, _pairs(args.pair), split=args.split,
                                       attention=not args.no_attention, mask_dir=args.mask_dir)
    print(_format_table(table))
    if args.out:
        from cocam.evaluate import write_results

        _, sidecar = write_results(args.out, table, checkpoints)
        print(f"results written to {args.out} (provenance: {sidecar})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from cocam.train import TrainConfig

    from cocam.checkpoint import ModelSpec
    from cocam.io import atomic_write_text
    from cocam.synthetic import PRESETS, generate_synthetic_celeba
    from cocam.train import fit

    times = {}
    t = time.perf_counter()
    folder = generate_synthetic_celeba(args.root, PRESETS[args.preset], workers=args.workers)
    times["generate"] = time.perf_counter() - t
    print(f"dataset: {folder}\n")
    print(stats_report(args.root, list(PAPER_PAIRS)))
    out = Path(args.out)
    spec = ModelSpec(image_size=args.image_size, hidden=args.hidden)
    t = time.perf_counter()
    train, valid = _datasets(args.root, spec.image_size)
    times["cache"] = time.perf_counter() - t

    print("\n1/3 baseline: BCE on all 40 attributes, early stopping on the validation split")
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    base = fit(spec.build(), train, valid, _train_config(args, epochs=args.epochs), spec=spec,
               run_dir=out / "baseline", resume=True)
    times["baseline"] = time.perf_counter() - t
    from cocam.checkpoint import load_model

    args.attribute = [a for a, _ in PAPER_PAIRS]
    args.mask, args.mask_dir = None, "data/masks"
    guidance = _guidance(args)
    tuned = {}
    config = TrainConfig.fine_tuning(len(train), args.finetune_epochs, batch_size=args.batch_size,
                                     lr=args.finetune_lr, seed=args.seed, device=args.device,
                                     clip_grad_norm=args.clip_grad_norm)
    for name, g in (("guided", guidance), ("control", None)):
        print(f"\n{'2/3 guided fine-tuning (w_a*BCE + w_g*loss_g)' if g else '3/3 BCE-only control, same steps'}")
        model, _, _ = load_model(base.best_path)
        t = time.perf_counter()
        r = fit(model, train, valid, config, spec=spec, guidance=g, run_dir=out / name, resume=True)
        times[name] = time.perf_counter() - t
        tuned[name] = r.last_path
    from cocam.evaluate import evaluate_checkpoints, write_results

    t = time.perf_counter()
    checkpoints = {"pre-trained": base.best_path, "BCE-only control": tuned["control"],
                   "fine-tuned (guided)": tuned["guided"]}
    table, long = evaluate_checkpoints(args.root, checkpoints, list(PAPER_PAIRS))
    times["evaluate"] = time.perf_counter() - t
    figures = _demo_figures(args.root, out, checkpoints)
    write_results(out / "results.csv", table, checkpoints)
    atomic_write_text(out / "results_long.csv", long.to_csv(index=False))
    print("\nBefore/after on the synthetic test split (accuracy on attribute A, %; conflict = A without B):")
    print(_format_table(table))
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) +
          f"; total {sum(times.values()):.0f}")
    print(f"results: {out / 'results.csv'}; Grad-CAM before/after: {', '.join(str(f) for f in figures)}")
    return 0


def _demo_figures(root: Path, out: Path, checkpoints: dict[str, Path], n: int = 6) -> list[Path]:
    """Grad-CAM of each guided attribute on the same conflict-subset test images, per model."""
    from cocam.checkpoint import load_model
    from cocam.dataset import CelebADataset
    from cocam.io import atomic_write
    from cocam.notebook import show_cam_comparison

    loaded = {name: load_model(path) for name, path in checkpoints.items()}
    models = {name: model for name, (model, _, _) in loaded.items()}
    image_size = next(iter(loaded.values()))[1].image_size
    test = CelebADataset(root, "test", image_size=image_size, progress=False)
    written = []
    for a, b in PAPER_PAIRS:
        conflict = test.subset({a: 1, b: 0})
        if len(conflict) == 0:
            continue
        fig = show_cam_comparison(models, conflict, a, n=n)
        path = out / f"gradcam_{a}.png"
        with atomic_write(path) as fh:
            fig.savefig(fh, format="png", dpi=80)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from cocam.losses import DEFAULT_GUIDANCE_WEIGHTS, GUIDANCE_LOSSES
    from cocam.masks import MASK_TRANSFERS
    from cocam.synthetic import PRESETS

    g = sub.add_parser("generate", help="write the synthetic CelebA-format dataset")
    g.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder that will hold celeba/ (default: %(default)s)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default")
    g.add_argument("--n-train", type=int)
    g.add_argument("--n-valid", type=int)
    g.add_argument("--n-test", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--train-conflict-scale", type=float,
                   help="bias strength: 1 keeps CelebA's rates in train, smaller amplifies co-occurrence")
    g.add_argument("--workers", type=int, default=None, help="rendering processes (default: all cores)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stats", help="co-occurrence statistics of a CelebA-layout dataset")
    s.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    s.add_argument("--pair", action="append", metavar="A:B", help="pair to summarise (repeatable; default: the paper's)")
    s.add_argument("--top", type=int, default=10)
    s.set_defaults(func=cmd_stats)

    t = sub.add_parser("template", help="write the template face for drawing masks")
    t.add_argument("--out", type=Path, default=Path("data"))
    t.set_defaults(func=cmd_template)

    def training_options(p, epochs: int):
        p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="dataset root holding celeba/")
        p.add_argument("--epochs", type=int, default=epochs)
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        p.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                       help="clip the gradients' global L2 norm to MAX each step (default: no clipping; the "
                            "pre-clip norm is logged as grad_norm either way)")
        p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")

    def guidance_options(p):
        p.add_argument("--w-a", type=float, default=1.0, help="weight of the BCE term")
        p.add_argument("--w-g", type=float, nargs="+", default=None,
                       help="weight of the guidance term loss_g, or one per --attribute (default: the loss's "
                            "own: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_GUIDANCE_WEIGHTS.items()) + ")")
        p.add_argument("--loss", choices=GUIDANCE_LOSSES, nargs="+", default=["iou"],
                       help="guidance loss, or one per --attribute: iou (the paper's -ln IoU), energy (CAM mass "
                            "inside the region), rrr_cam (CAM energy outside), rrr_input (input gradients "
                            "outside; Ross et al.)")
        p.add_argument("--target", choices=["positive", "both"], nargs="+", default=["positive"],
                       help="positive (default): the paper (CAM of the logit on positives); both: CAM of "
                            "sign(y)*logit on every image; or one per --attribute")
        p.add_argument("--transfer", choices=MASK_TRANSFERS, default="template",
                       help="template: the same mask pixels for every image; landmarks: moved by each image's "
                            "5 landmarks")
        p.add_argument("--first-order", action="store_true", help="detach the Grad-CAM weights (cheaper)")

    tr = sub.add_parser("train", help="train the baseline classifier")
    training_options(tr, 10)
    tr.add_argument("--out", type=Path, default=Path("runs/baseline"))
    tr.add_argument("--arch", default="alexnet")
    tr.add_argument("--image-size", type=int, default=112, help="224 for real CelebA; 112 for CPU runs")
    tr.add_argument("--hidden", type=int, default=512, help="classifier width (0 = torchvision's 4096)")
    tr.add_argument("--pretrained", action="store_true", help="ImageNet weights (must be in the torch cache)")
    tr.add_argument("--patience", type=int, default=3)
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="guided fine-tuning (or --control: BCE only) from a checkpoint")
    training_options(ft, 2)
    ft.add_argument("--checkpoint", type=Path, required=True)
    ft.add_argument("--out", type=Path, default=Path("runs/guided"))
    ft.add_argument("--attribute", action="append", default=[], help="guided attribute (repeatable)")
    ft.add_argument("--mask", action="append", type=Path, help="mask file per --attribute (PNG or .npy)")
    ft.add_argument("--mask-dir", type=Path, default=Path("data/masks"),
                    help="where <Attribute>.png masks are looked up (default: %(default)s)")
    ft.add_argument("--control", action="store_true", help="BCE-only control: no guidance term")
    guidance_options(ft)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("evaluate", help="test and conflict-subset accuracy of checkpoints")
    ev.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ev.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    ev.add_argument("--pair", action="append", metavar="A:B", help="default: the paper's three pairs")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--out", type=Path, help="write the table as CSV")
    ev.add_argument("--no-attention", action="store_true", help="skip the Grad-CAM attention metrics")
    ev.add_argument("--mask-dir", type=Path, default=Path("data/masks"),
                    help="masks scored against: <mask-dir>/<Attribute>.png, else the built-in region")
    ev.set_defaults(func=cmd_evaluate)

    bi = sub.add_parser("bias", help="rank attribute pairs by what a trained model gets wrong")
    bi.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    bi.add_argument("--checkpoint", type=Path, required=True)
    bi.add_argument("--split", default="valid", choices=["train", "valid", "test"],
                    help="where to look (default: valid — keep the test split for the final report)")
    bi.add_argument("--attribute", action="append", help="attribute A to examine (repeatable; default: all 40)")
    bi.add_argument("--min-group", type=int, default=20, help="smallest A∧B and A∧¬B group to report")
    bi.add_argument("--top", type=int, default=15)
    bi.add_argument("--out", type=Path, help="write the whole ranking as CSV (with a provenance sidecar)")
    bi.add_argument("--device", default="auto")
    bi.set_defaults(func=cmd_bias)

    from cocam.protocol import add_protocol_arguments, run_from_args

    pp = sub.add_parser("paper", help="the paper's experiment on your CelebA, next to the paper's numbers "
                                      "(--check: what it needs and how long it takes)")
    add_protocol_arguments(pp)
    pp.set_defaults(func=run_from_args)

    c = sub.add_parser("compare", help="guidance losses vs the BCE-only control: same budget, several seeds")
    c.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    c.add_argument("--out", type=Path, default=Path("runs/compare"))
    c.add_argument("--method", action="append", metavar="NAME",
                   help="a setting of cocam.compare.METHODS (repeatable; default: all)")
    c.add_argument("--pair", action="append", metavar="A:B", help="guided pairs (default: the paper's three)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--image-size", type=int, default=112)
    c.add_argument("--hidden", type=int, default=512, help="classifier width (0 = torchvision's 4096)")
    c.add_argument("--baseline", type=Path, help="start from this converged baseline checkpoint (e.g. the "
                   "notebooks' best.pt) instead of training one into <out>/baseline")
    c.add_argument("--epochs", type=int, default=40, help="baseline epochs at most (early stopping)")
    c.add_argument("--patience", type=int, default=3)
    c.add_argument("--finetune-epochs", type=int, default=2)
    c.add_argument("--finetune-lr", type=float, default=3e-4)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--mask-dir", type=Path, default=Path("data/masks"))
    c.add_argument("--device", default="auto")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="the main job on the embedded synthetic default")
    training_options(d, 8)
    d.add_argument("--preset", choices=sorted(PRESETS), default="default")
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--image-size", type=int, default=112)
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--patience", type=int, default=3)
    d.add_argument("--finetune-epochs", type=int, default=1)
    d.add_argument("--finetune-lr", type=float, default=3e-4)
    guidance_options(d)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker other than rank 0: rank 0 reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    from cocam.errors import CocamError

    try:
        return args.func(args)
    except (CocamError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"cocam {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
