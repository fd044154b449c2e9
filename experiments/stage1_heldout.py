"""Score a stage-1 export the way issue #5's target is checked: degraded crops of held-out photos
written by `degsr degrade`, scored by `degsr estimate`, Spearman against the written scores.

    python experiments/stage1_heldout.py EXPORT --photos DIR [--seeds 11,12,13]
        [--n-per-image 96] [--crop 512] [--work DIR]

Prints one JSON object: the Spearman correlation of blur and noise over all pairs of all seeds
(``pooled``), per seed, and the number of pairs. One seed of 288 pairs (3 photos x 96) moved
blur by up to 0.04 between seeds in session 7 (docs/benchmarks.md): compare runs on the pooled
figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from scipy.stats import spearmanr

SCORES = ("blur", "noise")


class CommandFailed(Exception):
    pass


def degsr(*args: str) -> str:
    """stdout of ``degsr ARGS``; CommandFailed with its last error line when it fails."""
    r = subprocess.run([sys.executable, "-m", "degsr", *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise CommandFailed(f"degsr {args[0]} failed: {last}")
    return r.stdout


def score_seed(export: str, photos: list[str], seed: int, n: int, crop: int, out: Path) -> list:
    """[(true, predicted)] score dicts of every pair `degsr degrade` writes for ``seed``."""
    if not (out / "params.jsonl").exists():
        degsr("degrade", *photos, "--preset", "s3diff", "--seed", str(seed), "--n-per-image",
              str(n), "--crop", str(crop), "--scale", "4", "--out", str(out))
    truth = {r["stem"]: r["scores"] for r in map(json.loads, open(out / "params.jsonl"))}
    lqs = [str(out / f"{stem}_lq.png") for stem in sorted(truth)]
    pred = {Path(r["path"]).name[:-len("_lq.png")]: r
            for r in map(json.loads, degsr("estimate", "--ckpt", export, *lqs).splitlines())}
    return [(truth[stem], pred[stem]) for stem in sorted(truth)]


def spearman(pairs: list) -> dict[str, float]:
    return {s: round(float(spearmanr([t[s] for t, _ in pairs], [p[s] for _, p in pairs])[0]), 4)
            for s in SCORES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="the estimator export folder (estimator.safetensors + json)")
    ap.add_argument("--photos", required=True, help="folder of held-out photos")
    ap.add_argument("--seeds", default="11,12,13")
    ap.add_argument("--n-per-image", type=int, default=96)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--work", help="keep the degraded pairs here (reused when present)")
    a = ap.parse_args(argv)
    photos = sorted(str(p) for p in Path(a.photos).iterdir() if p.is_file())
    if not photos:
        ap.error(f"--photos: no files in {a.photos}")
    work = Path(a.work or tempfile.mkdtemp(prefix="stage1_heldout_"))
    per_seed, pooled = {}, []
    for seed in (int(s) for s in a.seeds.split(",")):
        try:
            pairs = score_seed(a.export, photos, seed, a.n_per_image, a.crop,
                               work / f"seed{seed}-crop{a.crop}-n{a.n_per_image}")
        except CommandFailed as e:
            print(f"stage1_heldout: {e}", file=sys.stderr)
            return 1
        per_seed[seed], pooled = spearman(pairs), pooled + pairs
    print(json.dumps({"pooled": spearman(pooled), "per_seed": per_seed, "pairs": len(pooled),
                      "crop": a.crop, "work": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
