"""Multi-label CNN classifiers split at the Grad-CAM target layer.

cocam never uses forward or backward hooks. Instead every model is a :class:`SplitModel`:
a ``trunk`` that maps images to the target activation ``A`` and a ``head`` that maps ``A`` to
the logits, so ``model(x) == model.head(model.trunk(x))``. Grad-CAM (:mod:`cocam.gradcam`)
runs one forward pass, keeps ``A`` and differentiates the logits with respect to it.

**Which tensor is A (pre- or post-ReLU)?** torchvision's AlexNet and VGG use in-place ReLUs,
so with hook-based tools "the output of the conv layer" may mean the tensor before or after
the ReLU depending on when the hook reads it. Here there is no ambiguity: the trunk *ends
with* the ReLU that follows the last convolution, and the tensor returned by the trunk, which
is exactly the tensor the head receives, is the **rectified (post-ReLU)** activation. If a
custom split makes the head start with an in-place operation, :func:`build_model` turns it
into an out-of-place one so the head can never overwrite ``A``.

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
========== ================ ===================================================== ==========

Other splits: ``"features.<i>"`` for alexnet/vgg11 (the trunk is ``features[:i+1]``) and
``"layer1"`` … ``"layer4"`` for resnet18.

Input size: any square size works as long as the trunk still produces a feature map (AlexNet
needs at least 63 px, VGG11 32 px); 224 for real CelebA, 96–128 for fast CPU runs. Inputs are
expected to be normalised with the ImageNet mean/std (the data layer does that).
"""

from __future__ import annotations

import copy
import os
import re
from collections import OrderedDict
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

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

#: Architectures :func:`build_model` knows.
SUPPORTED_ARCHS: tuple[str, ...] = ("alexnet", "resnet18", "vgg11")

#: The default Grad-CAM target layer per architecture (torchvision module names).
DEFAULT_TARGET_LAYERS: dict[str, str] = {
    "alexnet": "features.11",
    "resnet18": "layer4",
    "vgg11": "features.19",
}

#: Smallest square input (pixels) for which each architecture still produces logits.
MIN_INPUT_SIZE: dict[str, int] = {"alexnet": 63, "resnet18": 1, "vgg11": 32}

_WEIGHTS = {
    "alexnet": "AlexNet_Weights",
    "resnet18": "ResNet18_Weights",
    "vgg11": "VGG11_Weights",
}


class PretrainedWeightsUnavailableError(CocamError, FileNotFoundError):
    """ImageNet weights were requested but are not in the local torch hub cache."""


class SplitModel(nn.Module):
    """A classifier written as ``head(trunk(x))``, split at the Grad-CAM target layer.

    Args:
        trunk: images ``(B, 3, S, S)`` → target activation ``A`` ``(B, K, h, w)``.
        head: ``A`` → logits ``(B, num_outputs)``.
        num_outputs: number of logits (40 for the CelebA attributes).
        arch: architecture name (``"alexnet"``, ``"resnet18"``, ``"vgg11"`` or anything for a
            custom model).
        target_layer: human-readable description of ``A``.
        target_layer_name: the module name of the target layer in the original network.
        min_input_size: smallest accepted square input size in pixels (checked in forward).

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

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(B, C, H, W)`` with ``H, W >= min_input_size``."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}.")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is too small for {self.arch}: it needs at "
                f"least {self.min_input_size}x{self.min_input_size} pixels."
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


def pretrained_weights_path(arch: str) -> str:
    """Where torchvision expects the ImageNet weights file of ``arch`` (torch hub cache)."""
    weights = _imagenet_weights(_check_arch(arch))
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _check_arch(arch: str) -> str:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"Unknown architecture {arch!r}. Supported architectures: {', '.join(SUPPORTED_ARCHS)}."
        )
    return arch


def _imagenet_weights(arch: str):
    return getattr(torchvision.models, _WEIGHTS[arch]).IMAGENET1K_V1


def _make_out_of_place(module: nn.Module) -> None:
    """If ``module`` (or its first leaf) is an in-place op, make it out-of-place."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    if getattr(module, "inplace", False):
        module.inplace = False  # type: ignore[assignment]


def _set_classifier(classifier: nn.Sequential, num_outputs: int, hidden: int | None) -> None:
    """Replace the output layer (and, with ``hidden``, the hidden widths) of an AlexNet/VGG classifier."""
    linears = [i for i, m in enumerate(classifier) if isinstance(m, nn.Linear)]
    if hidden is not None:
        for i in linears[:-1]:
            old = classifier[i]
            width_in = old.in_features if i == linears[0] else hidden
            classifier[i] = nn.Linear(width_in, hidden)
    last = linears[-1]
    classifier[last] = nn.Linear(classifier[last].in_features if hidden is None else hidden, num_outputs)


