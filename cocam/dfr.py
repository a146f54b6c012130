"""Last-layer retraining on group-balanced data (DFR; Kirichenko et al., ICLR 2023) — a peer of guidance.

The observation behind DFR: a network trained with a shortcut often still *computes* the right
features; only its last linear layer leans on the shortcut's. Retraining that layer alone on data
where the shortcut carries no information — the four (A, B) groups in equal numbers — removes
the reliance, at the cost of a logistic regression.

Here, for every guided attribute A with shortcut B:

1. ``X``: the penultimate features (the input of the head's last ``nn.Linear``, in eval mode) of
   a group-balanced subset of the given images (:func:`cocam.groups.balanced_subset`; by default
   the training split, so the validation split stays free for choosing settings — DFR's own
   recipe uses held-out data, which is the same code with another dataset);
2. an L2-regularised logistic regression of A's label on the standardised ``X`` (full-batch
   L-BFGS in float64, started from the current weights), minimising
   ``mean_i BCE(x̃_i·w + b, y_i) + l2 · ‖w‖²/2`` with ``x̃ = (x − μ)/σ``;
3. the solution folded back into A's row of the last layer: ``W_A = w/σ``, ``b_A = b − Σ w·μ/σ``.

The other 39 rows, and everything before the last layer, are untouched, so only the retrained
attributes' predictions change. Splitting the head needs no hooks: a head is a (nested)
``nn.Sequential`` of modules, and its flattened list minus the last ``nn.Linear`` computes the
features (:func:`split_last_linear`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from cocam.dataset import CelebADataset, iterate_batches, label_space_of_dataset
from cocam.evaluate import resolve_device
from cocam.groups import balanced_subset
from cocam.model import SplitModel

__all__ = ["penultimate_features", "retrain_last_layer", "split_last_linear"]


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def split_last_linear(head: nn.Module) -> tuple[nn.Sequential, nn.Linear]:
    """``(body, last)`` with ``head(a) == last(body(a))``; ``body`` shares the head's modules."""
    leaves = _leaves(head)
    if not leaves or not isinstance(leaves[-1], nn.Linear):
        raise ValueError("last-layer retraining needs a head that is an nn.Sequential ending in an nn.Linear "
                         f"(got {type(leaves[-1]).__name__ if leaves else 'an empty head'} last).")
    return nn.Sequential(*leaves[:-1]), leaves[-1]


@torch.no_grad()
def penultimate_features(model: SplitModel, dataset: CelebADataset, indices: np.ndarray | None = None, *,
                         batch_size: int = 256, device: str | torch.device | None = "auto") -> Tensor:
    """``(N, D)`` float32 features entering the last linear layer, in eval mode (mode restored)."""
    device = resolve_device(device)
    body, _ = split_last_linear(model.head)
    view = dataset if indices is None else dataset.subset_names(dataset.names[np.asarray(indices)])
    was_training = model.training
    model.eval().to(device)
    out = []
    try:
        for images, _, _ in iterate_batches(view, batch_size, device=device):
            out.append(body(model.trunk(images)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, split_last_linear(model.head)[1].in_features))


def _logistic_regression(x: Tensor, y: Tensor, w0: Tensor, b0: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def retrain_last_layer(model: SplitModel, dataset: CelebADataset, pairs: Sequence[tuple[str, str]], *,
                       seed: int = 0, l2: float = 1e-2, per_group: int | None = None, max_iter: int = 200,
                       device: str | torch.device | None = "auto") -> tuple[SplitModel, pd.DataFrame]:
    """A copy of ``model`` whose last-layer rows of each pair's A are refit on group-balanced data.

    Args:
        model: the trained classifier (not modified).
        dataset: where the balanced subset is drawn from (the training split by default in the
            pipeline; never the test split).
        pairs: (A, B) per retrained attribute.
        seed: draws the balanced subset.
        l2: the ridge strength on the standardised features.
        per_group: images per group (default: the smallest group's size).

    Returns:
        ``(retrained model, info)`` where ``info`` has one row per attribute with the subset size
        and the fitted logistic loss.
    """
    if not pairs:
        raise ValueError("retrain_last_layer needs at least one (A, B) pair.")
    if not (np.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
    new = copy.deepcopy(model)
    _, last = split_last_linear(new.head)
    labels = dataset.attributes
    rows = []
    for a, b in pairs:
        idx = balanced_subset(labels, [(a, b)], seed, per_group=per_group)
        x = penultimate_features(new, dataset, idx, device=device).double()
        y = torch.from_numpy((labels[a].to_numpy()[idx] > 0).astype(np.float64))
        mu, sigma = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        xs = (x - mu) / sigma
        k = label_space_of_dataset(dataset).index(a)
        w0 = last.weight[k].detach().double().cpu() * sigma
        b0 = last.bias[k].detach().double().cpu() + (last.weight[k].detach().double().cpu() * mu).sum()
        w, bias = _logistic_regression(xs, y, w0, b0, l2, max_iter)
        with torch.no_grad():
            last.weight[k] = (w / sigma).to(last.weight)
            last.bias[k] = (bias - (w * mu / sigma).sum()).to(last.bias)
            loss = nn.functional.binary_cross_entropy_with_logits(xs @ w + bias, y).item()
        rows.append({"a": a, "b": b, "n_subset": int(idx.size), "logistic_loss": loss})
    return new, pd.DataFrame(rows)
