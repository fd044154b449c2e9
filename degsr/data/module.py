"""``SRDataModule``: training crops from shards, degraded per batch on the training device, and
the validation sets of :mod:`degsr.data.validation`.

Training batches leave the DataLoader as uint8 HR crops (cheap to pin and transfer);
``on_after_batch_transfer`` turns them into the degradation engine's dict on the device
(``hr, gt, lr, lr_up, scores, clean, params``) plus ``n_bad``, ``keys`` and ``crop``. The
degradation of training batch ``t`` (counted over the whole run, equal on every rank) draws from
``make_generator(seed, 1000 + global_rank, t, device=...)``: distinct per rank and batch, and
independent of what ran before. With ``data.degradations_per_crop = D`` the loader yields
``batch_size / D`` crops and each is degraded D times side by side, each time with its own
draw; ``crop`` (B,) says which crop each sample came from. The LightningModule must not override
``on_before/after_batch_transfer`` itself (Lightning would then skip these).

Exact resume: :meth:`state_dict` (saved in every checkpoint) holds ``t``; a resumed run starts the
stream at epoch ``t // batches_per_epoch``, batch ``t % batches_per_epoch`` (see
:mod:`degsr.data.stream`), so model, degradations and crops continue as if never interrupted.

Data echoing (``data.echo = E``, Choi et al. 2019, "Faster neural network training with data
echoing"): the loader yields each HR batch E times (``batch["echo"]`` = 0 .. E-1); the batch is
degraded once, at its first use, and echo k trains on that output turned by the k-th of the 8
flips/rotations (:func:`dihedral`); an epoch is ``batches_per_epoch`` HR batches, i.e.
``batches_per_epoch * E`` training batches. With ``data.echo_window = W`` the echoes of W HR
batches are interleaved (b0 b1 .. b(W-1), then each turned once, ...), so consecutive steps see
different crops (Choi et al. found echoing before shuffling better than repeating a batch in a
row); W = 1 repeats each batch E times in a row. :func:`echo_position` maps training batch ``t``
to (HR batch index, echo): the index keys the degradation generator, so a run resumed anywhere in
a window re-reads the window, re-degrades its batches identically and skips what was used; with
E = 1 everything is as without echoing.

Data quality: the module counts the samples the workers read and skipped
(:meth:`data_quality`); once ``min_samples_for_bad_check`` samples were read (summed over ranks,
synchronised every ``QUALITY_SYNC_EVERY`` batches under DDP so every rank stops at the same step),
a corrupt fraction above ``max_bad_fraction`` stops training with a UserError.

Validation: ``val_dataloader()`` returns ``[synthetic, paired]``, each only when configured
(``val_names`` says which); synthetic batches carry ``scores``, paired ones ``name``.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from degsr import console
from degsr.config.fields import as_dataclass
from degsr.config.schema import DegradationConfig
from degsr.data.config import DataConfig
from degsr.data.shard_sets import expand_pattern, folder_overlaps, shards_overlap
from degsr.data.stream import TrainStream
from degsr.data.validation import EvenSplit, Marked, PairedFolders, SyntheticValSet
from degsr.degradation.pipeline import Degrader
from degsr.errors import UserError
from degsr.seeding import make_generator

QUALITY_SYNC_EVERY = 25  # batches between all-reduces of the quality counts under DDP


def dihedral(out: dict, k: int) -> dict:
    """``out`` with its images (``hr, gt, lr, lr_up``) turned by the ``k``-th (0-7) of the 8
    flips/rotations of the square: ``rot90`` by ``k % 4`` quarter turns, then a horizontal flip
    when ``k >= 4``. Scores and parameters do not change: blur and noise have no direction."""
    if k == 0:
        return dict(out)
    turned = dict(out)
    for key in ("hr", "gt", "lr", "lr_up"):
        x = torch.rot90(out[key], k % 4, dims=(-2, -1))
        turned[key] = x.flip(-1) if k >= 4 else x
    return turned


def degrade_crops(degrader: Degrader, hr: torch.Tensor, per: int, g: torch.Generator) -> dict:
    """The engine's output for HR crops (B, 3, H, W) each degraded ``per`` times side by side
    (independent draws; ``data.degradations_per_crop``), plus ``crop``: (B * per,) the index of
    each sample's crop (stage 1's within-crop loss)."""
    out = degrader(hr.repeat_interleave(per, 0) if per > 1 else hr, g)
    out["crop"] = torch.arange(hr.shape[0], device=hr.device).repeat_interleave(per)
    return out


def echo_position(t: int, batches_per_epoch: int, echo: int, window: int) -> tuple[int, int, int]:
    """Training batch ``t`` (0-based, over the run) -> (HR batch index over the run, echo k,
    HR batches into its epoch where its window starts). An epoch's last window holds what is
    left when ``batches_per_epoch`` is not a multiple of ``window``. Without echoing (E = 1)
    there is nothing to interleave: windows of one batch."""
    window = window if echo > 1 else 1
    epoch, q = divmod(t, batches_per_epoch * echo)
    w, r = divmod(q, window * echo)
    size = min(window, batches_per_epoch - w * window)
    k, j = divmod(r, size)
    return epoch * batches_per_epoch + w * window + j, k, w * window


class ResumableLoader(DataLoader):
    """The training DataLoader, marked resumable for Lightning (``state_dict``/``load_state_dict``).

    Its position lives in :meth:`SRDataModule.state_dict` (batches consumed, counted as the
    training loop takes them -- the loader itself runs ahead by its prefetch), which sets the
    stream's start when the loader is made; so there is nothing to save here. With ``echo`` E > 1
    every batch is yielded E times (``batch["echo"]`` = 0 .. E-1), interleaved over windows of
    ``window`` batches; ``skip`` leaves out the first uses of the very first window (a run
    resumed inside it: the stream then starts at the window's first batch).
    """

    def __init__(self, *args, echo: int = 1, window: int = 1, skip: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.echo, self.window, self.skip = int(echo), int(window), int(skip)

    def __len__(self) -> int:
        return super().__len__() * self.echo

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.echo == 1 else self._echoed(batches)

    def _echoed(self, batches):
        skip, self.skip = self.skip, 0  # only the resumed epoch starts inside a window
        batches = iter(batches)
        while window := list(itertools.islice(batches, self.window)):
            for r in range(skip, len(window) * self.echo):
                k, j = divmod(r, len(window))
                yield {**window[j], "echo": k}
            skip = 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SRDataModule(L.LightningDataModule):
    def __init__(self, data: DataConfig, degradation: DegradationConfig, seed: int = 0):
        super().__init__()
        self.data: DataConfig = as_dataclass(data, DataConfig())
        self.degradation: DegradationConfig = as_dataclass(degradation, DegradationConfig())
        self.seed = int(seed)
        self.degrader = Degrader(self.degradation)
        self.train_urls: list[str] | None = None
        self.val_set: SyntheticValSet | None = None
        self.paired_set: PairedFolders | None = None
        self._counts = {"read": 0, "bad": 0, "small": 0}  # this rank
        self._batches = 0  # training batches consumed over the run (all ranks alike)
        self._degraded: dict[int, dict] = {}  # HR batch index -> output, this echo window

    # ----------------------------------------------------------------- setup and loaders
    def check_sources(self) -> None:
        """What ``setup("fit")`` checks first, without reading an image (``degsr fit`` runs it
        before the run directory is made): the crop sizes, the shard patterns expanded (local
        shards must exist), the validation folders there."""
        d = self.data
        self._check_crops()
        if self.train_urls is None:
            if not d.train_shards:
                raise UserError("data.train_shards is not set: give the training shards (a .tar, "
                                "glob, {000000..000009} pattern, folder or index.json written by "
                                "`degsr shards`)")
            self.train_urls = expand_pattern("data.train_shards", d.train_shards)
        if d.val_shards:
            expand_pattern("data.val_shards", d.val_shards)
        for key in ("val_paired_lr", "val_paired_hr") + (() if d.val_shards else ("val_folder",)):
            folder = getattr(d, key)  # (val_folder is read only without val_shards)
            if folder and not Path(folder).expanduser().is_dir():
                where = "not a folder" if Path(folder).expanduser().exists() else "no such folder"
                raise UserError(f"data.{key} {folder}: {where}")

    def _check_crops(self) -> None:
        d, scale = self.data, self.degradation.scale
        for key in ("crop_size", "val_crop_size"):
            if getattr(d, key) % scale:
                raise UserError(f"data.{key}={getattr(d, key)} must be a multiple of "
                                f"degradation.scale={scale}")

    def setup(self, stage: str | None = None) -> None:
        d = self.data
        if stage in (None, "fit"):
            self.check_sources()
        else:
            self._check_crops()
        if stage in (None, "fit", "validate"):
            train = self.train_urls or []  # none when only validating: nothing to compare
            if self.val_set is None and (d.val_shards or d.val_folder):
                if d.val_shards:
                    urls = expand_pattern("data.val_shards", d.val_shards)
                    self._warn_overlaps(shards_overlap(train, urls))
                else:
                    self._warn_overlaps(folder_overlaps(train, "data.val_folder", d.val_folder))
                self.val_set = SyntheticValSet.from_config(d, self.degradation)
            if self.paired_set is None and (d.val_paired_lr or d.val_paired_hr):
                if not (d.val_paired_lr and d.val_paired_hr):
                    raise UserError("data.val_paired_lr and data.val_paired_hr: set both or neither")
                self.paired_set = PairedFolders(d.val_paired_lr, d.val_paired_hr)
                self._warn_overlaps(folder_overlaps(train, "data.val_paired_hr", d.val_paired_hr))

    def _warn_overlaps(self, overlaps: list[str]) -> None:
        """Each overlap of a validation set with the training shards, one line, on global rank
        zero: scores on images the model trains on would flatter it."""
        if self.trainer is None or self.trainer.is_global_zero:
            for line in overlaps:
                console.log.warning(f"{line}: validation would score images the model trains on")

    def _pin(self) -> bool:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        if self.train_urls is None:
            self.setup("fit")
        d, trainer = self.data, self.trainer
        steps = d.batches_per_epoch * d.echo  # training batches per epoch
        _, _, window_start = echo_position(self._batches, d.batches_per_epoch, d.echo, d.echo_window)
        stream = TrainStream(
            self.train_urls, crop_size=d.crop_size,
            batch_size=d.batch_size // d.degradations_per_crop,
            batches_per_epoch=d.batches_per_epoch, shuffle_buffer=d.shuffle_buffer,
            crops_per_image=d.crops_per_image, scale_range=tuple(d.scale_range),
            small_images=d.small_images, seed=self.seed,
            rank=None if trainer is None else trainer.global_rank,
            start_epoch=self._batches // steps,
            skip_batches=window_start,
            stall_limit=max(1000, d.min_samples_for_bad_check))
        # Lightning warns that __len__ may be wrong with several workers; here each worker
        # yields its share of batches_per_epoch, so len() is exact.
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
        return ResumableLoader(stream, batch_size=None, num_workers=d.num_workers,
                               persistent_workers=d.num_workers > 0, pin_memory=self._pin(),
                               echo=d.echo, window=d.echo_window,
                               skip=self._batches % steps - window_start * d.echo)

    @property
    def val_names(self) -> list[str]:
        return [n for n, s in (("synthetic", self.val_set), ("paired", self.paired_set)) if s]

    def val_dataloader(self) -> list[DataLoader]:
        """The validation sets split over the ranks without counting a sample twice (items carry
        ``keep``: False on the padding that evens out the ranks, :class:`EvenSplit`)."""
        world, rank = (1, 0) if self.trainer is None else (self.trainer.world_size,
                                                           self.trainer.global_rank)
        loaders = []
        for ds, batch, kw in ((self.val_set, self.data.val_batch_size, {"pin_memory": self._pin()}),
                              (self.paired_set, 1, {"num_workers": min(self.data.num_workers, 2)})):
            if ds is not None:
                loaders.append(DataLoader(Marked(ds), batch_size=batch,
                                          sampler=EvenSplit(ds, world, rank), **kw))
        return loaders

    # ----------------------------------------------------------------- per-batch hooks
    def _is_train_batch(self, batch) -> bool:
        trainer = self.trainer
        return (trainer is not None and trainer.training and isinstance(batch, dict)
                and "n_bad" in batch and "hr" in batch)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self._is_train_batch(batch):  # counts are still CPU tensors here: no device sync
            self._count(batch)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not self._is_train_batch(batch):
            return batch
        d = self.data  # training batch t = self._batches - 1: counted before the transfer
        index, k, start = echo_position(self._batches - 1, d.batches_per_epoch, d.echo, d.echo_window)
        if k != int(batch.get("echo", 0)):
            raise RuntimeError(f"data echo out of step: batch {self._batches - 1} should be echo "
                               f"{k}, the loader gave {batch.get('echo', 0)}")
        if index not in self._degraded:
            first = (self._batches - 1) // (d.batches_per_epoch * d.echo) * d.batches_per_epoch + start
            self._degraded = {i: o for i, o in self._degraded.items() if i >= first}  # this window
            hr = batch["hr"]
            hr = hr.float() / 255.0 if hr.dtype == torch.uint8 else hr.float()
            g = make_generator(self.seed, 1000 + self.trainer.global_rank, index, device=hr.device)
            per = d.degradations_per_crop
            out = degrade_crops(self.degrader, hr, per, g)
            keys = batch.get("keys")
            out["n_bad"] = batch["n_bad"]
            out["keys"] = [k for k in keys for _ in range(per)] if keys is not None else None
            self._degraded[index] = out
        return dihedral(self._degraded[index], k)

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"train_batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        self._batches = int(state.get("train_batches", 0))

    # ----------------------------------------------------------------- data quality
    def data_quality(self) -> dict:
        """This rank's counts: samples ``read`` by its workers, ``bad`` (corrupt/unreadable),
        ``small`` (skipped as smaller than the crop) and ``bad_fraction`` = bad / read."""
        c = dict(self._counts)
        c["bad_fraction"] = c["bad"] / c["read"] if c["read"] else 0.0
        return c

    def _count(self, batch) -> None:
        c = self._counts
        self._batches += 1
        if not batch.get("echo", 0):  # an echo is the same samples again: read once
            c["read"] += int(batch.get("n_read", batch["hr"].shape[0]))
            c["bad"] += int(batch["n_bad"])
            c["small"] += int(batch.get("n_small", 0))
        trainer = self.trainer
        if trainer.world_size > 1:  # every rank runs the same batch count: collectives line up
            if self._batches % QUALITY_SYNC_EVERY:
                return
            local = torch.tensor([c["read"], c["bad"]], dtype=torch.float64,
                                 device=trainer.strategy.root_device)
            read, bad = (int(v) for v in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        else:
            read, bad = c["read"], c["bad"]
        self.check_quality(read, bad)

    def check_quality(self, read: int, bad: int) -> None:
        """UserError when enough samples were read and too many of them were corrupt."""
        d = self.data
        if read >= d.min_samples_for_bad_check and read and bad / read > d.max_bad_fraction:
            raise UserError(
                f"data: {bad} of {read} samples ({100 * bad / read:.1f}%) were corrupt or "
                f"unreadable, above data.max_bad_fraction={d.max_bad_fraction}; check the shards "
                f"the log names: {d.train_shards} (rewrite them with `degsr shards`, which checks "
                "every image)")
