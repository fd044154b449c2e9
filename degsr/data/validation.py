"""Validation sets: a fixed synthetic set (degraded once) and real LR/HR pairs from two folders.

The synthetic set is the same every epoch and every run: ``val_crops`` crops cut from the first
images of ``val_shards`` (read in order) or ``val_folder`` (sorted), cycling over the images when
there are fewer of them than crops, at positions drawn from ``VAL_SEED`` (no flips); images smaller
than the crop are reflect-padded. The crops are degraded once, on CPU, in chunks of
``DEGRADE_CHUNK`` with a generator ``make_generator(VAL_SEED, chunk)``, so the result depends
neither on ``val_batch_size`` nor on ``run.seed``: runs stay comparable.
"""

from __future__ import annotations

import functools
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from degsr import console
from degsr.config.schema import DegradationConfig
from degsr.data.config import DataConfig
from degsr.data.shard_sets import expand_shard_pattern
from degsr.data.samples import decode_image, read_shard
from degsr.data.stream import random_crop, reflect_pad
from degsr.degradation.pipeline import Degrader
from degsr.errors import UserError
from degsr.io import IMAGE_SUFFIXES, pair_folders, read_image
from degsr.walk import files_under
from degsr.seeding import make_generator

VAL_SEED = 2024_0601
DEGRADE_CHUNK = 8


def _images_from_shards(pattern: str, limit: int) -> Iterator[tuple[np.ndarray, Callable]]:
    """The first ``limit`` decodable images of the shards, one at a time, each with a function
    that decodes it again (by reading its shard anew: nothing is kept)."""
    found = 0
    for url in expand_shard_pattern(pattern):
        try:
            for key, parts in read_shard(url):
                try:
                    img = decode_image(parts)
                except ValueError as e:
                    console.log.warning("val: skipping %s in %s: %s", key, url, e)
                    continue
                yield img, functools.partial(_decode_again, url, key)
                found += 1
                if found >= limit:
                    return
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            console.log.warning("val: shard %s is damaged, rest of it skipped: %s", url, e)


def _decode_again(url: str, key: str) -> np.ndarray:
    return decode_image(next(parts for k, parts in read_shard(url) if k == key))


def _images_from_folder(folder: str, limit: int) -> Iterator[tuple[np.ndarray, Callable]]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"data.val_folder: {folder} is not a folder")
    files = files_under(root, IMAGE_SUFFIXES)[:limit]
    for p in files:
        reload = functools.partial(_read_hwc, p)
        yield reload(), reload


def _read_hwc(path: Path) -> np.ndarray:
    return read_image(path).permute(1, 2, 0).numpy()


