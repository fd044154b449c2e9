"""``degsr bench loader``: the shard stream vs a plain folder-of-images loader, same crops/workers."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from degsr.bench import at_least
from degsr.data.shard_sets import expand_shard_pattern
from degsr.data.stream import TrainStream, random_crop, reflect_pad
from degsr.io import expand_inputs, read_image


def add_arguments(p) -> None:
    p.add_argument("--shards", required=True, help="shard pattern (as data.train_shards)")
    p.add_argument("--folder", required=True, help="the same images as a plain folder")
    p.add_argument("--workers", type=at_least(0), default=2, help="DataLoader workers for both")
    p.add_argument("--crop", type=at_least(1), default=512, help="crop size")
    p.add_argument("--batch", type=at_least(1), default=8, help="batch size")
    p.add_argument("--batches", type=at_least(1), default=30, help="batches timed (after 2 warm-up)")


class FolderCrops(Dataset):
    """The baseline: decode each image file, one random crop + flip, as most SR repos do."""

    def __init__(self, paths, crop: int):
        self.paths, self.crop = paths, crop

    def __len__(self):
        return 10 ** 9  # sampled with replacement, like the resampled shard stream

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        path = self.paths[int(torch.randint(len(self.paths), (1,), generator=g))]
        img = reflect_pad(read_image(path).permute(1, 2, 0).numpy(), self.crop)
        return torch.from_numpy(random_crop(img, self.crop, g)).permute(2, 0, 1)


def _rate(loader, batches: int) -> float:
    it = iter(loader)
    for _ in range(2):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        n += (batch["hr"] if isinstance(batch, dict) else batch).shape[0]
    return n / (time.perf_counter() - t0)


def run(args) -> dict:
    urls = expand_shard_pattern(args.shards)
    paths, problems = expand_inputs([args.folder])
    if problems:
        from degsr.errors import UserError
        raise UserError(problems[0])
    total = args.batches + 2
    stream = TrainStream(urls, crop_size=args.crop, batch_size=args.batch, batches_per_epoch=total,
                         shuffle_buffer=args.batch * 4, seed=0, rank=0)
    shard_rate = _rate(DataLoader(stream, batch_size=None, num_workers=args.workers), args.batches)
    folder = DataLoader(FolderCrops(paths, args.crop), batch_size=args.batch, shuffle=False,
                        num_workers=args.workers)
    folder_rate = _rate(folder, args.batches)
    return {"bench": "loader", "shards": len(urls), "images": len(paths), "crop": args.crop,
            "batch": args.batch, "workers": args.workers,
            "shard_samples_per_s": round(shard_rate, 2), "folder_samples_per_s": round(folder_rate, 2),
            "ratio_shard_over_folder": round(shard_rate / folder_rate, 3),
            "cpu_threads": torch.get_num_threads(), "numpy": np.__version__}
