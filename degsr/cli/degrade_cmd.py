"""``degsr degrade``: random crops of images, degraded by a preset, written as HR/LQ pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from degsr import console
from degsr.cli import user_device
from degsr.errors import UserError

NAME = "degrade"
HELP = "write degraded HR/LR pairs from random crops of images (with every sampled parameter)"


def add_arguments(p) -> None:
    p.add_argument("items", nargs="+", metavar="IMAGE",
                   help="image files, folders or globs; items with '=' are config overrides, "
                        "e.g. degradation.final_sinc_prob=0")
    p.add_argument("--preset", choices=["s3diff", "realesrgan"], default="s3diff",
                   help="degradation preset (configs/degradation/<preset>.yaml; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of crops and degradations (default: %(default)s)")
    p.add_argument("--n-per-image", type=int, default=1, metavar="K", help="crops per image (default: %(default)s)")
    p.add_argument("--crop", type=int, default=512, help="HR crop size (smaller images are "
                   "reflect-padded; default: %(default)s)")
    p.add_argument("--scale", type=int, default=4, help="HR size / LR size (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...; default: %(default)s)")


def random_crops(img: torch.Tensor, k: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(k, 3, size, size) crops at random positions; images smaller than ``size`` are reflect-padded."""
    from degsr.data.stream import random_crop, reflect_pad

    arr = reflect_pad(img.permute(1, 2, 0).numpy(), size)
    crops = [random_crop(arr, size, g, flip=False) for _ in range(k)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def _plain(key: str, v: torch.Tensor):
    """A parameter as JSON: modes and kernel types by name, flags as bools, sizes as ints."""
    from degsr.degradation.kernels import KERNEL_TYPES
    from degsr.degradation.resize import RESIZE_MODES

    if v.dtype == torch.bool:
        return bool(v)
    if key.endswith("_mode"):
        return RESIZE_MODES[int(v)]
    if key.endswith("_kernel_type"):
        return KERNEL_TYPES[int(v)]
    if key.endswith("_kind"):
        return ("up", "down", "keep")[int(v)]
    return int(v) if not v.is_floating_point() else round(float(v), 6)


def params_record(stem: str, scores: torch.Tensor, params: dict, i: int) -> dict:
    vals = {k: _plain(k, v[i]) for k, v in params.items()}
    return {"stem": stem, "scores": {"blur": round(float(scores[i, 0]), 6),
                                     "noise": round(float(scores[i, 1]), 6)}, "params": vals}


def earlier_stems(out: Path) -> list[str]:
    """The pair stems an earlier run's ``out/params.jsonl`` lists ([] when none is readable)."""
    try:
        lines = (out / "params.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    stems = []
    for line in lines:
        try:
            stem = json.loads(line).get("stem")
        except (ValueError, AttributeError):
            continue
        if isinstance(stem, str) and stem and "/" not in stem and stem not in (".", ".."):
            stems.append(stem)
    return stems


def remove_stale_pairs(out: Path, stems: list[str], kept: set[str]) -> int:
    """Delete the pairs of an earlier run into ``out`` that this run did not rewrite (a rerun
    with fewer images or a smaller --n-per-image): params.jsonl lists only this run's pairs, and
    a consumer globbing ``*_lq.png`` must not find pairs it describes no more. Only files the
    earlier params.jsonl names and that degsr wrote go. Returns the pairs removed."""
    from degsr.io import written_by_degsr

    removed = 0
    for stem in dict.fromkeys(s for s in stems if s not in kept):
        files = [f for f in (out / f"{stem}_hr.png", out / f"{stem}_lq.png")
                 if f.is_file() and written_by_degsr(f)]
        for f in files:
            f.unlink()
        removed += bool(files)
    return removed


def run(args) -> int:
    from degsr.config import load_config
    from degsr.degradation.pipeline import Degrader
    from degsr.cli.config_cmd import split_items
    from degsr.io import (atomic_write_bytes, expand_inputs, make_out_folder, output_targets,
                          preset_path, read_image, save_png)
    from degsr.seeding import make_generator

    images, overrides = split_items(args.items)  # as degsr fit / config: '=' makes an override
    if not images:
        raise UserError("no IMAGE given (only key=value overrides)")
    for flag, value, low in (("--n-per-image", args.n_per_image, 1), ("--scale", args.scale, 1),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.crop < args.scale or args.crop % args.scale:
        raise UserError(f"--crop {args.crop} must be a positive multiple of --scale {args.scale}")
    # Only the degradation section is used; the data crop sizes are set to a multiple of the
    # scale because the config's cross-check wants one (the default 512 made --scale 3 fail).
    sizes = [f"data.{k}={128 * args.scale}" for k in ("crop_size", "val_crop_size")]
    cfg = load_config([preset_path(args.preset)],
                      [f"degradation.scale={args.scale}", *sizes, *overrides]).degradation
    device = user_device(args.device)  # before the folder: a bad --device leaves no empty --out
    out = Path(args.out)
    make_out_folder(out)

    paths, problems = expand_inputs(images, out)
    jobs, clashes = output_targets(paths, out, suffix="")  # outputs: <stem>_<k>_{hr,lq}.png
    problems.extend(clashes)
    degrader = Degrader(cfg)
    crop_gen = make_generator(args.seed, 0)
    deg_gen = make_generator(args.seed, 1, device=device)
    earlier = earlier_stems(out)
    records = []
    for path, _ in console.progress(jobs, desc="degrade", unit="img"):
        try:
            img = read_image(path)
        except UserError as e:
            problems.append(str(e))
            continue
        crops = random_crops(img, args.n_per_image, args.crop, crop_gen)
        with torch.no_grad():
            batch = degrader(crops.to(device).float() / 255.0, deg_gen)
        if not records:  # the old params.jsonl describes pairs this run starts to replace
            (out / "params.jsonl").unlink(missing_ok=True)
        for k in range(args.n_per_image):
            stem = f"{path.stem}_{k}"
            save_png(batch["hr"][k], out / f"{stem}_hr.png")
            save_png(batch["lr"][k], out / f"{stem}_lq.png")
            records.append(params_record(stem, batch["scores"], batch["params"], k))
    if records or not earlier:  # a rerun that wrote nothing leaves the earlier run whole
        atomic_write_bytes(out / "params.jsonl",
                           "".join(json.dumps(r) + "\n" for r in records).encode())
        stale = remove_stale_pairs(out, earlier, {r["stem"] for r in records})
        if stale:
            console.log.info(f"removed {stale} pair(s) of an earlier run not written this time")
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    console.log.info(f"wrote {len(records)} pairs to {out}"
                     + (f"; {len(problems)} input(s) failed" if problems else ""))
    return 1 if problems else 0
