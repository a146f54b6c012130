"""One Grad-CAM library, one batch size, one resolution, in its own process (used by cam_libraries.py).

    python benchmarks/_cam_worker.py --library captum --batch 1 16 --size 128 --reps 5

Prints one JSON line per batch size: median seconds of the library's call and of the "floor" (one forward plus
``torch.autograd.grad`` of the target logit sum w.r.t. the conv5 activation, no CAM
arithmetic), measured interleaved in this process, and the maximum absolute difference of the
library's output to cocam's (see ``check_outputs``). Libraries: ``cocam``, ``pytorch-grad-cam``,
``captum``, ``torchcam``. For ``cocam`` it also times the CAMs of all 40 attributes in one call
against one attribute, both at feature resolution (``grad_cam(model, images, list(range(40)))``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, median  # noqa: E402

from cocam.gradcam import grad_cam  # noqa: E402
from cocam.model import SplitModel, build_model  # noqa: E402

LIBRARIES = ("cocam", "pytorch-grad-cam", "captum", "torchcam")


class PlainAlexNet(nn.Module):
    """cocam's SplitModel as one ordinary module, for the hook-based libraries.

    ``layer`` is the ReLU after conv5 (the last module of the trunk), i.e. the same tensor
    cocam calls ``A``. All ReLUs of the trunk copy are made out-of-place, so a hook on ``layer``
    sees a tensor of its own (with torchvision's in-place ReLU the hooked output would be the
    conv output overwritten in place, and "the activation" would be ambiguous).
    """

    def __init__(self, split: SplitModel) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(split.trunk)
        for module in self.trunk.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.head = split.head  # starts with MaxPool: never writes into A
        self.layer = self.trunk[-1]
        assert isinstance(self.layer, nn.ReLU)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def floor_fn(model: SplitModel, images: Tensor, target: int) -> Callable[[], Tensor]:
    """Forward + gradient of the target logits w.r.t. A, nothing else: what any Grad-CAM must do."""

    def run() -> Tensor:
        acts = model.trunk(images)
        logits = model.head(acts)
        (g,) = torch.autograd.grad(logits[:, target].sum(), acts)
        return g

    return run


def library_fn(name: str, model: SplitModel, images: Tensor, target: int) -> tuple[Callable[[], Any], Callable[[], dict]]:
    """(timed call, equality check) for one library; the call returns the library's usual output."""
    size = images.shape[-1]
    if name == "cocam":
        def run() -> Tensor:  # normalised at feature resolution, upsampled to the input size
            return grad_cam(model, images, target, output_size=size).cams

        def check() -> dict:
            return {"max_abs_diff_raw": 0.0, "max_abs_diff_output": 0.0, "output": "normalised, input size"}

        return run, check

    plain = PlainAlexNet(model).eval()
    ref = grad_cam(model, images, target, normalize=False)
    ref_raw = ref.raw[:, 0].detach()  # (B, h, w) after the ReLU, before normalisation
    ref_norm = grad_cam(model, images, target).cams[:, 0].detach()  # normalised at (h, w)
    ref_up = grad_cam(model, images, target, output_size=size).cams[:, 0].detach()

    if name == "pytorch-grad-cam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = GradCAM(model=plain, target_layers=[plain.layer])
        targets = [ClassifierOutputTarget(target)] * images.shape[0]

        def run() -> np.ndarray:  # min-max normalised, resized to the input size (cv2), numpy
            return cam(input_tensor=images, targets=targets)

        def check() -> dict:
            out = run()
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            raw = np.maximum(cam.get_cam_image(images, plain.layer, targets, acts, grads), 0)
            return {"max_abs_diff_raw": float(np.abs(raw - ref_raw.numpy()).max()),
                    "max_abs_diff_output": float(np.abs(out - ref_up.numpy()).max()),
                    "output": "normalised, input size (cv2)"}

        return run, check

    if name == "captum":
        from captum.attr import LayerGradCam

        lgc = LayerGradCam(plain, plain.layer)

        def run() -> Tensor:  # raw ReLU'd map at feature resolution
            return lgc.attribute(images, target=target, relu_attributions=True)

        def check() -> dict:
            raw = run()[:, 0].detach()
            diff = float((raw - ref_raw).abs().max())
            return {"max_abs_diff_raw": diff, "max_abs_diff_output": diff, "output": "raw, feature size"}

        return run, check

    if name == "torchcam":
        from torchcam.methods import GradCAM

        extractor = GradCAM(plain, target_layer=plain.layer, input_shape=tuple(images.shape[1:]))

        def run() -> Tensor:  # normalised at feature resolution
            scores = plain(images)
            return extractor(class_idx=target, scores=scores)[0]

        def check() -> dict:
            out = run()
            scores = plain(images)
            raw = extractor(class_idx=target, scores=scores, normalized=False)[0]
            return {"max_abs_diff_raw": float((raw - ref_raw).abs().max()),
                    "max_abs_diff_output": float((out - ref_norm).abs().max()),
                    "output": "normalised, feature size"}

        return run, check

    raise ValueError(f"unknown library {name!r}; choose one of {LIBRARIES}")


def measure(library: str, model: SplitModel, batch: int, size: int, reps: int, seed: int, target: int) -> dict:
    """Check the library against cocam, then time it interleaved with the floor (and all-40 for cocam)."""
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, size, size, generator=gen)
    run, check = library_fn(library, model, images, target)
    result: dict[str, Any] = {"library": library, "batch": batch, "size": size,
                              "threads": torch.get_num_threads(), **check(),
                              "ref_raw_max": float(grad_cam(model, images, target, normalize=False).raw.abs().max())}
    fns: dict[str, Callable[[], Any]] = {"library": run, "floor": floor_fn(model, images, target)}
    if library == "cocam":
        # As in the brief: grad_cam(model, images, list(range(40))) vs one attribute, both at
        # feature resolution (no upsampling of 40 maps to the input size).
        fns["one"] = lambda: grad_cam(model, images, target).cams
        fns["all40"] = lambda: grad_cam(model, images, list(range(40))).cams
    times = interleaved_times(fns, reps=reps, warmup=1)
    result.update({f"t_{k}": median(v) for k, v in times.items()})
    result.update({f"samples_{k}": v for k, v in times.items()})
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True, choices=LIBRARIES)
    p.add_argument("--batch", type=int, nargs="+", required=True, help="one JSON line per batch size")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=int, default=9,
                   help="output index (9 = Blond_Hair: the untrained model gives it non-zero maps on these inputs)")
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model("alexnet", hidden=args.hidden).eval()
    for batch in args.batch:
        print(json.dumps(measure(args.library, model, batch, args.size, args.reps, args.seed, args.target)), flush=True)


if __name__ == "__main__":
    main()
