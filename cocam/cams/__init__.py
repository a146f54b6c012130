"""Gradient CAM methods, selectable by name: ``grad_cam(..., method=...)``.

:data:`CAM_METHODS` maps each name to its method:

* ``"gradcam"`` — Grad-CAM (:mod:`cocam.cams.gradcam`), the default;
* ``"gradcam++"`` — Grad-CAM++ (:mod:`cocam.cams.gradcam_pp`);
* ``"layercam"`` — LayerCAM (:mod:`cocam.cams.layercam`).

Each maps the target activation ``A (B, K, h, w)`` and the per-position gradients
``G (B, T, K, h, w)`` to the map ``(B, T, h, w)``; the gradients themselves come from the one
engine in :mod:`cocam.gradcam`. To add a method: write one file with a subclass of
:class:`CamMethod` (or :class:`ChannelWeightedCam` for ``Σ_k w_k A_k``) decorated with
:func:`register_cam_method`, and import it below.
"""

from cocam.cams.base import (
    CAM_METHODS,
    CamMethod,
    ChannelWeightedCam,
    UnknownCamMethodError,
    get_cam_method,
    register_cam_method,
)
from cocam.cams import gradcam, gradcam_pp, layercam  # noqa: E402,F401  (registration)

#: The default method (the paper's Grad-CAM).
DEFAULT_CAM_METHOD = "gradcam"

__all__ = ["CAM_METHODS", "DEFAULT_CAM_METHOD", "CamMethod", "ChannelWeightedCam", "UnknownCamMethodError",
           "get_cam_method", "register_cam_method"]
