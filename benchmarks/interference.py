"""Why do several biases guided in one model interfere? The gradients, measured.

    python benchmarks/interference.py --root data/synthetic --checkpoint runs/compare/baseline/best.pt

On a trained baseline and a few training batches, with the guidance that guides the paper's
three pairs at once (``--loss``, ``--target``, ``--w-g``), this measures for every guided
attribute t:

* ``share`` — the fraction of the pooled guidance mean that t's pairs carry. The guided
  objective averages the guidance loss over all guided (image, attribute) pairs,
  ``Σ_bt m_bt ℓ_bt / Σ_bt m_bt`` (with ``target="positive"``, ``m_bt = y_bt``), so an attribute
  with few positives (Double_Chin: ~5 % of faces) weighs ~10× less than one present in half
  of them (Wearing_Lipstick): share_t = Σ_b m_bt / Σ_bt m_bt;
* ``norm`` — ‖∇θ L_t‖ of t's own mean guidance loss ``L_t = Σ_b m_bt ℓ_bt / Σ_b m_bt``, and of the
  BCE (row ``BCE``);
* ``cos`` — the cosine between t's guidance gradient and the BCE gradient, and between every two
  attributes' guidance gradients (a negative cosine: the two objectives pull the shared trunk
  apart — what gradient surgery such as PCGrad removes);
* ``effective`` — ‖share_t · w_t · ∇θ L_t‖: how hard t actually pulls in the pooled step; and
  ``effective, pool=attribute`` — ‖w_t · ∇θ L_t‖ / T', its pull when every attribute weighs the
  same (``Guidance(pool="attribute")``).

Means over ``--batches`` batches (model in training mode, as in a step). Writes
``benchmarks/results/interference_<device>.csv`` (tidy: one row per batch-mean quantity).
Nothing is timed or asserted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cocam.attributes import PAPER_PAIRS, attribute_index
from cocam.checkpoint import load_model
from cocam.dataset import BatchLoader, CelebADataset
from cocam.masks import resolve_mask
from cocam.train import Guidance, guidance_masks, guided_terms

RESULTS = Path(__file__).resolve().parent / "results"


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def measure(checkpoint: Path, root: Path, guidance_kwargs: dict, batches: int, batch_size: int, seed: int,
            mask_dir: Path | None, trunk_only: bool) -> pd.DataFrame:
    model, spec, _ = load_model(checkpoint)
    model.train()
    attrs = tuple(a for a, _ in PAPER_PAIRS)
    guidance = Guidance(attrs, tuple(resolve_mask(a, mask_dir)[0] for a in attrs), **guidance_kwargs)
    train = CelebADataset(root, "train", image_size=spec.image_size)
    device = torch.device("cpu")
    masks = guidance_masks(guidance, model, spec.image_size, device)
    target_idx = [attribute_index(a) for a in attrs]
    params = [p for n, p in model.named_parameters() if p.requires_grad and (not trunk_only or n.startswith("trunk"))]
    w = np.broadcast_to(np.asarray(guidance.w_g, dtype=float), (len(attrs),))
    rows = []
    torch.manual_seed(seed)
    loader = BatchLoader(train, batch_size, shuffle=True, seed=seed, drop_last=True)
    loader.set_epoch(0)
    for k, (images, targets, landmarks) in enumerate(loader):
        if k == batches:
            break
        terms = guided_terms(model, images, targets, guidance, target_idx, masks, landmarks)
        labels = targets[:, target_idx]
        m = labels if guidance.target == "positive" else torch.ones_like(labels)
        share = (m.sum(0) / m.sum().clamp_min(1)).tolist()
        g_bce = flat_grad(terms.bce, params)
        grads = []
        for t in range(len(attrs)):
            if float(m[:, t].sum()) == 0:
                grads.append(None)
                continue
            grads.append(flat_grad((m[:, t] * terms.per_sample[:, t]).sum() / m[:, t].sum(), params))
        rows.append(dict(batch=k, quantity="norm", a="BCE", b="", value=float(g_bce.norm())))
        for t, a in enumerate(attrs):
            rows.append(dict(batch=k, quantity="share", a=a, b="", value=share[t]))
            if grads[t] is None:
                continue
            rows.append(dict(batch=k, quantity="norm", a=a, b="", value=float(grads[t].norm())))
            rows.append(dict(batch=k, quantity="effective", a=a, b="", value=float(share[t] * w[t] * grads[t].norm())))
            present = sum(g is not None for g in grads)
            rows.append(dict(batch=k, quantity="effective, pool=attribute", a=a, b="",
                             value=float(w[t] * grads[t].norm() / present)))
            rows.append(dict(batch=k, quantity="cos", a=a, b="BCE", value=cosine(grads[t], g_bce)))
            for u in range(t + 1, len(attrs)):
                if grads[u] is not None:
                    rows.append(dict(batch=k, quantity="cos", a=a, b=attrs[u], value=cosine(grads[t], grads[u])))
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained baseline")
    p.add_argument("--loss", default="iou")
    p.add_argument("--target", default="positive")
    p.add_argument("--w-g", type=float, default=3.0)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-dir", type=Path, default=Path("data/masks"))
    p.add_argument("--trunk-only", action="store_true", help="gradients of the trunk's parameters only")
    p.add_argument("--out", type=Path, default=RESULTS / "interference_cpu.csv")
    args = p.parse_args()
    kwargs = dict(loss=args.loss, target=args.target, w_g=args.w_g)
    table = measure(args.checkpoint, args.root, kwargs, args.batches, args.batch_size, args.seed, args.mask_dir,
                    args.trunk_only).assign(loss=args.loss, target=args.target, w_g=args.w_g)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(args.out)
    view = table.groupby(["quantity", "a", "b"], sort=False).value.agg(["mean", "std", "count"]).reset_index()
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(view.to_string(index=False))


if __name__ == "__main__":
    main()
