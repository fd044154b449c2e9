"""``degsr bench train``: stage-2 training throughput (img/s) and peak memory, random weights.

The full step of the reference recipe: degradation-guided LoRA forward with online negatives,
2·MSE + 5·LPIPS + 0.5·GAN, generator backward + AdamW step, discriminator step. LPIPS and the
critic use random weights of their real architectures (VGG16, DINO ViT-B/16 for sd-turbo).
"""

from __future__ import annotations

import resource
import time

import torch

from degsr.bench import at_least, device_name, sync


def add_arguments(p) -> None:
    p.add_argument("--arch", choices=["tiny", "sd-turbo"], default="tiny")
    p.add_argument("--batch", type=at_least(1), default=4)
    p.add_argument("--size", type=at_least(1), default=None, help="HR crop (default 512; tiny: 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--steps", type=at_least(1), default=5, help="timed steps (after 2 warm-up)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="unet,vae_encoder,vae_decoder",
                   default="", metavar="PARTS",
                   help="checkpoint these parts (comma list of unet, vae_encoder, vae_decoder; "
                        "the flag alone: all three; default: none)")


def run(args) -> dict:
    from degsr.config import load_config
    from degsr.degradation.pipeline import Degrader
    from degsr.io import CONFIG_DIR
    from degsr.metrics.lpips import LPIPS
    from degsr.seeding import make_generator
    from degsr.sr.module import SRModule

    device = torch.device(args.device)
    size = args.size or (64 if args.arch == "tiny" else 512)
    disc_arch = "tiny" if args.arch == "tiny" else "dino-vitb16"
    cfg = load_config([CONFIG_DIR / "sr_tiny.yaml"], [
        f"model.arch={args.arch}", f"disc.arch={disc_arch}",
        f"disc.input_size={64 if args.arch == 'tiny' else 224}",
        f"sr.gradient_checkpointing=[{args.gradient_checkpointing}]"])
    module = SRModule(cfg.model, cfg.lora, cfg.disc, cfg.sr, cfg.degradation)
    module.lpips, module.cfg.lpips_weight = LPIPS.random(0), 5.0  # random VGG16: cost, not quality
    module.to(device)
    opt_g, opt_d = module.configure_optimizers()
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    degrader = Degrader(cfg.degradation)
    g = make_generator(0, device=device)
    hr = torch.rand(args.batch, 3, size, size, generator=g, device=device)
    module._gen = g

    def step():
        batch = degrader(hr, g)
        with autocast:
            loss, _, out = module.generator_loss(batch, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.trainable_parameters(), 1.0)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        with autocast:
            loss_d = 0.5 * module.disc.loss_d(out["gt"] * 2 - 1, out["fake"].detach(), generator=g)
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    trainable = sum(p.numel() for p in module.net.trainable_parameters())
    return {"bench": "train", "arch": args.arch, "batch": args.batch, "size": size,
            "precision": precision, "img_per_s": round(args.batch / dt, 3),
            "step_s": round(dt, 4), "peak_mem_gib": round(peak / 2 ** 30, 3),
            "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
            "gradient_checkpointing": list(cfg.sr.gradient_checkpointing),
            "trainable_params": trainable, "device": device_name(device)}
