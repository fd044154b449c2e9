"""Pack training images into WebDataset tar shards (``degsr shards``); reading a set back is
:mod:`degsr.data.shard_sets`.

A sample is one WHOLE image, never pre-cropped (the loader draws fresh crops every epoch), lossless:
JPEG, PNG and WebP files are stored as their ORIGINAL FILE BYTES (no re-encoding: they read back
bit-identical) under ``jpg``/``png``/``webp`` as PIL detects the format (not as the name claims);
other formats (BMP, TIFF) are re-encoded losslessly as RGB ``png``. With ``max_side``, an image whose
longer side exceeds it is downscaled (LANCZOS, longer side = max_side) and stored as RGB ``png``.
``json`` holds ``{"source": absolute path, "width", "height"}`` of the stored image (plus
``"resized_from": [w, h]``). Originals keep their PIL mode and EXIF orientation: readers use
``.convert("RGB")``. ``__key__`` = ``<8-digit running index>_<stem reduced to [A-Za-z0-9_-]>``
(a dot would split the key in WebDataset).

Order: by default the images are shuffled (``order="random"``, seeded by ``seed``) before they are
packed, so a shard mixes the folders (shoots, sources) of the collection: the training stream
reads one shard at a time through a shuffle buffer of a few hundred crops, and shards written in
path order would give batches from one folder. ``order="path"`` keeps the order found.

Each image is checked first: size on disk >= ``min_bytes``; fully decodable (decoded and converted
to RGB now, so a truncated file fails here rather than mid-training); shorter side of the stored
image >= ``min_side``. Rejects, and missing entries of list files, go to ``DIR/skipped.tsv``
(path, reason); they are never fatal. A path given twice is kept once, and so is an image whose
stored bytes equal an earlier one's (a copy in another folder, a second path through a symlink):
the later ones are skipped as ``duplicate of <path kept>``, so no photo weighs double in
training. (Another encoding or size of the same photo is not a duplicate here.)

Output: ``DIR/<name>-000000.tar`` ... (``per_shard`` samples each), ``DIR/skipped.tsv`` and, last,
``DIR/index.json``; one shard set per DIR (a DIR whose index names another set is refused).
Replacing a previous run: every new shard is written as ``DIR/.<name>-NNNNNN.tar.tmp`` first. Only
when all are complete is the old index.json removed, the temps renamed into place (``os.replace``),
old ``<name>-NNNNNN.tar`` not in the new set deleted, and the new index.json written atomically.
A run that fails before that removes its temps and leaves the previous set untouched (one with
no usable image writes its rejects to ``skipped.failed.tsv`` beside a previous set); a crash
while renaming leaves no index.json, so no mixed set is read through an index. Needs disk space for
both sets at once; not for concurrent runs on one DIR. Same inputs give byte-identical shards
(fixed tar mtime, ordered results: ``workers`` only changes speed).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import random
import re
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from degsr import console
from degsr.errors import UserError
from degsr.walk import IMAGE_SUFFIXES, files_under

LIST_EXT = ".txt"
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a JPEG with
# more pictures appended (phones, cameras); decoders read its first picture
TAR_MTIME = 0  # fixed, so the same inputs give byte-identical shards
LARGE_PIXELS = 50_000_000  # named at the end of a run: costly for every training worker
WORKER_BYTES_PER_PIXEL = 20  # what a training worker holds while it crops one (measured: 200 MP)


@dataclass
class ShardSummary:
    out: Path
    name: str
    shards: list[dict] = field(default_factory=list)  # [{"file", "samples"}]
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    large: list[tuple[int, str]] = field(default_factory=list)  # (pixels, path) above LARGE_PIXELS


def find_images(sources) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand SRC arguments (folders, image files, .txt lists) into absolute image paths, in order.

    Returns ``(paths, skipped)``; ``skipped`` holds list-file entries that do not exist.
    A SRC that does not exist, or a file that is neither an image nor a .txt list, is a UserError.
    """
    images, skipped = [], []
    for src in map(str, sources):
        path = os.path.expanduser(src)
        if os.path.isdir(path):
            images += map(str, files_under(path, IMAGE_SUFFIXES))
        elif os.path.isfile(path) and path.lower().endswith(LIST_EXT):
            base = os.path.dirname(os.path.abspath(path))
            try:
                lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # BOM or not
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{src}: cannot read image list ({e})") from None
            for line in (ln.strip() for ln in lines):
                if line and not line.startswith("#"):
                    p = os.path.join(base, os.path.expanduser(line))
                    if os.path.isfile(p):
                        images.append(p)
                    else:
                        skipped.append((os.path.abspath(p), f"not found (listed in {src})"))
        elif os.path.isfile(path):
            if not path.lower().endswith(IMAGE_SUFFIXES):
                raise UserError(f"{src}: not an image ({' '.join(IMAGE_SUFFIXES)}) nor a "
                                f"{LIST_EXT} list of images")
            images.append(path)
        else:
            raise UserError(f"{src}: no such file or directory")
    return list(dict.fromkeys(map(os.path.abspath, images))), skipped  # first of duplicates


