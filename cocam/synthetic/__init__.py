"""The synthetic CelebA: rendered faces with known co-occurrence bias and known evidence regions."""

from cocam.synthetic.evidence import EvidenceRegions, rasterize_ellipses
from cocam.synthetic.generate import (
    PRESETS,
    SyntheticConfig,
    generate_synthetic_celeba,
    is_synthetic_complete,
    render_template,
    synthetic_labels,
    template_region,
)
from cocam.synthetic.labels import LabelTree, fit_label_tree, sample_labels
from cocam.synthetic.render import REGION_ATTRIBUTES, CueDifficulty, render_face

__all__ = [
    "PRESETS",
    "REGION_ATTRIBUTES",
    "CueDifficulty",
    "EvidenceRegions",
    "LabelTree",
    "SyntheticConfig",
    "fit_label_tree",
    "generate_synthetic_celeba",
    "is_synthetic_complete",
    "rasterize_ellipses",
    "render_face",
    "render_template",
    "sample_labels",
    "synthetic_labels",
    "template_region",
]
