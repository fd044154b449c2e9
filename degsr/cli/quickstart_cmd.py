"""``degsr quickstart [--out DIR] [--minutes M] [--pretrained SD_TURBO_DIR]``: the whole method
on the tiny default, end to end (see :mod:`degsr.quickstart.run` and docs/quickstart.md)."""

from __future__ import annotations

NAME = "quickstart"
HELP = ("the whole method in minutes on a CPU: shards from the skimage photos, a fitted tiny "
        "prior (stand-in for SD-Turbo), stage 1, stage 2, sr and eval on held-out photos, "
        "DIR/report.md + DIR/comparison.png; a rerun reuses finished steps")


def add_arguments(p) -> None:
    p.add_argument("--out", default="quickstart", metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=10.0, metavar="M",
                   help="size of the run (default: %(default)s): the training steps that "
                        "take about M minutes on 2 quiet CPU cores; a slower machine makes the "
                        "same steps in more time (each fit stops at 3x its calibrated time)")
    p.add_argument("--pretrained", default=None, metavar="DIR",
                   help="a real SD-Turbo diffusers folder: skip fitting the tiny stand-in prior "
                        "and train stage 2 on it")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the cores left idle over half a second of "
                        "/proc/stat, else by the load average; at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every step (default: %(default)s)")


def run(args) -> int:
    from degsr.quickstart.run import quickstart

    results = quickstart(args.out, minutes=args.minutes, pretrained=args.pretrained,
                         seed=args.seed, threads=args.threads)
    for name, e in results["photos"].items():
        b, s, t = e["bicubic"], e["degsr"], e["targets"]
        print(f"{name}: PSNR-Y bicubic {b['psnr_y']:.2f} dB, degsr {s['psnr_y']:.2f} dB "
              f"({t['psnr_gap_db']:+.2f}); sharpness bicubic {b['sharpness']:.1f}, degsr "
              f"{s['sharpness']:.1f}, HR {e['hr']['sharpness']:.1f}")
    print(f"report: {results['out']}/report.md  comparison: {results['out']}/comparison.png")
    return 0
