"""Label spaces: the ordered names of a dataset's binary labels, which are a model's outputs.

A model trained on a dataset has one logit per label, in the label space's order: output ``k``
is the logit of ``names[k]``, and the dataset's target vectors list the labels in the same
order. CelebA's space, :data:`CELEBA`, is the 40 attributes of ``list_attr_celeba.txt`` in file
order; a folder dataset (:mod:`cocam.folder`) takes its space from the columns of its
``labels.csv``. Every name a user gives — a guided attribute, an (A, B) pair — is checked
against the space of the data it is used with, with the closest valid names suggested.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from cocam.attributes import CELEBA_ATTRIBUTES, UnknownAttributeError, validate_attribute
from cocam.errors import CocamError

__all__ = ["CELEBA", "LabelSpace", "LabelSpaceError", "UnknownAttributeError", "label_space_of", "labels_of_frame"]


class LabelSpaceError(CocamError, ValueError):
    """Label names that cannot make a label space (none, a repeated one, an empty or non-text one)."""


class LabelSpace:
    """The ordered, distinct names of a dataset's binary labels (one model output each).

    Args:
        names: the label names in output order (strings, distinct, non-empty).
        description: how error messages name the space (e.g. ``"the 40 CelebA attributes"``).

    Two spaces are equal when their names are equal in the same order (the description is
    only for messages).
    """

    __slots__ = ("_description", "_index", "_names")

    def __init__(self, names: Iterable[str], *, description: str | None = None) -> None:
        names = tuple(names)
        if not names:
            raise LabelSpaceError("a label space needs at least one label name.")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise LabelSpaceError(f"label names must be non-empty text, got {n!r}.")
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise LabelSpaceError(f"label {n!r} is named twice: every label needs a name of its own.")
            seen.add(n)
        self._names = names
        self._index = {n: i for i, n in enumerate(names)}
        self._description = description

    @property
    def names(self) -> tuple[str, ...]:
        """The label names in output order."""
        return self._names

    @property
    def description(self) -> str:
        """How messages name this space: given, or ``"the N labels 'a', 'b', …"``."""
        if self._description is not None:
            return self._description
        shown = ", ".join(repr(n) for n in self._names[:6]) + (", …" if len(self._names) > 6 else "")
        return f"the {len(self._names)} label(s) of the dataset: {shown}"

    def validate_one(self, name: str) -> str:
        """``name`` if it is a label of this space, else :class:`UnknownAttributeError` with the closest names."""
        return validate_attribute(name, self._names, described=self.description)

    def validate(self, names: Iterable[str]) -> list[str]:
        """Several names at once (see :meth:`validate_one`); one name given as a string is one name."""
        if isinstance(names, str):
            names = [names]
        return [self.validate_one(n) for n in names]

    def index(self, name: str) -> int:
        """The output index of ``name`` (validated)."""
        return self._index[self.validate_one(name)]

    def indices(self, names: Iterable[str]) -> list[int]:
        """The output indices of several names (validated)."""
        return [self._index[n] for n in self.validate(names)]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and other._names == self._names

    def __hash__(self) -> int:
        return hash(self._names)

    def __repr__(self) -> str:
        if self is CELEBA or self._names == CELEBA_ATTRIBUTES:
            return "LabelSpace(<the 40 CelebA attributes>)"
        return f"LabelSpace({list(self._names)!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable into data-loading and DDP workers
        return (_rebuild, (self._names, self._description))


def _rebuild(names: tuple[str, ...], description: str | None) -> LabelSpace:
    return LabelSpace(names, description=description)


#: CelebA's 40 attributes, in the column order of ``list_attr_celeba.txt``.
CELEBA = LabelSpace(CELEBA_ATTRIBUTES, description="the 40 CelebA attributes, e.g. 'Wearing_Lipstick', "
                                                    "'Heavy_Makeup' (see cocam.CELEBA_ATTRIBUTES)")


def label_space_of(names: Iterable[str] | LabelSpace) -> LabelSpace:
    """``names`` as a label space: :data:`CELEBA` itself when they are CelebA's 40 in order."""
    if isinstance(names, LabelSpace):
        return names
    names = tuple(names)
    return CELEBA if names == CELEBA_ATTRIBUTES else LabelSpace(names)


def labels_of_frame(columns: Iterable[str]) -> LabelSpace:
    """The space names in a label frame are checked against: :data:`CELEBA` when every column is a
    CelebA attribute (a CelebA frame, whole or a few of its columns), else the frame's columns."""
    columns = tuple(str(c) for c in columns)
    return CELEBA if set(columns) <= set(CELEBA_ATTRIBUTES) else LabelSpace(columns)
