"""Image files in and out: clear one-line errors for bad inputs, atomic writes for outputs."""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from degsr.errors import UserError
from degsr.walk import IMAGE_SUFFIXES, files_under

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit gray files


_ANY_SIZE = {"users": 0, "saved": None}
_ANY_SIZE_LOCK = threading.Lock()


@contextlib.contextmanager
def any_pixel_count():
    """PIL's decompression-bomb guard (images over ~179 MP refused) off for the body: degsr reads
    the user's own photos (a 200 MP phone shot is one). Thread-safe: the guard comes back when
    the last reader that lifted it is done."""
    with _ANY_SIZE_LOCK:
        if _ANY_SIZE["users"] == 0:
            _ANY_SIZE["saved"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _ANY_SIZE["users"] += 1
    try:
        yield
    finally:
        with _ANY_SIZE_LOCK:
            _ANY_SIZE["users"] -= 1
            if _ANY_SIZE["users"] == 0:
                Image.MAX_IMAGE_PIXELS = _ANY_SIZE["saved"]


def rgb_array(im: Image.Image) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB, the way a viewer shows it: the EXIF orientation
    applied (phone photos are stored sideways), 16-bit gray brought to 8 bits by its high byte
    (``v >> 8``, the rule PIL's decoders apply to 16-bit colour PNG and TIFF, so a gray and an
    RGB copy of one picture read alike; PIL's own conversion of gray would clip it to white).
    One decoder for every reader in degsr (files, shards, validation sets), so training, ``sr``,
    ``degrade`` and ``eval`` see the same pixels. ValueError for a float image (no agreed range)."""
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode in SIXTEEN_BIT_MODES:
        gray = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("32-bit float image: no agreed value range; save it as 8 or 16 bit")
    if im.mode == "P" and "transparency" in im.info:  # the same colours; PIL warns (a pngquant
        return np.asarray(im.convert("RGBA").convert("RGB"))  # PNG) on P -> RGB straight
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike, alpha: bool = False):
    """An RGB image as a (3, H, W) uint8 tensor (:func:`rgb_array`); UserError naming the file
    if it can't be read. ``alpha``: ``(rgb, alpha)`` with the (1, H, W) uint8 alpha channel of
    an image that has one (RGBA, LA, a palette with transparency), else None."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("a folder, not an image" if path.is_dir() else "no such file"))
    try:
        with any_pixel_count(), Image.open(path) as im:
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            arr = rgb_array(im)  # turns ``im`` upright in place: the alpha below too
            a = np.asarray(im.convert("RGBA"))[..., 3] if alpha and has_alpha else None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot decode image ({type(e).__name__}: {e})".replace("\n", " "))
    rgb = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if not alpha:
        return rgb
    return rgb, None if a is None else torch.from_numpy(a.copy())[None]


GRAY_MODES = ("1", "L", "LA", *SIXTEEN_BIT_MODES)  # one gray channel (and perhaps alpha)


def output_style(path: str | os.PathLike) -> tuple[bool, bytes | None]:
    """How an output made from this file is written: ``(gray, icc)``. ``gray``: the file holds
    one gray channel, so the output is written gray too (a black-and-white photo must not come
    back tinted by the model's colour; Real-ESRGAN does the same). ``icc``: its ICC profile when
    it describes that output (an RGB one for colour: a phone's Display P3, a camera's Adobe RGB;
    a gray one for gray), else None (a CMYK one does not fit). Untagged, a viewer takes the
    values for sRGB and a P3 photo looks washed out. (False, None) if the file does not open."""
    try:
        with any_pixel_count(), Image.open(path) as im:
            gray, icc = im.mode in GRAY_MODES, im.info.get("icc_profile")
            # PIL opens a 16-bit gray + alpha PNG as RGBA (its tile's raw mode says LA;16B)
            gray = gray or any(getattr(t, "args", None) == "LA;16B" for t in im.tile or ())
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return False, None
    fits = isinstance(icc, bytes) and icc[16:20] == (b"GRAY" if gray else b"RGB ")
    return gray, icc if fits else None


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] (or uint8) -> (H, W, C) uint8 array (C 3: RGB, 4: RGBA)."""
    if img.is_floating_point():
        img = (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


@functools.cache
def _umask() -> int:
    """The process's umask, read once: reading it means setting it, and while it is 0 a file
    another thread creates would be world-writable."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is flushed to disk and then
    renamed onto it: ``path`` holds the new content or the old, never a part, also after a crash
    of the machine. Its mode is an ordinary new file's (mkstemp makes 0600, unreadable to
    others)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_png(img: torch.Tensor, path: str | os.PathLike, icc_profile: bytes | None = None,
             gray: bool = False) -> None:
    """Write an image as PNG via a temporary file and a rename (never a half-written file),
    marked as degsr's (:func:`written_by_degsr`), tagged with ``icc_profile`` when given (the
    colour space of its values; untagged means sRGB). ``gray``: written as one gray channel
    (and its alpha), the luma of the RGB (PIL's ITU-R 601-2 weights)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from degsr import __version__

    info = PngInfo()
    info.add_text("Software", f"degsr {__version__}")
    buf = io.BytesIO()
    extra = {} if icc_profile is None else {"icc_profile": icc_profile}
    pil = Image.fromarray(to_uint8(img))
    if gray:
        pil = pil.convert("LA" if pil.mode == "RGBA" else "L")
    pil.save(buf, format="PNG", pnginfo=info, **extra)
    atomic_write_bytes(path, buf.getvalue())


def written_by_degsr(path: Path) -> bool:
    """Whether ``path`` is a PNG that :func:`save_png` wrote (its ``Software`` text chunk): the
    only files a command counts as its earlier outputs, skips, or replaces with ``--overwrite``."""
    try:
        with any_pixel_count(), Image.open(path) as im:
            return im.format == "PNG" and str(im.info.get("Software", "")).startswith("degsr ")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, None for a path that can't be resolved (a symlink loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def make_out_folder(out: Path) -> None:
    """Create the output folder ``out`` (and its parents) before any work; UserError (one line)
    when it is a file or can't be made."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None


