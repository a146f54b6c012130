"""AlexNet (the paper's): Grad-CAM on conv5 + ReLU, ``features.11`` (256×13×13 at 224², 6×6 at 112²).

Head: the final MaxPool, avgpool, flatten, classifier. ``hidden`` narrows the classifier's two
hidden layers (torchvision: 4096). Inputs of at least 63 px still give a feature map.
"""

from __future__ import annotations

import torchvision
from torch import nn

from cocam.archs.base import Architecture, Split
from cocam.archs.features import set_classifier, split_features

TARGET = "features.11"


def build(num_outputs: int, *, weights, dropout: float, hidden: int | None, image_size: int | None) -> nn.Module:
    net = torchvision.models.alexnet(weights=weights, dropout=dropout)
    set_classifier(net.classifier, num_outputs, hidden)
    return net


def split(net: nn.Module, layer: str, dropout: float) -> Split:
    return split_features(net, "alexnet", layer, TARGET)


ARCHITECTURE = Architecture(name="alexnet", build=build, split=split, default_target_layer=TARGET,
                            min_input_size=63, weights="AlexNet_Weights", hidden_layers=True)
