"""``degsr sr``: upscale images with a trained adapter on a base SD-Turbo folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from degsr import console
from degsr.cli import user_device
from degsr.errors import UserError, each_fitting

NAME = "sr"
HELP = "super-resolve images with a stage-2 adapter (one diffusion step, merged LoRA, CFG)"


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--adapter", required=True, help="stage-2 export (folder with adapter.json)")
    p.add_argument("--pretrained", default=None, help="base SD-Turbo diffusers folder (default: "
                   "the adapter's random arch, for tests only)")
    p.add_argument("--out", required=True, help="output folder: <stem>.png per input")
    p.add_argument("--estimator", default=None, help="stage-1 export (default: the adapter's)")
    p.add_argument("--scale", type=int, default=None, help="must match the adapter's (default)")
    p.add_argument("--guidance", type=float, default=1.07, help="CFG scale (1 = positive only; default: %(default)s)")
    p.add_argument("--blur", type=float, default=None, help="override the estimated blur score "
                   "(0..1): the fidelity <-> generation dial")
    p.add_argument("--noise", type=float, default=None, help="override the estimated noise score")
    p.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet",
                   help="colour correction of the output towards the LR (default: %(default)s)")
    p.add_argument("--tile", type=int, default=96, help="latent tile size (latent pixels; default: %(default)s)")
    p.add_argument("--tile-overlap", type=int, default=32, help="latent tile overlap (default: %(default)s)")
    p.add_argument("--vae-tile", type=int, default=1024, metavar="PX",
                   help="VAE encoder/decoder tile side in output pixels, a multiple of 64 "
                   "(overlap a quarter of it; smaller: less memory; default: %(default)s)")
    p.add_argument("--batch", type=int, default=1,
                   help="images of the same size per call (default 1: the LoRA merged per image; "
                        "B > 1 runs it unmerged with per-sample modulation unless --blur and "
                        "--noise are both given)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")


def _check(args) -> None:
    for name in ("blur", "noise"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 1:
            raise UserError(f"--{name} must be in [0, 1], got {v}")
    if args.tile < 8 or not 0 <= args.tile_overlap < args.tile:
        raise UserError(f"--tile {args.tile} / --tile-overlap {args.tile_overlap}: need tile >= 8 "
                        f"and 0 <= overlap < tile")
    if args.vae_tile < 128 or args.vae_tile % 64:
        raise UserError(f"--vae-tile must be a multiple of 64 and >= 128, got {args.vae_tile}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")


def run(args) -> int:
    from degsr.inference.upscale import Upscaler, UpscaleOptions
    from degsr.io import (expand_inputs, make_out_folder, output_style, output_targets,
                          read_image, save_png, written_by_degsr)
    from degsr.sr.model import read_adapter_meta

    _check(args)
    scale = int(read_adapter_meta(args.adapter)[1].get("scale", 4))  # Upscaler's, read cheaply:
    if args.scale is not None and args.scale != scale:  # before --out is made and the model loads
        raise UserError(f"--scale {args.scale} does not match the adapter's scale {scale}")
    out = Path(args.out)
    make_out_folder(out)
    device = user_device(args.device)
    paths, problems = expand_inputs(args.inputs, out)
    jobs, clashes = output_targets(paths, out)
    problems.extend(clashes)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    up = Upscaler.load(args.adapter, args.pretrained, args.estimator, device, precision,
                       args.compile)
    opts = UpscaleOptions(guidance=args.guidance, blur=args.blur, noise=args.noise,
                          color_fix=args.color_fix, tile=args.tile, tile_overlap=args.tile_overlap,
                          vae_tile=args.vae_tile)
    up.check(opts)
    done = skipped = 0
    pending: dict[tuple, list] = {}  # image size -> [(path, target, lr, alpha)], up to --batch

    def upscale(group) -> None:
        nonlocal done
        try:
            sr, d = up(torch.cat([lr for _, _, lr, _ in group]), opts)
        except UserError as e:
            problems.extend(f"{path}: {e}" for path, _, _, _ in group)
            return
        for (path, target, _, alpha), img, dv in zip(group, sr, d.tolist()):
            if alpha is not None:  # transparency: upscaled bicubic, beside the model's RGB
                alpha = F.interpolate(alpha, size=img.shape[-2:], mode="bicubic", align_corners=False)
                img = torch.cat([img, alpha[0].clamp(0, 1).to(img)])
            try:
                gray, icc = output_style(path)  # the input's channels and colour space
                save_png(img, target, icc, gray=gray)
            except OSError as e:  # the folder is broken for every output: stop here
                raise UserError(f"--out {out}: cannot write {target.name} ({e.strerror or e})")
            done += 1
            console.log.debug(json.dumps({"path": str(path), "blur": round(dv[0], 4),
                                          "noise": round(dv[1], 4)}))

    def flush(size) -> None:
        each_fitting(pending.pop(size), upscale, lambda item, msg: problems.append(
            f"{item[0]}: {msg} upscaling {size[1]}x{size[0]} on {device} (try a smaller --tile or "
            "--vae-tile, --precision bf16 or another --device)"))

    try:
        for path, target in console.progress(jobs, desc="sr", unit="img"):
            if target.exists() or target.is_symlink():
                if not written_by_degsr(target):
                    problems.append(f"{path}: {target} exists and is not a degsr output: left as "
                                    "it is (move it or choose another --out)")
                    continue
                if not args.overwrite:
                    skipped += 1
                    continue
            try:
                rgb, alpha = read_image(path, alpha=True)
            except UserError as e:
                problems.append(str(e))
                continue
            lr = rgb.float()[None] / 255.0
            alpha = None if alpha is None else alpha.float()[None] / 255.0
            size = tuple(lr.shape[-2:])
            pending.setdefault(size, []).append((path, target, lr, alpha))
            if len(pending[size]) == args.batch:
                flush(size)
            elif sum(map(len, pending.values())) > 2 * args.batch:
                flush(next(iter(pending)))  # many sizes: the oldest partial batch, memory bound
        for size in list(pending):  # the partial batches left over
            flush(size)
    finally:  # also on an error or an interrupt: what failed so far
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
    console.log.info(f"{done} written, {skipped} already there, {len(problems)} failed -> {out}")
    return 1 if problems else 0
