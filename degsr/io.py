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


def _names(paths: list[Path], show: int = 5) -> str:
    more = f" (+{len(paths) - show} more)" if len(paths) > show else ""
    return ", ".join(p.name for p in paths[:show]) + more


def images_by_key(folder, label: str, key=lambda stem: stem) -> dict[str, Path]:
    """The images directly in ``folder`` by ``key(stem)``; UserError (one line, naming ``label``)
    for a missing or empty folder or two images with one key."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{label} {root}: " + ("not a folder" if root.exists() else "no such folder"))
    found: dict[str, list[Path]] = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(key(p.stem), []).append(p)
    if not found:
        raise UserError(f"{label} {root}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    dupes = [ps for ps in found.values() if len(ps) > 1]
    if dupes:
        raise UserError(f"{label} {root}: images share a name, pairing is ambiguous: "
                        + "; ".join(" and ".join(p.name for p in ps) for ps in dupes[:5]))
    return {k: ps[0] for k, ps in found.items()}


def pair_folders(a, b, a_label: str, b_label: str, key=lambda stem: stem
                 ) -> list[tuple[str, Path, Path]]:
    """``[(key, a_path, b_path)]`` sorted by key for two folders of images matched by
    ``key(stem)``; one UserError line naming the unmatched files on each side."""
    left, right = images_by_key(a, a_label, key), images_by_key(b, b_label, key)
    only_a = [left[k] for k in sorted(left.keys() - right.keys())]
    only_b = [right[k] for k in sorted(right.keys() - left.keys())]
    if only_a or only_b:
        parts = [f"{len(ps)} in {label} without a match: {_names(ps)}"
                 for ps, label in ((only_a, a_label), (only_b, b_label)) if ps]
        raise UserError(f"{a_label} and {b_label} images do not pair up by name: " + "; ".join(parts))
    return [(k, left[k], right[k]) for k in sorted(left)]
