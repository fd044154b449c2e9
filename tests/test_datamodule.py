"""The data layer: shard stream, synthetic/paired validation sets and SRDataModule, on real shards
written by ``degsr shards`` from scikit-image photos (no network)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import skimage.data
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

import degsr.cli
from degsr.config.loader import validate
from degsr.config.schema import DegradationConfig
from degsr.data.config import DataConfig
from degsr.data.module import QUALITY_SYNC_EVERY, SRDataModule, dihedral, echo_position
from degsr.data.shard_sets import expand_shard_pattern
from degsr.data.samples import read_shard
from degsr.data.stream import TrainStream, reflect_pad, rescale
from degsr.data.validation import EvenSplit, Marked, PairedFolders, SyntheticValSet
from degsr.errors import ConfigError, UserError

CROP = 64
ENGINE_KEYS = {"hr", "gt", "lr", "lr_up", "scores", "clean", "params", "n_bad"}


def _save(arr, path):
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos as PNG plus small generated images (one smaller than the crop)."""
    src = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        _save(getattr(skimage.data, name)(), src / f"{name}.png")
    _save(np.repeat(skimage.data.camera()[..., None], 3, axis=2), src / "camera.png")
    rng = np.random.default_rng(0)
    _save(rng.integers(0, 256, (96, 80, 3), np.uint8), src / "noise.png")
    _save(rng.integers(0, 256, (40, 50, 3), np.uint8), src / "tiny.png")
    return src


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    rc = degsr.cli.main(["shards", str(photos), "--out", str(out), "--per-shard", "2",
                         "--min-side", "16", "--min-bytes", "0", "--order", "path"])
    assert rc == 0
    return out


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_shards(shards, tmp_path_factory) -> dict[str, Path]:
    """A shard with one garbage image member and one good image; a shard cut short (90%, inside
    its second sample) and one cut in half (inside its first)."""
    d = tmp_path_factory.mktemp("bad")
    good = _png(skimage.data.chelsea())
    meta = json.dumps({"source": "x"}).encode()
    corrupt = _tar(d / "corrupt-000000.tar", [
        ("00000000_garbage", {"png": b"\x89PNG this is not an image" * 50, "json": meta}),
        ("00000001_chelsea", {"png": good, "json": meta})])
    full = (shards / "train-000000.tar").read_bytes()
    truncated = d / "cut-000000.tar"
    truncated.write_bytes(full[: int(len(full) * 0.9)])
    (d / "half-000000.tar").write_bytes(full[: len(full) // 2])
    return {"corrupt": corrupt, "truncated": truncated, "half": d / "half-000000.tar", "dir": d}


def fake_trainer(training=True, rank=0, world_size=1, epoch=0):
    return SimpleNamespace(training=training, global_rank=rank, world_size=world_size,
                           current_epoch=epoch,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging the suite, when the block loops for good (a stream that stops
    counting an empty shard as bad never ends)."""
    class Expired(BaseException):  # not an Exception: the stream's handlers must not catch it
        pass

    def expired(*_):
        raise Expired(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def stream(urls, **kw):
    args = dict(crop_size=CROP, batch_size=2, batches_per_epoch=4, shuffle_buffer=4, seed=0)
    return TrainStream([str(u) for u in urls], **{**args, **kw})


def data_cfg(**kw) -> DataConfig:
    args = dict(crop_size=CROP, batch_size=2, num_workers=0, shuffle_buffer=4,
                batches_per_epoch=3, val_crops=6, val_batch_size=4)
    return DataConfig(**{**args, **kw})


# ------------------------------------------------------------------------------------ config
def test_config_checks_name_their_keys():
    validate(OmegaConf.structured(DataConfig()), DataConfig)
    with pytest.raises(ConfigError) as e:
        validate(OmegaConf.structured(DataConfig(batch_size=0, small_images="crop",
                                                 max_bad_fraction=2.0, val_paired_lr="x")),
                 DataConfig)
    text = str(e.value)
    for key in ("batch_size", "small_images", "max_bad_fraction", "val_paired_hr"):
        assert key in text


# ------------------------------------------------------------------------------------ stream
def test_batch_through_datamodule_hooks(shards):
    dm = SRDataModule(data_cfg(train_shards=str(shards)), DegradationConfig(), seed=0)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 == len(dm.train_dataloader())
    raw = batches[0]
    assert raw["hr"].dtype == torch.uint8 and raw["hr"].shape == (2, 3, CROP, CROP)
    out = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
    assert ENGINE_KEYS <= set(out)
    assert out["hr"].dtype == torch.float32 and out["hr"].shape == (2, 3, CROP, CROP)
    assert out["lr"].shape == (2, 3, CROP // 4, CROP // 4)
    assert out["lr_up"].shape == (2, 3, CROP, CROP) and out["scores"].shape == (2, 2)
    assert out["clean"].shape == (2,)
    assert torch.equal(out["hr"], raw["hr"].float() / 255)
    q = dm.data_quality()
    assert q["read"] >= 2 and q["bad"] == 0 and q["bad_fraction"] == 0.0
    dm.trainer = fake_trainer(training=False)  # validation batches pass through untouched
    assert dm.on_after_batch_transfer(raw, 0) is raw


def test_degradations_per_crop_degrades_each_crop_side_by_side(shards):
    dm = SRDataModule(data_cfg(train_shards=str(shards), batch_size=6, degradations_per_crop=3),
                      DegradationConfig(), seed=0)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    raw = next(iter(dm.train_dataloader()))
    assert raw["hr"].shape[0] == 2 and len(raw["keys"]) == 2  # the loader cuts 6 / 3 crops
    out = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
    assert out["lr"].shape[0] == 6 and out["crop"].tolist() == [0, 0, 0, 1, 1, 1]
    assert out["keys"] == [raw["keys"][0]] * 3 + [raw["keys"][1]] * 3
    for i in range(6):
        assert torch.equal(out["hr"][i], raw["hr"][i // 3].float() / 255)
    lr = out["lr"]  # independent draws: the three LRs of one crop differ
    assert not torch.equal(lr[0], lr[1]) and not torch.equal(lr[1], lr[2])


# ------------------------------------------------------------------------------- data echo
def _turn_loop(img: np.ndarray, k: int) -> np.ndarray:
    """The k-th flip/rotation of a square (..., n, n) array, pixel by pixel: k % 4 quarter turns
    counter-clockwise (out[i, j] = in[j, n-1-i] per turn), then a mirror (out[i, j] = in[i, n-1-j])
    when k >= 4."""
    n = img.shape[-1]
    out = img.copy()
    for _ in range(k % 4):
        prev, out = out, np.empty_like(out)
        for i in range(n):
            for j in range(n):
                out[..., i, j] = prev[..., j, n - 1 - i]
    if k >= 4:
        prev, out = out, np.empty_like(out)
        for i in range(n):
            for j in range(n):
                out[..., i, j] = prev[..., i, n - 1 - j]
    return out


def test_dihedral_turns_every_image_alike_and_keeps_scores():
    g = torch.Generator().manual_seed(0)
    out = {"hr": torch.rand(2, 3, 8, 8, generator=g), "gt": torch.rand(2, 3, 8, 8, generator=g),
           "lr": torch.rand(2, 3, 2, 2, generator=g), "lr_up": torch.rand(2, 3, 8, 8, generator=g),
           "scores": torch.rand(2, 2, generator=g), "clean": torch.zeros(2, dtype=torch.bool)}
    seen = []
    for k in range(8):
        t = dihedral(out, k)
        for key in ("hr", "gt", "lr", "lr_up"):
            assert np.array_equal(t[key].numpy(), _turn_loop(out[key].numpy(), k)), (key, k)
        assert t["scores"] is out["scores"] and t["clean"] is out["clean"]
        seen.append(t["hr"])
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])


def echoing_module(shards, monkeypatch, **data) -> tuple[SRDataModule, list]:
    """A training DataModule whose degrader appends to the returned list at every call."""
    dm = SRDataModule(data_cfg(train_shards=str(shards), **data), DegradationConfig(), seed=0)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    calls = []
    real = dm.degrader.__call__
    monkeypatch.setattr(dm.degrader.__class__, "__call__",
                        lambda self, hr, g: calls.append(1) or real(hr, g))
    return dm, calls


def test_echo_degrades_each_batch_once_and_turns_the_echoes(shards, monkeypatch):
    dm, calls = echoing_module(shards, monkeypatch, batches_per_epoch=2, echo=3)
    loader = dm.train_dataloader()
    raw = list(loader)
    assert len(loader) == 6 == len(raw) and [b["echo"] for b in raw] == [0, 1, 2, 0, 1, 2]
    outs = [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in raw]
    assert len(calls) == 2  # one degradation per HR batch
    read_once = sum(int(b["n_read"]) for b in raw if b["echo"] == 0)
    assert read_once > 0 and dm.data_quality()["read"] == read_once  # echoes are not re-counted
    for first, group in ((outs[0], outs[:3]), (outs[3], outs[3:])):
        for k, o in enumerate(group):
            for key in ("hr", "lr", "lr_up"):
                assert np.array_equal(o[key].numpy(), _turn_loop(first[key].numpy(), k))
            assert torch.equal(o["scores"], first["scores"])
    assert not torch.equal(outs[0]["hr"], outs[3]["hr"])


def test_echo_position_follows_the_loader_order():
    """echo_position(t) against the order written out by loops: per epoch, per window of W HR
    batches, E rounds over the window's batches."""
    for bpe, echo, window in ((6, 1, 1), (6, 3, 1), (6, 3, 2), (4, 2, 4), (6, 8, 3), (7, 3, 3),
                              (5, 1, 8), (3, 8, 8)):
        order = []
        window = window if echo > 1 else 1  # no echoing: nothing to interleave
        for epoch in range(3):
            for w0 in range(0, bpe, window):
                size = min(window, bpe - w0)  # the epoch's last window: what is left
                for k in range(echo):
                    for j in range(size):
                        order.append((epoch * bpe + w0 + j, k, w0))
        assert [echo_position(t, bpe, echo, window) for t in range(len(order))] == order


def test_echo_window_interleaves_batches_and_degrades_each_once(shards, monkeypatch):
    dm, calls = echoing_module(shards, monkeypatch, batches_per_epoch=5, echo=2, echo_window=2)
    raw = list(dm.train_dataloader())  # windows of 2, 2 and (what is left) 1 HR batches
    assert [b["echo"] for b in raw] == [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    assert torch.equal(raw[8]["hr"], raw[9]["hr"])
    for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):  # the same crops, second use
        assert torch.equal(raw[a]["hr"], raw[b]["hr"])
    assert not torch.equal(raw[0]["hr"], raw[1]["hr"])
    outs = [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in raw]
    assert len(calls) == 5 and len(dm._degraded) == 1  # once per HR batch; one window held
    for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):
        assert np.array_equal(outs[b]["lr"].numpy(), _turn_loop(outs[a]["lr"].numpy(), 1))


def test_small_images_pad_or_skip(shards):
    padded = reflect_pad(np.arange(6, dtype=np.uint8).reshape(1, 2, 3), 5)
    assert padded.shape == (5, 5, 3)
    assert reflect_pad(np.zeros((1, 1, 3), np.uint8), 4).shape == (4, 4, 3)
    urls = expand_shard_pattern(str(shards))
    tiny = [u for u in urls if any("tiny" in k for k, _ in read_shard(u))] + [urls[0]]
    with pytest.raises(UserError, match="smaller than data.crop_size=64"):
        list(stream(tiny[:1], small_images="skip", stall_limit=50))
    s = stream(tiny, small_images="skip", batches_per_epoch=6)
    batches = list(s)
    assert all("tiny" not in k for b in batches for k in b["keys"])
    assert sum(int(b["n_small"]) for b in batches) > 0
    assert sum(int(b["n_bad"]) for b in batches) == 0
    padded = list(stream(tiny, small_images="pad", batches_per_epoch=8))
    assert any("tiny" in k for b in padded for k in b["keys"])


def _crop_position(crop: np.ndarray, img: np.ndarray):
    """(top, left, flipped) of a CROP x CROP window of ``img`` equal to ``crop``, found by trying
    every one; None if there is none."""
    h, w = img.shape[:2]
    return next(((t, l, f) for t in range(h - CROP + 1) for l in range(w - CROP + 1)
                 for f in (0, 1)
                 if np.array_equal(crop, img[t:t + CROP, l:l + CROP][:, ::-1 if f else 1])), None)


def test_crops_per_image_cuts_several_crops_from_each_decoded_image(tmp_path):
    img = np.random.default_rng(3).integers(0, 256, (96, 80, 3), np.uint8)
    tar = _tar(tmp_path / "one.tar", [("00000000_rand", {"png": _png(img)})])
    # shuffle_buffer 1 keeps the order (each item swaps with the one held)
    batches = list(stream([tar], crops_per_image=3, shuffle_buffer=1, batch_size=6,
                          batches_per_epoch=4))
    crops = torch.cat([b["hr"] for b in batches]).permute(0, 2, 3, 1).numpy()
    where = [_crop_position(c, img) for c in crops]
    assert None not in where and len(set(where)) > len(where) // 2  # each its own position/flip
    # 24 crops yielded, one more held in the buffer: 25 crops = 9 decodes of the image
    assert sum(int(b["n_read"]) for b in batches) == 9


def _bicubic_aa_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Antialiased bicubic (a = -0.5) resize in float64, one axis at a time (columns first,
    rounded and clipped to uint8 in between, as PIL stores its first pass): output pixel i
    centred at (i + 1/2)·s in input coordinates (s = in/out), taps within 2·max(s, 1) of it,
    weights K((j + 1/2 - centre)/max(s, 1)), normalised."""
    def kernel(x):
        x = np.abs(x)
        return np.where(x < 1, 1.5 * x**3 - 2.5 * x**2 + 1,
                        np.where(x < 2, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2, 0.0))

    def axis(n_in, n_out):
        s = n_in / n_out
        stretch = max(s, 1.0)
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            c = (i + 0.5) * s
            j = np.arange(int(np.floor(c - 2 * stretch)), int(np.ceil(c + 2 * stretch)) + 1)
            j = j[(j >= 0) & (j < n_in)]
            w = kernel((j + 0.5 - c) / stretch)
            m[i, j] = w / w.sum()
        return m

    x = img.astype(np.float64)
    rows, cols = axis(img.shape[0], out_h), axis(img.shape[1], out_w)
    x = np.clip(np.floor(np.einsum("jkc,lk->jlc", x, cols) + 0.5), 0, 255)
    return np.clip(np.einsum("ij,jlc->ilc", rows, x), 0, 255)


def test_scale_range_resizes_each_image_before_cropping(tmp_path):
    img = np.ascontiguousarray(skimage.data.astronaut()[100:260, 200:330])  # 160 x 130
    small = rescale(img, 0.5)
    assert small.shape == (80, 65, 3)
    ref = np.floor(_bicubic_aa_reference(img, 80, 65) + 0.5)
    diff = np.abs(small.astype(np.float64) - ref)
    assert diff.max() <= 1.0 and (diff == 0).mean() > 0.95  # PIL's weights are fixed-point
    assert rescale(img, 0.77).shape == (123, 100, 3)  # round(160·0.77), round(130·0.77)
    assert rescale(img, 0.63).shape == (101, 82, 3)  # 100.8, 81.9: rounded, not cut
    assert rescale(img, 1.0) is img
    tar = _tar(tmp_path / "one.tar", [("00000000_rand", {"png": _png(img)})])
    batches = list(stream([tar], scale_range=(0.5, 0.5), batch_size=4, batches_per_epoch=2))
    for crop in torch.cat([b["hr"] for b in batches]).permute(0, 2, 3, 1).numpy():
        assert _crop_position(crop, small) is not None


def test_ranks_and_workers_get_distinct_seeded_streams(shards, monkeypatch):
    urls = expand_shard_pattern(str(shards))
    monkeypatch.setenv("WORLD_SIZE", "2")
    seqs = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        # rank from RANK/WORLD_SIZE (webdataset's pytorch_worker_info), 2 worker processes
        batches = list(DataLoader(stream(urls, batches_per_epoch=5), batch_size=None,
                                  num_workers=2))
        assert len(batches) == 5  # exactly batches_per_epoch per rank, odd split over 2 workers
        for w, bs in enumerate((batches[0::2], batches[1::2])):  # workers take turns
            seqs[rank, w] = (tuple(k for b in bs for k in b["keys"]),
                             torch.cat([b["hr"] for b in bs]))
    for (ra, wa), a in seqs.items():
        for (rb, wb), b in seqs.items():
            if (ra, wa) < (rb, wb):
                assert not torch.equal(a[1][:4], b[1][:4]), f"{(ra, wa)} and {(rb, wb)} share crops"

    # seeded: the same (rank, worker) in this process reproduces the DataLoader worker's stream
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORKER", "1")
    monkeypatch.setenv("NUM_WORKERS", "2")
    s = stream(urls, batches_per_epoch=5)
    again = list(s)
    assert len(again) == 2
    assert tuple(k for b in again for k in b["keys"]) == seqs[1, 1][0]
    assert torch.equal(torch.cat([b["hr"] for b in again]), seqs[1, 1][1])
    second_epoch = torch.cat([b["hr"] for b in s])  # next iter() = next epoch: new crops
    assert not torch.equal(second_epoch, seqs[1, 1][1])
    explicit = stream(urls, batches_per_epoch=5, rank=0)  # the trainer's rank wins over RANK
    assert not torch.equal(torch.cat([b["hr"] for b in explicit]), seqs[1, 1][1])


def _loader_epochs(streams, monkeypatch, epochs: int) -> list[list[dict]]:
    """What a DataLoader with one persistent worker per stream yields over ``epochs`` epochs,
    played in this process: worker ``w`` (WORKER/NUM_WORKERS, as webdataset reads them) runs its
    own copy of the dataset, one iter() per epoch, and the loader takes a batch from each active
    worker in turn, starting at worker 0 every epoch."""
    W, out = len(streams), []
    monkeypatch.setenv("NUM_WORKERS", str(W))
    for _ in range(epochs):
        per_worker = []
        for w, s in enumerate(streams):
            monkeypatch.setenv("WORKER", str(w))
            per_worker.append(list(s))
        order, turn = [], 0
        while any(per_worker):
            if per_worker[turn % W]:
                order.append(per_worker[turn % W].pop(0))
            turn += 1
        out.append(order)
    return out


@pytest.mark.parametrize("workers, skip", [(1, 3), (3, 1), (3, 2), (3, 4), (3, 5), (2, 6)])
def test_a_resumed_epoch_continues_the_uninterrupted_batch_sequence(tmp_path, monkeypatch,
                                                                    workers, skip):
    """skip_batches=k (a resume k batches into an epoch) against an uninterrupted run of the same
    seed and worker count, both played batch by batch: the resumed loader yields exactly the
    uninterrupted epoch's batches k, k+1, ..., N-1 (same keys, crops and n_bad/n_read counts:
    the batches the fast-forward passed over are not counted again), whatever worker hands over
    to which, and its next epoch is the uninterrupted next epoch (the skip is for the first one
    only)."""
    rng = np.random.default_rng(8)
    urls = [_tar(tmp_path / f"s-{i}.tar", [(f"{i}{j}_img", {"png": _png(
        rng.integers(0, 256, (72, 70, 3), np.uint8))}) for j in range(3)]) for i in range(3)]
    urls.append(_tar(tmp_path / "bad.tar", [("garbage", {"png": b"not a png" * 20})]))
    kw = dict(batches_per_epoch=7, batch_size=2, shuffle_buffer=3, seed=5, rank=0, start_epoch=2)
    full = _loader_epochs([stream(urls, **kw) for _ in range(workers)], monkeypatch, 2)
    resumed = _loader_epochs([stream(urls, skip_batches=skip, **kw) for _ in range(workers)],
                             monkeypatch, 2)
    assert [len(e) for e in full] == [7, 7]
    want = [full[0][skip:], full[1]]
    assert [len(e) for e in resumed] == [len(e) for e in want]
    for got_epoch, want_epoch in zip(resumed, want):
        for got, exp in zip(got_epoch, want_epoch):
            assert got["keys"] == exp["keys"]
            assert torch.equal(got["hr"], exp["hr"])
            for k in ("n_bad", "n_small", "n_read"):
                assert int(got[k]) == int(exp[k]), k
    assert sum(int(b["n_bad"]) for e in full for b in e) > 0  # the counts were put to the test


# ------------------------------------------------------------------------------- bad samples
def test_truncated_shard_yields_complete_samples_then_raises(bad_shards):
    got = []
    with pytest.raises(tarfile.ReadError):
        for key, parts in read_shard(bad_shards["truncated"]):
            got.append(key)
            assert {"png", "json"} <= set(parts)
    assert got == ["00000000_astronaut"]
    with pytest.raises(tarfile.ReadError):
        list(read_shard(bad_shards["half"]))


@pytest.mark.parametrize("damage", ["zeroed", "garbage", "cut"])
def test_a_damaged_header_is_not_taken_for_the_end(shards, tmp_path, damage):
    """Python's tarfile reads a bad header after the first as the end of the archive; the
    samples before it still come out, then the shard raises (counted as damaged)."""
    full = (shards / "train-000000.tar").read_bytes()
    with tarfile.open(shards / "train-000000.tar") as tar:  # random access: every header offset
        members = [(m.name.split(".", 1)[0], m.offset) for m in tar.getmembers()]
    keys = list(dict.fromkeys(k for k, _ in members))
    assert len(keys) >= 2
    at = next(off for k, off in members if k == keys[-1])  # the last sample's first header
    damaged = {"zeroed": full[:at] + bytes(512) + full[at + 512:],
               "garbage": full[:at] + bytes(range(256)) * 2 + full[at + 512:],
               "cut": full[:at]}[damage]
    (tmp_path / "d.tar").write_bytes(damaged)
    got = []
    with pytest.raises(tarfile.ReadError, match=f"byte {at}"):
        for key, _ in read_shard(tmp_path / "d.tar"):
            got.append(key)
    assert got == keys[:-1]
    assert [k for k, _ in read_shard(shards / "train-000000.tar")] == keys  # the intact shard


def test_bad_samples_are_counted_and_the_stream_goes_on(shards, bad_shards):
    good = expand_shard_pattern(str(shards))[1]
    urls = [good, bad_shards["corrupt"], bad_shards["truncated"], bad_shards["half"]]
    batches = list(stream(urls, batches_per_epoch=12))
    assert len(batches) == 12
    keys = [k for b in batches for k in b["keys"]]
    assert "00000000_garbage" not in keys and "00000001_chelsea" in keys
    bad, read = (sum(int(b[k]) for b in batches) for k in ("n_bad", "n_read"))
    assert bad > 0 and read >= len(keys) + bad

    # corrupt shard alone: each pass reads 1 garbage + 1 good sample
    only = list(stream([bad_shards["corrupt"]], batches_per_epoch=6))
    bad, read = (sum(int(b[k]) for b in only) for k in ("n_bad", "n_read"))
    assert abs(bad - (read - bad)) <= 1 and bad >= 12 // 2

    # nothing usable at all: a clear error instead of an endless loop
    junk = bad_shards["dir"] / "junk.tar"
    junk.write_bytes(b"not a tar file" * 100)
    empty = _tar(bad_shards["dir"] / "empty.tar", [])
    for urls in ([junk], [empty]):
        with pytest.raises(UserError, match="unusable"), deadline(60):
            list(stream(urls, stall_limit=20))


def test_a_damaged_or_empty_shard_is_named_once_with_what_it_gave(bad_shards, monkeypatch):
    """The stream draws a damaged shard again and again; the log names it once (per worker),
    with the count of samples read from it before the damage."""
    from degsr import console

    said = []
    monkeypatch.setattr(console.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    cut, whole = bad_shards["truncated"], 0
    with pytest.raises(Exception):
        for _ in read_shard(cut):
            whole += 1
    assert whole > 0
    list(stream([cut], batches_per_epoch=4))
    assert said == [said[0]] and f"shard {cut} is damaged" in said[0], said
    assert f"after {whole} sample(s)" in said[0]
    empty = _tar(bad_shards["dir"] / "empty.tar", [])
    said.clear()
    with pytest.raises(UserError, match="unusable"), deadline(60):
        list(stream([empty], stall_limit=20))
    assert said == [f"data: shard {empty} holds no sample: skipped at every visit (counted as "
                    "one bad sample)"]
    said.clear()  # an intact shard with an undecodable sample: named once, with the sample's key
    list(stream([bad_shards["corrupt"]], batches_per_epoch=6))
    assert len(said) == 1 and said[0].startswith(
        f"data: shard {bad_shards['corrupt']} holds samples that cannot be used, such as "
        "00000000_garbage (cannot decode png: not an image format PIL reads)"), said
    assert "object at 0x" not in said[0]  # PIL's text named the BytesIO, not the member


def test_the_stall_limit_counts_unusable_samples_in_a_row(tmp_path):
    """stall_limit is a run of unusable samples IN A ROW: a shard read over and over as
    bad, bad, good (runs of exactly 2) raises at stall_limit=2, naming the 2, and trains on for
    ever at stall_limit=3 (a usable sample starts the count again: 3 bad ones in all are not 3
    in a row)."""
    good = _png(np.random.default_rng(9).integers(0, 256, (70, 70, 3), np.uint8))
    tar = _tar(tmp_path / "bbg.tar", [("0_bad", {"png": b"garbage" * 30}),
                                      ("1_bad", {"png": b"rubbish" * 30}),
                                      ("2_good", {"png": good})])
    with pytest.raises(UserError, match=r"the last 2 training samples read were all unusable "
                                        r"\(2 corrupt\)"):
        list(stream([tar], stall_limit=2, batches_per_epoch=4))
    batches = list(stream([tar], stall_limit=3, batches_per_epoch=4))  # 8 crops: 8+ passes
    assert {k for b in batches for k in b["keys"]} == {"2_good"}
    assert sum(int(b["n_bad"]) for b in batches) >= 2 * 8


def test_bad_fraction_ceiling(bad_shards):
    cfg = data_cfg(train_shards=str(bad_shards["corrupt"]), min_samples_for_bad_check=8,
                   max_bad_fraction=0.2, batches_per_epoch=8)
    dm = SRDataModule(cfg, DegradationConfig(), seed=0)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    with pytest.raises(UserError, match=r"corrupt or unreadable, above data.max_bad_fraction=0.2"):
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    assert dm.data_quality()["read"] >= 8

    lenient = SRDataModule(data_cfg(train_shards=str(bad_shards["corrupt"]),
                                    min_samples_for_bad_check=8, max_bad_fraction=0.6,
                                    batches_per_epoch=8), DegradationConfig())
    lenient.setup("fit")
    lenient.trainer = fake_trainer()
    for batch in lenient.train_dataloader():
        lenient.on_before_batch_transfer(batch, 0)
    assert 0.3 < lenient.data_quality()["bad_fraction"] <= 0.6


# ---------------------------------------------------------------------------------- val sets
def _val_items(ds):
    return {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}


def test_synthetic_val_set_is_fixed(shards, photos):
    deg = DegradationConfig()
    a = SyntheticValSet.from_config(data_cfg(val_shards=str(shards)), deg)
    b = SyntheticValSet.from_config(data_cfg(val_shards=str(shards), val_batch_size=1), deg)
    assert len(a) == 6
    ia, ib = _val_items(a), _val_items(b)
    assert set(ia) == {"hr", "gt", "lr", "lr_up", "scores", "clean"}
    assert ia["lr"].shape == (6, 3, CROP // 4, CROP // 4) and ia["hr"].dtype == torch.float32
    for k in ia:
        assert torch.equal(ia[k], ib[k]), k
    assert torch.equal(_val_items(a)["lr_up"], ia["lr_up"])  # every epoch: same tensors
    small = SyntheticValSet.from_config(data_cfg(val_shards=str(shards), val_crop_size=CROP // 2), deg)
    assert _val_items(small)["hr"].shape == (6, 3, CROP // 2, CROP // 2)  # its own crop side

    many = SyntheticValSet.from_config(data_cfg(val_folder=str(photos), val_crops=8), deg)
    again = SyntheticValSet.from_config(data_cfg(val_folder=str(photos), val_crops=8), deg)
    assert len(many) == 8  # 7 photos: cycles
    for k, v in _val_items(many).items():
        assert torch.equal(v, _val_items(again)[k]), k

    with pytest.raises(UserError, match="data.val_folder"):
        SyntheticValSet.from_config(data_cfg(val_folder=str(photos / "nope")), deg)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_validation_split_counts_every_sample_once(n, world):
    """Every rank gets the same number of items (the collectives stay in step); over the ranks
    each sample is kept exactly once, the padding repeats samples with keep False."""
    ds = [{"x": torch.tensor(float(i))} for i in range(n)]
    per_rank = [[Marked(ds)[i] for i in EvenSplit(ds, world, r)] for r in range(world)]
    assert len({len(items) for items in per_rank}) == 1 and len(per_rank[0]) == -(-n // world)
    kept = sorted(int(it["x"]) for items in per_rank for it in items if it["keep"])
    assert kept == list(range(n))
    padding = [it for items in per_rank for it in items if not it["keep"]]
    assert len(padding) == len(per_rank[0]) * world - n


def test_sample_means_over_ranks_equal_the_mean_over_the_set():
    from degsr.training.val_means import SampleMeans

    g = torch.Generator().manual_seed(0)
    values, keep = torch.rand(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g) > 0.3
    ranks = [SampleMeans(), SampleMeans()]
    for r, means in enumerate(ranks):  # 3 batches of 4 on each rank
        for b in range(3):
            means.add("m", values[r, b], keep[r, b])
    tables = [torch.stack(list(m.sums.values())) for m in ranks]

    class TwoRanks:  # the all-reduce of two ranks that hold these tables
        def reduce(self, t, reduce_op):
            assert reduce_op == "sum"
            return tables[0] + tables[1]

    want = sum(float(v) for v, k in zip(values.flatten(), keep.flatten()) if k) / int(keep.sum())
    assert ranks[0].compute(TwoRanks())["m"] == pytest.approx(want, rel=1e-12)
    assert not ranks[0].sums  # reset
    one = SampleMeans()
    one.add("m", torch.tensor([1.0, 2.0]), torch.tensor([False, False]))
    assert one.compute() == {}  # nothing kept: no mean


def test_paired_folders(tmp_path):
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    img = skimage.data.astronaut()
    _save(img[::4, ::4], lr / "Canon_001_LR4.png")
    _save(img, hr / "Canon_001_HR.png")
    _save(img[:128:4, :96:4], lr / "b.png")
    _save(img[:128, :96], hr / "b.png")
    ds = PairedFolders(str(lr), str(hr))
    assert [ds[i]["name"] for i in range(len(ds))] == ["Canon_001", "b"]
    assert ds[1]["lr"].shape == (3, 32, 24) and ds[1]["hr"].shape == (3, 128, 96)
    assert ds[1]["hr"].dtype == torch.float32 and float(ds[1]["hr"].max()) <= 1.0

    _save(img[:8, :8], lr / "extra_one.png")
    _save(img[:8, :8], hr / "other.png")
    with pytest.raises(UserError) as e:
        PairedFolders(str(lr), str(hr))
    assert "extra_one.png" in str(e.value) and "other.png" in str(e.value)


def test_pair_key_strips_only_a_trailing_scale_tag():
    """The names RealSR (``_HR``/``_LR4``) and DRealSR (``_x1``/``_x4``) give a pair, any case,
    ``_`` or ``-``, ``_LR`` with or without its factor; a tag anywhere but at the end, or a bare
    ``_x``, is part of the name."""
    from degsr.data.validation import pair_key

    table = {"Canon_001_HR": "Canon_001", "Canon_001_LR4": "Canon_001", "Canon_001_LR": "Canon_001",
             "Nikon_050_lr2": "Nikon_050", "DSC_1454_x1": "DSC_1454", "DSC_1454_x4": "DSC_1454",
             "pic-hr": "pic", "pic-X12": "pic", "hr_001": "hr_001", "a_HR_b": "a_HR_b",
             "photo_x": "photo_x", "shr": "shr", "img_LR4_HR": "img_LR4"}
    assert {stem: pair_key(stem) for stem in table} == table


def test_validation_shards_skip_an_undecodable_sample_and_a_damaged_rest(tmp_path, monkeypatch):
    """val_shards: the first ``limit`` DECODABLE images, shards in sorted order and samples in
    shard order; an undecodable sample is passed over (the images after it still count) and a
    damaged shard gives what it holds before the damage, then the next shard is read. Each image
    comes with a reload that decodes it again."""
    from degsr import console
    from degsr.data.validation import _images_from_shards

    monkeypatch.setattr(console.log, "warning", lambda *a: None)
    rng = np.random.default_rng(12)
    imgs = [rng.integers(0, 256, (20 + i, 30, 3), np.uint8) for i in range(5)]
    d = tmp_path / "val"
    d.mkdir()
    _tar(d / "v-0.tar", [("a", {"png": _png(imgs[0])}), ("junk", {"png": b"no image" * 9}),
                         ("b", {"png": _png(imgs[1])})])
    whole = _tar(tmp_path / "whole.tar", [("c", {"png": _png(imgs[2])}),
                                          ("d", {"png": _png(imgs[3])})])
    with tarfile.open(whole) as tar:
        member = tar.getmember("d.png")
    cut = member.offset_data + member.size // 2  # inside d's image
    (d / "v-1.tar").write_bytes(whole.read_bytes()[:cut])
    _tar(d / "v-2.tar", [("e", {"png": _png(imgs[4])})])
    got = list(_images_from_shards(str(d / "*.tar"), 10))
    want = [imgs[0], imgs[1], imgs[2], imgs[4]]
    assert len(got) == len(want)
    for (img, reload), w in zip(got, want):
        assert np.array_equal(img, w) and np.array_equal(reload(), w)
    assert [im.shape for im, _ in _images_from_shards(str(d / "*.tar"), 2)] == [imgs[0].shape,
                                                                               imgs[1].shape]


# ------------------------------------------------------------------------------- setup errors
def test_setup_errors_name_key_and_pattern(tmp_path, shards):
    deg = DegradationConfig()
    with pytest.raises(UserError, match="data.train_shards is not set"):
        SRDataModule(data_cfg(), deg).setup("fit")
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(UserError) as e:
        SRDataModule(data_cfg(train_shards=pattern), deg).setup("fit")
    assert "data.train_shards" in str(e.value) and pattern in str(e.value)
    with pytest.raises(UserError, match="data.val_shards"):
        SRDataModule(data_cfg(train_shards=str(shards), val_shards=pattern), deg).setup("fit")
    with pytest.raises(UserError, match="multiple of degradation.scale"):
        SRDataModule(data_cfg(train_shards=str(shards), crop_size=66), deg).setup("fit")
    with pytest.raises(UserError, match="data.val_crop_size=30 must be a multiple"):
        SRDataModule(data_cfg(train_shards=str(shards), val_crop_size=30), deg).setup("fit")
    SRDataModule(data_cfg(), deg).setup("validate")  # no training source needed to validate


# ----------------------------------------------------------------------- a real Lightning fit
class _Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        assert ENGINE_KEYS <= set(batch) and batch["lr"].shape[-1] == CROP // 4
        self.seen["train"].append([batch["keys"], float(batch["lr"].sum())])
        return (batch["lr_up"].mean() - batch["hr"].mean() + self.w).pow(2)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append(sorted(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_workers_and_both_val_sets(shards, photos, tmp_path):
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    _save(skimage.data.coffee()[::4, ::4], lr / "c.png")
    _save(skimage.data.coffee(), hr / "c.png")
    cfg = data_cfg(train_shards=str(shards), val_folder=str(photos), num_workers=2,
                   val_paired_lr=str(lr), val_paired_hr=str(hr))
    dm, model = SRDataModule(cfg, DegradationConfig(), seed=3), _Probe()
    trainer = L.Trainer(max_epochs=1, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(model.seen["train"]) == cfg.batches_per_epoch
    assert dm.val_names == ["synthetic", "paired"]
    assert ["clean", "gt", "hr", "keep", "lr", "lr_up", "scores"] in model.seen["val"]
    assert ["hr", "keep", "lr", "name"] in model.seen["val"]
    assert dm.data_quality()["read"] >= cfg.batches_per_epoch * cfg.batch_size


def test_a_val_folder_packed_into_the_training_shards_is_named(shards, photos, tmp_path,
                                                               monkeypatch):
    """The shards fixture packed ``photos``: validating on them (or on a link to them) warns once,
    on rank 0 only; a val folder beside the sources does not."""
    from degsr import console

    said = []
    monkeypatch.setattr(console.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    link = tmp_path / "val-link"
    link.symlink_to(photos, target_is_directory=True)
    for folder in (photos, link):
        SRDataModule(data_cfg(train_shards=str(shards), val_folder=str(folder)),
                     DegradationConfig(), seed=0).setup("fit")
    assert len(said) == 2 and all(f"overlaps {photos}, a source of the training shards" in m
                                  for m in said)
    other = tmp_path / "other"
    other.mkdir()
    _save(skimage.data.coffee(), other / "c.png")
    dm = SRDataModule(data_cfg(train_shards=str(shards), val_folder=str(other)),
                      DegradationConfig(), seed=0)
    dm.setup("fit")
    dm = SRDataModule(data_cfg(train_shards=str(shards), val_folder=str(photos)),
                      DegradationConfig(), seed=0)
    dm.trainer = fake_trainer(world_size=2)
    dm.trainer.is_global_zero = False
    dm.setup("fit")
    assert len(said) == 2


def test_val_shards_and_paired_hr_sharing_training_images_are_named(shards, photos, tmp_path,
                                                                     monkeypatch):
    """Like data.val_folder: validation shards that are training shard files, or whose sources
    overlap the training sources, and a data.val_paired_hr among the training sources warn, a
    line per overlap on rank 0 only; a set from other photos does not."""
    from degsr import console

    said = []
    monkeypatch.setattr(console.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    sub, other = tmp_path / "photos" / "sub", tmp_path / "other"
    sub.mkdir(parents=True)
    other.mkdir()
    _save(skimage.data.coffee(), other / "c.png")
    for name in ("astronaut", "rocket"):  # a copy of two training photos, then links to it
        (sub / f"{name}.png").write_bytes((photos / f"{name}.png").read_bytes())
    lr = tmp_path / "lr"  # names paired with the training photos (sizes are not checked here)
    lr.mkdir()
    for p in photos.iterdir():
        (lr / p.name).write_bytes(p.read_bytes())
    link = tmp_path / "link"
    link.symlink_to(photos, target_is_directory=True)
    for src, out in ((link / "astronaut.png", "val-a"), (other, "val-b")):
        assert degsr.cli.main(["shards", str(src), "--out", str(tmp_path / out), "--min-side",
                               "16", "--min-bytes", "0"]) == 0

    def setup(rank_zero=True, **kw):
        dm = SRDataModule(data_cfg(train_shards=str(shards), **kw), DegradationConfig(), seed=0)
        dm.trainer = None if rank_zero else SimpleNamespace(is_global_zero=False)
        dm.setup("fit")

    tail = ": validation would score images the model trains on"
    setup(val_shards=str(shards / "*-000001.tar"))  # a training shard file itself
    setup(val_shards=str(tmp_path / "val-a"))  # a photo of the training folder, by a link
    setup(val_shards=str(tmp_path / "val-b"), val_paired_lr=str(lr), val_paired_hr=str(photos))
    assert said == [
        f"data.val_shards: 1 of its 1 shard files are training shards too "
        f"({shards / 'train-000001.tar'}){tail}",
        f"data.val_shards {link / 'astronaut.png'}, a source of the validation shards, overlaps "
        f"{photos}, a source of the training shards{tail}",
        f"data.val_paired_hr {photos} overlaps {photos}, a source of the training shards{tail}"]
    said.clear()
    setup(val_shards=str(tmp_path / "val-b"), val_paired_lr=str(sub), val_paired_hr=str(sub))
    assert said == []  # copies of training photos elsewhere: not a shared path (not looked for)
    setup(rank_zero=False, val_shards=str(shards), val_paired_lr=str(lr),
          val_paired_hr=str(photos))
    assert said == []


def test_quality_counts_sync_across_ranks(bad_shards):
    """Under DDP the ceiling uses counts summed over ranks, checked at the same batch on all."""
    reduced = []

    def reduce(t, reduce_op):
        reduced.append(reduce_op)
        return t * 2  # as if the other rank counted the same

    cfg = data_cfg(train_shards=str(bad_shards["corrupt"]), min_samples_for_bad_check=8,
                   max_bad_fraction=0.2, batches_per_epoch=40)
    dm = SRDataModule(cfg, DegradationConfig(), seed=0)
    dm.setup("fit")
    dm.trainer = fake_trainer(world_size=2)
    dm.trainer.strategy.reduce = reduce
    n = 0
    with pytest.raises(UserError, match="above data.max_bad_fraction"):
        for batch in dm.train_dataloader():
            n += 1
            dm.on_before_batch_transfer(batch, 0)
    assert n == QUALITY_SYNC_EVERY and reduced == ["sum"]
    q = dm.data_quality()
    assert q["read"] >= 2 * QUALITY_SYNC_EVERY and q["bad_fraction"] > 0.2


DDP_SCRIPT = """
import json, sys
import lightning as L, torch
import degsr.data.module as m
from degsr.config.schema import DegradationConfig
from test_datamodule import _Probe, data_cfg

m.QUALITY_SYNC_EVERY = 2  # the all-reduce of the quality counts runs (gloo)
if __name__ == "__main__":
    shards, out = sys.argv[1:3]
    dm, model = m.SRDataModule(data_cfg(train_shards=shards, num_workers=2),
                               DegradationConfig(), seed=0), _Probe()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, **QUIET,
                        default_root_dir=out)
    trainer.fit(model, datamodule=dm)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"train": model.seen["train"], "quality": dm.data_quality()}, f)
    torch.distributed.destroy_process_group()
