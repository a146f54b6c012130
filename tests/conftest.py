"""Shared fixtures: one small synthetic CelebA per test session."""

from __future__ import annotations

import pytest

from cocam.synthetic import PRESETS, generate_synthetic_celeba


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A smoke-size synthetic CelebA (192 images), generated once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_celeba(root, PRESETS["smoke"], workers=2, progress=False)
    return root
