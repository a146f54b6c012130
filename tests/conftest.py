"""Shared fixtures: one small synthetic CelebA per test session."""

from __future__ import annotations

import pytest
import torch

from cocam.synthetic import PRESETS, generate_synthetic_celeba


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A smoke-size synthetic CelebA (192 images), generated once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_celeba(root, PRESETS["smoke"], workers=2, progress=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and a busy machine makes them stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