def prepare_image(path: str, min_bytes: int = 0, min_side: int = 0, max_side: int | None = None):
    """Check one image and produce what its sample stores.

    Returns ``(None, (ext, data, width, height, resized_from))`` or ``(reason, None)`` if skipped.
    """
    from PIL import Image, UnidentifiedImageError

    from degsr.io import any_pixel_count, rgb_array

    try:
        size = os.path.getsize(path)
        if size < min_bytes:
            return f"too small: {size} bytes < --min-bytes {min_bytes}", None
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}", None
    # the user's own photos, of any size: --max-side brings panoramas and 200 MP shots down
    try:
        with any_pixel_count(), Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if min(w, h) < min_side:  # downscaling only shrinks: reject before decoding
                return f"too small: {w}x{h}, shorter side < --min-side {min_side}", None
            rgb = Image.fromarray(rgb_array(im))  # decodes everything: corrupt data fails here
            fmt, (w, h) = im.format, rgb.size  # the EXIF orientation may swap the sides
    except UnidentifiedImageError:
        return "cannot decode: not an image PIL can identify", None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unusable", never fatal
        return f"cannot decode: {type(e).__name__}: {e}", None
    ext, resized_from = KEPT_FORMATS.get(fmt), None
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        resized_from, (w, h) = [w, h], (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb, ext = rgb.resize((w, h), Image.LANCZOS), None
        if min(w, h) < min_side:
            return (f"too small after --max-side {max_side}: {w}x{h}, shorter side < "
                    f"--min-side {min_side}"), None
    if ext is None:  # re-encode losslessly
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        ext, data = "png", buf.getvalue()
    return None, (ext, data, w, h, resized_from)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:  # undecodable names
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_options(out: Path, name: str, per_shard, min_side, min_bytes, max_side, workers,
                   order):
    if order not in ("random", "path"):
        raise UserError(f"--order {order!r}: expected 'random' or 'path'")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-', '.' (not leading '.')")
    for flag, value, low in (("--per-shard", per_shard, 1), ("--min-side", min_side, 0),
                             ("--min-bytes", min_bytes, 0), ("--workers", workers, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if max_side is not None and max_side < max(1, min_side):
        raise UserError(f"--max-side {max_side} must be >= --min-side {min_side} (and >= 1)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    index = out / "index.json"
    if index.exists():
        try:
            other = json.loads(index.read_text(encoding="utf-8"))["name"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{index} exists and is not a degsr shard index; "
                            "use another --out or remove it") from None
        if other != name:
            raise UserError(f"{out} already holds shard set {other!r} (index.json); "
                            f"use --name {other} to replace it, or another --out")


def _samples(images, results, summary: ShardSummary):
    """Samples to write, in order; records skips and counts ``summary.total``."""
    kept: dict[bytes, str] = {}  # digest of the stored bytes -> the path that stored them
    for path, (reason, sample) in zip(images, results):
        if not reason:
            first = kept.setdefault(hashlib.sha256(sample[1]).digest(), path)
            reason = f"duplicate of {first}" if first != path else None
        if reason:
            console.log.debug("skip %s: %s", path, reason)
            summary.skipped.append((path, reason))
            continue
        ext, data, w, h, resized_from = sample
        if w * h > LARGE_PIXELS:
            summary.large.append((w * h, path))
        meta = {"source": path, "width": w, "height": h}
        if resized_from:
            meta["resized_from"] = resized_from
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:48].strip("_") or "img"
        key, summary.total = f"{summary.total:08d}_{stem}", summary.total + 1
        yield {"__key__": key, ext: data, "json": json.dumps(meta).encode("utf-8")}


def _worker_signals() -> None:
    """Pool workers leave Ctrl-C and SIGTERM to the main process (one line there instead of a
    traceback per worker); a SIGTERM sent to a worker alone (an OOM killer) just ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _prepared(images: list, prep, workers: int, stack: ExitStack):
    """``prep`` of every image, in order (the output does not depend on ``workers``); a worker
    that dies (killed for memory) is a UserError naming where it happened, not a hang."""
    if workers <= 1 or len(images) <= 1:
        yield from map(prep, images)
        return
    pool = ProcessPoolExecutor(min(workers, len(images)), initializer=_worker_signals)
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    done = 0
    try:
        for result in pool.map(prep, images):
            yield result
            done += 1
    except BrokenProcessPool:
        raise UserError(f"--workers: a worker process died while preparing {images[done]} or an "
                        "image after it (out of memory? try fewer --workers or --max-side)") from None


def write_shards(sources, out, name: str = "train", per_shard: int = 1000, min_side: int = 384,
                 min_bytes: int = 100_000, max_side: int | None = None,
                 workers: int = 1, order: str = "random", seed: int = 0) -> ShardSummary:
    """Write ``out/<name>-NNNNNN.tar`` shards, ``skipped.tsv`` and ``index.json`` (module doc)."""
    from webdataset import TarWriter  # imports torch: only when writing

    out = Path(os.path.expanduser(str(out)))
    _check_options(out, name, per_shard, min_side, min_bytes, max_side, workers, order)
    sources = [os.path.expanduser(str(s)) for s in sources]
    images, skipped = find_images(sources)
    if order == "random":
        random.Random(seed).shuffle(images)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror or e})") from None
    shard_re = re.compile(rf"^{re.escape(name)}-\d{{6,}}\.tar$")
    for p in out.iterdir():  # temps left by a crashed earlier run
        if p.name.startswith(".") and shard_re.match(p.name[1:].removesuffix(".tmp")):
            p.unlink()

    summary = ShardSummary(out=out, name=name, skipped=skipped)
    prep = functools.partial(prepare_image, min_bytes=min_bytes, min_side=min_side,
                             max_side=max_side)
    temps: list[Path] = []
    try:
        with ExitStack() as stack:
            results = console.progress(_prepared(images, prep, workers, stack), f"shards {name}",
                                       total=len(images), unit="img")
            samples = _samples(images, results, summary)
            for first in samples:  # one shard per pass; islice takes the rest from `samples`
                start = summary.total - 1
                file = f"{name}-{len(summary.shards):06d}.tar"
                temps.append(out / f".{file}.tmp")
                with open(temps[-1], "wb") as f:
                    with TarWriter(f, encoder=False, mtime=TAR_MTIME) as tar:
                        rest = itertools.islice(samples, per_shard - 1)
                        for sample in itertools.chain([first], rest):
                            tar.write(sample)
                    f.flush()
                    os.fsync(f.fileno())
                summary.shards.append({"file": file, "samples": summary.total - start})
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise

    clean = lambda s: re.sub(r"[\t\r\n]+", " ", s)  # noqa: E731
    # a failed rerun keeps the set already there whole, its skipped.tsv included
    failed_over_set = summary.total == 0 and (out / "index.json").exists()
    skipped_file = out / ("skipped.failed.tsv" if failed_over_set else "skipped.tsv")
    _write_atomic(skipped_file, "path\treason\n" + "".join(
        f"{clean(p)}\t{clean(r)}\n" for p, r in summary.skipped))
    if summary.total == 0:
        what = " ".join(map(str, sources))
        if not images and not summary.skipped:
            raise UserError(f"no images ({' '.join(IMAGE_SUFFIXES)}) found in {what}")
        raise UserError(f"no usable images in {what} ({len(summary.skipped)} skipped, "
                        f"see {skipped_file})")
    (out / "skipped.failed.tsv").unlink(missing_ok=True)

    (out / "index.json").unlink(missing_ok=True)
    for tmp, shard in zip(temps, summary.shards):
        os.replace(tmp, out / shard["file"])
    new = {s["file"] for s in summary.shards}
    for p in out.iterdir():
        if shard_re.match(p.name) and p.name not in new:
            p.unlink()
    index = {"name": name, "shards": summary.shards, "total": summary.total,
             "skipped": len(summary.skipped), "sources": [os.path.abspath(s) for s in sources],
             "options": {"per_shard": per_shard, "min_side": min_side, "min_bytes": min_bytes,
                         "max_side": max_side, "order": order,
                         "seed": seed if order == "random" else None},
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(out / "index.json", json.dumps(index, indent=2) + "\n")
    return summary
