"""The CUDA paths: Grad-CAM, the guided step under bf16 autocast, the loader and ``fit``.

Skipped without a GPU (CI has none); run them where one is present with
``python -m pytest tests/test_cuda.py``. Each compares the GPU result with the CPU one or with
the fp32 one, so a wrong device path fails rather than merely runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cocam.attributes import attribute_index
from cocam.checkpoint import ModelSpec, load_model
from cocam.dataset import BatchLoader, CelebADataset, normalize_uint8
from cocam.gradcam import grad_cam
from cocam.masks import default_mask
from cocam.train import Guidance, TrainConfig, guided_terms, guidance_masks, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPEC = ModelSpec(image_size=64, hidden=32)
ATTRS = ("Wearing_Lipstick", "High_Cheekbones")


@pytest.fixture(scope="module")
def train_set(synthetic_root) -> CelebADataset:
    return CelebADataset(synthetic_root, "train", image_size=SPEC.image_size, progress=False)


def _batch(dataset: CelebADataset, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets, _ = dataset.get_batch(range(n))
    return normalize_uint8(images), targets.float()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SPEC.build().eval()


def test_grad_cam_on_cuda_equals_cpu(train_set) -> None:
    images, _ = _batch(train_set)
    model = _model()
    for create_graph in (False, True):
        cpu = grad_cam(model, images, list(ATTRS), create_graph=create_graph, normalize=False)
        gpu = grad_cam(model.cuda(), images.cuda(), list(ATTRS), create_graph=create_graph, normalize=False)
        model.cpu()
        torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gpu.cams.detach().cpu(), cpu.cams.detach(), atol=1e-4, rtol=1e-3)


def test_loader_normalises_on_the_gpu_like_the_cpu(train_set) -> None:
    cpu = next(iter(BatchLoader(train_set, 16)))
    gpu = next(iter(BatchLoader(train_set, 16, device="cuda", channels_last=True)))
    assert gpu[0].device.type == "cuda" and gpu[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-6, rtol=0)
    assert torch.equal(gpu[1].cpu(), cpu[1])


@pytest.mark.parametrize("loss", ["iou", "energy", "rrr_cam", "rrr_input"])
def test_guided_step_under_bf16_autocast_matches_fp32(train_set, loss: str) -> None:
    images, targets = (t.cuda() for t in _batch(train_set, 32))
    # eval mode: dropout draws different masks in bf16 and fp32, which would hide the precision's
    # own effect (with dropout even the BCE gradients agree only to a cosine of ~0.75)
    model = _model().eval().cuda().to(memory_format=torch.channels_last)
    guidance = Guidance(ATTRS, tuple(default_mask(a) for a in ATTRS), loss=loss)
    idx = [attribute_index(a) for a in ATTRS]
    masks = guidance_masks(guidance, model, SPEC.image_size, torch.device("cuda"))
    images = images.contiguous(memory_format=torch.channels_last)

    def terms(amp: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = guided_terms(model, images, targets, guidance, idx, masks)
        out.total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out, grads

    fp32, g32 = terms(False)
    bf16, g16 = terms(True)
    assert torch.isfinite(bf16.total) and torch.isfinite(g16).all()
    assert bf16.guidance.item() == pytest.approx(fp32.guidance.item(), rel=0.1, abs=0.05)
    assert bf16.bce.item() == pytest.approx(fp32.bce.item(), rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(g16.float(), g32.float(), dim=0)
    # measured on the trained 112-px baseline: 0.93 (iou) to 1.00 (rrr_input); a wrong cast or sign gives ~0
    assert cosine > 0.8, f"bf16 gradient direction differs from fp32 (cosine {cosine:.3f})"


def test_fit_on_cuda_with_amp_writes_checkpoints_that_load_on_the_cpu(train_set, synthetic_root,
                                                                       tmp_path: Path) -> None:
    valid = CelebADataset(synthetic_root, "valid", image_size=SPEC.image_size, progress=False)
    guidance = Guidance(ATTRS, tuple(default_mask(a) for a in ATTRS))
    config = TrainConfig(epochs=2, batch_size=32, device="cuda", patience=None)
    torch.manual_seed(0)
    first = fit(SPEC.build(), train_set, valid, TrainConfig(epochs=1, batch_size=32, device="cuda", patience=None),
                spec=SPEC, guidance=guidance, run_dir=tmp_path / "run", progress=False)
    assert first.steps == len(train_set) // 32  # drop_last
    resumed = fit(SPEC.build(), train_set, valid, config, spec=SPEC, guidance=guidance, run_dir=tmp_path / "run",
                  resume=True, progress=False)
    assert len(resumed.history) == 2 and resumed.steps == 2 * first.steps
    assert resumed.history.train_bce.notna().all()
    model, spec, _ = load_model(resumed.last_path)  # map_location="cpu"
    assert spec == SPEC and all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        images, _ = _batch(train_set, 8)
        assert torch.isfinite(model.eval()(images)).all()
