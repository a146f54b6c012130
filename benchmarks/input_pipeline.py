"""Images/s delivered by cocam's input pipeline vs torchvision's CelebA + DataLoader, and vs training.

    .venv/bin/python -m cocam generate --root /tmp/bench_data --preset small   # once (about a minute)
    .venv/bin/python benchmarks/input_pipeline.py --root /tmp/bench_data           # full: 112, 128, 224 px
    .venv/bin/python benchmarks/input_pipeline.py --root /tmp/bench_data --quick   # smoke run (< 60 s)

What is compared, on the SAME files (``<root>/celeba/``, train split), batch 64, shuffled:

* **cocam** — ``CelebADataset(root, "train", image_size=S)`` + ``BatchLoader(..., shuffle=True)``:
  one fancy-index into the decoded ``uint8`` memmap cache per batch, normalised to float32
  (what ``cocam.train.fit`` iterates);
* **torchvision** — ``torchvision.datasets.CelebA(root, split="train", target_type="attr",
  transform=Compose([crop CROP_BOX, Resize((S, S)), ToTensor(), Normalize(ImageNet)]))`` +
  ``torch.utils.data.DataLoader`` with ``num_workers`` 0 and 2 (JPEG decode per item, every epoch;
  the 2-worker time includes starting the workers, as in every epoch without persistent workers);
* **training consumption** — images/s of one plain BCE step and one guided step (3 attributes,
  ``Guidance`` defaults: exact, input resolution, both) on ``build_model("alexnet",
  hidden=512)`` at the same size: the rate the loader has to keep up with.

The first batches of both loaders are compared (same images in file order; max abs
difference of the normalised tensors). Measurements are interleaved in rounds and the
medians reported (the machine is shared); targets: cocam >= 5x torchvision, >= 3x the
training step. Also the one-off cache build (decode + crop + resize of every JPEG of the
split into a fresh cache folder, ``CelebADataset``'s default 2 decode workers) per 1000 images.
Writes ``benchmarks/results/input_pipeline_cpu.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, machine_info, median, print_table, save_csv, time_call  # noqa: E402

from cocam import train as cocam_train  # noqa: E402
from cocam.attributes import attribute_index  # noqa: E402
from cocam.dataset import IMAGENET_MEAN, IMAGENET_STD, BatchLoader, CelebADataset, normalize_uint8  # noqa: E402
from cocam.geometry import CROP_BOX  # noqa: E402
from cocam.masks import default_mask  # noqa: E402
from cocam.model import build_model  # noqa: E402
from cocam.train import Guidance  # noqa: E402

GUIDED = ("Wearing_Lipstick", "High_Cheekbones", "Double_Chin")


class CelebAFiles(torchvision.datasets.CelebA):
    """torchvision's CelebA reader, minus its md5 check.

    ``CelebA._check_integrity`` compares the annotation files with the md5 sums of the real
    CelebA release; cocam's synthetic data set has the same layout and formats but other
    contents, so the check refuses it. Only that check is bypassed; reading is torchvision's.
    """

    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.base_folder / "img_align_celeba").is_dir()


class CropBox:
    """``PIL.Image.crop(CROP_BOX)``: the central 178×178 square cocam feeds its models."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.crop(CROP_BOX)


