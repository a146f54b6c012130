"""Last-layer retraining on group-balanced data: the split head, the solved regression, untouched rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cocam.attributes import attribute_index
from cocam.checkpoint import ModelSpec
from cocam.dataset import CelebADataset
from cocam.dfr import penultimate_features, retrain_last_layer, split_last_linear
from cocam.groups import balanced_subset

PAIR = ("Wearing_Lipstick", "Heavy_Makeup")


@pytest.fixture(scope="module")
def model_and_data(synthetic_root, one_thread):
    torch.manual_seed(0)
    model = ModelSpec(arch="alexnet", image_size=64, hidden=32).build()
    return model, CelebADataset(synthetic_root, "train", image_size=64, progress=False)


def test_split_last_linear_recomposes_the_head(model_and_data):
    model, _ = model_and_data
    body, last = split_last_linear(model.head)
    assert isinstance(last, nn.Linear) and last.out_features == 40
    model.eval()
    a = model.trunk(torch.randn(3, 3, 64, 64))
    torch.testing.assert_close(last(body(a)), model.head(a), rtol=0, atol=0)  # the same modules, the same ops
    with pytest.raises(ValueError, match="ending in an nn.Linear"):
        split_last_linear(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_retraining_solves_the_regression_and_touches_only_the_pairs_row(model_and_data):
    model, data = model_and_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, info = retrain_last_layer(model, data, [PAIR], seed=0, l2=1e-1, device="cpu")
    for k, v in model.state_dict().items():  # the input model is not modified
        assert torch.equal(v, before[k])
    _, last_old = split_last_linear(model.head)
    _, last_new = split_last_linear(new.head)
    k = attribute_index(PAIR[0])
    others = [i for i in range(40) if i != k]
    assert torch.equal(last_new.weight[others], last_old.weight[others])
    assert torch.equal(last_new.bias[others], last_old.bias[others])
    assert not torch.equal(last_new.weight[k], last_old.weight[k])
    for name, value in new.state_dict().items():  # nothing before the last layer changed
        if not name.startswith("head") or value.shape[0] != 40:
            assert torch.equal(value, before[name]), name

    # the folded row is a stationary point of the regularised logistic loss on the balanced subset
    idx = balanced_subset(data.attributes, [PAIR], seed=0)
    assert info.loc[0, "n_subset"] == idx.size
    x = penultimate_features(new, data, idx, device="cpu").double()
    y = torch.from_numpy((data.attributes[PAIR[0]].to_numpy()[idx] > 0).astype(np.float64))
    mu, sigma = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    w = (last_new.weight[k].double() * sigma).detach().requires_grad_(True)
    b = (last_new.bias[k].double() + (last_new.weight[k].double() * mu).sum()).detach().requires_grad_(True)
    xs = (x - mu) / sigma
    loss = nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + 0.05 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    # the float32 round trip of the weights leaves a gradient of order eps32 · |curvature · w|
    assert gw.abs().max() < 1e-4 and gb.abs() < 1e-4
    assert info.loc[0, "logistic_loss"] == pytest.approx(
        nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y).item(), abs=1e-4)


def test_bad_arguments_are_clear_errors(model_and_data):
    model, data = model_and_data
    with pytest.raises(ValueError, match="at least one"):
        retrain_last_layer(model, data, [])
    with pytest.raises(ValueError, match="l2"):
        retrain_last_layer(model, data, [PAIR], l2=float("nan"))
