"""Grad-CAM++ (Chattopadhay et al., 2018): pixel-weighted gradients for the channel weights.

Grad-CAM++ writes the weight of channel ``k`` as ``w_k = Σ_ij α_kij · ReLU(∂Y/∂A_kij)``, with
``α`` chosen so that ``Y = Σ_k w_k Σ_ij A_kij`` holds for a score linear in the positive
gradients. Solving for ``α`` needs the second and third derivatives of
``Y``. Taking the exponential of the score, ``Y = exp(S)``, for a head that is piecewise linear
in ``A`` (ReLU, max-pooling and linear layers: the second derivatives of ``S`` vanish almost
everywhere) gives ``∂ⁿY/∂Aⁿ = Y · Gⁿ`` with ``G = ∂S/∂A``, and the closed form (the paper's eq. 19)::

    α_kij = G_kij² / (2 · G_kij² + Σ_ab A_kab · G_kij³)
    w_k   = Σ_ij α_kij · ReLU(G_kij)
    cam   = ReLU(Σ_k w_k · A_k)

(the common factor ``Y > 0`` of ``w`` only scales the map and is dropped). This is also the
form pytorch-grad-cam uses. Where ``G_kij = 0`` the fraction is ``0/0`` and is taken as ``0``
(the position has no gradient); more generally a term whose denominator
``G² · (2 + S_k · G)`` vanishes contributes ``0`` (with ``S_k = Σ_ab A_kab``, only possible for
``S_k < 0``; for non-negative activations every position with ``G > 0`` has
``α = 1 / (2 + S_k · G) ∈ (0, 1/2]``). pytorch-grad-cam instead adds ``1e-6`` to the
denominator, which differs from this where ``G²`` is not much larger than ``1e-6``.

Unlike Grad-CAM's mean, the weights depend on ``A`` (through ``S_k``) as well as on ``G``; in
first-order mode (``create_graph=False``) ``G`` is a constant but the dependence on ``A`` is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cocam.cams.base import ChannelWeightedCam, register_cam_method


@register_cam_method
class GradCAMPlusPlus(ChannelWeightedCam):
    """``w_k = Σ_ij α_kij ReLU(G_kij)`` with ``α = G² / (2G² + Σ_ab A_kab G³)``, ``0/0 := 0``."""

    name = "gradcam++"

    def channel_weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        g2 = grads.square()
        sums = activations.sum(dim=(-2, -1))[:, None, :, None, None]  # (B, 1, K, 1, 1): S_k
        denominator = 2 * g2 + sums * g2 * grads
        defined = denominator != 0
        # The inner where keeps the division finite where it is masked out, so that its
        # gradient (double backprop) is 0 there rather than NaN.
        alpha = torch.where(defined, g2 / torch.where(defined, denominator, torch.ones_like(denominator)), 0.0)
        return (alpha * F.relu(grads)).sum(dim=(-2, -1))
