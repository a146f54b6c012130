"""cocam: see, draw and fix the evidence an image classifier relies on.

Grad-CAM guided fine-tuning against co-occurrence bias, on CelebA or on the embedded
synthetic CelebA-format benchmark.
"""

from cocam.attributes import (
    CELEBA_ATTRIBUTES,
    PAPER_PAIRS,
    UnknownAttributeError,
    attribute_index,
    validate_attribute,
    validate_attributes,
)
from cocam.labels import CELEBA, LabelSpace

__version__ = "0.1.0"

__all__ = [
    "CELEBA",
    "CELEBA_ATTRIBUTES",
    "LabelSpace",
    "PAPER_PAIRS",
    "UnknownAttributeError",
    "attribute_index",
    "validate_attribute",
    "validate_attributes",
]
