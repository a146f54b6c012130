"""Tests for the test suite's rounding bounds (tests/_tolerance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import _tolerance


def test_unit_roundoff_and_gamma() -> None:
    assert _tolerance.unit_roundoff(torch.float32) == 2.0**-24
    assert _tolerance.unit_roundoff(torch.float64) == 2.0**-53
    assert _tolerance.gamma(1000, torch.float32) == pytest.approx(1000 * 2.0**-24 / (1 - 1000 * 2.0**-24))
    with pytest.raises(ValueError, match="too long"):
        _tolerance.gamma(2**24, torch.float32)


def test_reordered_float32_sums_stay_within_the_bound() -> None:
    """Sums of cancelling terms in several orders: within γ_n Σ|x|, far outside a per-result rtol."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 100
    x = torch.cat([x, -x[:-1] * (1 + 1e-3)])  # heavy cancellation: the sum is small next to Σ|x|
    exact = x.double().sum().item()
    magnitude = x.double().abs().sum().item()
    values = x.numpy()
    # np.add.accumulate adds strictly left to right in float32 (IEEE, correctly rounded): these
    # three orders give the same numbers on every machine; torch's sum uses the CPU's own order
    orders = {
        "torch": x.sum().item(),
        "sequential": float(np.add.accumulate(values)[-1]),
        "reversed": float(np.add.accumulate(values[::-1])[-1]),
        "sorted": float(np.add.accumulate(np.sort(values))[-1]),
    }
    bound = _tolerance.sum_error_bound(x.numel(), magnitude, torch.float32)
    for name, value in orders.items():
        assert abs(value - exact) <= bound, name
    sequential = [orders[k] for k in ("sequential", "reversed", "sorted")]
    assert max(sequential) - min(sequential) > 1.3e-6 * abs(exact)  # a tolerance on the result would not hold


def test_assert_near_reference_catches_a_real_difference() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    b = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    exact = a @ b
    scale = (a.abs() @ b.abs()).max().item()
    computed = (a.float() @ b.float())
    # the float32 inputs are rounded too: one more rounding on each factor, n = 64 + 2
    _tolerance.assert_near_reference(computed, exact, n=66, scale=scale, what="a @ b")
    with pytest.raises(AssertionError, match="exceeds the rounding bound"):
        _tolerance.assert_near_reference(computed * (1 + 1e-4), exact, n=66, scale=scale)


def test_chain_lengths_count_each_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),  # forward 3·3·3 = 27, backward 6·2·2 = 24
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),  # 8×8 -> 2×2: 16 each way
        nn.Flatten(1),
        nn.Linear(24, 5),  # forward 24, backward 5
    )
    assert _tolerance.chain_lengths(model, torch.zeros(1, 3, 16, 16)) == (27 + 16 + 24, 24 + 16 + 5)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