""".replace("**QUIET", "logger=False, enable_checkpointing=False, enable_progress_bar=False, "
                       "enable_model_summary=False")


def test_real_ddp_two_ranks(shards, tmp_path):
    """2-process DDP on CPU (gloo), 2 workers per rank: equal batch counts, distinct streams."""
    script = tmp_path / "ddp_probe.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), str(shards), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["train"]) for r in ranks] == [3, 3]  # data_cfg: batches_per_epoch=3
    assert ranks[0]["train"] != ranks[1]["train"]
    assert all(r["quality"]["read"] >= 6 and r["quality"]["bad"] == 0 for r in ranks)


class _Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise UserError("data: shard x.tar is unusable")


def test_a_worker_error_is_one_line_again():
    """A UserError raised in a DataLoader worker comes back from PyTorch as UserError('Caught
    UserError in DataLoader worker process 0.\\nOriginal Traceback ...'): the CLI printed every
    line of it. It now keeps the worker's own message and says where it came from."""
    loader = torch.utils.data.DataLoader(_Failing(), num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert str(info.value) == "data: shard x.tar is unusable (in DataLoader worker process 0)"


def test_validation_crops_hold_one_source_image_at_a_time():
    """val_crops lets each source image go before the next is decoded (512 photos of 12 MP held
    at once were 17 GiB a rank); with fewer images than crops it decodes them again. The crops
    are those of the rule written out: crop i of image i % m at positions drawn in order."""
    import weakref

    from degsr.data.stream import random_crop, reflect_pad
    from degsr.data.validation import VAL_SEED, val_crops
    from degsr.seeding import make_generator

    class Image(np.ndarray):  # an ndarray that can be watched with a weak reference
        pass

    def make(k):
        return np.random.default_rng(k).integers(0, 256, (300 - 9 * k, 280, 3), np.uint8)

    alive, reloads = [], []

    def images():
        for k in range(5):
            img = make(k).view(Image)
            alive.append(weakref.ref(img))
            assert sum(r() is not None for r in alive) == 1, k
            yield img, lambda k=k: reloads.append(k) or make(k)
            del img

    got = val_crops(images(), 7, 256)
    assert reloads == [0, 1]
    g = make_generator(VAL_SEED)
    want = [random_crop(reflect_pad(make(i % 5), 256), 256, g, flip=False) for i in range(7)]
    assert torch.equal(got, torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2))
    assert val_crops(iter([]), 3, 256) is None


def test_random_crop_positions_are_uniform_and_half_are_flipped():
    """Over many draws every one of the (h - s + 1)(w - s + 1) positions comes up about equally
    often (binomial bounds), top and left independently, and with ``flip`` about half the crops
    are mirrored (never without it). Each pixel of the image encodes its own (row, column), so a
    crop tells where it came from and whether it was flipped."""
    from degsr.data.stream import random_crop

    h, w, s, n = 10, 12, 8, 3000
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 1] = np.arange(h)[:, None], np.arange(w)[None, :]
    for flip in (True, False):
        g = torch.Generator().manual_seed(11)
        counts, flips = np.zeros((h - s + 1, w - s + 1)), 0
        for _ in range(n):
            c = random_crop(img, s, g, flip=flip)
            top, left = int(c[0, 0, 0]), int(c[0, :, 1].min())
            mirrored = c[0, 0, 1] > c[0, -1, 1]
            want = img[top:top + s, left:left + s]
            assert np.array_equal(c, want[:, ::-1] if mirrored else want)
            counts[top, left] += 1
            flips += int(mirrored)
        p = 1 / counts.size
        assert np.abs(counts - n * p).max() < 5 * np.sqrt(n * p * (1 - p)), counts
        if flip:
            assert abs(flips / n - 0.5) < 5 * np.sqrt(0.25 / n)
        else:
            assert flips == 0


