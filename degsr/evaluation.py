"""Full-reference evaluation of a folder of super-resolved images against a folder of ground truth.

Used by ``degsr eval`` and callable from other code (e.g. the quickstart)::

    rows, summary, problems = evaluate("out/sr", "data/hr", crop_border=4)

Conventions (chosen here, tested in ``tests/test_eval.py``):

* **Pairing** is by exact file stem: ``pred/x.png`` pairs with ``gt/x.<any image suffix>``
  (:data:`degsr.io.IMAGE_SUFFIXES`). Only the top level of each folder is read (no recursion);
  hidden files (name starting with ``.``) are ignored. No tag stripping: ``x`` does not pair with
  ``x_HR``. Any image without a partner on the other side, or two images with one stem in the same
  folder, is a :class:`~degsr.errors.UserError` (one line, naming the first few on each side).
* **Per-pair problems** (different sizes, an unreadable file, an image too small for
  ``crop_border``) do not stop the run: the pair is skipped and described in ``problems``; the
  other pairs are still scored.
* **Metrics** are computed on the 8-bit images exactly as loaded (RGB, value / 255, no resizing):
  ``psnr_y`` and ``ssim_y`` on the BT.601 Y channel with ``crop_border`` pixels removed from every
  edge (BasicSR's ``test_y_channel=True`` convention, see :mod:`degsr.metrics.fidelity`), and
  ``lpips`` (v0.1, VGG16, lin) and ``dists`` (:mod:`degsr.metrics.dists`), both on the full,
  uncropped RGB images, when their models (or the path of torchvision's VGG16 weights) are given.
* **Identical images** have ``psnr_y = inf`` (as in BasicSR). The per-image rows keep ``inf`` (the
  CSV writes ``inf``); the summary's ``psnr_y`` is the mean over the *finite* values only and
  ``psnr_inf`` counts the pairs left out of it (``psnr_y`` is ``None`` when no value is finite).
  SSIM, LPIPS and DISTS means are over all scored pairs (identical images: SSIM 1, LPIPS and
  DISTS 0).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import torch

from degsr import console
from degsr.errors import UserError, each_fitting
from degsr.io import atomic_write_bytes, pair_folders, read_image

__all__ = ["pair_images", "score_pair", "summarize", "evaluate", "rows_to_csv", "write_csv",
           "format_table", "METRIC_COLUMNS"]

#: CSV / row metric columns, in order (``lpips``, ``dists`` only when computed).
METRIC_COLUMNS = ("psnr_y", "ssim_y", "lpips", "dists")
PERCEPTUAL = ("lpips", "dists")


def pair_images(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                missing: list | None = None) -> list[tuple[str, Path, Path]]:
    """``[(stem, pred_path, gt_path), ...]`` sorted by stem (exact stems, no tag stripping);
    UserError (one line) when a folder is missing or empty, has two images with one stem, or any
    stem is unmatched. ``missing`` (a list): ground truth without a prediction is appended to it
    instead (``--allow-missing``)."""
    return pair_folders(pred_dir, gt_dir, "--pred", "--gt", unmatched_b=missing)


def _modcrop_hint(pred: torch.Tensor, gt: torch.Tensor) -> str:
    """A hint when ``gt`` is larger by less than 8 pixels per side: what an LR made from ground
    truth that is not a multiple of the SR scale upscales to (BSD100's 481x321 at x4: 480x320)."""
    (ph, pw), (gh, gw) = pred.shape[-2:], gt.shape[-2:]
    if not (0 <= gh - ph < 8 and 0 <= gw - pw < 8):
        return ""
    return (f" (ground truth not a multiple of the SR scale? crop it to {pw}x{ph} from the top "
            "left, as the benchmarks' 'GTmod' sets are)")


def _fidelity_device(device: torch.device) -> torch.device:
    # PSNR/SSIM run in float64, which MPS lacks.
    return torch.device("cpu") if device.type == "mps" else device


@torch.no_grad()
def score_pair(pred_path: Path, gt_path: Path, crop_border: int = 0, lpips=None,
               device: str | torch.device = "cpu", dists=None) -> dict[str, float]:
    """Metrics of one pair: ``{"psnr_y", "ssim_y"[, "lpips"][, "dists"]}``. Raises UserError
    (naming the files) when a file can't be read, the sizes differ, or the image is too small for
    ``crop_border``."""
    from degsr.metrics import psnr_y, ssim_y

    device = torch.device(device)
    pred, gt = read_image(pred_path), read_image(gt_path)
    if pred.shape != gt.shape:
        raise UserError(f"{pred_path.name}: size {pred.shape[2]}x{pred.shape[1]} (WxH) differs from "
                        f"{gt_path} {gt.shape[2]}x{gt.shape[1]}; pair skipped"
                        + _modcrop_hint(pred, gt))
    h, w = pred.shape[-2:]
    if min(h, w) - 2 * crop_border < 11:
        raise UserError(f"{pred_path.name}: {w}x{h} image with --crop-border {crop_border} leaves "
                        f"less than the 11x11 pixels SSIM needs; pair skipped")
    fdev = _fidelity_device(device)
    p64 = pred.to(fdev, torch.float64).unsqueeze(0) / 255.0
    g64 = gt.to(fdev, torch.float64).unsqueeze(0) / 255.0
    out = {"psnr_y": float(psnr_y(p64, g64, crop_border)[0]),
           "ssim_y": float(ssim_y(p64, g64, crop_border)[0])}
    del p64, g64
    if lpips is None and dists is None:
        return out
    if lpips is not None and min(h, w) < 16:
        raise UserError(f"{pred_path.name}: {w}x{h} image is smaller than the 16x16 LPIPS needs "
                        "(VGG16 halves it four times); pair skipped")
    p32 = pred.to(device, torch.float32).unsqueeze(0) / 255.0
    g32 = gt.to(device, torch.float32).unsqueeze(0) / 255.0
    if lpips is not None:
        out["lpips"] = float(lpips(p32, g32, normalize=True)[0])
    if dists is not None:
        out["dists"] = float(dists(p32, g32)[0])
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], pred_dir, gt_dir, crop_border: int,
              perceptual: tuple[str, ...] = ()) -> dict:
    """Means of the per-image rows. ``psnr_y`` averages the finite values only (``psnr_inf``
    counts identical pairs left out); a mean with no value to average is ``None``.
    ``perceptual``: the metrics computed besides PSNR/SSIM (keys present, None with no rows)."""
    psnr = [r["psnr_y"] for r in rows]
    finite = [v for v in psnr if math.isfinite(v)]
    summary: dict = {"psnr_y": _mean(finite), "ssim_y": _mean([r["ssim_y"] for r in rows])}
    for name in perceptual:
        summary[name] = _mean([r[name] for r in rows])
    summary.update({"n": len(rows), "psnr_inf": len(psnr) - len(finite), "pred": str(pred_dir),
                    "gt": str(gt_dir), "crop_border": int(crop_border)})
    return summary


