"""A small two-convolution network for small images (Decoy-FashionMNIST's 28×28, any size ≥ 16).

The network of the explanatory-interactive-learning benchmarks (Ross et al. 2017; Friedrich et
al. 2023 call it a simple CNN): ``conv 5×5 (20) → ReLU → max-pool 2 → conv 5×5 (50) → ReLU →
max-pool 2 → fully connected (hidden, default 256) → ReLU → dropout → num_outputs``. It takes
the three colour channels cocam's datasets give (a greyscale image is three equal channels)
and ends with an adaptive 4×4 pool, so any input of at least 16 pixels gives logits.

Grad-CAM layer: the ReLU after the second convolution, ``features.4`` (50×8×8 at 28²). There
are no ImageNet weights: ``weights`` must be ``None``.
"""

from __future__ import annotations

from torch import nn

from cocam.archs.base import Architecture, Split
from cocam.archs.features import split_features

TARGET = "features.4"


class SmallCNN(nn.Module):
    """``features`` (convolutions) → ``avgpool`` (adaptive max to 4×4) → ``classifier``."""

    def __init__(self, num_outputs: int, *, dropout: float, hidden: int | None) -> None:
        super().__init__()
        width = 256 if hidden is None else int(hidden)
        self.features = nn.Sequential(nn.Conv2d(3, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                                      nn.ReLU())
        self.avgpool = nn.AdaptiveMaxPool2d(4)
        self.classifier = nn.Sequential(nn.Linear(50 * 4 * 4, width), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(width, num_outputs))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def build(num_outputs: int, *, weights, dropout: float, hidden: int | None, image_size: int | None) -> nn.Module:
    if weights is not None:
        raise ValueError("small_cnn has no pretrained weights: build it with pretrained=False.")
    return SmallCNN(num_outputs, dropout=dropout, hidden=hidden)


def split(net: nn.Module, layer: str, dropout: float) -> Split:
    return split_features(net, "small_cnn", layer, TARGET)


ARCHITECTURE = Architecture(name="small_cnn", build=build, split=split, default_target_layer=TARGET,
                            min_input_size=16, weights=None, hidden_layers=True)