@pytest.mark.parametrize("h, w, size", [(2, 3, 5), (5, 9, 8), (7, 4, 7), (1, 6, 4)])
def test_reflect_pad_centres_the_image(h, w, size):
    """reflect_pad against an index loop: output pixel (i, j) is the input at the mirrored
    (i - ph // 2, j - pw // 2), ph = size - h split with the smaller half on top/left; reflect
    mirrors without repeating the edge (symmetric, repeating it, for a 1-pixel side)."""
    img = np.random.default_rng(h * 10 + w).integers(0, 256, (h, w, 3), np.uint8)
    ph, pw = max(0, size - h), max(0, size - w)

    def mirror(k: int, n: int) -> int:
        if n == 1:
            return 0
        period = 2 * (n - 1)
        k %= period
        return k if k < n else period - k

    out = reflect_pad(img, size)
    assert out.shape == (h + ph, w + pw, 3)
    for i in range(h + ph):
        for j in range(w + pw):
            assert np.array_equal(out[i, j], img[mirror(i - ph // 2, h), mirror(j - pw // 2, w)]), (i, j)


def test_an_image_with_one_side_under_the_crop_is_small(tmp_path):
    """The crop needs both sides: an image 100 x 40 (one side under the 64 crop) is skipped with
    small_images=skip (counted in n_small) and padded with pad, like one smaller on both."""
    narrow = np.random.default_rng(4).integers(0, 256, (100, 40, 3), np.uint8)
    good = np.random.default_rng(5).integers(0, 256, (80, 90, 3), np.uint8)
    tar = _tar(tmp_path / "mixed.tar", [("00000000_narrow", {"png": _png(narrow)}),
                                        ("00000001_good", {"png": _png(good)})])
    batches = list(stream([tar], small_images="skip", batches_per_epoch=3))
    assert {k for b in batches for k in b["keys"]} == {"00000001_good"}
    assert sum(int(b["n_small"]) for b in batches) >= 3
    padded = list(stream([tar], small_images="pad", batches_per_epoch=3))
    assert "00000000_narrow" in {k for b in padded for k in b["keys"]}
    assert all(b["hr"].shape == (2, 3, CROP, CROP) for b in padded)


def test_shuffle_buffer_yields_a_uniform_pick_of_what_it_holds():
    """With a buffer of B items, the first item out is any of the first B read with probability
    1/B (over seeds; binomial bounds), and every item comes out at most once."""
    B, n_items, seeds = 4, 10, 2000
    s = stream(["unused.tar"], shuffle_buffer=B)
    first = np.zeros(n_items)
    for seed in range(seeds):
        out = list(s._shuffled(iter(range(n_items)), __import__("random").Random(seed)))
        assert len(out) == n_items - B and len(set(out)) == len(out)
        first[out[0]] += 1
    assert first[B:].sum() == 0
    p = 1 / B
    assert np.abs(first[:B] - seeds * p).max() < 5 * np.sqrt(seeds * p * (1 - p)), first


def test_training_degradations_differ_per_rank_and_follow_the_documented_seed():
    """Batch t of rank r is degraded with make_generator(seed, 1000 + r, t): the same HR batch
    gives other LRs on another rank, and exactly those of a Degrader called with that generator."""
    from degsr.degradation.pipeline import Degrader
    from degsr.seeding import make_generator

    hr = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, CROP, CROP), np.uint8))
    cfg = DegradationConfig(blur_label="params", noise_label="params")  # the LR only: no probes
    lrs = {}
    for rank in (0, 1):
        dm = SRDataModule(data_cfg(), cfg, seed=3)
        dm.trainer = fake_trainer(rank=rank, world_size=1)
        raw = {"hr": hr, "keys": ["a", "b"], "n_bad": torch.tensor(0), "n_small": torch.tensor(0),
               "n_read": torch.tensor(2)}
        out = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)  # batch t = 0
        want = Degrader(cfg)(hr.float() / 255, make_generator(3, 1000 + rank, 0))
        assert torch.equal(out["lr"], want["lr"])
        lrs[rank] = out["lr"]
    assert not torch.equal(lrs[0], lrs[1])


