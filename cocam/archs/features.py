"""What AlexNet and VGG share: ``features`` (convolutions) → ``avgpool`` → ``classifier`` (MLP).

Their default Grad-CAM layer is the ReLU after the last convolution, so the trunk *ends with*
that ReLU and the activation it returns is the **rectified (post-ReLU)** output of the last
conv layer — the tensor the head receives, with no ambiguity from torchvision's in-place ReLUs.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from cocam.archs.base import Split

__all__ = ["set_classifier", "split_features"]


def set_classifier(classifier: nn.Sequential, num_outputs: int, hidden: int | None) -> None:
    """Replace the output layer (and, with ``hidden``, the hidden widths) of an AlexNet/VGG classifier.

    The new layers are created in order, first hidden layer first, so a seed fixes them.
    """
    linears = [i for i, m in enumerate(classifier) if isinstance(m, nn.Linear)]
    if hidden is not None:
        for i in linears[:-1]:
            width_in = classifier[i].in_features if i == linears[0] else hidden
            classifier[i] = nn.Linear(width_in, hidden)
    last = linears[-1]
    classifier[last] = nn.Linear(classifier[last].in_features if hidden is None else hidden, num_outputs)


def split_features(net: nn.Module, arch: str, layer: str, default: str) -> Split:
    """Split after ``features.<i>``: trunk ``features[:i+1]``, head the rest of ``features``, avgpool, classifier."""
    features: nn.Sequential = net.features  # type: ignore[assignment]
    match = re.fullmatch(r"features\.(\d+)", layer)
    if match is None or int(match.group(1)) >= len(features):
        raise ValueError(
            f"target_layer {layer!r} is not valid for {arch}: use 'features.<i>' with "
            f"0 <= i < {len(features)} (default {default!r})."
        )
    i = int(match.group(1))
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if i + 1 < len(features):
        parts["features"] = features[i + 1 :]
    parts["avgpool"] = net.avgpool
    parts["flatten"] = nn.Flatten(1)
    parts["classifier"] = net.classifier
    convs = [j for j in range(i + 1) if isinstance(features[j], nn.Conv2d)]
    module = features[i]
    if isinstance(module, nn.ReLU) and convs:
        description = f"{layer}: ReLU after conv features.{convs[-1]} (post-ReLU activation)"
    else:
        description = f"{layer}: output of {type(module).__name__}"
    return Split(features[: i + 1], nn.Sequential(parts), description)
