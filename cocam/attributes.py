"""The 40 CelebA attribute names and their validation.

Every public function that takes an attribute name goes through :func:`validate_attribute`,
so a misspelled name fails early with the closest valid names suggested.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from cocam.errors import CocamError

__all__ = [
    "CELEBA_ATTRIBUTES",
    "PAPER_PAIRS",
    "UnknownAttributeError",
    "attribute_index",
    "parse_pairs",
    "validate_attribute",
    "validate_attributes",
]

#: The 40 attributes in the column order of CelebA's ``list_attr_celeba.txt``.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)  # fmt: skip

#: The (target, co-occurring shortcut) pairs studied in the paper.
PAPER_PAIRS: tuple[tuple[str, str], ...] = (
    ("Wearing_Lipstick", "Heavy_Makeup"),
    ("High_Cheekbones", "Smiling"),
    ("Double_Chin", "Chubby"),
)

_INDEX = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}
_BY_LOWER = {name.lower(): name for name in CELEBA_ATTRIBUTES}


class UnknownAttributeError(CocamError, ValueError):
    """An attribute (label) name that is not in the label space it is used with (by default CelebA's 40)."""


def validate_attribute(name: str, valid: Iterable[str] = CELEBA_ATTRIBUTES, *, described: str | None = None) -> str:
    """Return ``name`` if it is a valid attribute, else raise :class:`UnknownAttributeError`.

    The error lists the closest valid names (case, spaces and hyphens are forgiven in the
    suggestion, never silently corrected) and says which names are valid: ``described`` (how a
    :class:`cocam.labels.LabelSpace` names itself), by default the 40 CelebA attributes.
    """
    valid = tuple(valid)
    if isinstance(name, str) and name in valid:
        return name
    text = str(name)
    normalised = text.strip().replace(" ", "_").replace("-", "_")
    candidates = difflib.get_close_matches(normalised, valid, n=3, cutoff=0.5)
    lower = {v.lower(): v for v in valid}
    if normalised.lower() in lower and lower[normalised.lower()] not in candidates:
        candidates.insert(0, lower[normalised.lower()])
    hint = f" Did you mean {', '.join(repr(c) for c in candidates)}?" if candidates else ""
    if described is None:
        described = ("the 40 CelebA attributes, e.g. 'Wearing_Lipstick', 'Heavy_Makeup' "
                     "(see cocam.CELEBA_ATTRIBUTES)")
    raise UnknownAttributeError(f"Unknown attribute {text!r}.{hint} Valid names are {described}.")


def validate_attributes(names: Iterable[str], valid: Iterable[str] = CELEBA_ATTRIBUTES) -> list[str]:
    """Validate several names at once (see :func:`validate_attribute`)."""
    valid = tuple(valid)
    return [validate_attribute(n, valid) for n in names]


def attribute_index(name: str) -> int:
    """Column index of ``name`` in :data:`CELEBA_ATTRIBUTES` (validated)."""
    return _INDEX[validate_attribute(name)]


def parse_pairs(values: Iterable[str], labels: Any = None) -> list[tuple[str, str]]:
    """``["A:B", ...]`` → validated ``[(A, B), ...]`` (attribute A and the shortcut B it co-occurs with).

    A value without ``:`` is a :class:`ValueError` showing the form; misspelled names raise
    :class:`UnknownAttributeError` with the closest valid names of ``labels`` (a
    :class:`cocam.labels.LabelSpace`; default: the 40 CelebA attributes).
    """
    pairs = []
    for value in values:
        a, sep, b = str(value).partition(":")
        if not sep:
            raise ValueError(f"pair {value!r} must look like Wearing_Lipstick:Heavy_Makeup (attribute:shortcut).")
        pairs.append(tuple(validate_attributes([a, b]) if labels is None else labels.validate([a, b])))
    return pairs