def test_bad_fraction_at_the_ceiling_is_allowed():
    """'above max_bad_fraction' stops training: exactly at it does not, one more bad sample
    does; nothing is checked before min_samples_for_bad_check samples were read."""
    dm = SRDataModule(data_cfg(min_samples_for_bad_check=100, max_bad_fraction=0.25),
                      DegradationConfig())
    dm.check_quality(100, 25)
    dm.check_quality(99, 99)
    with pytest.raises(UserError, match="max_bad_fraction=0.25"):
        dm.check_quality(100, 26)
    with pytest.raises(UserError, match="max_bad_fraction=0.25"):
        dm.check_quality(100, 100)


def test_validation_crops_cycle_over_the_images_unflipped():
    """The fixed synthetic set: crop i is an unmirrored window of image i % len(images) (pixels
    encode their image, row and column, so a mirrored crop reads right to left)."""
    from degsr.data.validation import val_crops

    imgs = []
    for k, (h, w) in enumerate(((70, 90), (80, 66))):
        img = np.full((h, w, 3), k, np.uint8)
        img[..., 0], img[..., 1] = np.arange(h)[:, None], np.arange(w)[None, :]
        imgs.append(img)
    crops = val_crops([(im, lambda im=im: im) for im in imgs], 16, 64).permute(0, 2, 3, 1).numpy()
    for i, c in enumerate(crops):
        top, left = int(c[0, 0, 0]), int(c[0, 0, 1])
        assert np.array_equal(c, imgs[i % 2][top:top + 64, left:left + 64]), i


