"""One shard's samples: :func:`read_shard` yields ``(key, {ext: bytes})`` in order, keys split
as webdataset splits them (``base_plus_ext``), from a local file or a URL webdataset's ``gopen``
opens (``pipe:CMD``, ``https://``, :func:`is_remote`), and :func:`decode_image` finds a sample's image
member and decodes it as every degsr reader does (:func:`degsr.io.rgb_array`)."""

from __future__ import annotations

import io
import re
import tarfile
from collections import deque
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from degsr.io import any_pixel_count, rgb_array

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


REMOTE = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through webdataset's ``gopen`` (``pipe:``, ``https://``, ...)."""
    return bool(REMOTE.match(str(url)))


class _Tail:
    """A read-only stream that keeps its last ``keep`` bytes read, so that what follows the
    last tar member can be checked on a stream that cannot seek back (:meth:`zeros_from`)."""

    def __init__(self, f, keep: int = 1 << 16):
        self.f, self.keep, self.n, self.chunks, self.eof = f, keep, 0, deque(), False

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.eof |= not b
        self.n += len(b)
        self.chunks.append(b)
        while sum(map(len, self.chunks)) - len(self.chunks[0]) >= self.keep:
            self.chunks.popleft()
        return b

    def zeros_from(self, offset: int) -> bool:
        """Whether at least one 512-byte block follows ``offset``, all zeros, up to the end
        (False when ``offset`` is no longer kept: it cannot be checked)."""
        kept = b"".join(self.chunks)
        start = offset - (self.n - len(kept))
        if start < 0 or kept[start:].count(0) != len(kept) - start:
            return False
        seen = len(kept) - start
        while chunk := self.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
            seen += len(chunk)
        return seen >= 512

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.eof and hasattr(self.f, "ignore_errors"):
            self.f.ignore_errors = True  # left before its end: the command's SIGPIPE is ours
        self.f.close()


def _open(path: str):
    return _Tail(gopen(str(path))) if is_remote(path) else open(path, "rb")


def read_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of one tar shard, in order.

    Raises (``tarfile.TarError``, ``OSError``, ``EOFError``) where the file is damaged, after
    yielding every sample read before the damage (the last one possibly without all its
    members); a member cut in the middle is lost. Python's tarfile takes a damaged header after
    the first one (zeroed, garbage, or the file cut right before it) for the end of the
    archive: an uncompressed shard must therefore end in zero blocks (the end-of-archive marker
    every writer puts there), else it is damaged.
    """
    with _open(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, parts = None, {}
        for member in tar:
            if not member.isreg():
                continue
            k, ext = base_plus_ext(member.name)
            if k is None or k.startswith("__"):
                continue
            if k != key:  # the previous sample is complete: out before this member is read
                if parts:
                    yield key, parts
                key, parts = k, {}
            parts[ext.lower()] = tar.extractfile(member).read()
        if parts:  # complete, or cut by damage below: a sample without its image is bad anyway
            yield key, parts
        if getattr(tar.fileobj, "comptype", "tar") == "tar" and not (
                f.zeros_from(tar.offset) if isinstance(f, _Tail) else _zeros_from(f, tar.offset)):
            raise tarfile.ReadError(f"damaged at byte {tar.offset}: no end-of-archive marker there")


def _zeros_from(f, offset: int) -> bool:
    """Whether the file holds at least one 512-byte block from ``offset`` on, all zeros."""
    f.seek(offset)
    seen = 0
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
        seen += len(chunk)
    return seen >= 512


def image_member(parts: dict[str, bytes]) -> str:
    """The member of a sample that holds its image: a bare image extension (``jpg``, in the
    order of ``IMAGE_KEYS``), else the only member whose LAST extension is one (as webdataset's
    decoders match: ``img.v2.jpg`` is sample ``img``, member ``v2.jpg``). ValueError when there
    is none, or several and none bare (``hr.png`` and ``lr.png``: which one is the photo?)."""
    if ext := next((e for e in IMAGE_KEYS if e in parts), None):
        return ext
    found = sorted(e for e in parts if e.rsplit(".", 1)[-1] in IMAGE_KEYS)
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{len(found)} image members ({', '.join(found)}): one image per "
                         "sample is read, and which one is the training photo is not known")
    raise ValueError(f"no image member ({'/'.join(IMAGE_KEYS)}) among {sorted(parts)}")


def decode_image(parts: dict[str, bytes]) -> np.ndarray:
    """The sample's image (:func:`image_member`) as (H, W, 3) uint8 RGB; ValueError if it has
    none or it does not decode."""
    ext = image_member(parts)
    try:
        with any_pixel_count(), Image.open(io.BytesIO(parts[ext])) as im:
            return rgb_array(im)
    except UnidentifiedImageError:  # its text names an object address, not the member
        raise ValueError(f"cannot decode {ext}: not an image format PIL reads") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the sample unusable
        raise ValueError(f"cannot decode {ext}: {type(e).__name__}: {e}") from None
