"""``degsr bench infer``: bare one-step SD-Turbo vs ours (merged degradation-guided LoRA + CFG)
vs ours unmerged, ms per image at each size, batch throughput at 512², peak memory (random
weights of the real architecture: cost, not quality)."""

from __future__ import annotations

import torch

from degsr.bench import device_name, time_calls


def add_arguments(p) -> None:
    p.add_argument("--arch", choices=["tiny", "sd-turbo"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="512,1024", help="output sizes (square), comma separated")
    p.add_argument("--batch", type=int, default=16, help="batch for the throughput figure at 512²")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (both paths)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object (default: too)")


def run(args) -> dict:
    from degsr.inference.upscale import DTYPES, Upscaler, UpscaleOptions
    from degsr.sr.components import load_components
    from degsr.sr.config import LoraConfig, ModelConfig
    from degsr.sr.model import SRModel
    from degsr.sr.onestep import one_step_sr

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[precision]
    model_cfg = ModelConfig(arch=args.arch)
    bare = load_components(model_cfg, device=device, dtype=dtype)
    net = SRModel(model_cfg, LoraConfig(), device=device, dtype=dtype)
    with torch.no_grad():  # a non-trivial adapter (cost is the same, outputs differ from bare)
        for p in net.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    net.eval().requires_grad_(False)
    if args.compile:
        bare.unet = torch.compile(bare.unet)
    ours = Upscaler(net, {"scale": 4}, compile=args.compile)
    unmerged = Upscaler(net, {"scale": 4}, merge=False)
    opts = UpscaleOptions(blur=0.3, noise=0.3, tile=10 ** 6)  # no tiling: the images fit
    d = torch.tensor([[0.3, 0.3]], device=device)  # the batch figure's shared vector
    result = {"bench": "infer", "arch": args.arch, "precision": precision, "compile": args.compile,
              "device": device_name(device), "ms_per_image": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for size in [int(s) for s in args.sizes.split(",")]:
        lr = torch.rand(1, 3, size // 4, size // 4, device=device)
        x = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1
        with torch.no_grad():
            t_bare = time_calls(lambda: one_step_sr(bare, x), device, args.iters)
            t_ours = time_calls(lambda: ours(lr, opts), device, args.iters)
            t_unmerged = time_calls(lambda: unmerged(lr, opts), device, args.iters)
        result["ms_per_image"][str(size)] = {"bare": round(1e3 * t_bare, 2), "ours": round(1e3 * t_ours, 2),
                                             "ours_unmerged": round(1e3 * t_unmerged, 2)}
        if size == 512:
            result["ratio_ours_over_bare"] = round(t_ours / t_bare, 3)
    xb = torch.rand(args.batch, 3, 512, 512, device=device, dtype=dtype) * 2 - 1
    db = d.expand(args.batch, -1)
    with torch.no_grad():
        t_bare_b = time_calls(lambda: one_step_sr(bare, xb), device, max(1, args.iters // 2))
        t_ours_b = time_calls(lambda: net(xb, db, guidance_scale=1.07), device, max(1, args.iters // 2))
    result["batch_512"] = {"batch": args.batch, "bare_img_per_s": round(args.batch / t_bare_b, 2),
                           "ours_unmerged_cfg_img_per_s": round(args.batch / t_ours_b, 2)}
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return result