def test_validation_folder_images_are_taken_in_sorted_order(tmp_path):
    """val_folder: the first val_crops images in sorted path order (not directory order)."""
    from degsr.data.validation import _images_from_folder

    for name, value in (("b.png", 20), ("a.png", 10), ("sub/c.png", 30), ("0.png", 5)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _save(np.full((8, 8, 3), value, np.uint8), tmp_path / name)
    got = [int(im[0, 0, 0]) for im, _ in _images_from_folder(str(tmp_path), 3)]
    assert got == [5, 10, 20]  # 0.png, a.png, b.png; sub/c.png is fourth


@pytest.mark.parametrize("usm", [False, True])
def test_synthetic_val_chunks_each_take_their_own_generator(usm):
    """Crops are degraded in chunks of DEGRADE_CHUNK, chunk c with make_generator(VAL_SEED, c)
    (a plain Degrader call per chunk here): later chunks do not repeat the first one's draws.
    Every item is that call's output: hr, the target gt (the USM-sharpened hr under
    usm_sharpen, else hr itself), lr, lr_up, scores and clean."""
    from degsr.data.validation import DEGRADE_CHUNK, VAL_SEED
    from degsr.degradation.pipeline import Degrader
    from degsr.seeding import make_generator

    n = DEGRADE_CHUNK + 2
    hr = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (n, 3, 32, 32), np.uint8))
    cfg = DegradationConfig(blur_label="params", noise_label="params",  # the LR only: no probes
                            usm_sharpen=usm)
    items = _val_items(SyntheticValSet(hr, cfg))
    deg = Degrader(cfg)
    for c, start in enumerate(range(0, n, DEGRADE_CHUNK)):
        chunk = hr[start:start + DEGRADE_CHUNK].float() / 255
        want = deg(chunk, make_generator(VAL_SEED, c))
        want["hr"] = chunk
        for k in ("hr", "gt", "lr", "lr_up", "scores", "clean"):
            assert torch.equal(items[k][start:start + DEGRADE_CHUNK], want[k]), (c, k)
    assert torch.equal(items["gt"], items["hr"]) != usm  # sharpened: the target is not hr