def expand_inputs(items: list[str], out: Path | None = None) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted) and globs -> (image paths, problems). The images a
    folder or a glob finds inside ``out`` (the command's output folder, the input folder or one
    inside it) that degsr wrote (:func:`written_by_degsr`) are left out: a rerun must not take
    the first run's outputs for inputs. Every other file there is an input, and so is a file
    named on its own."""
    paths, problems = [], []
    outdir = _resolved(out) if out is not None else None

    def earlier_output(q: Path) -> bool:
        r = _resolved(q)
        return (outdir is not None and r is not None and r.is_relative_to(outdir)
                and written_by_degsr(q))

    for item in items:
        p = Path(item)
        if p.is_dir():
            found = [q for q in files_under(p, IMAGE_SUFFIXES) if not earlier_output(q)]
            if not found:
                problems.append(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif not p.exists() and any(ch in item for ch in "*?["):  # a file may be named [1].png
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
            if not found:
                problems.append(f"{item}: pattern matches no file")
            elif not (found := [q for q in found if not earlier_output(q)]):
                problems.append(f"{item}: pattern matches only degsr's earlier outputs in {out}")
            paths.extend(found)
        else:
            paths.append(p)  # read_image reports a missing or undecodable file
    return paths, problems


def output_targets(paths: list[Path], out: Path,
                   suffix: str = ".png") -> tuple[list[tuple[Path, Path]], list[str]]:
    """``(input, out/<stem><suffix>)`` per input, in order, each file once (a file given twice,
    e.g. by name and inside a folder, is done once). An input whose output name another input
    already takes (one stem in two folders, ``a.jpg`` beside ``a.png``) or whose output would
    overwrite an input is a problem line instead. (``degsr degrade`` names its outputs after
    the stem: ``suffix=""``.)"""
    inputs = {_resolved(p) for p in paths}
    pairs, problems, taken = [], [], {}  # taken: resolved target -> (resolved input, input)
    for path in paths:
        target = out / f"{path.stem}{suffix}"
        key, tkey = _resolved(path), _resolved(target)
        if key is None or tkey is None:
            problems.append(f"{path if key is None else target}: cannot resolve the path "
                            "(a symbolic link loop?)")
            continue
        if tkey in taken:
            if taken[tkey][0] != key:
                problems.append(f"{path}: its output name '{target.name}' in {out} is taken by "
                                f"{taken[tkey][1]}; rename one or give it another --out")
            continue
        taken[tkey] = (key, path)
        if tkey in inputs:
            problems.append(f"{path}: output {target} would overwrite an input; choose another --out")
        else:
            pairs.append((path, target))
    return pairs, problems


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


def pair_folders(a, b, a_label: str, b_label: str, key=lambda stem: stem, unmatched_b=None
                 ) -> list[tuple[str, Path, Path]]:
    """``[(key, a_path, b_path)]`` sorted by key for two folders of images matched by
    ``key(stem)``; one UserError line naming the unmatched files on each side. ``unmatched_b``
    (a list): ``b`` images without a match are appended to it instead of being an error."""
    left, right = images_by_key(a, a_label, key), images_by_key(b, b_label, key)
    only_a = [left[k] for k in sorted(left.keys() - right.keys())]
    only_b = [right[k] for k in sorted(right.keys() - left.keys())]
    if unmatched_b is not None:
        unmatched_b.extend(only_b)
        only_b = []
    if only_a or only_b:
        parts = [f"{len(ps)} in {label} without a match: {_names(ps)}"
                 for ps, label in ((only_a, a_label), (only_b, b_label)) if ps]
        raise UserError(f"{a_label} and {b_label} images do not pair up by name: " + "; ".join(parts))
    return [(k, left[k], right[k]) for k in sorted(left)]
