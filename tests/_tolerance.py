"""Float tolerances derived from the arithmetic, not from one machine's output.

Two code paths that compute the same mathematical value — a batched and a looped backward, one
and two threads, AVX2 and AVX-512 kernels, MKL on an Intel and on an AMD CPU — add the same terms
in different orders, and every order rounds differently. How far apart they may land follows from
the arithmetic alone (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3–4): a
sum of ``n`` terms computed in floating point with unit roundoff ``u``, in *any* order, satisfies

    |fl(Σ x_i) − Σ x_i|  ≤  γ_n · Σ |x_i|,        γ_n = n·u / (1 − n·u),

and a dot product or a matrix product the same with ``x_i = a_i · b_i``. The bound is on the
*magnitude of the summands*, not of the result: when terms cancel, a result can be tiny while its
rounding error is not, so a relative tolerance per element (``assert_close``'s float32 default
``rtol=1.3e-6``, about 22 ``u``) holds for one summation order and fails for another.

A value that passes through several stages (a network's forward pass, its backward, a double
backward) collects one such error per stage; to first order they add, so ``n`` is the sum of the
accumulation lengths along the chain. The summand magnitude of a whole tensor is taken as its
largest entry (the normwise bound), which is what :func:`assert_near_reference` does when no
``scale`` is given.

The robust way to compare two float32 code paths is therefore to compute a float64 reference
(its own error, ``γ_n`` of float64, is ~10⁹ times smaller) and to bound each path's distance to it:
a check that the two paths agree with each other within that bound still catches any real
difference between them (a dropped term, a wrong sign, a mixed-up image), which is of the order of
the values themselves.

Bit-for-bit equality stays the right check where both sides run the very same code on the same
machine with the same thread count (a resumed run against an uninterrupted one, a cache against
a recomputation): those compare a computation with itself, and any difference is a bug.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``, half the machine epsilon: float32 2⁻²⁴ ≈ 6.0e-8, float64 2⁻⁵³, bfloat16 2⁻⁸."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``: the relative error bound of an ``n``-term sum."""
    nu = n * unit_roundoff(dtype)
    if not 0 <= nu < 1:
        raise ValueError(f"n·u = {nu} must be in [0, 1): {n} terms is too long a sum for {dtype}.")
    return nu / (1 - nu)


def sum_error_bound(n: int, magnitude: float, dtype: torch.dtype) -> float:
    """Largest distance of a computed ``n``-term sum from the exact one, ``γ_n · Σ|x_i|``.

    ``magnitude`` is ``Σ|x_i|``, the summed absolute values of the terms (not of the result).
    Two summation orders differ by at most twice this.
    """
    return gamma(n, dtype) * magnitude


def assert_near_reference(
    actual: Tensor,
    reference: Tensor,
    *,
    n: int,
    scale: float | None = None,
    what: str = "value",
) -> None:
    """Assert ``|actual − reference| ≤ γ_n(actual) · scale + γ_n(reference) · scale`` elementwise.

    Args:
        actual: the value from the code path under test (e.g. float32).
        reference: the same value from a more precise computation (e.g. float64: its own
            share of the bound is then negligible), or from a second path of the same precision
            (each path is within ``γ_n · scale`` of the exact value, so the two are within twice
            that of each other, which is what the sum of the two shares gives).
        n: the accumulation length along the chain that produces each value (see the module
            docstring); one number for the whole tensor.
        scale: the summand magnitude; default the largest ``|reference|`` (normwise bound).
        what: the name printed on failure.
    """
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    ref = reference.detach().to(torch.float64).cpu()
    got = actual.detach().to(torch.float64).cpu()
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 0.0
    bound = (gamma(n, actual.dtype) + gamma(n, reference.dtype)) * scale
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= bound, (
        f"{what}: greatest difference {err:.3e} exceeds the rounding bound {bound:.3e} "
        f"(γ_{n} of {actual.dtype} and of {reference.dtype}, times the summand magnitude {scale:.3e})"
    )


def chain_lengths(model: torch.nn.Module, *inputs: Tensor) -> tuple[int, int]:
    """``(forward, backward)`` accumulation lengths of one pass of ``model`` on ``inputs``.

    The sum, over the model's convolutions, linear layers and average pools as they run on these
    inputs, of the number of terms each output element adds up: a convolution ``C_in/groups × kh
    × kw`` forward and ``C_out/groups × ⌈kh/s⌉ × ⌈kw/s⌉`` backward (to its input), a linear layer
    ``in_features`` forward and ``out_features`` backward, an average pool its window forward and
    at most its window backward. (Max pools, ReLUs and element-wise layers pick or scale one value
    and add nothing.) A parameter's gradient additionally sums over the batch and the positions:
    add that length where parameter gradients are compared.
    """
    forward, backward = [0], [0]

    def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            k = 1
            for size in module.kernel_size:
                k *= size
            back = module.out_channels // module.groups
            for size, stride in zip(module.kernel_size, module.stride):
                back *= -(-size // stride)
            forward[0] += module.in_channels // module.groups * k
            backward[0] += back
        elif isinstance(module, torch.nn.Linear):
            forward[0] += module.in_features
            backward[0] += module.out_features
        elif isinstance(module, (torch.nn.modules.pooling._AdaptiveAvgPoolNd, torch.nn.modules.pooling._AvgPoolNd)):
            window = -(-args[0][0].numel() // output[0].numel())  # input / output elements per image
            forward[0] += window
            backward[0] += window

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return forward[0], backward[0]
