"""``degsr bench degradation``: the batched pipeline vs the same operations one image at a time."""

from __future__ import annotations

import time

import torch

from degsr.bench import at_least, device_name, sync
from degsr.config import load_config
from degsr.degradation.pipeline import Degrader
from degsr.io import preset_path
from degsr.seeding import make_generator


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=["s3diff", "realesrgan"], default="s3diff")
    p.add_argument("--size", type=at_least(1), default=512, help="HR crop size")
    p.add_argument("--batch", type=at_least(1), default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=at_least(1), default=5,
                   help="timed rounds, each a new draw of the batch's parameters, the same for "
                   "both paths (after one warm-up round)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables of the batched call to stderr")


def run(args) -> dict:
    device = torch.device(args.device)
    degrader = Degrader(load_config([preset_path(args.preset)]).degradation)
    hr = _photo_batch(args.batch, args.size).to(device)
    seconds = {"batched": 0.0, "per_image": 0.0}
    # both paths render the same draws (round i: seed i), so the ratio compares the same pixel
    # work: a draw's resize factors change a call's cost several times over. The per-image path
    # draws its own parameters one image at a time (the cost of drawing) and renders row j of
    # the batch's draw.
    for i in range(args.iters + 1):  # round 0: warm-up, not counted
        rows = [_row(degrader.sample(args.batch, make_generator(i, device=device)), j)
                for j in range(args.batch)]
        for name in ("batched", "per_image"):
            g, scratch = make_generator(i, device=device), make_generator(i, device=device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "batched":
                    degrader(hr, g)
                else:
                    for j in range(args.batch):
                        degrader.sample(1, scratch)
                        degrader.apply(hr[j:j + 1], rows[j], g)
            sync(device)
            seconds[name] += (time.perf_counter() - t0) * (i > 0)
    if args.profile:
        profile_tables(lambda: degrader(hr, make_generator(0, device=device)), device, args.iters)
    n = args.batch * args.iters
    return {"bench": "degradation", "preset": args.preset, "size": args.size, "batch": args.batch,
            "img_per_s": round(n / seconds["batched"], 2),
            "per_image_img_per_s": round(n / seconds["per_image"], 2),
            "speedup": round(seconds["per_image"] / seconds["batched"], 2),
            "device": device_name(device), "torch": torch.__version__}


def _row(draw: dict, j: int) -> dict:
    """Sample ``j`` of a draw, as a draw of one."""
    return {part: {k: v[j:j + 1] for k, v in draw[part].items()} for part in ("params", "kernels")}


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
