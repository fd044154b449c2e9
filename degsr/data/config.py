"""``data.*`` keys: where training/validation images come from and how they are cut and batched.

Sources are checked when the DataModule is set up (``SRDataModule.setup``), not at config load:
an empty ``train_shards`` is only an error for a run that trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from degsr.config.fields import choice, number, plain, positive, prob, span

SMALL_IMAGE_POLICIES = ["pad", "skip"]


@dataclass
class DataConfig:
    """Training stream (WebDataset shards) and validation sets."""

    train_shards: str = plain("", "training shards: a .tar (.tar.gz), glob, {000..009} brace "
                                  "pattern, folder (the set its index.json names, else its *.tar, "
                                  "*.tar.gz, *.tgz), index.json written by `degsr shards`, or a "
                                  ".txt list of those, one a line ('' = not set)")
    val_shards: str = plain("", "shards the fixed synthetic val set is cut from (read in order)")
    val_folder: str = plain("", "a folder of images the fixed synthetic val set is cut from "
                                "(used when val_shards is '')")
    val_paired_lr: str = plain("", "folder of real LR images (RealSR-style), matched by file stem "
                                   "with val_paired_hr")
    val_paired_hr: str = plain("", "folder of the HR images that match val_paired_lr")
    crop_size: int = positive(512, "HR crop side in pixels (a multiple of degradation.scale)")
    batch_size: int = positive(4, "training crops per batch, per device")
    num_workers: int = number(2, "DataLoader worker processes per device (0 = main process)", lo=0)
    crops_per_image: int = positive(1, "random crops cut from each decoded image (each its own "
                                       "position and flip; they meet other images' crops in the "
                                       "shuffle buffer): divides the decoding cost, for loaders "
                                       "that cannot keep up (few CPU cores, large images)")
    degradations_per_crop: int = positive(1, "each training crop is degraded this many times "
                                             "with independent draws, side by side in the batch "
                                             "(a batch holds batch_size / this many crops): the "
                                             "same content at several degradations, for stage "
                                             "1's estimator.within_crop_weight")
    scale_range: List[float] = span([1.0, 1.0], "each decoded image is first resized by a factor "
                                    "drawn uniformly from [low, high] (antialiased bicubic): "
                                    "Real-ESRGAN's multi-scale HR set, drawn on the fly. [1, 1] = "
                                    "off", lo=0.05, hi=4.0)
    shuffle_buffer: int = number(256, "crops held per worker for shuffling (memory: "
                                      "shuffle_buffer * crop_size^2 * 3 bytes)", lo=1)
    batches_per_epoch: int = positive(1000, "training batches per epoch, per rank (every rank runs "
                                            "exactly this many, so DDP never waits at epoch end; "
                                            "times data.echo when echoing)")
    echo: int = number(1, "data echoing: each degraded training batch is used this many times, "
                          "the k-th time turned by the k-th of the 8 flips/rotations (1 = off; for "
                          "runs bound by the degradation, e.g. on a CPU)", lo=1, hi=8)
    echo_window: int = positive(1, "data echoing: HR batches whose echoes are interleaved (W "
                                   "batches, then their W second uses, ...): consecutive steps "
                                   "see different crops. 1 = each batch's echoes in a row. Holds "
                                   "W degraded batches on the device")
    small_images: str = choice("pad", SMALL_IMAGE_POLICIES, "image smaller than crop_size: 'pad' "
                               "(reflect-pad up to the crop) or 'skip' (counted, not an error)")
    val_crops: int = positive(32, "size of the fixed synthetic val set (crops, degraded once)")
    val_crop_size: int = number(0, "side of the synthetic val crops in pixels (a multiple of "
                                   "degradation.scale); 0 = crop_size. Lets a run train on small "
                                   "crops and still be compared on the usual ones", lo=0)
    val_batch_size: int = positive(4, "synthetic val crops per batch")
    max_bad_fraction: float = prob(0.05, "training stops when more than this fraction of the "
                                         "samples read were corrupt or unreadable")
    min_samples_for_bad_check: int = positive(200, "samples read before max_bad_fraction applies")

    def check(self):
        if self.batch_size % self.degradations_per_crop:
            yield "degradations_per_crop", (f"must divide data.batch_size={self.batch_size}, got "
                                            f"{self.degradations_per_crop}")
        if bool(self.val_paired_lr) != bool(self.val_paired_hr):
            yield "val_paired_hr", "set val_paired_lr and val_paired_hr together (or neither)"
