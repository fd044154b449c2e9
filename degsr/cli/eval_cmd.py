"""``degsr eval --pred DIR --gt DIR``: PSNR-Y / SSIM-Y (and LPIPS, DISTS) of super-resolved
images against ground truth, paired by file stem; per-image CSV plus a summary (table or JSON).

The logic lives in :mod:`degsr.evaluation` (pairing, inf handling and skipped pairs are documented
there). Exit status: 0 all pairs scored, 1 some pairs skipped (one ``error:`` line each on stderr),
2 a user error (folders, unmatched names, options).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from degsr import console
from degsr.cli import user_device
from degsr.errors import UserError

NAME = "eval"
HELP = ("score super-resolved images against ground truth (PSNR/SSIM on Y, optional LPIPS and "
        "DISTS), paired by file stem")


def add_arguments(p) -> None:
    p.add_argument("--pred", required=True, metavar="DIR",
                   help="folder of predicted (super-resolved) images; top level only")
    p.add_argument("--gt", required=True, metavar="DIR",
                   help="folder of ground-truth images; pred x.png pairs with gt x.<any image "
                        "suffix> (exact stem match, no _HR tag stripping); unmatched names are an "
                        "error")
    p.add_argument("--crop-border", type=int, default=0, metavar="N",
                   help="pixels removed from every edge before PSNR/SSIM (commonly the SR scale)")
    p.add_argument("--vgg", "--lpips-vgg", dest="vgg", metavar="FILE",
                   help="also compute LPIPS (v0.1, VGG, lin) and DISTS: path of torchvision's "
                        "ImageNet VGG16 weights (vgg16-397923af.pth); LPIPS' lin layers and DISTS' "
                        "alpha/beta come from the files torchmetrics ships")
    p.add_argument("--csv", metavar="FILE",
                   help="per-image CSV (name, psnr_y, ssim_y[, lpips, dists]; identical images have "
                        "psnr_y inf); default <pred>/metrics.csv")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout (psnr_y mean over finite "
                        "values, psnr_inf = pairs left out, ssim_y, lpips, dists, n, pred, gt, "
                        "crop_border)")
    p.add_argument("--allow-missing", action="store_true",
                   help="ground-truth images without a prediction are skipped pairs (one error "
                        "line each, exit status 1) instead of an error: scores what a `degsr sr` "
                        "run that failed on some inputs wrote")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")


def run(args) -> int:
    from degsr.evaluation import evaluate, format_table, pair_images, write_csv

    if args.crop_border < 0:
        raise UserError(f"--crop-border must be >= 0, got {args.crop_border}")
    device = user_device(args.device)
    pair_images(args.pred, args.gt, [] if args.allow_missing else None)  # fail fast on pairing,
    # before loading VGG weights
    lpips = dists = None
    if args.vgg is not None:
        from degsr.metrics import DISTS, LPIPS

        lpips, dists = LPIPS.from_files(args.vgg), DISTS.from_files(args.vgg)
    rows, summary, problems = evaluate(args.pred, args.gt, args.crop_border, lpips, device, dists,
                                       allow_missing=args.allow_missing)
    perceptual = ("lpips", "dists") if args.vgg is not None else ()
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    if args.json:  # the summary first: a CSV that can't be written then loses only the rows
        print(json.dumps(summary))
    else:
        print(format_table(summary), end="")
    csv_path = write_csv(args.csv or Path(args.pred) / "metrics.csv", rows, perceptual)
    console.log.info(f"wrote per-image metrics of {len(rows)} pair(s) to {csv_path}"
                     + (f"; {len(problems)} pair(s) skipped" if problems else ""))
    return 1 if problems else 0
