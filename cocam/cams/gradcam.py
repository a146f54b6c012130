"""Grad-CAM (Selvaraju et al., 2017): channel weights are the spatial mean of the gradients.

For one image and target, with ``G_kij = ∂score/∂A_kij`` over the ``h×w`` positions::

    w_k = (1 / hw) · Σ_ij G_kij
    cam = ReLU(Σ_k w_k · A_k)

``w_k`` is the global-average-pooled gradient: the first-order sensitivity of the score to
channel ``k`` as a whole. For a head that is linear in ``A`` after global average pooling (the
original CAM setting), ``Σ_k w_k A_k`` is the class activation map of Zhou et al. (2016) up to
a constant factor.
"""

from __future__ import annotations

from torch import Tensor

from cocam.cams.base import ChannelWeightedCam, register_cam_method


@register_cam_method
class GradCAM(ChannelWeightedCam):
    """``w_k = mean_ij G_kij``; the map ``Σ_k w_k A_k``."""

    name = "gradcam"

    def channel_weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        return grads.mean(dim=(-2, -1))
