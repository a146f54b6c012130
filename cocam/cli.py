"""The ``cocam`` command line: the batch path through the method.

    cocam generate   write the synthetic CelebA (the embedded default)
    cocam stats      co-occurrence statistics of a dataset, next to real CelebA's
    cocam template   write the template face (and its landmarks) for drawing masks
    cocam train      train the baseline classifier (CelebA's 40 attributes, or a folder dataset's labels)
    cocam finetune   Grad-CAM guided fine-tuning from a checkpoint (or the BCE-only control)
    cocam evaluate   accuracy on the test split and the conflict subsets, before vs after
    cocam bias       rank attribute pairs by the accuracy gap of a trained model (model-side bias)
    cocam compare    the guidance losses and the BCE-only control side by side (several seeds)
    cocam paper      the paper's protocol on a real CelebA (AlexNet 224², three pairs), next to its numbers
    cocam demo       the main job on the embedded default: all of the above, end to end
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import pandas as pd

from cocam.attributes import CELEBA_ATTRIBUTES, PAPER_PAIRS, parse_pairs
from cocam.labels import CELEBA

DEFAULT_ROOT = Path("data/synthetic")


def _data_root() -> Path:
    """The default ``--root`` of the commands that read a dataset: ``$COCAM_DATA_ROOT``, else the synthetic default."""
    from cocam.folder import env_data_root

    return env_data_root() or DEFAULT_ROOT


def _pairs(values: list[str] | None, root: Path | None = None) -> list[tuple[str, str]]:
    """``--pair`` values checked against the labels of the dataset at ``root``; without them the paper's
    three on CelebA, and on a dataset of your own its three most co-occurring pairs on the train split
    (:func:`cocam.cooccurrence.suggest_pairs`), printed so the run says what it examines."""
    from cocam.cooccurrence import suggest_pairs
    from cocam.folder import dataset_label_space, read_labels

    space = dataset_label_space(root) if root is not None else None
    if values:
        return parse_pairs(values, space)
    if space is None or space.names == CELEBA_ATTRIBUTES:
        return list(PAPER_PAIRS)
    labels = read_labels(root)
    try:
        pairs = suggest_pairs(labels.attributes, labels.split)
    except ValueError:
        raise ValueError(f"no two labels of {root} co-occur (a positive φ with an A∧¬B image on the train split), "
                         f"so there is no pair to examine by default: give one, e.g. --pair "
                         f"{space.names[0]}:{space.names[-1]}.") from None
    print(f"pairs: {' '.join(f'{a}:{b}' for a, b in pairs)} (the most co-occurring labels of {root} on the train "
          f"split; --pair A:B to choose)")
    return pairs


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cocam.synthetic import PRESETS, generate_synthetic_celeba

    config = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("n_train", "n_valid", "n_test", "seed", "train_conflict_scale")
                 if getattr(args, k) is not None}
    if args.train_decorrelated:
        overrides["train_decorrelated"] = True
    config = replace(config, **overrides)
    folder = generate_synthetic_celeba(args.root, config, workers=args.workers, overwrite=args.overwrite)
    print(f"synthetic CelebA ({config.n_train}/{config.n_valid}/{config.n_test} train/valid/test images) in {folder}")
    return 0


def stats_report(root: Path, pairs: list[tuple[str, str]], top: int = 10) -> str:
    """The co-occurrence summary printed by ``cocam stats`` and ``cocam demo``: the pairs' rates, next to real
    CelebA's for a CelebA-format dataset, and the most co-occurring pairs of the test split."""
    from cocam.cooccurrence import celeba_reference, cooccurrence, pair_summary, rank_pairs
    from cocam.folder import is_folder_dataset, read_labels

    labels = read_labels(root)
    stats = cooccurrence(labels.attributes, labels.split, include_all=True)
    celeba = not is_folder_dataset(root)
    summary = pair_summary(stats, pairs, reference=celeba_reference(include_all=True) if celeba else None)
    cols = ["split", "a", "b", "n_a", "p_b_given_a", "celeba_p_b_given_a", "p_a_given_b", "celeba_p_a_given_b",
            "n_conflict"]
    cols = [c for c in cols if c in summary.columns]
    beside = ", next to real CelebA's" if celeba else ""
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        lines = [
            f"Co-occurrence of the guided pairs in {labels.root} (P(B|A) and P(A|B){beside}; "
            f"split 'all' is every image{', the numbers usually quoted for CelebA' if celeba else ''}):",
            summary[cols].to_string(index=False),
            "",
            f"Most co-occurring pairs (test split, phi coefficient, top {top}):",
            rank_pairs(stats, split="test", top=top).drop(columns=["split"]).to_string(index=False),
        ]
    return "\n".join(lines)


def _positive(name: str, value: int) -> int:
    """``value`` if it is at least 1, else the one-line error the CLI prints."""
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}: it is how many rows to show.")
    return value


def cmd_stats(args: argparse.Namespace) -> int:
    _positive("--top", args.top)
    print(stats_report(args.root, _pairs(args.pair, args.root), args.top))
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


def train_config(args: argparse.Namespace, **override):
    from cocam.train import TrainConfig

    values = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "device", "max_steps", "patience",
                                            "clip_grad_norm")
              if getattr(args, k, None) is not None}
    values.update(override)
    return TrainConfig(**values)