def test_another_tools_shards_are_read_by_their_last_extension(tmp_path):
    """Shards packed by hand or another tool: a key with dots (``img.v2.jpg`` is sample ``img``,
    member ``v2.jpg`` in webdataset), TIFF and BMP members, an uppercase extension in a nested
    folder all train; a sample with two images and no bare one is bad, saying why."""
    def enc(fmt):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 80, 3), np.uint8)).save(
            buf, format=fmt)
        return buf.getvalue()

    tar = _tar(tmp_path / "other.tar", [("img", {"v2.jpg": enc("JPEG")}),
                                        ("scan", {"tif": enc("TIFF"), "txt": b"x"}),
                                        ("old", {"bmp": enc("BMP")}),
                                        ("set1/astro", {"JPG": enc("JPEG")}),
                                        ("pair", {"hr.png": enc("PNG"), "lr.png": enc("PNG")})])
    from degsr.data.samples import decode_image
    samples = dict(read_shard(str(tar)))
    for key in ("img", "scan", "old", "set1/astro"):
        assert decode_image(samples[key]).shape == (70, 80, 3), key
    with pytest.raises(ValueError, match=r"2 image members \(hr.png, lr.png\)"):
        decode_image(samples["pair"])
    keys = {k for b in stream([tar], batches_per_epoch=6) for k in b["keys"]}
    assert keys == {"img", "scan", "old", "set1/astro"}