def _resolve(model, cls_name: str, device: torch.device):
    """``model`` as given (None, or a model) or built from a VGG16 weights path."""
    if model is None:
        return None
    if isinstance(model, (str, os.PathLike)):
        from degsr import metrics

        model = getattr(metrics, cls_name).from_files(model)
    return model.to(device)


def evaluate(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, crop_border: int = 0,
             lpips=None, device: str | torch.device = "cpu", dists=None,
             allow_missing: bool = False) -> tuple[list[dict], dict, list[str]]:
    """Score every ``pred_dir`` image against the ``gt_dir`` image of the same file stem.

    ``lpips`` / ``dists``: ``None`` (not computed), a :class:`degsr.metrics.LPIPS` /
    :class:`degsr.metrics.DISTS` model, or the path of torchvision's VGG16 weights (their
    ``from_files``). Returns ``(rows, summary, problems)``: ``rows`` are ``{"name": stem,
    "psnr_y", "ssim_y"[, "lpips"][, "dists"]}`` per scored pair (sorted by stem), ``summary`` as
    :func:`summarize`, ``problems`` one line per skipped pair. Pairing problems raise UserError
    (see the module docstring); with ``allow_missing``, ground truth without a prediction is one
    problem line each instead (the predictions of a run that failed on some inputs). A pair that
    runs out of memory is skipped too."""
    if int(crop_border) != crop_border or crop_border < 0:
        raise UserError(f"--crop-border must be a non-negative integer, got {crop_border}")
    crop_border = int(crop_border)
    device = torch.device(device)
    missing: list[Path] = []
    pairs = pair_images(pred_dir, gt_dir, missing if allow_missing else None)
    lpips, dists = _resolve(lpips, "LPIPS", device), _resolve(dists, "DISTS", device)
    problems = [f"{g}: no prediction in {pred_dir}; pair skipped" for g in missing]
    rows: list[dict] = []

    def score(group) -> None:
        (stem, p, g), = group
        try:
            rows.append({"name": stem, **score_pair(p, g, crop_border, lpips, device, dists)})
        except UserError as e:
            problems.append(str(e))

    for pair in console.progress(pairs, desc="eval", unit="img"):
        each_fitting([pair], score, lambda item, msg: problems.append(
            f"{item[1].name}: {msg}; pair skipped"))
    summary = summarize(rows, pred_dir, gt_dir, crop_border,
                        tuple(n for n, m in zip(PERCEPTUAL, (lpips, dists)) if m is not None))
    return rows, summary, problems


def rows_to_csv(rows: list[dict], perceptual: tuple[str, ...] = ()) -> str:
    """CSV text: header ``name,psnr_y,ssim_y`` and the ``perceptual`` columns (``lpips``,
    ``dists``), values with 6 decimals, ``inf`` as ``inf``."""
    cols = ["psnr_y", "ssim_y", *perceptual]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", *cols])
    for r in rows:
        writer.writerow([r["name"], *(f"{r[c]:.6f}" for c in cols)])
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: list[dict], perceptual: tuple[str, ...] = ()) -> Path:
    """Write :func:`rows_to_csv` atomically (creating the parent folder); UserError if impossible.
    A file name that is not UTF-8 (a Latin-1 name from an old archive) is written as its bytes,
    the name the file system has."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, rows_to_csv(rows, perceptual).encode("utf-8", "surrogateescape"))
    except OSError as e:
        raise UserError(f"--csv {path}: cannot write ({e.strerror or e})")
    return path


def _fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _printable(text: str) -> str:
    """``text`` with the bytes of a name that is not UTF-8 as ``\\udcXX`` escapes: a terminal
    whose locale is strict UTF-8 refuses them (UnicodeEncodeError), after the scoring."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def format_table(summary: dict) -> str:
    """A short human-readable summary table."""
    lines = [f"{'metric':<8}{'mean':>10}",
             f"{'psnr_y':<8}{_fmt(summary['psnr_y'], 4):>10}  dB (Y, crop_border={summary['crop_border']})",
             f"{'ssim_y':<8}{_fmt(summary['ssim_y'], 4):>10}"]
    lines += [f"{name:<8}{_fmt(summary[name], 4):>10}" for name in PERCEPTUAL if name in summary]
    note = f"n={summary['n']} pairs  pred={summary['pred']}  gt={summary['gt']}"
    if summary.get("psnr_inf"):
        note += f"  ({summary['psnr_inf']} identical pair(s): PSNR inf, left out of the PSNR mean)"
    lines.append(note)
    return _printable("\n".join(lines) + "\n")