def _split_features(net: nn.Module, arch: str, layer: str, num_outputs: int) -> SplitModel:
    """Split AlexNet / VGG (``features`` → ``avgpool`` → ``classifier``) after ``layer``."""
    features: nn.Sequential = net.features  # type: ignore[assignment]
    match = re.fullmatch(r"features\.(\d+)", layer)
    if match is None or int(match.group(1)) >= len(features):
        raise ValueError(
            f"target_layer {layer!r} is not valid for {arch}: use 'features.<i>' with "
            f"0 <= i < {len(features)} (default {DEFAULT_TARGET_LAYERS[arch]!r})."
        )
    i = int(match.group(1))
    trunk = features[: i + 1]
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if i + 1 < len(features):
        rest = features[i + 1 :]
        _make_out_of_place(rest)
        parts["features"] = rest
    parts["avgpool"] = net.avgpool
    parts["flatten"] = nn.Flatten(1)
    parts["classifier"] = net.classifier
    convs = [j for j in range(i + 1) if isinstance(features[j], nn.Conv2d)]
    module = features[i]
    if isinstance(module, nn.ReLU) and convs:
        desc = f"{layer}: ReLU after conv features.{convs[-1]} (post-ReLU activation)"
    else:
        desc = f"{layer}: output of {type(module).__name__}"
    return SplitModel(
        trunk,
        nn.Sequential(parts),
        num_outputs=num_outputs,
        arch=arch,
        target_layer=desc,
        target_layer_name=layer,
        min_input_size=MIN_INPUT_SIZE[arch],
    )


def _split_resnet(net: nn.Module, layer: str, num_outputs: int, dropout: float) -> SplitModel:
    stages = ["layer1", "layer2", "layer3", "layer4"]
    if layer not in stages:
        raise ValueError(
            f"target_layer {layer!r} is not valid for resnet18: use one of {', '.join(stages)} "
            f"(default 'layer4')."
        )
    k = stages.index(layer) + 1
    trunk = nn.Sequential(
        OrderedDict(
            [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
            + [(s, getattr(net, s)) for s in stages[:k]]
        )
    )
    parts: OrderedDict[str, nn.Module] = OrderedDict((s, getattr(net, s)) for s in stages[k:])
    parts["avgpool"] = net.avgpool
    parts["flatten"] = nn.Flatten(1)
    if dropout > 0:
        parts["dropout"] = nn.Dropout(p=dropout)
    parts["fc"] = net.fc
    return SplitModel(
        trunk,
        nn.Sequential(parts),
        num_outputs=num_outputs,
        arch="resnet18",
        target_layer=f"{layer}: output of the last residual block of {layer} (post-ReLU activation)",
        target_layer_name=layer,
        min_input_size=MIN_INPUT_SIZE["resnet18"],
    )


def build_model(
    arch: str = "alexnet",
    num_outputs: int = 40,
    *,
    pretrained: bool = False,
    dropout: float = 0.5,
    target_layer: str | None = None,
    hidden: int | None = None,
) -> SplitModel:
    """Build a torchvision CNN with a ``num_outputs``-logit multi-label head, split for Grad-CAM.

    Args:
        arch: one of :data:`SUPPORTED_ARCHS` (``"alexnet"``, ``"resnet18"``, ``"vgg11"``).
        num_outputs: number of logits; the last Linear layer is replaced by a freshly
            initialised ``Linear(in_features, num_outputs)``.
        pretrained: initialise from torchvision's ImageNet weights (``IMAGENET1K_V1``). Works
            offline only: the file must already be in the torch hub cache
            (``torch.hub.get_dir()/checkpoints/<file>``, see :func:`pretrained_weights_path`),
            otherwise :class:`PretrainedWeightsUnavailableError` is raised; nothing is
            downloaded. ``pretrained=False`` trains from scratch.
        dropout: dropout probability in the classifier (alexnet, vgg11: torchvision's two
            dropout layers; resnet18: one dropout inserted before ``fc``, omitted when 0).
        target_layer: where to split (see the module docstring); ``None`` = the default
            (:data:`DEFAULT_TARGET_LAYERS`), i.e. the rectified output of the last conv layer.
        hidden: width of the two hidden fully connected layers of alexnet/vgg11 (``None`` keeps
            torchvision's 4096). A narrow classifier (e.g. 512) keeps the convolutional trunk —
            and so the Grad-CAM layer — of the paper's AlexNet while making CPU training several
            times faster; those layers are freshly initialised even with ``pretrained=True``.

    Returns:
        A :class:`SplitModel`; images ``(B, 3, S, S)`` → logits ``(B, num_outputs)``.
        Its weights are a deterministic function of the torch RNG state (``torch.manual_seed``).
    """
    _check_arch(arch)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    layer = DEFAULT_TARGET_LAYERS[arch] if target_layer is None else target_layer
    kwargs: dict = {}
    if pretrained:
        path = pretrained_weights_path(arch)
        if not os.path.isfile(path):
            weights = _imagenet_weights(arch)
            raise PretrainedWeightsUnavailableError(
                f"ImageNet weights for {arch} are not in the torch hub cache and cocam does not "
                f"download them. Put the file {os.path.basename(path)!r} (from {weights.url}) at "
                f"{path} (the directory is torch.hub.get_dir()/checkpoints; set TORCH_HOME to "
                f"change it), or use pretrained=False to train from scratch."
            )
        kwargs["weights"] = _imagenet_weights(arch)
    else:
        kwargs["weights"] = None

    if hidden is not None and (arch == "resnet18" or hidden < 1):
        raise ValueError(f"hidden must be a positive width for alexnet/vgg11 (got {hidden} for {arch}).")
    if arch in ("alexnet", "vgg11"):
        factory = torchvision.models.alexnet if arch == "alexnet" else torchvision.models.vgg11
        net = factory(dropout=dropout, **kwargs)
        _set_classifier(net.classifier, num_outputs, hidden)
        return _split_features(net, arch, layer, num_outputs)
    net = torchvision.models.resnet18(**kwargs)
    net.fc = nn.Linear(net.fc.in_features, num_outputs)
    return _split_resnet(net, layer, num_outputs, dropout)
