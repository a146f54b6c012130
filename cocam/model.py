"""Multi-label classifiers split at the Grad-CAM target layer.

cocam never uses forward or backward hooks. Instead every model is a :class:`SplitModel`:
a ``trunk`` that maps images to the target activation ``A`` and a ``head`` that maps ``A`` to
the logits, so ``model(x) == model.head(model.trunk(x))``. Grad-CAM (:mod:`cocam.gradcam`)
runs one forward pass, keeps ``A`` and differentiates the logits with respect to it.

The backbones come from the registry :mod:`cocam.archs` (one small file each: how to build the
torchvision net, its default target layer, its minimum input size, how to split it);
:data:`SUPPORTED_ARCHS`, :data:`DEFAULT_TARGET_LAYERS` and :data:`MIN_INPUT_SIZE` are live views
of it, so an architecture registered later appears in them too.

**Which tensor is A (pre- or post-ReLU)?** torchvision's AlexNet and VGG use in-place ReLUs,
so with hook-based tools "the output of the conv layer" may mean the tensor before or after
the ReLU depending on when the hook reads it. Here there is no ambiguity: the trunk *ends
with* the ReLU that follows the last convolution, and the tensor returned by the trunk, which
is exactly the tensor the head receives, is the **rectified (post-ReLU)** activation. If a
split makes the head start with an in-place operation, :func:`build_model` turns it into an
out-of-place one so the head can never overwrite ``A``.

Default target layers (``target_layer_name``):

========== ================ ===================================================== ==========
arch       target           A                                                     A at 224²
========== ================ ===================================================== ==========
alexnet    ``features.11``  conv5 + ReLU (post-ReLU); head = final MaxPool,       256×13×13
                            avgpool, flatten, classifier
resnet18   ``layer4``       output of the last residual block (post-ReLU);        512×7×7
                            head = avgpool, flatten, (dropout), fc
vgg11      ``features.19``  last conv + ReLU (post-ReLU); head = last MaxPool,    512×14×14
                            avgpool, flatten, classifier
vit_tiny   ``encoder``      patch tokens after the final LayerNorm, on the patch  32×28×28
                            grid (class token dropped); head = mean, (dropout), fc
small_cnn  ``features.4``   second conv + ReLU of a two-conv net for small images   50×8×8 at 28²
                            (Decoy-FashionMNIST); head = adaptive max-pool 4×4,
                            flatten, classifier
========== ================ ===================================================== ==========

Other splits: ``"features.<i>"`` for alexnet/vgg11 (the trunk is ``features[:i+1]``) and
``"layer1"`` … ``"layer4"`` for resnet18.

**Token models.** An architecture with a ``to_map`` function (:mod:`cocam.archs.tokens`) has a
trunk whose last step turns tokens ``(B, N, C)`` into the map ``(B, C, h, w)``; everything
downstream (Grad-CAM, the guidance losses) sees a CNN-like activation.

Input size: any square size works as long as the trunk still produces a feature map (AlexNet
needs at least 63 px, VGG11 32 px); 224 for real CelebA, 96–128 for fast CPU runs. An
architecture built for one size (``vit_tiny``) takes exactly the ``image_size`` it was built
with. Inputs are expected to be normalised with the ImageNet mean/std (the data layer does that).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from cocam.archs import ARCHITECTURES, Architecture, get_architecture
from cocam.errors import CocamError

__all__ = [
    "DEFAULT_TARGET_LAYERS",
    "MIN_INPUT_SIZE",
    "SUPPORTED_ARCHS",
    "PretrainedWeightsUnavailableError",
    "SplitModel",
    "build_model",
    "pretrained_weights_path",
]


class _RegistryView(Mapping):
    """A read-only, always-current mapping ``arch name → ARCHITECTURES[name].<field>``."""

    def __init__(self, field: str) -> None:
        self._field = field

    def __getitem__(self, arch: str) -> Any:
        return getattr(ARCHITECTURES[arch], self._field)

    def __iter__(self) -> Iterator[str]:
        return iter(ARCHITECTURES)

    def __len__(self) -> int:
        return len(ARCHITECTURES)

    def __repr__(self) -> str:
        return repr(dict(self))


#: Architectures :func:`build_model` knows: the names in the registry (a live view of it).
SUPPORTED_ARCHS = ARCHITECTURES.keys()

#: The default Grad-CAM target layer per architecture (torchvision module names).
DEFAULT_TARGET_LAYERS: Mapping[str, str] = _RegistryView("default_target_layer")

#: Smallest square input (pixels) for which each architecture still produces logits.
MIN_INPUT_SIZE: Mapping[str, int] = _RegistryView("min_input_size")


class PretrainedWeightsUnavailableError(CocamError, FileNotFoundError):
    """ImageNet weights were requested but are not in the local torch hub cache (or torchvision has none)."""


class SplitModel(nn.Module):
    """A classifier written as ``head(trunk(x))``, split at the Grad-CAM target layer.

    Args:
        trunk: images ``(B, 3, S, S)`` → target activation ``A`` ``(B, K, h, w)``.
        head: ``A`` → logits ``(B, num_outputs)``.
        num_outputs: number of logits (40 for the CelebA attributes).
        arch: architecture name (one of :data:`SUPPORTED_ARCHS`, or anything for a custom model).
        target_layer: human-readable description of ``A``.
        target_layer_name: the module name of the target layer in the original network.
        min_input_size: smallest accepted square input size in pixels (checked in forward).
        input_size: the one input size accepted (``S×S``), for a net built for one size
            (positional embeddings); ``None`` accepts any size of at least ``min_input_size``.

    The trunk's output is passed to the head unchanged, so the activation returned by
    :meth:`forward_with_activation` is exactly what the head consumed.
    """

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        *,
        num_outputs: int,
        arch: str = "custom",
        target_layer: str = "trunk output",
        target_layer_name: str = "trunk",
        min_input_size: int = 1,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if int(num_outputs) < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}.")
        self.trunk = trunk
        self.head = head
        self.num_outputs = int(num_outputs)
        self.arch = arch
        self.target_layer = target_layer
        self.target_layer_name = target_layer_name
        self.min_input_size = int(min_input_size)
        self.input_size = None if input_size is None else int(input_size)

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(B, C, H, W)`` of a size this model takes.

        That is ``H, W >= min_input_size``, and ``H = W = input_size`` when it is set.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}.")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is too small for {self.arch}: it needs at "
                f"least {self.min_input_size}x{self.min_input_size} pixels."
            )
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} does not fit this {self.arch}: it was built for "
                f"{self.input_size}x{self.input_size} inputs; build one for your size (image_size=...)."
            )

    def forward_with_activation(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(A, logits)``: the target activation ``(B, K, h, w)`` and ``(B, num_outputs)``."""
        self.check_input(x)
        activation = self.trunk(x)
        return activation, self.head(activation)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_outputs)`` for images ``(B, 3, S, S)``."""
        return self.forward_with_activation(x)[1]

    def feature_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """Shape ``(K, h, w)`` of ``A`` for a given input size, computed without real work.

        Runs a copy of the trunk on the ``meta`` device, so no parameter, buffer or BatchNorm
        statistic of this model is touched.
        """
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        trunk = copy.deepcopy(self.trunk).to("meta")
        with torch.no_grad():
            out = trunk(torch.empty(1, 3, h, w, device="meta"))
        return tuple(out.shape[1:])  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, target_layer={self.target_layer!r}, num_outputs={self.num_outputs}"


class _ToMap(nn.Module):
    """The last step of a token model's trunk: its architecture's ``to_map``, tokens → ``(B, C, h, w)``."""

    def __init__(self, to_map: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.to_map = to_map

    def forward(self, tokens: Tensor) -> Tensor:
        return self.to_map(tokens)

    def extra_repr(self) -> str:
        return getattr(self.to_map, "__name__", repr(self.to_map))


def pretrained_weights_path(arch: str) -> str:
    """Where torchvision expects the ImageNet weights file of ``arch`` (torch hub cache)."""
    weights = _imagenet_weights(get_architecture(arch))
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _imagenet_weights(entry: Architecture):
    if entry.weights is None:
        raise PretrainedWeightsUnavailableError(
            f"torchvision has no ImageNet weights for {entry.name}: use pretrained=False to train it from scratch."
        )
    return getattr(torchvision.models, entry.weights).IMAGENET1K_V1


def _make_out_of_place(module: nn.Module) -> None:
    """If ``module`` (or its first leaf) is an in-place op, make it out-of-place."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    if getattr(module, "inplace", False):
        module.inplace = False  # type: ignore[assignment]


