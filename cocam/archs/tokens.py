"""Token models (vision transformers): the trunk gives tokens, :func:`class_token_map` turns them into a map.

A vision transformer cuts an ``S×S`` image into ``h×w`` patches of ``p×p`` pixels
(``h = w = S/p``), embeds each as a ``C``-vector and prepends a class token; its encoder returns
tokens ``(B, 1 + h·w, C)``, the patch tokens in row-major grid order. :func:`class_token_map`
drops the class token and lays the patch tokens out on their grid, ``(B, C, h, w)``, so the
Grad-CAM activation ``A_k[i, j]`` is channel ``k`` of the token of patch ``(i, j)``: the same
shape as a CNN's feature map, and Grad-CAM runs on it unchanged.

**Why the head pools the patch tokens instead of reading the class token.** Grad-CAM needs the
logits as a function of ``A``. torchvision's ViT classifies from the final class token alone,
which the final patch tokens no longer influence, so ``∂logit/∂A`` would be exactly 0. The head
here is the mean of the patch tokens followed by a linear layer (the "global average pooling"
ViT head): ``logit_t = b_t + Σ_k W_tk · mean_ij A_k[i, j]``, hence
``∂logit_t/∂A_k[i, j] = W_tk / (h·w)``, the Grad-CAM channel weights are ``w_k = W_tk / (h·w)``
and the map ``Σ_k w_k A_k`` is the class activation map (CAM) of Zhou et al., as for ResNet. The
class token still takes part in every attention layer of the trunk.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from cocam.archs.base import Split

__all__ = ["PatchTokens", "class_token_map", "split_vision_transformer"]


class PatchTokens(nn.Module):
    """A torchvision ``VisionTransformer`` up to its encoder: images ``(B, 3, S, S)`` → tokens ``(B, 1 + h·w, C)``.

    The same computation as torchvision's forward before its head (patch embedding, class
    token, positional embedding, encoder blocks, final LayerNorm), with the modules shared.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.encoder = net.encoder

    def forward(self, x: Tensor) -> Tensor:
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, h·w, C), row-major over the grid
        cls = self.class_token.expand(x.shape[0], -1, -1)
        return self.encoder(torch.cat([cls, patches], dim=1))


def class_token_map(tokens: Tensor) -> Tensor:
    """Tokens ``(B, 1 + h·h, C)`` (class token first) → the patch tokens on their grid ``(B, C, h, h)``."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, N, C), got shape {tuple(tokens.shape)}.")
    b, n, c = tokens.shape
    side = math.isqrt(max(n - 1, 0))
    if n < 2 or side * side != n - 1:
        raise ValueError(f"expected a class token and a square grid of patch tokens, got {n} tokens.")
    return tokens[:, 1:].transpose(1, 2).reshape(b, c, side, side)


def split_vision_transformer(net: nn.Module, arch: str, layer: str, dropout: float) -> Split:
    """Trunk: :class:`PatchTokens` (tokens; ``class_token_map`` follows). Head: mean over the grid, dropout, linear.

    The only split is ``"encoder"``, the output of the final LayerNorm: a cut before a later
    block would leave that block without the class token the trunk dropped.
    """
    if layer != "encoder":
        raise ValueError(f"target_layer {layer!r} is not valid for {arch}: its only split is 'encoder' (the "
                         f"patch tokens after the final LayerNorm).")
    parts: OrderedDict[str, nn.Module] = OrderedDict(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1))
    if dropout > 0:
        parts["dropout"] = nn.Dropout(p=dropout)
    parts["fc"] = net.heads.head
    return Split(PatchTokens(net), nn.Sequential(parts),
                 "encoder: patch tokens after the final LayerNorm, on the patch grid (class token dropped)")
