"""Draw the README's picture grid of synthetic faces with their attributes.

    python docs/make_synthetic_grid.py [--root data/synthetic] [--out docs/synthetic_grid.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from cocam.celeba import load_annotations  # noqa: E402

SHOWN = ["Wearing_Lipstick", "Heavy_Makeup", "Smiling", "High_Cheekbones", "Chubby", "Double_Chin", "Male",
         "Eyeglasses", "Bangs", "Blond_Hair", "Black_Hair", "Pale_Skin", "No_Beard", "Wearing_Hat"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_grid.png"))
    parser.add_argument("--n", type=int, default=12)
    args = parser.parse_args()
    ann = load_annotations(args.root)
    names = ann.names("test")[: args.n]
    cols = 6
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 3.4))
    for ax, name in zip(axes.flat, names):
        ax.imshow(Image.open(ann.image_dir / name))
        on = [a for a in SHOWN if ann.attributes.loc[name, a] and a != "No_Beard"]
        if not ann.attributes.loc[name, "No_Beard"]:
            on.append("Beard")
        ax.set_title("\n".join(on[:5]) or "(none shown)", fontsize=7)
        ax.axis("off")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
