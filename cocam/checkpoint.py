"""Checkpoints: what a model is, how it was made, and how to resume it — stored safely.

A checkpoint is a plain dictionary of tensors and builtin values saved with :func:`torch.save`
and read back with ``weights_only=True``, so loading a checkpoint from elsewhere never
executes code. It is written atomically (temporary file, fsync, rename): an interrupted save
leaves the previous checkpoint intact. Every checkpoint carries the model description
(architecture, head width, input size, attribute names), the training configuration and the
library versions, so a result can be traced to how it was made.
"""

from __future__ import annotations

import os
import platform
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.errors import CocamError
from cocam.io import atomic_write
from cocam.model import SplitModel, build_model

__all__ = ["CheckpointError", "ModelSpec", "checkpoint_spec", "load_checkpoint", "load_model", "load_weights",
           "save_checkpoint", "versions"]

FORMAT = "cocam-checkpoint-v1"


class CheckpointError(CocamError, ValueError):
    """A file that is not a usable cocam checkpoint (or does not match what was asked)."""


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model before loading its weights.

    ``arch`` names an entry of the architecture registry (:mod:`cocam.archs`); ``image_size``
    is passed to it, which matters for architectures built for one input size (``vit_tiny``).
    """

    arch: str = "alexnet"
    image_size: int = 112
    hidden: int | None = 512
    dropout: float = 0.5
    attributes: tuple[str, ...] = field(default=CELEBA_ATTRIBUTES)

    def build(self, *, pretrained: bool = False) -> SplitModel:
        """A freshly initialised model of this spec."""
        return build_model(self.arch, len(self.attributes), pretrained=pretrained, dropout=self.dropout,
                           hidden=self.hidden, image_size=self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "image_size": self.image_size, "hidden": self.hidden, "dropout": self.dropout,
                "attributes": list(self.attributes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(arch=d["arch"], image_size=int(d["image_size"]), hidden=d.get("hidden"),
                   dropout=float(d.get("dropout", 0.5)), attributes=tuple(d["attributes"]))


def versions() -> dict[str, str]:
    """Versions of the software a result was made with."""
    from cocam import __version__

    return {"cocam": str(__version__), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _plain_data(value: Any, where: str) -> Any:
    """``value`` as data that ``torch.load(weights_only=True)`` reads back.

    numpy scalars become Python numbers, numpy arrays tensors and paths strings; containers
    are converted recursively. Anything else (an arbitrary object) is a :class:`TypeError`,
    raised before a file is written, rather than a checkpoint that cannot be loaded.
    """
    if isinstance(value, np.generic):  # before the scalars: np.float64 subclasses float
        return value.item()
    if isinstance(value, torch.Tensor) or type(value) in _SCALARS:
        return value
    if isinstance(value, str):  # subclasses (str enums, version strings) as the plain text
        return str.__str__(value)
    for plain in (int, float, bytes):
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"checkpoint entry {where!r}: numpy arrays of Python objects cannot be stored.")
        return torch.from_numpy(np.array(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (bool, int, float, str, type(None))):
                raise TypeError(f"checkpoint entry {where!r}: key {k!r} is not a string or a number.")
            out[k] = _plain_data(v, f"{where}[{k!r}]")
        return OrderedDict(out) if isinstance(value, OrderedDict) else out
    if isinstance(value, (list, tuple, set)):
        items = [_plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(items) if isinstance(value, list) else set(items) if isinstance(value, set) else tuple(items)
    raise TypeError(
        f"checkpoint entry {where!r} is a {type(value).__name__}: checkpoints hold only tensors, numbers, "
        f"strings, None, lists, tuples and dicts (so that loading them never runs code)."
    )


def save_checkpoint(path: str | os.PathLike, model: SplitModel, spec: ModelSpec, **extra: Any) -> Path:
    """Atomically save ``model``'s weights with its ``spec``, the versions and ``extra`` entries.

    ``extra`` may hold tensors, numbers, strings, lists and dicts (e.g. the configuration, the
    optimizer state, the epoch, the history, RNG states); numpy numbers and arrays and paths
    are stored as Python numbers, tensors and strings. Any other object raises
    :class:`TypeError` before anything is written.
    """
    path = Path(path)
    extra = {k: _plain_data(v, k) for k, v in extra.items()}
    payload = {"format": FORMAT, "spec": spec.to_dict(), "versions": versions(),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    with atomic_write(path) as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing code (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Train one with `cocam train` or check the path.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors, truncated files, foreign objects
        raise CheckpointError(
            f"{path} could not be read as a cocam checkpoint ({type(err).__name__}: {err}). "
            f"It may be truncated, from another program, or contain objects that are not plain data."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cocam checkpoint (expected format {FORMAT!r}).")
    return payload


def checkpoint_spec(payload: Mapping[str, Any], path: str | os.PathLike) -> ModelSpec:
    """The :class:`ModelSpec` stored in a loaded checkpoint ``payload`` (read from ``path``).

    Raises:
        CheckpointError: the checkpoint has no model description (``'spec'``) or a malformed one:
            without it, no model can be built to receive the weights.
    """
    spec = payload.get("spec")
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"{path} has no model description ('spec'): it was not written by cocam's "
                              f"save_checkpoint (or was edited since), so no model can be built for its weights. "
                              f"Use a checkpoint saved by `cocam train`/`cocam finetune`.")
    try:
        return ModelSpec.from_dict(dict(spec))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model description ('spec') is malformed ({type(err).__name__}: {err}). "
                              f"Use a checkpoint saved by `cocam train`/`cocam finetune`.") from err


def load_weights(model: torch.nn.Module, weights: Mapping[str, Any], path: str | os.PathLike,
                 spec: ModelSpec | None = None) -> None:
    """Load a checkpoint's ``weights`` into ``model``; weights of another shape are a one-line :class:`CheckpointError`.

    torch's own error lists every missing and unexpected key over many lines; this one names
    the counts and the first key of each kind.
    """
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        mine = model.state_dict()
        missing = [k for k in mine if k not in weights]
        unexpected = [k for k in weights if k not in mine]
        reshaped = [k for k in mine if k in weights and tuple(mine[k].shape) != tuple(weights[k].shape)]
        parts = [f"{len(v)} {what} (e.g. {v[0]!r})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if v]
        target = f"a {spec.arch} model of this spec" if spec is not None else "this model"
        raise CheckpointError(f"{path}: the weights do not fit {target}: {'; '.join(parts) or 'mismatch'} "
                              f"weights. The file was made for another architecture or head width.") from err


def load_model(path: str | os.PathLike, *, attributes: tuple[str, ...] | None = None,
               map_location: str | torch.device = "cpu") -> tuple[SplitModel, ModelSpec, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint: ``(model, spec, payload)``.

    Args:
        attributes: if given, the attribute names the caller expects; a checkpoint trained on
            other attributes (or in another order) is refused with a clear error.
    """
    payload = load_checkpoint(path, map_location=map_location)
    spec = checkpoint_spec(payload, path)
    if attributes is not None and tuple(attributes) != spec.attributes:
        raise CheckpointError(f"{path} predicts other attributes than expected: {list(spec.attributes)[:5]}...")
    try:
        model = spec.build()
    except ValueError as err:  # an architecture this version does not know
        raise CheckpointError(f"{path}: its model description cannot be built ({err}).") from err
    if not isinstance(payload.get("model"), Mapping):
        raise CheckpointError(f"{path} holds no weights ('model'): use a checkpoint saved by cocam.")
    load_weights(model, payload["model"], path, spec)
    return model, spec, payload
