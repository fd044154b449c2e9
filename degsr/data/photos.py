"""Real photographs that ship with scikit-image, written as files: the offline data of the
quickstart, the stage-1 target check and the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TRAIN = ("astronaut", "rocket", "retina", "hubble_deep_field", "stereo_motorcycle", "camera",
         "brick", "grass", "gravel", "coins", "colorwheel", "page", "text")
HELD_OUT = ("chelsea", "coffee", "immunohistochemistry")


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``skimage.data.<name>`` (stereo pairs: the left view)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def write_photos(out: str | Path, names=TRAIN) -> list[Path]:
    """Save photos as PNG (lossless) into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = out / f"{name}.png"
        if not path.exists():
            Image.fromarray(load_photo(name)).save(path)
        paths.append(path)
    return paths