def val_crops(images: Iterable[tuple[np.ndarray, Callable]], n: int, size: int,
              seed: int = VAL_SEED) -> torch.Tensor:
    """``n`` crops (n, 3, size, size) uint8, crop i from image i % len(images), fixed positions.
    ``images``: ``(image, reload)`` pairs, used one at a time and let go (512 validation photos
    of 12 MP held at once were 17 GiB a rank); when there are fewer than ``n``, the later crops
    decode theirs again with ``reload()``. None when there is no image."""
    g = make_generator(seed)
    out, reloads = [], []
    for img, reload in images:
        out.append(random_crop(reflect_pad(img, size), size, g, flip=False))
        reloads.append(reload)
        del img
    if not out:
        return None
    for i in range(len(out), n):  # fewer images than crops: round again
        out.append(random_crop(reflect_pad(reloads[i % len(reloads)](), size), size, g,
                               flip=False))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class SyntheticValSet(Dataset):
    """Fixed degraded crops; items are dicts of float tensors ``hr, gt, lr, lr_up, scores`` and
    bool ``clean`` (as the training batches after degradation, one sample each)."""

    def __init__(self, hr: torch.Tensor, degradation: DegradationConfig, seed: int = VAL_SEED):
        if hr.dtype != torch.uint8 or hr.ndim != 4:
            raise ValueError("hr must be a (N, 3, S, S) uint8 tensor")
        degrader = Degrader(degradation)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("gt", "lr", "lr_up", "scores",
                                                                  "clean")}
        with torch.no_grad():
            for c, start in enumerate(range(0, len(hr), DEGRADE_CHUNK)):
                chunk = hr[start:start + DEGRADE_CHUNK].float() / 255.0
                out = degrader(chunk, make_generator(seed, c))
                for k in parts:
                    parts[k].append(out[k])
        t = {k: torch.cat(v) for k, v in parts.items()}
        self.hr = hr  # uint8 keeps memory low: hr and lr are exact multiples of 1/255
        self.lr = (t["lr"] * 255.0).round().to(torch.uint8)
        self.gt = None if torch.equal(t["gt"], hr.float() / 255.0) else t["gt"]
        self.lr_up, self.scores, self.clean = t["lr_up"], t["scores"], t["clean"]

    @classmethod
    def from_config(cls, data: DataConfig, degradation: DegradationConfig) -> "SyntheticValSet":
        if data.val_shards:
            images, source = _images_from_shards(data.val_shards, data.val_crops), "data.val_shards"
        else:
            images, source = _images_from_folder(data.val_folder, data.val_crops), "data.val_folder"
        crops = val_crops(images, data.val_crops, data.val_crop_size or data.crop_size)
        if crops is None:
            where = data.val_shards or data.val_folder
            raise UserError(f"{source}: no readable images in {where}")
        return cls(crops, degradation)

    def __len__(self) -> int:
        return len(self.hr)

    def __getitem__(self, i: int) -> dict:
        hr = self.hr[i].float() / 255.0
        return {"hr": hr, "gt": hr if self.gt is None else self.gt[i],
                "lr": self.lr[i].float() / 255.0, "lr_up": self.lr_up[i],
                "scores": self.scores[i], "clean": self.clean[i]}


_SCALE_TAG = re.compile(r"[_-](hr|lr\d*|x\d+)$", re.IGNORECASE)


def pair_key(stem: str) -> str:
    """The name two paired files share: the stem less a trailing ``_HR``, ``_LR4`` or ``_x4``
    tag (RealSR names ``Canon_001_HR.png`` / ``Canon_001_LR4.png``, DRealSR ``_x1`` / ``_x4``)."""
    return _SCALE_TAG.sub("", stem)


class PairedFolders(Dataset):
    """Real LR/HR pairs matched by file stem (see :func:`pair_key`); items are
    ``{"lr", "hr": float (3, h, w) in [0, 1], "name": str}``. Sizes differ: batch size 1."""

    def __init__(self, lr_folder: str, hr_folder: str):
        self.pairs = pair_folders(lr_folder, hr_folder, "data.val_paired_lr", "data.val_paired_hr",
                                  key=pair_key)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        name, lr, hr = self.pairs[i]
        return {"lr": read_image(lr).float() / 255.0, "hr": read_image(hr).float() / 255.0,
                "name": name}


class EvenSplit(DistributedSampler):
    """Validation under DDP, each sample counted once: ``DistributedSampler(shuffle=False)``
    (every rank gets the same number of batches, so the ranks' collectives stay in step), but
    the padding it repeats to fill the last round is yielded as ``len(dataset) + i``, an index
    :class:`Marked` returns with ``keep`` False: the metrics leave it out."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        n = len(self.dataset)
        return iter([p if p < n else n + p % n
                     for p in range(self.rank, self.total_size, self.num_replicas)])


class Marked(Dataset):
    """``dataset``'s items with ``keep`` added: True for index ``i < len``, False for the
    repeats :class:`EvenSplit` pads with (index ``len + i``: item ``i``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n = len(self.dataset)
        return {**self.dataset[i % n], "keep": i < n}