def build_model(
    arch: str = "alexnet",
    num_outputs: int = 40,
    *,
    pretrained: bool = False,
    dropout: float = 0.5,
    target_layer: str | None = None,
    hidden: int | None = None,
    image_size: int | None = None,
) -> SplitModel:
    """Build a registered torchvision net with a ``num_outputs``-logit multi-label head, split for Grad-CAM.

    Args:
        arch: one of :data:`SUPPORTED_ARCHS` (``"alexnet"``, ``"resnet18"``, ``"vgg11"``,
            ``"vit_tiny"``, and any architecture registered with
            :func:`cocam.archs.register_architecture`).
        num_outputs: number of logits; the last Linear layer is replaced by a freshly
            initialised ``Linear(in_features, num_outputs)``.
        pretrained: initialise from torchvision's ImageNet weights (``IMAGENET1K_V1``). Works
            offline only: the file must already be in the torch hub cache
            (``torch.hub.get_dir()/checkpoints/<file>``, see :func:`pretrained_weights_path`),
            otherwise :class:`PretrainedWeightsUnavailableError` is raised; nothing is
            downloaded. ``pretrained=False`` trains from scratch.
        dropout: dropout probability in the classifier (alexnet, vgg11: torchvision's two
            dropout layers; resnet18, vit_tiny: one dropout inserted before the output layer,
            omitted when 0).
        target_layer: where to split (see the module docstring); ``None`` = the default
            (:data:`DEFAULT_TARGET_LAYERS`), i.e. the rectified output of the last conv layer.
        hidden: width of the two hidden fully connected layers of alexnet/vgg11 (``None`` keeps
            torchvision's 4096). A narrow classifier (e.g. 512) keeps the convolutional trunk —
            and so the Grad-CAM layer — of the paper's AlexNet while making CPU training several
            times faster; those layers are freshly initialised even with ``pretrained=True``.
        image_size: the square input size. Only architectures built for one size need it
            (``vit_tiny``: a multiple of 8); the CNNs take any size and ignore it.

    Returns:
        A :class:`SplitModel`; images ``(B, 3, S, S)`` → logits ``(B, num_outputs)``.
        Its weights are a deterministic function of the torch RNG state (``torch.manual_seed``).
    """
    entry = get_architecture(arch)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    layer = entry.default_target_layer if target_layer is None else target_layer
    weights = None
    if pretrained:
        weights = _imagenet_weights(entry)
        path = pretrained_weights_path(arch)
        if not os.path.isfile(path):
            raise PretrainedWeightsUnavailableError(
                f"ImageNet weights for {arch} are not in the torch hub cache and cocam does not "
                f"download them. Put the file {os.path.basename(path)!r} (from {weights.url}) at "
                f"{path} (the directory is torch.hub.get_dir()/checkpoints; set TORCH_HOME to "
                f"change it), or use pretrained=False to train from scratch."
            )
    if hidden is not None and (not entry.hidden_layers or hidden < 1):
        takes = [name for name, a in ARCHITECTURES.items() if a.hidden_layers]
        raise ValueError(f"hidden must be a positive width for {'/'.join(takes)} (got {hidden} for {arch}).")

    net = entry.build(num_outputs, weights=weights, dropout=dropout, hidden=hidden, image_size=image_size)
    trunk, head, description = entry.split(net, layer, dropout)
    if entry.to_map is not None:
        trunk = nn.Sequential(OrderedDict(tokens=trunk, to_map=_ToMap(entry.to_map)))
    _make_out_of_place(head)
    return SplitModel(
        trunk,
        head,
        num_outputs=num_outputs,
        arch=arch,
        target_layer=description,
        target_layer_name=layer,
        min_input_size=entry.min_input_size,
        input_size=image_size if entry.fixed_input_size else None,
    )