def test_a_folder_of_gzipped_shards_is_read(tmp_path):
    """A folder of another tool's gzipped shards (``.tar.gz``, ``.tgz``, no index.json) is its
    set, as a folder of ``.tar`` is, and the stream reads them."""
    d = tmp_path / "gz"
    d.mkdir()
    img = _png(np.random.default_rng(1).integers(0, 256, (70, 80, 3), np.uint8))
    for name in ("a.tar.gz", "b.tgz"):
        with tarfile.open(d / name, "w:gz") as tar:
            info = tarfile.TarInfo(f"{name[0]}0.png")
            info.size = len(img)
            tar.addfile(info, io.BytesIO(img))
    urls = expand_shard_pattern(str(d))
    assert urls == [str(d / "a.tar.gz"), str(d / "b.tgz")]
    assert {k for b in stream(urls, batches_per_epoch=6) for k in b["keys"]} == {"a0", "b0"}


def test_remote_shards_are_streamed_through_webdataset_gopen(shards, bad_shards, tmp_path):
    """``pipe:CMD`` (and https://) shards are read as streams: braces expanded, the samples the
    file gives, a shard cut short is still damaged (no end marker: checked on the stream), a
    sample left early closes the command quietly; s3:// says how to stream it. All were 'no
    shard files match' before."""
    local = expand_shard_pattern(str(shards))[:2]
    urls = expand_shard_pattern(f"pipe:cat {shards}/train-{{000000..000001}}.tar")
    assert urls == [f"pipe:cat {u}" for u in local]
    assert [k for k, _ in read_shard(urls[0])] == [k for k, _ in read_shard(local[0])]
    got = {k for b in stream(urls, batches_per_epoch=3) for k in b["keys"]}
    assert got <= {k for u in local for k, _ in read_shard(u)} and got
    with pytest.raises(tarfile.ReadError):
        list(read_shard(f"pipe:cat {bad_shards['truncated']}"))
    samples = read_shard(urls[1])
    next(samples)
    samples.close()  # left early: the command's SIGPIPE is not an error
    with pytest.raises(UserError, match=r"s3:// shards are not read directly.*pipe:aws s3 cp"):
        expand_shard_pattern("s3://bucket/train-{000..009}.tar")
