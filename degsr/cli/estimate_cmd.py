"""``degsr estimate --ckpt EXPORT IMAGE...``: blur and noise scores of LR images, one JSON line each.

Each whole image is scored at its own size (no crop, no resize). IMAGE may be a file, a folder (its
images, as ``degsr sr`` finds them) or a glob. Consecutive images of the same size are batched
(up to ``--batch``). An image that cannot be read or is smaller than the estimator's
minimum side is reported on stderr, the others are still scored, and the exit status is 1.
"""

from __future__ import annotations

import json
import sys

NAME = "estimate"
HELP = "print the degradation estimator's blur and noise scores of LR images (one JSON line each)"


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, metavar="EXPORT",
                   help="exported estimator: a directory with estimator.safetensors + estimator.json, "
                        "or either file of such a pair")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="LR images (any format PIL reads), folders of them or globs")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--batch", type=int, default=8, metavar="N",
                   help="most images of identical size scored together (default 8)")


def run(args) -> int:
    import torch

    from degsr.cli import user_device
    from degsr.errors import UserError, each_fitting
    from degsr.estimator import SCORES, load_estimator
    from degsr.io import read_image

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    device = user_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_estimator(args.ckpt, device=device)
    failed = 0
    pending: list[tuple[str, torch.Tensor]] = []

    def score(group) -> None:
        x = torch.stack([t for _, t in group]).to(device)
        with torch.inference_mode():
            scores = model(x).float().cpu().tolist()
        for (path, _), row in zip(group, scores):
            print(json.dumps({"path": path, **{k: round(v, 4) for k, v in zip(SCORES, row)}}),
                  flush=True)

    def fail(item, message) -> None:
        nonlocal failed
        failed += 1
        h, w = item[1].shape[-2:]
        print(f"error: {item[0]}: {message} scoring {w}x{h} on {device}", file=sys.stderr,
              flush=True)

    def flush() -> None:
        if pending:
            each_fitting(list(pending), score, fail)
            pending.clear()

    for path in _images(args.images):
        if path.startswith("error: "):  # a folder without images, a glob matching nothing
            failed += 1
            print(path, file=sys.stderr, flush=True)
            continue
        try:
            img = read_image(path).float() / 255.0
            h, w = img.shape[-2:]
            if min(h, w) < model.min_side:
                raise UserError(f"{path}: image is {w}x{h}, smaller than the estimator's minimum "
                                f"side of {model.min_side} pixels")
        except UserError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if pending and (pending[0][1].shape != img.shape or len(pending) >= args.batch):
            flush()
        pending.append((path, img))
    flush()
    return 1 if failed else 0


def _images(items: list[str]):
    """Each IMAGE argument's files, as ``degsr sr`` expands them (a file is printed as typed),
    or an ``error: ...`` line where a folder or glob finds none."""
    from pathlib import Path

    from degsr.io import expand_inputs

    for item in items:
        found, problems = expand_inputs([item])
        yield from (f"error: {msg}" for msg in problems)
        yield from ([item] if found == [Path(item)] else map(str, found))
