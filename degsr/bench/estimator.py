"""``degsr bench estimator``: a stage-1 training step (img/s), degradation on the device included.

One step is what ``degsr fit`` does per batch: the engine degrades a batch of HR crops on the
training device, each ``data.degradations_per_crop`` times (the DataModule's
``on_after_batch_transfer``), the estimator's weighted objective is computed, backward, AdamW
step. ``train_only_img_per_s`` repeats the step on one already degraded
batch: the figure ``data.echo`` approaches when each degraded batch is reused E times.
"""

from __future__ import annotations

import time

import torch

from degsr.bench import at_least, device_name, sync


def add_arguments(p) -> None:
    p.add_argument("--config", choices=["estimator", "estimator_tiny"], default="estimator",
                   help="network and preset (full: 2.35 M parameters)")
    p.add_argument("--objective", choices=["supervised", "ranking", "both"], default="supervised")
    p.add_argument("--batch", type=at_least(1), default=32)
    p.add_argument("--size", type=at_least(1), default=None, help="HR crop (default: the config's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--steps", type=at_least(1), default=5, help="timed steps (after 2 warm-up)")


def run(args) -> dict:
    from degsr.bench.degradation import _photo_batch
    from degsr.config import load_config
    from degsr.data.module import degrade_crops
    from degsr.errors import UserError
    from degsr.estimator.module import EstimatorModule
    from degsr.io import CONFIG_DIR
    from degsr.seeding import make_generator

    device = torch.device(args.device)
    cfg = load_config([CONFIG_DIR / f"{args.config}.yaml"], [f"estimator.objective={args.objective}"])
    size = args.size or cfg.data.crop_size
    per = cfg.data.degradations_per_crop
    if args.batch % per:
        raise UserError(f"--batch {args.batch}: must be a positive multiple of the config's "
                        f"data.degradations_per_crop ({per})")
    module = EstimatorModule(cfg.estimator, cfg.degradation).to(device)
    opt = module.configure_optimizers()["optimizer"]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    g = make_generator(0, device=device)
    hr = _photo_batch(args.batch // per, size).to(device)

    def train(batch):
        with autocast:
            loss, _ = module.objective(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def degrade():
        with torch.no_grad():
            return degrade_crops(module.degrader, hr, per, g)

    def full_step():
        train(degrade())

    fixed = degrade()
    times = {}
    for name, fn in (("step", full_step), ("train_only", lambda: train(fixed))):
        for _ in range(2):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        times[name] = (time.perf_counter() - t0) / args.steps
    params = sum(p.numel() for p in module.net.parameters())
    return {"bench": "estimator", "config": args.config, "objective": args.objective,
            "batch": args.batch, "size": size, "precision": precision,
            "img_per_s": round(args.batch / times["step"], 2), "step_s": round(times["step"], 4),
            "train_only_img_per_s": round(args.batch / times["train_only"], 2),
            "params": params, "device": device_name(device), "torch": torch.__version__}
