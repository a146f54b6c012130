"""A small vision transformer trained from scratch: 8-pixel patches, 2 blocks, 2 heads, width 32.

Not DeiT's ViT-Ti (width 192, 12 blocks): the smallest real token model, cheap on a CPU, and the
registry's example of the token path (:mod:`cocam.archs.tokens`). Built for one input size
(its positional embeddings cover the ``(S/8)²`` patch grid), so ``image_size`` — a multiple of
8 — is needed to build it; 112 px gives a 14×14 map. torchvision has no ImageNet weights for it.
"""

from __future__ import annotations

import torchvision
from torch import nn

from cocam.archs.base import Architecture, Split
from cocam.archs.tokens import class_token_map, split_vision_transformer

PATCH, WIDTH = 8, 32


def build(num_outputs: int, *, weights, dropout: float, hidden: int | None, image_size: int | None) -> nn.Module:
    if image_size is None or image_size < PATCH or image_size % PATCH:
        raise ValueError(f"vit_tiny is built for one input size: give an image_size that is a multiple of its "
                         f"patch size {PATCH} (e.g. 112), got {image_size}.")
    net = torchvision.models.VisionTransformer(image_size=image_size, patch_size=PATCH, num_layers=2, num_heads=2,
                                               hidden_dim=WIDTH, mlp_dim=2 * WIDTH, num_classes=num_outputs)
    # torchvision zero-initialises its head, which would make every logit, and so every Grad-CAM, 0.
    net.heads.head = nn.Linear(WIDTH, num_outputs)
    return net


def split(net: nn.Module, layer: str, dropout: float) -> Split:
    return split_vision_transformer(net, "vit_tiny", layer, dropout)


ARCHITECTURE = Architecture(name="vit_tiny", build=build, split=split, default_target_layer="encoder",
                            min_input_size=PATCH, fixed_input_size=True, to_map=class_token_map)
