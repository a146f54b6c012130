"""The architecture registry: one small file per backbone, read by :func:`cocam.model.build_model`.

An :class:`Architecture` says everything cocam needs about one torchvision network:

* ``build(num_outputs, *, weights, dropout, hidden, image_size)`` → the torchvision net with a
  freshly initialised ``num_outputs``-logit output layer (``weights`` is torchvision's weights
  enum member, or ``None`` for random initialisation: the registry never downloads anything,
  :func:`~cocam.model.build_model` looks for the file in the torch hub cache first);
* ``split(net, layer, dropout)`` → :class:`Split` ``(trunk, head, description)`` with
  ``head(trunk(x)) == net(x)`` (up to a dropout the split may insert before the output layer),
  cut after the module named ``layer``; a ``layer`` it does not know is a one-line ValueError;
* ``default_target_layer``: the Grad-CAM layer used when none is asked for;
* ``min_input_size``: the smallest square input (pixels) that still gives logits;
* ``weights``: the name of torchvision's ImageNet weights enum (``"AlexNet_Weights"``), or
  ``None`` when torchvision has none;
* ``hidden_layers``: whether ``hidden=`` (the width of hidden fully connected layers) applies;
* ``fixed_input_size``: the net is built for one input size (a vision transformer's positional
  embeddings), so ``image_size`` is needed to build it and inputs must have that size;
* ``to_map``: for token models only, a function from the trunk's tokens ``(B, N, C)`` to a
  map ``(B, C, h, w)``; :func:`~cocam.model.build_model` appends it to the trunk (and the
  head must read that map), so Grad-CAM runs on token models unchanged.

Adding a backbone is one file in this folder that defines ``ARCHITECTURE = Architecture(...)``
and one line in the registration list at the bottom of this module — or, from outside the
package, one call of :func:`register_architecture`.
"""

from __future__ import annotations

from cocam.archs import alexnet, resnet18, small_cnn, vgg11, vit_tiny
from cocam.archs.base import Architecture, Split

__all__ = ["ARCHITECTURES", "Architecture", "Split", "get_architecture", "register_architecture",
           "unregister_architecture"]


#: The registered architectures by name, in registration order (read it; change it with
#: :func:`register_architecture` / :func:`unregister_architecture`).
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``arch`` to :data:`ARCHITECTURES`; a name already taken is a ValueError unless ``replace``."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"register_architecture takes an Architecture, got {type(arch).__name__}.")
    if arch.name in ARCHITECTURES and not replace:
        raise ValueError(f"architecture {arch.name!r} is already registered: choose another name, or pass "
                         f"replace=True to replace it.")
    ARCHITECTURES[arch.name] = arch
    return arch


def unregister_architecture(name: str) -> Architecture:
    """Remove the architecture ``name`` from :data:`ARCHITECTURES` and return it."""
    return ARCHITECTURES.pop(get_architecture(name).name)


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown architecture {name!r}. Supported architectures: "
                         f"{', '.join(ARCHITECTURES)}.") from None


for _module in (alexnet, resnet18, vgg11, vit_tiny, small_cnn):
    register_architecture(_module.ARCHITECTURE)
del _module
