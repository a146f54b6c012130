"""VGG11: Grad-CAM on the last conv + ReLU, ``features.19`` (512×14×14 at 224², 7×7 at 112²).

Head: the last MaxPool, avgpool, flatten, classifier. ``hidden`` narrows the classifier's two
hidden layers (torchvision: 4096). Inputs of at least 32 px still give a feature map.
"""

from __future__ import annotations

import torchvision
from torch import nn

from cocam.archs.base import Architecture, Split
from cocam.archs.features import set_classifier, split_features

TARGET = "features.19"


def build(num_outputs: int, *, weights, dropout: float, hidden: int | None, image_size: int | None) -> nn.Module:
    net = torchvision.models.vgg11(weights=weights, dropout=dropout)
    set_classifier(net.classifier, num_outputs, hidden)
    return net


def split(net: nn.Module, layer: str, dropout: float) -> Split:
    return split_features(net, "vgg11", layer, TARGET)


ARCHITECTURE = Architecture(name="vgg11", build=build, split=split, default_target_layer=TARGET,
                            min_input_size=32, weights="VGG11_Weights", hidden_layers=True)
