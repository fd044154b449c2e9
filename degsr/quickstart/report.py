"""The quickstart's evaluation inputs and its report: ``report.md``, ``comparison.png`` and
``results.json``.

Evaluation pairs (:func:`make_eval_inputs`): each held-out photo cut to a multiple of the scale
(top-left corner kept) is the HR; its LR is PIL's bicubic ×1/scale (antialiased, the classic
"BI" benchmark degradation); the baseline is the LR upsampled exactly as the model's own input
(``torch.nn.functional.interpolate``, the adapter's ``upsample_mode``, as
:mod:`degsr.inference.upscale` does), saved as 8-bit PNG like the SR output.

Sharpness (:func:`sharpness`) is the variance of the 4-neighbour Laplacian ``[[0,1,0],[1,-4,1],
[0,1,0]]`` of the BT.601 Y channel (0-255 scale, the one PSNR/SSIM use), over the pixels where the
3x3 stencil fits (no padding), in float64. Higher is sharper; the HR's value is the target.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from degsr.io import atomic_write_bytes, read_image, save_png
from degsr.metrics.fidelity import rgb_to_y

METHODS = ("bicubic", "degsr")


# --------------------------------------------------------------------------- inputs

def make_eval_inputs(heldout: Path, hr_dir: Path, lr_dir: Path, bicubic_dir: Path, scale: int,
                     upsample_mode: str = "bicubic") -> list[str]:
    """Write ``hr/``, ``lr/`` and ``bicubic/`` PNGs for every photo in ``heldout`` (files that
    exist are kept); returns the photo names (stems), sorted."""
    import torch.nn.functional as F

    names = []
    for d in (hr_dir, lr_dir, bicubic_dir):
        d.mkdir(parents=True, exist_ok=True)
    for src in sorted(heldout.glob("*.png")):
        name = src.stem
        names.append(name)
        img = read_image(src)
        h, w = (img.shape[1] // scale) * scale, (img.shape[2] // scale) * scale
        hr = img[:, :h, :w]
        if not (hr_dir / f"{name}.png").is_file():
            save_png(hr, hr_dir / f"{name}.png")
        if not (lr_dir / f"{name}.png").is_file():
            pil = Image.fromarray(hr.permute(1, 2, 0).numpy())
            lr = np.asarray(pil.resize((w // scale, h // scale), Image.BICUBIC))
            save_png(torch.from_numpy(lr.copy()).permute(2, 0, 1), lr_dir / f"{name}.png")
        if not (bicubic_dir / f"{name}.png").is_file():
            lr = read_image(lr_dir / f"{name}.png").float()[None] / 255.0
            kw = {} if upsample_mode == "nearest" else {"align_corners": False}
            up = F.interpolate(lr, size=(h, w), mode=upsample_mode, **kw).clamp(0, 1)
            save_png(up[0], bicubic_dir / f"{name}.png")
    return names


# --------------------------------------------------------------------------- measures

def sharpness(img: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of Y (see the module docstring)."""
    rgb = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].double() / 255.0
    y = rgb_to_y(rgb)[0, 0].numpy()
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def comparison(paths: list[Path]) -> np.ndarray:
    """The images side by side, left to right, no border: (H, sum of W, 3) uint8."""
    return np.concatenate([read_image(p).permute(1, 2, 0).numpy() for p in paths], axis=1)


def collect(p, evals: dict) -> dict:
    """Per photo: PSNR-Y / SSIM-Y (from ``degsr eval``'s metrics.csv) and sharpness of each
    method, the HR's sharpness and the two targets; plus the means."""
    import csv

    rows = {m: {r["name"]: r for r in csv.DictReader(open(Path(evals[m]["pred"]) / "metrics.csv"))}
            for m in METHODS}
    photos = {}
    for name in sorted(rows["degsr"]):
        hr = sharpness(read_image(p.hr / f"{name}.png").permute(1, 2, 0).numpy())
        entry = {"hr": {"sharpness": hr}}
        for m, folder in zip(METHODS, (p.bicubic, p.sr)):
            img = read_image(folder / f"{name}.png").permute(1, 2, 0).numpy()
            entry[m] = {"psnr_y": float(rows[m][name]["psnr_y"]),
                        "ssim_y": float(rows[m][name]["ssim_y"]), "sharpness": sharpness(img)}
        entry["targets"] = targets(entry)
        photos[name] = entry
    means = {m: {k: evals[m][k] for k in ("psnr_y", "ssim_y")} for m in METHODS}
    return {"photos": photos, "mean": means}


def targets(entry: dict) -> dict:
    """Issue 9's targets on one photo: PSNR within 2 dB of bicubic; sharper than bicubic, i.e.
    the sharpness (variance of the Laplacian) closer to the HR's (absolute difference)."""
    b, s, hr = entry["bicubic"], entry["degsr"], entry["hr"]["sharpness"]
    return {"psnr_gap_db": s["psnr_y"] - b["psnr_y"],
            "psnr_within_2db": s["psnr_y"] >= b["psnr_y"] - 2.0,
            "sharper": abs(s["sharpness"] - hr) < abs(b["sharpness"] - hr)}


# --------------------------------------------------------------------------- writing

def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
            "cuda": torch.cuda.is_available(), "when": datetime.now(timezone.utc).isoformat(
                timespec="seconds")}


def write_report(p, state: dict) -> dict:
    """Write comparison.png, results.json and report.md into ``p.out``; returns the results."""
    from degsr.quickstart.markdown import render

    evals = state["steps"]["eval"]["detail"]
    results = {**collect(p, evals), "minutes": state["minutes"], "threads": state.get("threads"),
               "steps": state["steps"],
               "machine": machine(), "out": str(p.out), "base": str(p.base),
               "prior_fitted": p.base == p.prior}
    first = sorted(results["photos"])[0]
    panels = [p.bicubic / f"{first}.png", p.sr / f"{first}.png", p.hr / f"{first}.png"]
    save_png(torch.from_numpy(comparison(panels)).permute(2, 0, 1), p.out / "comparison.png")
    results["comparison"] = {"photo": first, "panels": [str(x) for x in panels]}
    atomic_write_bytes(p.out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(p.out / "report.md", render(p, results).encode())
    return {"report": str(p.out / "report.md"), "comparison": str(p.out / "comparison.png")}
