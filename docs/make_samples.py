"""The bundled sample identities (capray/samples/<identity>/*.png) and how they were made.

They come from scikit-image's public-domain test images; regenerate them with
`python docs/make_samples.py` (needs scikit-image; a development script, not part of the package).
Each "identity" is a set of crops, flips and small rescales of one picture, so a group has the shared
look that CAP keeps consistent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "capray" / "samples"

# identity → (skimage.data function, [(top, left, height, width, out_w, out_h, flip)])
RECIPES = {
    "astronaut": ("astronaut", [(0, 120, 300, 300, 96, 96, False), (30, 150, 260, 220, 88, 104, False),
                                (0, 100, 340, 340, 112, 112, True), (60, 160, 200, 200, 80, 80, False)]),
    "chelsea": ("chelsea", [(0, 50, 300, 300, 96, 96, False), (20, 100, 250, 280, 112, 100, True),
                            (40, 80, 200, 200, 72, 72, False)]),
    "coffee": ("coffee", [(0, 50, 400, 500, 120, 96, False), (50, 100, 300, 300, 96, 96, True)]),
}


def main() -> None:
    from skimage import data

    for identity, (name, crops) in RECIPES.items():
        image = getattr(data, name)()
        folder = SAMPLES / identity
        folder.mkdir(exist_ok=True)
        for i, (top, left, h, w, ow, oh, flip) in enumerate(crops):
            crop = Image.fromarray(np.ascontiguousarray(image[top: top + h, left: left + w, :3]))
            crop = crop.resize((ow, oh), Image.Resampling.LANCZOS)
            if flip:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{identity}_{i + 1}.png", optimize=True)


if __name__ == "__main__":
    main()