def torchvision_dataset(root: Path, size: int) -> CelebAFiles:
    transform = transforms.Compose([
        CropBox(),
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return CelebAFiles(str(root), split="train", target_type="attr", transform=transform, download=False)


def consume(batches: Iterable, n_batches: int) -> int:
    """Pull ``n_batches`` batches (touching the image tensor); returns the number of images."""
    n = 0
    for images, *_ in itertools.islice(batches, n_batches):
        n += images.shape[0]
    return n


def loader_fns(train: CelebADataset, tv: CelebAFiles, batch: int, n_batches: int) -> dict[str, Callable[[], int]]:
    """Callables that each deliver ``n_batches`` shuffled batches and return the image count."""
    cocam_loader = BatchLoader(train, batch, shuffle=True, seed=0, drop_last=True)
    epoch = itertools.count()

    def cocam_fn() -> int:
        cocam_loader.set_epoch(next(epoch))
        return consume(cocam_loader, n_batches)

    def tv_fn(workers: int) -> Callable[[], int]:
        def run() -> int:
            loader = torch.utils.data.DataLoader(tv, batch_size=batch, shuffle=True, num_workers=workers,
                                                 drop_last=True)
            return consume(loader, n_batches)
        return run

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).numpy()
    batches = [order[i * batch:(i + 1) * batch] for i in range(n_batches)]

    def read_only() -> int:  # diagnostic: the memmap read of cocam's path, no normalisation
        return sum(train.get_batch_numpy(idx)[0].shape[0] for idx in batches)

    pixels = torch.from_numpy(train.get_batch_numpy(batches[0])[0])

    def normalise_only() -> int:  # diagnostic: cocam.dataset.normalize_uint8 as iterate_batches calls it
        for _ in range(n_batches):
            normalize_uint8(pixels.permute(0, 3, 1, 2))
        return n_batches * pixels.shape[0]

    def normalise_two_pass() -> int:  # diagnostic: a suggested 2-pass normalisation (see two_pass_normalize)
        for _ in range(n_batches):
            two_pass_normalize(pixels)
        return n_batches * pixels.shape[0]

    return {"cocam BatchLoader (memmap)": cocam_fn, "torchvision CelebA, workers=0": tv_fn(0),
            "torchvision CelebA, workers=2": tv_fn(2),
            "diagnostic: cocam memmap read only": read_only,
            "diagnostic: cocam normalize_uint8 only": normalise_only,
            "diagnostic: 2-pass normalisation (suggested)": normalise_two_pass}


def two_pass_normalize(pixels_nhwc: torch.Tensor) -> torch.Tensor:
    """A cheaper equivalent of ``normalize_uint8(pixels.permute(0, 3, 1, 2))`` (suggestion for cocam.dataset).

    ``normalize_uint8`` converts the NHWC-strided uint8 batch to float, then makes three
    in-place passes (``/255``, ``-mean``, ``/std``) and a transposing float copy
    (``.contiguous()``). Here: one transposing copy of the *bytes* to NCHW, then
    ``(x - 255·mean)`` (uint8 → float32 promotion in the same pass) and one in-place multiply by
    ``1 / (255·std)``: two float passes, no float transpose. Equal up to float rounding.
    """
    x = pixels_nhwc.permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return torch.sub(x, mean).mul_(inv_std)


def step_fns(size: int, batch: int, train: CelebADataset) -> dict[str, Callable[[], int]]:
    """A plain BCE step and a guided step (what cocam.train.fit runs) on one real batch."""
    torch.manual_seed(0)
    model = build_model("alexnet", hidden=512).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    images, targets, landmarks = next(iter(BatchLoader(train, batch, drop_last=True)))
    guidance = Guidance(GUIDED, tuple(default_mask(a) for a in GUIDED))
    idx = [attribute_index(a) for a in GUIDED]
    masks = cocam_train.guidance_masks(guidance, model, size, torch.device("cpu"))
    extra = {"landmarks": landmarks}

    def plain() -> int:
        loss = F.binary_cross_entropy_with_logits(model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return batch

    def guided() -> int:
        terms = cocam_train.guided_terms(model, images, targets, guidance, idx, masks, **extra)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        return batch

    return {"training: plain BCE step": plain, "training: guided step (3 attr)": guided}


def first_batch_difference(train: CelebADataset, tv: CelebAFiles, n: int = 8) -> float:
    """Max abs difference between the two pipelines' normalised tensors of the first ``n`` images."""
    ours = normalize_uint8(train.get_batch(range(n))[0])
    theirs = torch.stack([tv[i][0] for i in range(n)])
    return float((ours - theirs).abs().max())


def cache_build_seconds_per_1000(root: Path, split: str, size: int) -> float:
    """Build the decoded cache of ``split`` at ``size`` into a fresh folder; seconds per 1000 images."""
    with tempfile.TemporaryDirectory(prefix="cocam_cache_bench_") as tmp:
        t0 = time.perf_counter()
        ds = CelebADataset(root, split, image_size=size, cache_dir=tmp, progress=False)
        seconds = time.perf_counter() - t0
        return 1000 * seconds / len(ds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("/tmp/bench_data"))
    p.add_argument("--quick", action="store_true", help="112 px only, 3 batches per measurement, 1 round")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=None, help="batches per loader measurement (default 16; quick 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps per round (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--name", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.root / "celeba" / "list_attr_celeba.txt").is_file():
        sys.exit(f"no data set under {args.root}/celeba: run `python -m cocam generate --root {args.root} "
                 f"--preset small` first.")
    sizes = args.sizes or ([112] if args.quick else [112, 128, 224])
    n_batches = args.batches or (3 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 5)
    steps = args.steps or (1 if args.quick else 2)
    name = args.name or ("input_pipeline_quick" if args.quick else "input_pipeline")
    settings = dict(batch=args.batch, resolution=sizes, threads=torch.get_num_threads(), rounds=rounds,
                    images_per_measurement=n_batches * args.batch, root=str(args.root))
    print(machine_header("Input pipeline: images/s (CPU)", **settings), flush=True)

    rows = []
    for size in sizes:
        train = CelebADataset(args.root, "train", image_size=size, progress=False)  # builds the shared cache once
        tv = torchvision_dataset(args.root, size)
        assert len(tv) == len(train), (len(tv), len(train))
        diff = first_batch_difference(train, tv)
        build = cache_build_seconds_per_1000(args.root, "valid" if args.quick else "train", size)
        fns = loader_fns(train, tv, args.batch, n_batches)
        fns.update(step_fns(size, args.batch, train))
        samples: dict[str, list[float]] = {k: [] for k in fns}  # images/s
        for name_fn, fn in fns.items():  # warm-up (page cache, allocator, first worker start)
            fn()
        for r in range(rounds):
            order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
            for key in order:
                if key.startswith("training"):
                    reps = [time_call(fns[key]) for _ in range(steps)]
                    samples[key].append(args.batch / median(reps))
                else:
                    t0 = time.perf_counter()
                    n = fns[key]()
                    samples[key].append(n / (time.perf_counter() - t0))
        rates = {k: median(v) for k, v in samples.items()}
        u8 = torch.from_numpy(train.get_batch_numpy(range(8))[0])
        two_pass_diff = float((two_pass_normalize(u8) - normalize_uint8(u8.permute(0, 3, 1, 2))).abs().max())
        ours = rates["cocam BatchLoader (memmap)"]
        for key, rate in rates.items():
            rows.append({"size": size, "path": key, "images_per_s": rate, "cocam_over_this": ours / rate,
                         "target": 5.0 if key.startswith("torchvision") else (3.0 if key.startswith("training") else None),
                         "max_abs_diff_first_batch": diff if key.startswith("torchvision") else (
                             two_pass_diff if "2-pass" in key else None),
                         "cache_build_s_per_1000": build if key.startswith("cocam") else None})
        print(f"  {size}px done: cocam {ours:.0f} img/s", flush=True)
    table = pd.DataFrame(rows)
    print_table(table, f"Images/s, batch {args.batch} (medians over {rounds} interleaved rounds); "
                       "cocam_over_this = cocam's rate / this path's rate")
    save_csv(table, name, machine_info(**{k: str(v) for k, v in settings.items()}))


if __name__ == "__main__":
    main()