def _datasets(root: Path, image_size: int, splits=("train", "valid")):
    """The splits of the dataset at ``root``, a CelebA layout or a folder with labels.csv (:func:`cocam.folder.open_dataset`;
    cache location and skipping: see ``--cache-dir``, ``--skip-unreadable``)."""
    from cocam.folder import open_dataset

    return [open_dataset(root, s, image_size=image_size) for s in splits]


def _mask_dir(args: argparse.Namespace) -> Path:
    """The mask folder of a command: ``--mask-dir``, else ``$COCAM_MASK_DIR``, else the project's ``data/masks``."""
    from cocam.masks import resolve_mask_dir

    return resolve_mask_dir(getattr(args, "mask_dir", None))


def _print_masks(attributes, mask_dir: Path, what: str = "mask", root: Path | None = None) -> None:
    """Say which file each attribute's mask comes from (or that it is the built-in region)."""
    from cocam.masks import resolve_mask

    view = _mask_view(root)
    for a in attributes:
        print(f"{a}: {what} {resolve_mask(a, mask_dir, view=view)[1]}")


def _mask_view(root: Path | None) -> str:
    """What masks for the dataset at ``root`` are drawn on: a folder dataset's square view, else the template face."""
    from cocam.folder import is_folder_dataset

    return "square" if root is not None and is_folder_dataset(root) else "template"


def _require_landmarks(guidance, dataset) -> None:
    """Stop with a one-line error when ``--transfer landmarks`` meets a dataset without landmarks."""
    if guidance is not None and guidance.transfer == "landmarks":
        dataset.require_landmarks("--transfer landmarks")


def cmd_train(args: argparse.Namespace) -> int:
    from cocam.archs import ARCHITECTURES
    from cocam.checkpoint import ModelSpec
    from cocam.train import fit

    import torch

    hidden = None if args.hidden == 0 or not ARCHITECTURES[args.arch].hidden_layers else args.hidden
    train, valid = _datasets(args.root, args.image_size)
    spec = ModelSpec(arch=args.arch, image_size=args.image_size, hidden=hidden, attributes=train.label_space.names)
    config = train_config(args)
    torch.manual_seed(args.seed)  # --seed also fixes the initial weights
    result = fit(spec.build(pretrained=args.pretrained), train, valid, config, spec=spec, run_dir=args.out,
                 resume=args.resume, overwrite=args.overwrite)
    print(result.history.to_string(index=False))
    print(f"best checkpoint: {result.best_path}")
    return 0


def _guidance(args: argparse.Namespace, dataset=None):
    """The guidance of ``--attribute`` and its masks, checked against ``dataset``'s labels (default: CelebA's)."""
    from cocam.labels import CELEBA
    from cocam.masks import load_mask, resolve_mask
    from cocam.train import Guidance

    from cocam.losses import DEFAULT_GUIDANCE_WEIGHTS

    space = dataset.label_space if dataset is not None else CELEBA
    view = dataset.mask_view if dataset is not None else "template"
    attributes = space.validate(args.attribute)
    _check_weights(args)
    mask_dir = _mask_dir(args)
    if args.mask and len(args.mask) != len(attributes):
        raise ValueError(f"--mask given {len(args.mask)} times for {len(attributes)} --attribute: give one each, "
                         f"or none to use {mask_dir}/<Attribute>.png (or the built-in region).")
    masks = []
    print(f"masks: {'--mask' if args.mask else mask_dir}")
    for i, a in enumerate(attributes):
        if args.mask:
            masks.append(load_mask(args.mask[i], view=view))
            print(f"{a}: mask {args.mask[i]}")
        else:
            mask, source = resolve_mask(a, mask_dir, view=view)
            masks.append(mask)
            print(f"{a}: mask {source}")

    def one_or_each(values):  # one value for all attributes, or one per --attribute
        return values[0] if values is not None and len(values) == 1 else values

    guidance = Guidance(tuple(attributes), tuple(masks), w_a=args.w_a, w_g=one_or_each(args.w_g),
                        target=one_or_each(args.target), exact=not args.first_order, loss=one_or_each(args.loss),
                        transfer=args.transfer, cam_method=args.cam_method, pool=args.pool, label_space=space)
    losses = args.loss if len(args.loss) > 1 else args.loss * len(attributes)
    w_g = args.w_g if args.w_g is not None else [DEFAULT_GUIDANCE_WEIGHTS.get(loss) for loss in losses]
    print(f"guidance: loss {' '.join(args.loss)}, target {' '.join(args.target)}, "
          f"w_g {' '.join(f'{w:g}' for w in w_g) if all(w is not None for w in w_g) else w_g}"
          f"{'' if args.w_g is not None else ' (the loss default)'}, w_a {args.w_a:g}, transfer {args.transfer}, "
          f"{'first-order' if args.first_order else 'exact'} gradients"
          f"{'' if args.cam_method == 'gradcam' else ', CAM ' + args.cam_method}")
    return guidance


def _check_out_is_not_the_source(checkpoint: Path, out: Path) -> None:
    """Fine-tuning writes ``last.pt``/``best.pt`` into ``out``: never the folder of the checkpoint it starts from."""
    from cocam.train import RunExistsError

    if os.path.realpath(Path(checkpoint).parent) == os.path.realpath(out):
        raise RunExistsError(f"--out {out} is the folder of the checkpoint it starts from ({checkpoint}): the "
                             f"fine-tuned run would replace it. Choose another --out (e.g. runs/guided).")


