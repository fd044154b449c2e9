"""``degsr bench degradation``: the batched pipeline vs the same operations one image at a time."""

from __future__ import annotations

import torch

from degsr.bench import at_least, device_name, time_calls
from degsr.config import load_config
from degsr.degradation.pipeline import Degrader
from degsr.io import preset_path
from degsr.seeding import make_generator


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=["s3diff", "realesrgan"], default="s3diff")
    p.add_argument("--size", type=at_least(1), default=512, help="HR crop size")
    p.add_argument("--batch", type=at_least(1), default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=at_least(1), default=5, help="timed iterations (median reported)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables of the batched call to stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: too)")


def run(args) -> dict:
    device = torch.device(args.device)
    degrader = Degrader(load_config([preset_path(args.preset)]).degradation)
    hr = _photo_batch(args.batch, args.size).to(device)
    g = make_generator(0, device=device)

    def batched():
        with torch.no_grad():
            degrader(hr, g)

    def per_image():
        with torch.no_grad():
            for i in range(hr.shape[0]):
                degrader(hr[i:i + 1], g)

    t_batch = time_calls(batched, device, args.iters)
    if args.profile:
        profile_tables(batched, device, args.iters)
    t_single = time_calls(per_image, device, max(1, args.iters // 2))
    return {"bench": "degradation", "preset": args.preset, "size": args.size, "batch": args.batch,
            "img_per_s": round(args.batch / t_batch, 2),
            "per_image_img_per_s": round(args.batch / t_single, 2),
            "speedup": round(t_single / t_batch, 2), "device": device_name(device),
            "torch": torch.__version__}


def _photo_batch(n: int, size: int) -> torch.Tensor:
    """Crops of a real photo (content does not change the cost, but keeps JPEG/noise realistic)."""
    import skimage.data

    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255.0
    reps = -(-size // img.shape[1]) + 1
    img = img.repeat(1, reps, reps)
    g = torch.Generator().manual_seed(0)
    ys = torch.randint(0, img.shape[1] - size + 1, (n,), generator=g)
    xs = torch.randint(0, img.shape[2] - size + 1, (n,), generator=g)
    return torch.stack([img[:, y:y + size, x:x + size] for y, x in zip(ys.tolist(), xs.tolist())])


def profile_tables(fn, device: torch.device, iters: int) -> None:
    """torch.profiler over ``iters`` calls of ``fn``: the top operators by device time (by CPU
    time on the CPU) and, on accelerators, by host time (launches and syncs show there)."""
    import sys

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    table = prof.key_averages()
    keys = (["self_cuda_time_total", "self_cpu_time_total"] if device.type == "cuda"
            else ["self_cpu_time_total"])
    for key in keys:
        print(f"== profile of {iters} batched calls, by {key}", file=sys.stderr)
        print(table.table(sort_by=key, row_limit=30, max_name_column_width=60), file=sys.stderr)
