"""Image files in and out: clear one-line errors for bad inputs, atomic writes for outputs."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from degsr.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor; UserError naming the file if it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot decode image ({type(e).__name__}: {e})".replace("\n", " "))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] (or uint8) -> (H, W, 3) uint8 array."""
    if img.is_floating_point():
        img = (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(img: torch.Tensor, path: str | os.PathLike) -> None:
    """Write an image as PNG via a temporary file and a rename (never a half-written file)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted) and globs -> (image paths, problems)."""
    paths, problems = [], []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
            if not found:
                problems.append(f"{item}: pattern matches no file")
            paths.extend(found)
        else:
            paths.append(p)  # read_image reports a missing or undecodable file
    return paths, problems


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / "degradation" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"degradation preset '{name}' not found at {path}")
    return path
