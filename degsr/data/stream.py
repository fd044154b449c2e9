"""The training stream: endless, seeded random crops from WebDataset shards, batched per worker.

Each (rank, DataLoader worker, epoch) draws its own random stream, seeded with
``derive_seed(seed, rank, worker, epoch)``: shards are RESAMPLED (picked at random with
replacement, as ``WebDataset(resampled=True)`` does), then each shard's samples are read in order,
decoded, resized by a random factor from ``scale_range`` (unless it is (1, 1)), cut into
``crops_per_image`` crops, each at a random position and flipped with probability 1/2, and
shuffled in a buffer of ``shuffle_buffer`` crops. Why not ``WebDataset(resampled=True,
nodesplitter=..., ...)`` itself (webdataset 1.0.2, read from its source):

- its ``ResampledShards`` is built with ``deterministic=False`` and ignores ``seed=``: every
  worker mixes pid, time and ``os.urandom`` into its seed, so runs are not reproducible;
- ``split_by_node``/``split_by_worker`` only thin that endless random URL stream (``islice``);
  with resampling each (rank, worker) already has its own stream, so splitting adds nothing.
  Here the rank is passed in explicitly (``trainer.global_rank``), because a DataLoader worker
  started with ``spawn`` does not see the process group and would think it is rank 0;
- its handler is only called with an exception, so a truncated shard cannot be told apart from a
  partial sample and counted once. Here a damaged shard counts 1 bad sample (the one being read),
  an undecodable image, a sample without an image member or an empty shard counts 1, and
  reading goes on.
  Shard keys are split exactly as webdataset does (``base_plus_ext``).

Every rank yields exactly ``batches_per_epoch`` batches, split as evenly as possible over its
workers (``len()`` reports it), so no DDP rank waits for another at the end of an epoch. The
DataLoader takes batches from its workers in turn, so batch ``j`` of an epoch is batch
``j // W`` of worker ``j % W``: the epoch's batch sequence depends on (seed, rank, epoch, W) only.

Exact resume: ``skip_batches=k`` makes the first epoch start at its batch ``k``. The DataLoader
starts every epoch at worker 0, so worker ``w`` then plays the stream of worker ``(w + k) % W``,
fast-forwarded past the batches that worker had already delivered (they are read and cropped
again, not yielded: the cost is the loader's share of the time already spent in the epoch). Each
batch is ``{"hr": uint8 (B, 3, S, S), "keys": [str], "n_bad", "n_small", "n_read"}``: the last
three are int64 scalars counting what this worker met since its previous batch (corrupt,
smaller than the crop with ``small_images="skip"``, and every sample read, usable or not) -- the
only way counts leave a worker process. A worker that reads ``stall_limit`` unusable samples in a
row raises UserError instead of spinning forever.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from degsr import console
from degsr.data.samples import decode_image, read_shard
from degsr.errors import UserError
from degsr.seeding import derive_seed


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """(H, W, 3) uint8 resized by ``factor`` (each side rounded, at least 1 pixel) with PIL's
    bicubic filter, which widens its support by the factor when shrinking (antialiased)."""
    h, w = img.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return img
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))


def reflect_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Pad (H, W, 3) up to at least size x size, centred, by reflection (any H, W >= 1)."""
    h, w = img.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not (ph or pw):
        return img
    mode = "reflect" if min(h, w) > 1 else "symmetric"  # reflect of a 1-pixel axis is undefined
    return np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode=mode)


def random_crop(img: np.ndarray, size: int, g: torch.Generator, flip: bool = True) -> np.ndarray:
    """A size x size crop at a random position (image at least that big), flipped left-right
    with probability 1/2 when ``flip``; draws from ``g`` only."""
    h, w = img.shape[:2]
    top = int(torch.randint(h - size + 1, (1,), generator=g))
    left = int(torch.randint(w - size + 1, (1,), generator=g))
    crop = img[top:top + size, left:left + size]
    if flip and bool(torch.rand(1, generator=g) < 0.5):
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of ``total`` batches worker ``worker`` of ``num_workers`` yields (they sum up)."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


