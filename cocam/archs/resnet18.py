"""ResNet-18: Grad-CAM on the output of the last residual block, ``layer4`` (512×7×7 at 224²).

Splits: ``"layer1"`` … ``"layer4"``. Head: the remaining stages, avgpool, flatten, a dropout
(omitted when 0) and ``fc``. No hidden layers; any input size works (1 px gives a 1×1 map).
"""

from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn

from cocam.archs.base import Architecture, Split

STAGES = ("layer1", "layer2", "layer3", "layer4")


def build(num_outputs: int, *, weights, dropout: float, hidden: int | None, image_size: int | None) -> nn.Module:
    net = torchvision.models.resnet18(weights=weights)
    net.fc = nn.Linear(net.fc.in_features, num_outputs)
    return net


def split(net: nn.Module, layer: str, dropout: float) -> Split:
    if layer not in STAGES:
        raise ValueError(f"target_layer {layer!r} is not valid for resnet18: use one of {', '.join(STAGES)} "
                         f"(default 'layer4').")
    k = STAGES.index(layer) + 1
    stem = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
    trunk = nn.Sequential(OrderedDict(stem + [(s, getattr(net, s)) for s in STAGES[:k]]))
    parts: OrderedDict[str, nn.Module] = OrderedDict((s, getattr(net, s)) for s in STAGES[k:])
    parts["avgpool"] = net.avgpool
    parts["flatten"] = nn.Flatten(1)
    if dropout > 0:
        parts["dropout"] = nn.Dropout(p=dropout)
    parts["fc"] = net.fc
    return Split(trunk, nn.Sequential(parts),
                 f"{layer}: output of the last residual block of {layer} (post-ReLU activation)")


ARCHITECTURE = Architecture(name="resnet18", build=build, split=split, default_target_layer="layer4",
                            min_input_size=1, weights="ResNet18_Weights")
