"""The shared base of the CAM methods and their registry.

Every method here is a gradient CAM of one target activation ``A`` (``K`` channels, ``h×w``):
from ``A`` ``(B, K, h, w)`` and the per-position gradients ``G = ∂score_t/∂A`` ``(B, T, K, h, w)``
(one per image and target, computed by :func:`cocam.gradcam.grad_cam`) it makes a *signed* map
``(B, T, h, w)``; the CAM is its ReLU. The engine computes ``G`` in chunks of targets and never
holds all ``T`` of them at once, so a method works in two steps:

* :meth:`CamMethod.reduce` — what the map needs of ``G`` (channel weights ``(B, T, K)``, or the
  map itself), computed chunk by chunk as soon as the chunk's gradients exist;
* :meth:`CamMethod.signed_map` — the pre-ReLU map from ``A`` and the reduced statistics.

Both are ordinary differentiable torch code: with ``create_graph=True`` the gradients ``G``
carry their own graph (double backprop), and the map trains the head as well as the trunk.

A method that is a weighted sum of the activation channels, ``Σ_k w_k · A_k``, derives from
:class:`ChannelWeightedCam` and only defines :meth:`~ChannelWeightedCam.channel_weights`.
Adding a method is one file with one class decorated by :func:`register_cam_method`, imported
in :mod:`cocam.cams`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from cocam.errors import CocamError

__all__ = ["CAM_METHODS", "CamMethod", "ChannelWeightedCam", "UnknownCamMethodError", "get_cam_method",
           "register_cam_method"]


class UnknownCamMethodError(CocamError, ValueError):
    """A CAM method name that is not in :data:`CAM_METHODS`."""


class CamMethod(abc.ABC):
    """A gradient CAM: ``(A, G) ↦`` signed map ``(B, T, h, w)``; the CAM is its ReLU.

    Subclasses set :attr:`name` and implement :meth:`reduce` and :meth:`signed_map`;
    :meth:`reported_weights` returns the ``(B, T, K)`` channel weights where the method has them.
    """

    #: The registry key (``grad_cam(method=...)``, ``Guidance(cam_method=...)``, ``--cam-method``).
    name: ClassVar[str]

    @abc.abstractmethod
    def reduce(self, activations: Tensor, grads: Tensor) -> Tensor:
        """``(B, T, ...)`` what :meth:`signed_map` needs of ``G``; ``grads`` is ``(B, T, K, h, w)``."""

    @abc.abstractmethod
    def signed_map(self, activations: Tensor, reduced: Tensor) -> Tensor:
        """``(B, T, h, w)`` the map before the CAM's ReLU."""

    def reported_weights(self, reduced: Tensor) -> Tensor | None:
        """``(B, T, K)`` the channel weights in ``reduced``, or ``None`` for a method without them."""
        return None

    def __call__(self, activations: Tensor, grads: Tensor, *, relu: bool = True) -> Tensor:
        """``(B, T, h, w)`` the CAM at feature resolution from ``A (B, K, h, w)`` and ``G (B, T, K, h, w)``."""
        if activations.ndim != 4 or grads.ndim != 5 or grads.shape[:1] + grads.shape[2:] != activations.shape:
            raise ValueError(f"{self.name}: activations must be (B, K, h, w) and grads (B, T, K, h, w) of the "
                             f"same B, K, h, w; got {tuple(activations.shape)} and {tuple(grads.shape)}.")
        signed = self.signed_map(activations, self.reduce(activations, grads))
        return F.relu(signed) if relu else signed

    def __repr__(self) -> str:
        return f"<CAM method {self.name!r}>"


class ChannelWeightedCam(CamMethod):
    """A CAM of the form ``Σ_k w_k · A_k`` with one weight per image, target and channel."""

    @abc.abstractmethod
    def channel_weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        """``(B, T, K)`` the weights ``w`` from ``A (B, K, h, w)`` and ``G (B, T, K, h, w)``."""

    def reduce(self, activations: Tensor, grads: Tensor) -> Tensor:
        return self.channel_weights(activations, grads)

    def signed_map(self, activations: Tensor, reduced: Tensor) -> Tensor:
        return torch.einsum("btk,bkhw->bthw", reduced, activations)

    def reported_weights(self, reduced: Tensor) -> Tensor:
        return reduced


#: The CAM methods by name (filled by :func:`register_cam_method`; see :mod:`cocam.cams`).
CAM_METHODS: dict[str, CamMethod] = {}


def register_cam_method(cls: type[CamMethod]) -> type[CamMethod]:
    """Class decorator: register an instance of ``cls`` under ``cls.name`` in :data:`CAM_METHODS`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '<method name>' to be registered.")
    old = CAM_METHODS.get(name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise ValueError(f"CAM method name {name!r} is already taken by {type(old).__qualname__}: choose another.")
    CAM_METHODS[name] = cls()
    return cls


def get_cam_method(method: str | CamMethod) -> CamMethod:
    """The registered method called ``method`` (a :class:`CamMethod` instance is returned as is)."""
    if isinstance(method, CamMethod):
        return method
    if isinstance(method, str) and method in CAM_METHODS:
        return CAM_METHODS[method]
    raise UnknownCamMethodError(f"unknown CAM method {method!r}: choose one of {', '.join(CAM_METHODS)}.")
