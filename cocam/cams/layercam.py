"""LayerCAM (Jiang et al., 2021): every position's activation weighted by its own positive gradient.

Instead of one weight per channel, each activation ``A_kij`` is weighted by the positive part
of its gradient ``G_kij = ∂score/∂A_kij``::

    cam_ij = ReLU(Σ_k ReLU(G_kij) · A_kij)

so a channel counts only where it raises the score. Without per-channel weights the map is
reduced from the gradients directly (no ``weights`` are reported). With non-negative
activations (after a ReLU) the sum is already non-negative and the outer ReLU changes nothing.
Where the gradients are spatially constant (a head that global-average-pools ``A`` and then
is linear), ``G_kij`` equals Grad-CAM's weight ``w_k`` at every position, and LayerCAM is
Grad-CAM with its negative weights dropped.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from cocam.cams.base import CamMethod, register_cam_method


@register_cam_method
class LayerCAM(CamMethod):
    """``Σ_k ReLU(G_kij) · A_kij`` at each position."""

    name = "layercam"

    def reduce(self, activations: Tensor, grads: Tensor) -> Tensor:
        return (F.relu(grads) * activations[:, None]).sum(dim=2)  # (B, T, h, w)

    def signed_map(self, activations: Tensor, reduced: Tensor) -> Tensor:
        return reduced