def _check_weights(args: argparse.Namespace) -> None:
    """``--w-a`` finite and ≥ 0, each ``--w-g`` finite and > 0 (guidance with weight 0 is just the control)."""
    import math

    if not (math.isfinite(args.w_a) and args.w_a >= 0):
        raise ValueError(f"--w-a must be a finite number ≥ 0 (the weight of the BCE term), got {args.w_a:g}.")
    for w in args.w_g or ():
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"--w-g must be a finite number > 0 (the weight of the guidance term), got {w:g}; "
                             f"for no guidance at all train the control (--control).")


def _check_control(args: argparse.Namespace) -> None:
    """``--control`` takes no guidance options: refuse them rather than ignore them (even misspelled ones)."""
    if args.control and args.attribute:
        from cocam.folder import dataset_label_space

        dataset_label_space(args.root).validate(args.attribute)  # a misspelling is named first
        raise ValueError(f"--control trains with BCE only, so --attribute {args.attribute[0]} would be ignored: "
                         f"drop --attribute for the control, or drop --control to guide it.")


def cmd_finetune(args: argparse.Namespace) -> int:
    from cocam.checkpoint import load_model
    from cocam.train import fit

    _check_control(args)
    if not args.control and not args.attribute:
        raise ValueError("give at least one --attribute to guide (e.g. --attribute Wearing_Lipstick), "
                         "or --control for the BCE-only control.")
    _check_out_is_not_the_source(args.checkpoint, args.out)
    model, spec, _ = load_model(args.checkpoint)
    train, valid = _datasets(args.root, spec.image_size)
    guidance = None if args.control else _guidance(args, train)
    _require_landmarks(guidance, train)
    result = fit(model, train, valid, train_config(args, patience=None), spec=spec, guidance=guidance,
                 run_dir=args.out, resume=args.resume, overwrite=args.overwrite)
    print(result.history.to_string(index=False))
    print(f"fine-tuned checkpoint: {result.last_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cocam.compare import METHODS, PEERS, compare_guidance, comparison_table, select_settings

    names = args.method or list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from: {', '.join(repr(m) for m in METHODS)}.")
    config = _comparison_config(args, PEERS, args.peer_setting)
    _print_masks([a for a, _ in config.pairs], config.mask_dir, root=config.root)
    result = compare_guidance(config, {m: METHODS[m] for m in names}, baseline=args.baseline,
                              progress=not args.quiet)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        for split in config.splits:
            print(f"\n{split} split (mean over {len(config.baseline_seeds)} baselines × {len(config.seeds)} seeds, 95 % t-intervals; worst group = the lowest "
                  f"of the four (A, B) groups, conflict mean = mean of A∧¬B and ¬A∧B; gains are minus the same "
                  f"seed's BCE-only control):")
            print(comparison_table(result.summary, split).to_string(index=False))
        if "valid" in config.splits:
            try:
                chosen = select_settings(result.summary, split="valid")
            except ValueError as err:  # e.g. every setting lost more than a point: the comparison still stands
                print(f"\nnothing chosen on the valid split: {err}")
            else:
                print("\nchosen on the valid split (largest worst-group gain among the guidance settings, ≤ 1 point "
                      "of accuracy lost):")
                print(chosen[["attribute", "setting", "gain_worst_group", "gain_conflict_mean", "gain",
                              "test_change"]].to_string(index=False))
    print(f"\nruns: {config.out / 'runs.csv'}; summary: {config.out / 'summary.csv'}")
    return 0


def comparison_options(c: argparse.ArgumentParser, peers: str = "'random region', 'group-balanced', "
                       "'guided + balanced', 'last layer (DFR)'") -> None:
    """The budget options shared by ``compare`` and ``fix`` (the fields of ComparisonConfig)."""
    c.add_argument("--root", type=Path, default=_data_root(), help=_ROOT_HELP)
    c.add_argument("--pair", action="append", metavar="A:B", help="guided pairs (default: " + _PAIRS_HELP + ")")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    c.add_argument("--baseline-seeds", type=int, nargs="+", default=[0],
                   help="one converged baseline per seed; every fine-tuning seed runs from each (default: 0)")
    c.add_argument("--peers", nargs="*", default=None, metavar="PEER",
                   help=f"controls and peers beside the settings, from: {peers} (default: all; give none to run "
                        f"only the settings)")
    c.add_argument("--image-size", type=int, default=112)
    c.add_argument("--hidden", type=int, default=512, help="classifier width (0 = torchvision's 4096)")
    c.add_argument("--epochs", type=int, default=40, help="baseline epochs at most (early stopping)")
    c.add_argument("--patience", type=int, default=3)
    c.add_argument("--finetune-epochs", type=int, default=2)
    c.add_argument("--finetune-lr", type=float, default=3e-4)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--mask-dir", type=Path, default=None, help=_MASK_DIR_HELP)
    c.add_argument("--device", default="auto")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _comparison_config(args: argparse.Namespace, peers: tuple[str, ...], peer_setting: str | None = None):
    from cocam.compare import ComparisonConfig

    return ComparisonConfig(root=args.root, out=args.out, seeds=tuple(args.seeds),
                            pairs=tuple(_pairs(args.pair, args.root)),
                            image_size=args.image_size, hidden=args.hidden or None,
                            baseline_epochs=args.epochs, patience=args.patience,
                            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                            batch_size=args.batch_size, mask_dir=_mask_dir(args), device=args.device,
                            baseline_seeds=tuple(args.baseline_seeds),
                            peers=peers if args.peers is None else tuple(args.peers), peer_setting=peer_setting)


def cmd_fix(args: argparse.Namespace) -> int:
    from cocam.fix import CANDIDATES, PEER_CHOICES, fix_biases, fix_table

    names = args.candidate or list(CANDIDATES)
    if unknown := [m for m in names if m not in CANDIDATES]:
        raise ValueError(f"unknown candidate {unknown[0]!r}; choose from: {', '.join(repr(m) for m in CANDIDATES)}.")
    if not args.max_accuracy_drop >= 0:
        raise ValueError(f"--max-accuracy-drop must be a number of points ≥ 0, got {args.max_accuracy_drop}.")
    config = _comparison_config(args, (*PEER_CHOICES, "random region"))
    _print_masks([a for a, _ in config.pairs], config.mask_dir, root=config.root)
    result = fix_biases(config, {m: CANDIDATES[m] for m in names}, max_test_drop=args.max_accuracy_drop,
                        progress=not args.quiet)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        print("\nchosen on the valid split (largest worst-group gain over the control, within "
              f"{args.max_accuracy_drop:g} point(s) of accuracy; 'default' = none eligible, the paper's setting):")
        print(result.choice[["attribute", "setting", "chosen_on", "gain_worst_group", "test_change",
                             "best_peer"]].to_string(index=False))
        print(f"\ntest split: worst-group accuracy (%) of the model guiding every attribute with its choice, "
              f"mean over {len(config.baseline_seeds)} baseline(s) × {len(config.seeds)} seed(s) with 95 % "
              f"t-intervals; gains are per-run differences:")
        print(fix_table(result.report).to_string(index=False))
    first = next(iter(result.checkpoints.values()))
    print(f"\nfixed model (baseline {config.baseline_seeds[0]}, seed {config.seeds[0]}): {first}\n"
          f"runs: {config.out / 'runs.csv'}; summary: {config.out / 'summary.csv'}")
    return 0


def cmd_decoy(args: argparse.Namespace) -> int:
    from cocam.decoy import DecoyConfig, generate_decoy_fmnist

    config = DecoyConfig(n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, patch=args.patch,
                         seed=args.seed)
    root = generate_decoy_fmnist(args.root, config, source=args.source, overwrite=args.overwrite)
    labels = pd.read_csv(root / "labels.csv")
    print(f"Decoy-FashionMNIST in {root}: " + ", ".join(f"{n} {s}" for s, n in labels.split.value_counts().items())
          + " images; labels.csv (one-hot classes, split), decoy_boxes.csv (each image's decoy patch)")
    return 0


def cmd_bias(args: argparse.Namespace) -> int:
    from cocam.bias import rank_biases
    from cocam.checkpoint import load_model
    from cocam.evaluate import check_label_space, predict, write_results
    from cocam.folder import open_dataset

    _positive("--top", args.top)
    if args.out:
        _check_results_path(args.out, args.overwrite)
    model, spec, _ = load_model(args.checkpoint)
    dataset = open_dataset(args.root, args.split, image_size=spec.image_size)
    check_label_space(spec, dataset.label_space, args.checkpoint, args.root)
    ranking = rank_biases(predict(model, dataset, device=args.device), dataset.attributes,
                          attributes=args.attribute or None, min_group=args.min_group,
                          label_space=dataset.label_space)
    print(f"Biases of {args.checkpoint} on the {args.split} split ({len(dataset)} images): recall of A with B "
          f"present vs absent, 95 % bootstrap interval of the gap, Singh et al.'s bias score; groups of at least "
          f"{args.min_group} images.")
    cols = ["a", "b", "n_ab", "n_a_not_b", "acc_ab", "acc_a_not_b", "gap", "gap_low", "gap_high", "bias_score"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(ranking[cols].head(args.top).to_string(index=False))
    if args.out:
        write_results(args.out, ranking, {"model": args.checkpoint}, overwrite=args.overwrite)
        print(f"full ranking ({len(ranking)} pairs): {args.out}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """``cocam rank``: the images of a split in the order to look at them (glue over :mod:`cocam.ranking`)."""
    from cocam.checkpoint import load_model
    from cocam.evaluate import check_label_space, write_results
    from cocam.folder import dataset_label_space, open_dataset
    from cocam.masks import load_mask, resolve_mask
    from cocam.ranking import RANKINGS_NEEDING_SHORTCUT, rank_for_correction

    _positive("--top", args.top)
    space = dataset_label_space(args.root)
    attribute = space.validate_one(args.attribute)
    if args.shortcut is not None:
        space.validate_one(args.shortcut)
    if args.by in RANKINGS_NEEDING_SHORTCUT and args.shortcut is None:
        raise ValueError(f"--by {args.by} needs the shortcut attribute: add --shortcut B (e.g. --shortcut "
                         f"Heavy_Makeup for Wearing_Lipstick).")
    if args.out:
        _check_results_path(args.out, args.overwrite)
    view = _mask_view(args.root)
    mask, source = ((load_mask(args.mask, view=view), str(args.mask)) if args.mask
                    else resolve_mask(attribute, _mask_dir(args), view=view))
    model, spec, _ = load_model(args.checkpoint)
    dataset = open_dataset(args.root, args.split, image_size=spec.image_size)
    check_label_space(spec, dataset.label_space, args.checkpoint, args.root)
    ranking = rank_for_correction(model, dataset, attribute, mask, by=args.by, shortcut=args.shortcut,
                                  seed=args.seed, batch_size=args.batch_size, device=args.device)
    shortcut = f", shortcut {args.shortcut}" if args.shortcut else ""
    print(f"{attribute}: region {source}\nImages of the {args.split} split ({len(dataset)}) of {args.checkpoint} to "
          f"correct first, by {args.by}{shortcut} (p: predicted probability; outside_energy: share of the "
          f"Grad-CAM outside the region):")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(ranking.head(args.top).to_string(index=False))
    if args.out:
        _, sidecar = write_results(args.out, ranking, {"model": args.checkpoint}, overwrite=args.overwrite)
        print(f"full ranking ({len(ranking)} images): {args.out} (provenance: {sidecar})")
    return 0


def _format_table(table: pd.DataFrame) -> str:
    """The printed before/after table: a view of :func:`cocam.evaluate.evaluate_checkpoints`' numbers,
    worst group and conflict mean first, then the paper's columns, the reverse group and the AUCs."""
    from cocam.evaluate import paper_table

    shown = paper_table(table)
    cols = [c for c in ["attribute", "model", "worst group %", "worst group 95% CI", "worst group", "conflict mean %",
                        "test %", "conflict A∧¬B %", "conflict 95% CI", "n conflict", "reverse ¬A∧B %", "n reverse",
                        "AUC within B", "AUC within ¬B", "truth soft_iou", "mask soft_iou"] if c in shown.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        return shown[cols].to_string(index=False)


def _check_results_path(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a results file that would replace something: its sidecar, a checkpoint, a file."""
    from cocam.evaluate import results_sidecar

    sidecar = results_sidecar(out)
    for path in (out, sidecar):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists: choose another --out, or add --overwrite to replace "
                                  f"{out.name} and {sidecar.name}.")
        if path.is_dir():
            raise IsADirectoryError(f"--out {out} would be written over the folder {path}: give a file name "
                                    f"ending in .csv.")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cocam.evaluate import evaluate_checkpoints, name_checkpoints

    checkpoints = name_checkpoints(args.checkpoint)
    if args.out:
        _check_results_path(args.out, args.overwrite)

    pairs = _pairs(args.pair, args.root)
    mask_dir = _mask_dir(args)
    if not args.no_attention:
        _print_masks([a for a, _ in pairs], mask_dir, what="attention scored against the mask", root=args.root)
    table, long = evaluate_checkpoints(args.root, checkpoints, pairs, split=args.split,
                                       attention=not args.no_attention, mask_dir=mask_dir)
    print(_format_table(table))
    if args.out:
        from cocam.evaluate import write_results

        _, sidecar = write_results(args.out, table, checkpoints, overwrite=args.overwrite)
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
    try:
        folder = generate_synthetic_celeba(args.root, PRESETS[args.preset], workers=args.workers)
    except FileExistsError as err:
        raise FileExistsError(
            f"cocam demo runs on the synthetic dataset it generates, and {args.root} holds another dataset "
            f"({err}). Give the demo a new --root; to run the method on your own CelebA use `cocam paper` or "
            f"`cocam train` / `cocam finetune` / `cocam evaluate --root {args.root}`."
        ) from None
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
    base = fit(spec.build(), train, valid, train_config(args, epochs=args.epochs), spec=spec,
               run_dir=out / "baseline", resume=True)
    times["baseline"] = time.perf_counter() - t
    from cocam.checkpoint import load_model

    args.attribute = [a for a, _ in PAPER_PAIRS]
    args.mask = None
    guidance = _guidance(args)
    _require_landmarks(guidance, train)
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
    print("\nBefore/after on the synthetic test split (accuracy on attribute A, %; worst group = the lowest of "
          "A∧B, A∧¬B, ¬A∧B, ¬A∧¬B; conflict mean = mean of A∧¬B and ¬A∧B; the masks are the generator's true "
          "regions grown by 8 px):")
    print(_format_table(table))
    from cocam.evaluate import interval_reading

    reading = interval_reading(table, "fine-tuned (guided)", "BCE-only control")
    print("\nWhat this one run can say (worst group, guided vs control; 95 % intervals over the test images only — "
          "one baseline and one fine-tuning seed say nothing about training's randomness, and a different CPU or "
          "thread count can change these numbers):")
    for _, r in reading.iterrows():
        print(f"  {r.attribute}: {r.difference:+.1f} points, {r.reading}")
    print("  For a claim, run `cocam fix --root ... --baseline-seeds 0 1 2 --seeds 0 1 2`: the choice on the valid "
          "split, and intervals over baselines × seeds next to the control and the best peer.")
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

    from cocam.cams import CAM_METHODS, DEFAULT_CAM_METHOD
    from cocam.losses import DEFAULT_GUIDANCE_WEIGHTS, GUIDANCE_LOSSES
    from cocam.masks import MASK_TRANSFERS
    from cocam.model import SUPPORTED_ARCHS
    from cocam.synthetic import PRESETS

    g = sub.add_parser("generate", help="write the synthetic CelebA-format dataset")
    g.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder that will hold celeba/ (default: %(default)s)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default")
    g.add_argument("--n-train", type=int)
    g.add_argument("--n-valid", type=int)
    g.add_argument("--n-test", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--train-decorrelated", action="store_true",
                   help="the oracle's training split: each paper pair's A independent of its B (validation and "
                        "test unchanged)")
    g.add_argument("--train-conflict-scale", type=float,
                   help="bias strength: 1 keeps CelebA's rates in train, smaller amplifies co-occurrence")
    g.add_argument("--workers", type=int, default=None, help="rendering processes (default: all cores)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a dataset cocam generated here (never a folder without its cocam_synthetic.json)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stats", help="co-occurrence statistics of a dataset (next to real CelebA's for CelebA-format data)")
    s.add_argument("--root", type=Path, default=_data_root(), help=_ROOT_HELP)
    s.add_argument("--pair", action="append", metavar="A:B",
                   help="pair to summarise (repeatable; default: " + _PAIRS_HELP + ")")
    s.add_argument("--top", type=int, default=10)
    s.set_defaults(func=cmd_stats)

    t = sub.add_parser("template", help="write the template face for drawing masks")
    t.add_argument("--out", type=Path, default=Path("data"))
    t.set_defaults(func=cmd_template)

    def training_options(p, epochs: int, root: Path | None = None):
        p.add_argument("--root", type=Path, default=root or _data_root(),
                       help=_ROOT_HELP if root is None else "folder that will hold the synthetic celeba/ "
                                                            "(default: %(default)s)")
        p.add_argument("--epochs", type=int, default=epochs)
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        p.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                       help="clip the gradients' global L2 norm to MAX each step (default: no clipping; the "
                            "pre-clip norm is logged as grad_norm either way)")
        p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (same settings; only "
                       "--epochs, --max-steps, --patience and --device may change)")

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
        p.add_argument("--cam-method", choices=list(CAM_METHODS), default=DEFAULT_CAM_METHOD,
                       help="the CAM the guidance loss is computed on: gradcam (default, the paper's), gradcam++ "
                            "or layercam")
        p.add_argument("--pool", choices=["pairs", "attribute"], default="pairs",
                       help="average the guidance losses over all guided (image, attribute) pairs (default), or "
                            "per attribute first, so that each guided attribute weighs the same")

    tr = sub.add_parser("train", help="train the baseline classifier")
    training_options(tr, 10)
    tr.add_argument("--out", type=Path, default=Path("runs/baseline"))
    tr.add_argument("--arch", choices=SUPPORTED_ARCHS, default="alexnet",
                    help="the backbone, from the architecture registry (default: %(default)s)")
    tr.add_argument("--image-size", type=int, default=112, help="224 for real CelebA; 112 for CPU runs")
    tr.add_argument("--hidden", type=int, default=512, help="classifier width (0 = torchvision's 4096; ignored by "
                    "architectures without hidden layers, e.g. resnet18)")
    tr.add_argument("--pretrained", action="store_true", help="ImageNet weights (must be in the torch cache)")
    tr.add_argument("--patience", type=int, default=3)
    tr.add_argument("--overwrite", action="store_true", help="replace a run already in --out (its checkpoints "
                    "and history are deleted); without it such a folder is refused")
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="guided fine-tuning (or --control: BCE only) from a checkpoint")
    training_options(ft, 2)
    ft.add_argument("--checkpoint", type=Path, required=True)
    ft.add_argument("--out", type=Path, default=Path("runs/guided"))
    ft.add_argument("--attribute", action="append", default=[], help="guided attribute (repeatable)")
    ft.add_argument("--mask", action="append", type=Path, help="mask file per --attribute (PNG or .npy), drawn on the "
                    "template face for CelebA, on the square image the model sees for a folder dataset")
    ft.add_argument("--mask-dir", type=Path, default=None, help=_MASK_DIR_HELP)
    ft.add_argument("--control", action="store_true", help="BCE-only control: no guidance term")
    guidance_options(ft)
    ft.add_argument("--overwrite", action="store_true", help="replace a run already in --out (its checkpoints "
                    "and history are deleted); without it such a folder is refused")
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("evaluate", help="test and conflict-subset accuracy of checkpoints")
    ev.add_argument("--root", type=Path, default=_data_root(), help=_ROOT_HELP)
    ev.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                    help="checkpoint to evaluate (repeatable); a bare PATH is named after its folder, or "
                         "<folder>/<stem> when two share a folder (kb/best, kb/last)")
    ev.add_argument("--pair", action="append", metavar="A:B", help="default: " + _PAIRS_HELP)
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--out", type=Path, help="write the table as CSV (a .csv name; the provenance goes to "
                                             "<name>.json)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its sidecar")
    ev.add_argument("--no-attention", action="store_true", help="skip the Grad-CAM attention metrics")
    ev.add_argument("--mask-dir", type=Path, default=None, help="masks scored against: " + _MASK_DIR_HELP)
    ev.set_defaults(func=cmd_evaluate)

    bi = sub.add_parser("bias", help="rank attribute pairs by what a trained model gets wrong")
    bi.add_argument("--root", type=Path, default=_data_root(), help=_ROOT_HELP)
    bi.add_argument("--checkpoint", type=Path, required=True)
    bi.add_argument("--split", default="valid", choices=["train", "valid", "test"],
                    help="where to look (default: valid — keep the test split for the final report)")
    bi.add_argument("--attribute", action="append", help="attribute A to examine (repeatable; default: every label)")
    bi.add_argument("--min-group", type=int, default=20, help="smallest A∧B and A∧¬B group to report")
    bi.add_argument("--top", type=int, default=15)
    bi.add_argument("--out", type=Path, help="write the whole ranking as CSV (with a provenance sidecar)")
    bi.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its sidecar")
    bi.add_argument("--device", default="auto")
    bi.set_defaults(func=cmd_bias)

    from cocam.ranking import RANKINGS

    rk = sub.add_parser("rank", help="the images to correct first: CAM outside the region, uncertainty, worst group")
    rk.add_argument("--root", type=Path, default=_data_root(), help=_ROOT_HELP)
    rk.add_argument("--checkpoint", type=Path, required=True)
    rk.add_argument("--attribute", required=True, help="attribute A whose evidence should lie in its region")
    rk.add_argument("--shortcut", help="A's co-occurring attribute B: adds the (A, B) group and --by worst_group")
    rk.add_argument("--by", choices=list(RANKINGS), default="outside_energy",
                    help="outside_energy (default): share of the Grad-CAM of the predicted class outside the "
                         "region; uncertainty: p near 0.5; worst_group: the worst (A, B) group first; random: "
                         "the baseline")
    rk.add_argument("--split", default="valid", choices=["train", "valid", "test"],
                    help="where to look (default: valid — keep the test split for the final report)")
    rk.add_argument("--top", type=int, default=20, help="rows to print")
    rk.add_argument("--mask", type=Path, help="the region's mask file (PNG or .npy; default: from --mask-dir)")
    rk.add_argument("--mask-dir", type=Path, default=None, help=_MASK_DIR_HELP)
    rk.add_argument("--seed", type=int, default=0, help="seed of --by random")
    rk.add_argument("--batch-size", type=int, default=64)
    rk.add_argument("--out", type=Path, help="write the whole ranking as CSV (with a provenance sidecar)")
    rk.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its sidecar")
    rk.add_argument("--device", default="auto")
    data_options(rk)
    rk.set_defaults(func=cmd_rank)

    from cocam.protocol import add_protocol_arguments

    pp = sub.add_parser("paper", help="the paper's experiment on your CelebA, next to the paper's numbers "
                                      "(--check: what it needs and how long it takes)")
    add_protocol_arguments(pp)

    c = sub.add_parser("compare", help="guidance losses vs the BCE-only control: same budget, several seeds")
    c.add_argument("--out", type=Path, default=Path("runs/compare"))
    c.add_argument("--method", action="append", metavar="NAME",
                   help="a setting of cocam.compare.METHODS (repeatable; default: all)")
    c.add_argument("--peer-setting", default=None, metavar="NAME",
                   help="the setting the random region and guided + balanced reuse (default: the first --method)")
    c.add_argument("--baseline", type=Path, help="start from this converged baseline checkpoint (e.g. the "
                   "notebooks' best.pt) instead of training one into <out>/baseline")
    comparison_options(c)
    c.set_defaults(func=cmd_compare)

    fx = sub.add_parser("fix", help="choose each attribute's guidance on the validation split, train one model "
                                    "guiding all, report it next to the control and the best peer")
    fx.add_argument("--out", type=Path, default=Path("runs/fix"))
    fx.add_argument("--candidate", action="append", metavar="NAME",
                    help="a setting of cocam.fix.CANDIDATES to choose among (repeatable; default: all)")
    fx.add_argument("--max-accuracy-drop", type=float, default=1.0,
                    help="points of validation accuracy a chosen setting may lose against the control")
    comparison_options(fx, peers="'group-balanced', 'last layer (DFR)', 'random region'")
    fx.set_defaults(func=cmd_fix)

    dc = sub.add_parser("decoy", help="write Decoy-FashionMNIST (a class-coloured corner patch at training time, "
                                      "a random one at test time) from Debian's dataset-fashion-mnist files")
    dc.add_argument("--root", type=Path, default=Path("data/decoy_fmnist"), help="the folder to create")
    dc.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="the folder holding Fashion-MNIST's four .gz files")
    dc.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    dc.add_argument("--n-valid", type=int, default=5_000)
    dc.add_argument("--n-test", type=int, default=None, help="test images (default: all 10,000)")
    dc.add_argument("--patch", type=int, default=4, help="side of the decoy patch in pixels")
    dc.add_argument("--seed", type=int, default=0)
    dc.add_argument("--overwrite", action="store_true", help="replace a Decoy-FashionMNIST of another configuration")
    dc.set_defaults(func=cmd_decoy)

    d = sub.add_parser("demo", help="the main job on the embedded synthetic default")
    training_options(d, 8, root=DEFAULT_ROOT)  # the demo writes the synthetic default: never $COCAM_DATA_ROOT
    d.add_argument("--preset", choices=sorted(PRESETS), default="default")
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--image-size", type=int, default=112)
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--patience", type=int, default=3)
    d.add_argument("--finetune-epochs", type=int, default=1)
    d.add_argument("--finetune-lr", type=float, default=3e-4)
    d.add_argument("--mask-dir", type=Path, default=None, help=_MASK_DIR_HELP)
    guidance_options(d)
    d.set_defaults(func=cmd_demo)

    for name in ("train", "finetune", "evaluate", "bias", "compare", "fix", "demo", "paper"):
        data_options(sub.choices[name])
    pp.set_defaults(mask_dir=None, func=cmd_paper)
    return parser


_ROOT_HELP = ("dataset root: a folder holding celeba/ (or a CelebA layout), or a folder dataset of your own "
              "(labels.csv + images/); default: $COCAM_DATA_ROOT, else data/synthetic")

_PAIRS_HELP = ("the paper's three on CelebA; on a dataset of your own, its three most co-occurring label pairs on "
               "the train split")

_MASK_DIR_HELP = ("folder of <Attribute>.png masks (default: $COCAM_MASK_DIR, else the project's data/masks, "
                  "found from the project, not the current folder; an attribute without a file uses its "
                  "built-in region)")


def data_options(p: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--skip-unreadable``: how a command reads the images."""
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="folder under which the decoded-image cache is kept (default: $COCAM_CACHE_DIR, else "
                        "inside a dataset cocam generated, else ~/.cache/cocam; never inside a real dataset "
                        "folder unless given here)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out listed images that are missing or cannot be decoded (counted in a warning, "
                        "all listed in a file beside the cache) instead of stopping")


def cmd_paper(args: argparse.Namespace) -> int:
    """``cocam paper``: the protocol, with the mask folder resolved like every other command's."""
    from cocam.protocol import run_from_args

    args.mask_dir = _mask_dir(args)
    return run_from_args(args)


def _one_line(text: str) -> str:
    """A message on one line (the parts of a multi-line message joined)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _os_error_in(err: BaseException) -> OSError | None:
    """The :class:`OSError` behind ``err``: itself, or one it was raised from or while handling.

    A full disk often surfaces as another library's error (torch's ``unexpected pos …``) with the
    ``ENOSPC`` only in the chained part.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _describe_os_error(err: OSError) -> str:
    """One line naming the failed operation's path, the cause (ENOSPC, EACCES, ...) and the fix."""
    import errno

    path = err.filename if err.filename is not None else None
    where = f" writing {path}" if path is not None else ""
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where} ({code}): free some space, or write to another disk "
                f"(e.g. another --out); the files already there are intact.")
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied{' for ' + str(path) if path is not None else ''} ({code}): use a folder "
                f"you may write to (e.g. another --out or --root), or change its permissions.")
    if err.errno == errno.EROFS:
        return f"read-only file system{where} ({code}): write to another folder (e.g. another --out)."
    detail = err.strerror or _one_line(err) or type(err).__name__
    return (f"{detail}{' (' + code + ')' if code else ''}{': ' + str(path) if path is not None else ''}: "
            f"check the path, the disk and its permissions.")


