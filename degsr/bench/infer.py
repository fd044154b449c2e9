"""``degsr bench infer``: bare one-step SD-Turbo vs ours (merged degradation-guided LoRA + CFG)
vs ours unmerged, ms per image at each size, batch throughput at 512², tiled large output and
peak memory (random weights of the real architecture: cost, not quality)."""

from __future__ import annotations

import torch

from degsr.bench import at_least, device_name, gib, time_rounds
from degsr.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("--arch", choices=["tiny", "sd-turbo"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="512,1024", help="output sizes (square), comma separated")
    p.add_argument("--batch", type=at_least(0), default=16, help="batch for the throughput figure at 512² (0: skip)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights' dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet, VAE encoder and decoder (both paths)")
    p.add_argument("--tiled", type=at_least(0), default=0,
                   help="also time one output of this size, tiled as `degsr sr` tiles (0, the "
                   "default: skip)")
    p.add_argument("--mem-cap-gib", type=gib, default=0,
                   help="cap this process's accelerator memory (e.g. 24: a 24 GB card); 0: none")
    p.add_argument("--iters", type=at_least(1), default=7, help="timed rounds (median reported)")


def run(args) -> dict:
    from degsr.inference.upscale import DTYPES, Upscaler, UpscaleOptions, compile_parts
    from degsr.sr.components import load_components
    from degsr.sr.config import LoraConfig, ModelConfig
    from degsr.sr.model import SRModel
    from degsr.sr.onestep import one_step_sr

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 8 or s % 8 for s in sizes):  # the bare model's VAE halves it 3 times
        raise UserError(f"--sizes {args.sizes}: give output sizes that are multiples of 8, "
                        "e.g. 512,1024")
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[precision]
    if args.mem_cap_gib and device.type != "cuda":  # it would be ignored, and the JSON look capped
        raise UserError(f"--mem-cap-gib caps CUDA memory; on --device {args.device} it has no "
                        "effect: leave it out")
    if args.mem_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(  # on --device's GPU (cuda:1: not GPU 0)
            min(1.0, args.mem_cap_gib * 2 ** 30 / total),
            torch.cuda.current_device() if device.index is None else device.index)
    model_cfg = ModelConfig(arch=args.arch)
    bare = load_components(model_cfg, device=device, dtype=dtype)
    net = SRModel(model_cfg, LoraConfig(), device=device, dtype=dtype)
    with torch.no_grad():  # a non-trivial adapter (cost is the same, outputs differ from bare)
        for p in net.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    net.eval().requires_grad_(False)
    if args.compile:
        compile_parts(bare)
    ours = Upscaler(net, {"scale": 4}, compile=args.compile)
    unmerged = Upscaler(net, {"scale": 4}, merge=False)
    opts = UpscaleOptions(blur=0.3, noise=0.3, tile=10 ** 6, vae_tile=10 ** 6)  # the images fit
    other = UpscaleOptions(blur=0.31, noise=0.3, tile=10 ** 6, vae_tile=10 ** 6)
    flip = [opts, other]

    def refold(lr):  # a new vector every call (estimated degradations): refold each time
        flip.reverse()
        return ours(lr, flip[0])

    warmup = 3 if args.compile else 1  # compiled graphs settle over the first calls
    result = {"bench": "infer", "arch": args.arch, "precision": precision, "compile": args.compile,
              "device": device_name(device), "torch": torch.__version__,
              "timing": f"each variant: median of {args.iters} rounds interleaved with bare, "
                        f"after {warmup} warm-up calls",
              "ms_per_image": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for size in sizes:
        lr = torch.rand(1, 3, size // 4, size // 4, device=device)
        x = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1
        run_bare = lambda: one_step_sr(bare, x)  # noqa: E731
        variants = {"ours": lambda: ours(lr, opts), "ours_refold": lambda: refold(lr)}
        if not args.compile:  # compiled, the unmerged path would be a third set of graphs
            variants["ours_unmerged"] = lambda: unmerged(lr, opts)
        t, bare_by = {}, {}  # each variant interleaved with bare alone (they share the fold state)
        with torch.no_grad():
            for name, fn in variants.items():
                got = time_rounds({"bare": run_bare, name: fn}, device, args.iters, warmup)
                t[name], bare_by[name] = got[name], got["bare"]
        t_bare, t_ours, t_refold, t_unmerged = (bare_by["ours"], t["ours"], t["ours_refold"],
                                                t.get("ours_unmerged"))
        result["ms_per_image"][str(size)] = {
            "bare": round(1e3 * t_bare, 2), "ours": round(1e3 * t_ours, 2),
            "ours_refold": round(1e3 * t_refold, 2),
            "ours_unmerged": None if t_unmerged is None else round(1e3 * t_unmerged, 2)}
        if size == 512:
            result["ratio_ours_over_bare"] = round(t_ours / t_bare, 3)
            result["ratio_refold_over_bare"] = round(t_refold / bare_by["ours_refold"], 3)
    if args.batch:
        n = args.batch
        xb = torch.rand(n, 3, 512, 512, device=device, dtype=dtype) * 2 - 1
        lrb = torch.rand(n, 3, 128, 128, device=device)
        db = torch.tensor([[0.3, 0.3]], device=device).expand(n, -1)
        iters = max(1, args.iters // 2)
        with torch.no_grad():
            tb = time_rounds({"bare": lambda: one_step_sr(bare, xb), "ours": lambda: ours(lrb, opts)},
                             device, iters, warmup)
            t_bare_b, t_ours_b = tb["bare"], tb["ours"]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                t_unm_b = None if args.compile else time_rounds(  # as in training: autocast
                    {"unm": lambda: net(xb, db, guidance_scale=1.07)}, device, iters)["unm"]
        result["batch_512"] = {"batch": n, "bare_img_per_s": round(n / t_bare_b, 2),
                               "ours_img_per_s": round(n / t_ours_b, 2),
                               "ours_unmerged_cfg_img_per_s": t_unm_b and round(n / t_unm_b, 2)}
    if args.tiled:
        lr = torch.rand(1, 3, args.tiled // 4, args.tiled // 4, device=device)
        tiled = UpscaleOptions(blur=0.3, noise=0.3)  # the defaults of degsr sr
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            t = time_rounds({"tiled": lambda: ours(lr, tiled)}, device, 1)["tiled"]
        result["tiled"] = {"size": args.tiled, "tile": tiled.tile, "tile_overlap": tiled.tile_overlap,
                           "vae_tile": tiled.vae_tile, "s_per_image": round(t, 2)}
        if device.type == "cuda":
            result["tiled"]["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
            result["tiled"]["mem_cap_gib"] = args.mem_cap_gib or None
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return result
