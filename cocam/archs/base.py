"""What an architecture entry is (:class:`Architecture`) and what its split returns (:class:`Split`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["Architecture", "Split"]


class Split(NamedTuple):
    """A network cut at its Grad-CAM layer: ``head(trunk(x))`` are the logits."""

    trunk: nn.Module
    head: nn.Module
    description: str


@dataclass(frozen=True)
class Architecture:
    """How to build one backbone and split it for Grad-CAM (the fields are described in :mod:`cocam.archs`)."""

    name: str
    build: Callable[..., nn.Module]
    split: Callable[[nn.Module, str, float], Split]
    default_target_layer: str
    min_input_size: int
    weights: str | None = None
    hidden_layers: bool = False
    fixed_input_size: bool = False
    to_map: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"architecture name {self.name!r} must be a plain identifier such as 'resnet18'.")
        if not callable(self.build) or not callable(self.split):
            raise ValueError(f"architecture {self.name!r}: build and split must be functions.")
        if self.to_map is not None and not callable(self.to_map):
            raise ValueError(f"architecture {self.name!r}: to_map must be a function or None.")
        if int(self.min_input_size) < 1:
            raise ValueError(f"architecture {self.name!r}: min_input_size must be >= 1, got {self.min_input_size}.")