def main(argv: list[str] | None = None) -> int:
    """Run one ``cocam`` command; return its exit status.

    Every failure cocam foresees is one line on stderr, ``cocam <command>: error: <problem and fix>``,
    and exit status 1: cocam's own errors (:class:`cocam.errors.CocamError`), bad values
    (``ValueError``), missing or existing files, operating-system errors (a full disk: ``ENOSPC``
    and the path; permission denied) — also when another library re-raised them — and a missing
    optional package. Warnings are one line too (``cocam <command>: warning: …``). Anything else is
    a bug and keeps its traceback.
    """
    import warnings

    args = build_parser().parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker other than rank 0: rank 0 reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    from cocam.errors import CocamError

    def fail(message: str) -> int:
        print(f"cocam {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 1

    def warn(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"cocam {args.command}: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = warn
        try:
            with _data_environment(args):
                return args.func(args)
        except (CocamError, FileNotFoundError, FileExistsError, IsADirectoryError, ValueError) as err:
            return fail(str(err))
        except KeyError as err:  # str() of a KeyError is its repr: print the message itself
            return fail(str(err.args[0]) if len(err.args) == 1 and isinstance(err.args[0], str) else str(err))
        except ModuleNotFoundError as err:
            package = (err.name or "").split(".")[0]
            if not package or package == "cocam":
                raise  # cocam itself is broken or half-installed: a bug, keep the traceback
            return fail(f"{err}: this needs an optional package that is not installed; install it "
                        f"(pip install {package}) and run the command again.")
        except Exception as err:
            cause = _os_error_in(err)
            if cause is None:
                raise  # a bug: keep the traceback
            return fail(_describe_os_error(cause))


@contextlib.contextmanager
def _data_environment(args: argparse.Namespace):
    """Set ``$COCAM_CACHE_DIR`` / ``$COCAM_SKIP_UNREADABLE`` from the options for the command's run.

    The variables reach every dataset the command builds, also those built inside the
    evaluation, comparison and protocol code; the previous values are restored afterwards.
    """
    from cocam.dataset import CACHE_ENV, SKIP_UNREADABLE_ENV

    wanted = {}
    if getattr(args, "cache_dir", None) is not None:
        wanted[CACHE_ENV] = os.fspath(Path(args.cache_dir).expanduser().resolve())
    if getattr(args, "skip_unreadable", False):
        wanted[SKIP_UNREADABLE_ENV] = "1"
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    raise SystemExit(main())
