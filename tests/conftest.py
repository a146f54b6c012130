"""Shared fixtures: one small synthetic CelebA per test session."""

from __future__ import annotations

import os

import pytest
import torch

from cocam.synthetic import PRESETS, generate_synthetic_celeba


@pytest.fixture(scope="session", autouse=True)
def _private_cache_and_masks(tmp_path_factory):
    """Caches of non-generated test datasets go to a temporary user cache folder, never ~/.cache;
    the cache and mask environment variables of the caller's shell do not leak in."""
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "COCAM_CACHE_DIR", "COCAM_MASK_DIR", "COCAM_DATA_ROOT")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    os.environ.pop("COCAM_CACHE_DIR", None)
    os.environ.pop("COCAM_MASK_DIR", None)
    os.environ.pop("COCAM_DATA_ROOT", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A smoke-size synthetic CelebA (192 images), generated once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_celeba(root, PRESETS["smoke"], workers=2, progress=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and a busy machine makes them stall.

    The count is pinned so that a test comparing two runs in one process (same seed, resumed vs
    uninterrupted) compares a computation with itself, which is exact. ``COCAM_TEST_THREADS=2``
    pins another count instead, to check that those comparisons hold at that count too (the
    thread count changes how PyTorch splits its sums, so runs at different counts differ in the
    last bits and are never compared with each other).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("COCAM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