class TrainStream(IterableDataset):
    """Seeded random crops from resampled shards, yielded as whole batches (module doc).

    Use with ``DataLoader(stream, batch_size=None)``. ``rank`` None = read it from the
    environment/process group (webdataset's ``pytorch_worker_info``). ``start_epoch`` is the
    epoch of the first ``iter()``; each later ``iter()`` on the same object is the next epoch
    (so with worker processes, use ``persistent_workers=True``: a fresh worker copy would replay
    the first epoch's stream). ``skip_batches``: batches of the first epoch already consumed (a
    resumed run), see the module doc.
    """

    def __init__(self, urls: Sequence[str], *, crop_size: int, batch_size: int,
                 batches_per_epoch: int, shuffle_buffer: int = 256, crops_per_image: int = 1,
                 scale_range: tuple[float, float] = (1.0, 1.0), small_images: str = "pad",
                 seed: int = 0, rank: int | None = None, start_epoch: int = 0,
                 skip_batches: int = 0, stall_limit: int = 1000):
        super().__init__()
        if not urls:
            raise UserError("data: no training shards given")
        if small_images not in ("pad", "skip"):
            raise ValueError(f"small_images must be 'pad' or 'skip', got {small_images!r}")
        self.urls = list(urls)
        self.crop_size, self.batch_size = int(crop_size), int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.shuffle_buffer, self.small_images = max(1, int(shuffle_buffer)), small_images
        self.crops_per_image = max(1, int(crops_per_image))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.seed, self.rank, self.stall_limit = int(seed), rank, int(stall_limit)
        self.start_epoch, self.skip_batches = int(start_epoch), int(skip_batches)
        if not 0 <= self.skip_batches < max(1, self.batches_per_epoch):
            raise ValueError(f"skip_batches={skip_batches} outside [0, {batches_per_epoch})")
        self.epoch = self.start_epoch - 1  # advanced by each iter()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        rank, _, worker, num_workers = pytorch_worker_info()
        rank = rank if self.rank is None else self.rank
        self.epoch += 1
        skip = self.skip_batches if self.epoch == self.start_epoch else 0
        plays = (worker + skip) % num_workers  # the worker whose stream this one continues
        done = worker_share(skip, plays, num_workers)  # its batches consumed before the resume
        n_batches = worker_share(self.batches_per_epoch, plays, num_workers)
        seed = derive_seed(self.seed, rank, plays, self.epoch)
        rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
        counts = {"n_bad": 0, "n_small": 0, "n_read": 0}
        crops = self._shuffled(self._crops(rng, g, counts), rng)
        for _ in range(done * self.batch_size):  # fast-forward: same draws, nothing yielded
            next(crops)
        counts.update(n_bad=0, n_small=0, n_read=0)
        for _ in range(n_batches - done):
            items = [next(crops) for _ in range(self.batch_size)]
            hr = torch.from_numpy(np.stack([c for _, c in items])).permute(0, 3, 1, 2)
            batch = {"hr": hr.contiguous(), "keys": [k for k, _ in items]}
            batch.update({k: torch.tensor(v, dtype=torch.int64) for k, v in counts.items()})
            counts.update(n_bad=0, n_small=0, n_read=0)
            yield batch

    def _crops(self, rng: random.Random, g: torch.Generator, counts: dict):
        """Endless ``(key, crop)`` pairs from shards picked at random; counts what it skips."""
        unusable = {"n_bad": 0, "n_small": 0}  # since the last usable sample
        named: set[tuple[str, str]] = set()  # (shard, kind) in the log already: drawn again and again

        def warn(url: str, kind: str, what: str) -> None:
            if (url, kind) not in named:
                named.add((url, kind))
                console.log.warning(f"data: shard {url} {what}")

        def skip(kind: str):
            counts[kind] += 1
            counts["n_read"] += 1
            unusable[kind] += 1
            if sum(unusable.values()) >= self.stall_limit:
                small = (f", {unusable['n_small']} smaller than data.crop_size={self.crop_size} "
                         "with data.small_images=skip" if unusable["n_small"] else "")
                raise UserError(
                    f"data: the last {sum(unusable.values())} training samples read were all "
                    f"unusable ({unusable['n_bad']} corrupt{small}) in "
                    f"{len(self.urls)} shard(s) such as {self.urls[0]}; check data.train_shards")

        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            samples, read = read_shard(url), 0
            while True:
                try:
                    key, parts = next(samples)
                except StopIteration:
                    if not read:  # a valid but empty tar counts too, or this could spin forever
                        warn(url, "empty", "holds no sample: skipped at every visit (counted "
                             "as one bad sample)")
                        skip("n_bad")
                    break
                except Exception as e:  # noqa: BLE001 - damaged/unreadable shard: lose one sample
                    warn(url, "damaged", f"is damaged after {read} sample(s) ({type(e).__name__}"
                         f": {e}): the rest of it is skipped at every visit (counted as one bad "
                         "sample)")
                    skip("n_bad")
                    break
                read += 1
                try:
                    img = decode_image(parts)
                except ValueError as e:
                    warn(url, "sample", f"holds samples that cannot be used, such as {key} ({e}): "
                         "each counts as bad")
                    skip("n_bad")
                    continue
                if self.scale_range != (1.0, 1.0):
                    lo, hi = self.scale_range
                    img = rescale(img, lo + (hi - lo) * float(torch.rand(1, generator=g)))
                if min(img.shape[:2]) < self.crop_size:
                    if self.small_images == "skip":
                        skip("n_small")
                        continue
                    img = reflect_pad(img, self.crop_size)
                counts["n_read"] += 1
                unusable.update(n_bad=0, n_small=0)
                for _ in range(self.crops_per_image):
                    yield key, random_crop(img, self.crop_size, g)

    def _shuffled(self, items: Iterator, rng: random.Random):
        """Fill a buffer of ``shuffle_buffer`` items, then yield a random one per item read."""
        buf = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
