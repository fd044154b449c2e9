"""``degsr shards SRC... --out DIR``: pack training images into WebDataset tar shards."""

from __future__ import annotations

NAME = "shards"
HELP = ("pack training images (whole, original bytes) into WebDataset tar shards "
        "DIR/NAME-000000.tar ... with index.json and skipped.tsv")


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="image folders (searched recursively for .jpg .jpeg .png .webp .bmp), "
                        "image files, or .txt lists of image paths (relative to the list file)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--name", default="train", help="shard name prefix (default: %(default)s)")
    p.add_argument("--per-shard", type=int, default=1000, metavar="N",
                   help="samples per shard (default: %(default)s)")
    p.add_argument("--min-side", type=int, default=384, metavar="PX",
                   help="skip images whose shorter side is smaller (default: %(default)s)")
    p.add_argument("--min-bytes", type=int, default=100_000, metavar="B",
                   help="skip files smaller than this (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=None, metavar="M",
                   help="downscale images whose longer side exceeds M, stored as PNG "
                        "(default: keep original size and bytes)")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="processes decoding/checking images (default: %(default)s)")
    p.add_argument("--order", choices=("random", "path"), default="random",
                   help="random: shuffle the images (seeded) so that every shard mixes the "
                        "collection's folders; path: the order found (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --order random (default: %(default)s)")


def run(args) -> int:
    from degsr import console
    from degsr.data.shards import LARGE_PIXELS, WORKER_BYTES_PER_PIXEL, write_shards

    s = write_shards(args.sources, args.out, name=args.name, per_shard=args.per_shard,
                     min_side=args.min_side, min_bytes=args.min_bytes, max_side=args.max_side,
                     workers=args.workers, order=args.order, seed=args.seed)
    if s.large:
        pixels, path = max(s.large)
        console.log.warning(
            f"{len(s.large)} image(s) above {LARGE_PIXELS / 1e6:.0f} MP, the largest {path} "
            f"({pixels / 1e6:.0f} MP): a training worker decodes the whole image for its crops "
            f"(~{pixels * WORKER_BYTES_PER_PIXEL / 2**30:.1f} GiB); --max-side 4096 stores them smaller")
    note = f" (see {s.out / 'skipped.tsv'})" if s.skipped else ""
    print(f"{len(s.shards)} shards, {s.total} samples, {len(s.skipped)} skipped{note} "
          f"-> {s.out}")
    return 0
