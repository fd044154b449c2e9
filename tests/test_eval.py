"""``degsr eval`` / degsr.evaluation: metrics of real photo crops against independent numpy /
scikit-image references, pairing errors, skipped pairs, CSV/JSON agreement, LPIPS column."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

import degsr.cli
from degsr.errors import UserError
from degsr.evaluation import evaluate, pair_images
from degsr.io import read_image
from degsr.metrics.lpips import VGG16Features

ROOT = Path(__file__).resolve().parents[1]
CROP = 4


# ---- independent references (numpy, BasicSR's to_y_channel / calculate_psnr) ------------------

def y_channel(rgb_u8: np.ndarray) -> np.ndarray:
    """BasicSR: img/255 -> bgr2ycbcr(y_only) = 16 + 65.481 R + 128.553 G + 24.966 B (R,G,B in [0,1],
    result /255) -> *255; i.e. Y on the 0-255 scale, float64 here."""
    x = rgb_u8.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def ref_psnr(a: np.ndarray, b: np.ndarray, crop: int) -> float:
    ya, yb = y_channel(a), y_channel(b)
    if crop:
        ya, yb = ya[crop:-crop, crop:-crop], yb[crop:-crop, crop:-crop]
    mse = np.mean((ya - yb) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ref_ssim(a: np.ndarray, b: np.ndarray, crop: int) -> float:
    ya, yb = y_channel(a), y_channel(b)
    if crop:
        ya, yb = ya[crop:-crop, crop:-crop], yb[crop:-crop, crop:-crop]
    return float(structural_similarity(ya, yb, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


# ---- fixtures -------------------------------------------------------------------------------------

def _save(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def photos():
    """Ground-truth crops of real photos and predictions with known damage (all uint8 RGB)."""
    rng = np.random.default_rng(0)
    astro = data.astronaut()[120:184, 180:260].copy()   # 64 x 80
    cat = data.chelsea()[60:108, 150:206].copy()        # 48 x 56
    noisy = np.clip(astro.astype(np.float64) + rng.normal(0, 6.0, astro.shape), 0, 255)
    noisy = noisy.round().astype(np.uint8)
    border = cat.copy()                                  # damage only in the outer CROP pixels
    border[:CROP] = 255 - border[:CROP]
    border[:, -CROP:] = 0
    gt = {"astronaut": astro, "chelsea": cat, "same": astro[:40, :48].copy()}
    pred = {"astronaut": noisy, "chelsea": border, "same": astro[:40, :48].copy()}
    return gt, pred


def make_dirs(tmp_path: Path, gt: dict, pred: dict, gt_suffix=".png") -> tuple[Path, Path]:
    gdir, pdir = tmp_path / "gt", tmp_path / "pred"
    gdir.mkdir(exist_ok=True)
    pdir.mkdir(exist_ok=True)
    for k, v in gt.items():
        _save(v, gdir / f"{k}{gt_suffix}")
    for k, v in pred.items():
        _save(v, pdir / f"{k}.png")
    return pdir, gdir


@pytest.fixture
def folders(tmp_path, photos):
    gt, pred = photos
    return make_dirs(tmp_path, gt, pred, gt_suffix=".bmp")  # lossless, and a different suffix


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random VGG16 in torchvision's key format (``features.N.weight``), as LPIPS.from_files loads."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    sd = VGG16Features().state_dict()
    assert all(k.startswith("features.") for k in sd)
    torch.save(sd, path)
    return path


def cli(argv, monkeypatch):
    """``degsr eval ...`` in-process (registers ``eval`` if the CLI does not list it yet)."""
    if "eval" not in degsr.cli.SUBCOMMANDS:
        monkeypatch.setattr(degsr.cli, "SUBCOMMANDS", [*degsr.cli.SUBCOMMANDS, "eval"])
    return degsr.cli.main(["eval", *argv])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- metric values ------------------------------------------------------------------------------

def test_metrics_match_independent_reference(folders, photos):
    pdir, gdir = folders
    gt, pred = photos
    rows, summary, problems = evaluate(pdir, gdir, crop_border=0)
    assert problems == []
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["astronaut", "chelsea", "same"]
    for k in ("astronaut", "chelsea"):
        assert by[k]["psnr_y"] == pytest.approx(ref_psnr(pred[k], gt[k], 0), abs=1e-9)
        assert by[k]["ssim_y"] == pytest.approx(ref_ssim(pred[k], gt[k], 0), abs=1e-9)
    # independent sigma-6 noise per channel -> Y noise sigma 6*|(65.481, 128.553, 24.966)/255|
    # ~ 3.44, PSNR ~ 37.4 dB; SSIM well below 1
    sigma_y = 6.0 * np.linalg.norm([65.481, 128.553, 24.966]) / 255.0
    assert by["astronaut"]["psnr_y"] == pytest.approx(20 * np.log10(255.0 / sigma_y), abs=0.5)
    assert 0.6 < by["astronaut"]["ssim_y"] < 0.99
    # identical images: PSNR +inf (BasicSR), SSIM 1
    assert by["same"]["psnr_y"] == math.inf
    assert by["same"]["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    # summary: PSNR mean over finite values, the inf pair counted apart; SSIM over all
    assert summary["n"] == 3 and summary["psnr_inf"] == 1
    assert summary["psnr_y"] == pytest.approx((by["astronaut"]["psnr_y"] + by["chelsea"]["psnr_y"]) / 2)
    assert summary["ssim_y"] == pytest.approx(np.mean([r["ssim_y"] for r in rows]))
    assert "lpips" not in summary and "lpips" not in by["same"]


def test_crop_border_respected(folders, photos):
    pdir, gdir = folders
    gt, pred = photos
    rows, summary, _ = evaluate(pdir, gdir, crop_border=CROP)
    by = {r["name"]: r for r in rows}
    # chelsea differs only in its outer CROP pixels: identical once they are cropped
    assert ref_psnr(pred["chelsea"], gt["chelsea"], 0) < 20
    assert by["chelsea"]["psnr_y"] == math.inf
    assert by["chelsea"]["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    assert by["astronaut"]["psnr_y"] == pytest.approx(ref_psnr(pred["astronaut"], gt["astronaut"], CROP),
                                                      abs=1e-9)
    assert by["astronaut"]["ssim_y"] == pytest.approx(ref_ssim(pred["astronaut"], gt["astronaut"], CROP),
                                                      abs=1e-9)
    assert summary["crop_border"] == CROP and summary["psnr_inf"] == 2
    assert summary["psnr_y"] == pytest.approx(by["astronaut"]["psnr_y"])


def test_all_identical_gives_null_psnr_mean(tmp_path, photos):
    gt, _ = photos
    pdir, gdir = make_dirs(tmp_path, gt, gt)
    rows, summary, _ = evaluate(pdir, gdir)
    assert all(r["psnr_y"] == math.inf for r in rows)
    assert summary["psnr_y"] is None and summary["psnr_inf"] == 3 and summary["n"] == 3


# ---- CLI: CSV, JSON, table ----------------------------------------------------------------------

def test_cli_json_matches_csv(folders, monkeypatch, capsys):
    pdir, gdir = folders
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--crop-border", "2", "--json"],
               monkeypatch) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert out.count("\n") == 1
    rows = read_csv(pdir / "metrics.csv")
    assert list(rows[0]) == ["name", "psnr_y", "ssim_y"]
    assert [r["name"] for r in rows] == ["astronaut", "chelsea", "same"]
    assert rows[2]["psnr_y"] == "inf"
    psnr = [float(r["psnr_y"]) for r in rows]
    finite = [v for v in psnr if math.isfinite(v)]
    assert summary["psnr_y"] == pytest.approx(np.mean(finite), abs=1e-5)
    assert summary["ssim_y"] == pytest.approx(np.mean([float(r["ssim_y"]) for r in rows]), abs=1e-5)
    assert summary["n"] == 3 and summary["psnr_inf"] == len(psnr) - len(finite) == 1
    assert summary["crop_border"] == 2 and "lpips" not in summary
    assert summary["pred"] == str(pdir) and summary["gt"] == str(gdir)
    assert not list(pdir.glob(".metrics.csv.*"))  # no temp file left by the atomic write


def test_cli_table_and_custom_csv(folders, tmp_path, monkeypatch, capsys):
    pdir, gdir = folders
    out_csv = tmp_path / "reports" / "m.csv"
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--csv", str(out_csv)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "psnr_y" in out and "ssim_y" in out and "n=3" in out and "lpips" not in out
    assert len(read_csv(out_csv)) == 3 and not (pdir / "metrics.csv").exists()


def test_cli_lpips_and_dists_columns(folders, vgg_file, monkeypatch, capsys):
    from degsr.metrics import DISTS, LPIPS

    pdir, gdir = folders
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json", "--vgg", str(vgg_file)],
               monkeypatch) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = read_csv(pdir / "metrics.csv")
    assert list(rows[0]) == ["name", "psnr_y", "ssim_y", "lpips", "dists"]
    lpips, dists = LPIPS.from_files(vgg_file), DISTS.from_files(vgg_file)
    for name in ("lpips", "dists"):
        by = {r["name"]: float(r[name]) for r in rows}
        assert by["same"] == pytest.approx(0.0, abs=1e-6)
        assert by["astronaut"] > 0 and by["chelsea"] > 0
        assert summary[name] == pytest.approx(np.mean(list(by.values())), abs=1e-5)
    pred = read_image(pdir / "astronaut.png").float()[None] / 255  # the models on the pair itself
    gt = read_image(next(gdir.glob("astronaut.*"))).float()[None] / 255
    row = next(r for r in rows if r["name"] == "astronaut")
    assert float(row["lpips"]) == pytest.approx(float(lpips(pred, gt, normalize=True)), abs=2e-6)
    assert float(row["dists"]) == pytest.approx(float(dists(pred, gt)), abs=2e-6)
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json", "--lpips-vgg", str(vgg_file)],
               monkeypatch) == 0  # the old spelling
    assert json.loads(capsys.readouterr().out)["dists"] == summary["dists"]


def test_an_image_too_small_for_lpips_is_one_skipped_pair(tmp_path, photos, vgg_file, monkeypatch,
                                                         capsys):
    gt, pred = photos
    pdir, gdir = make_dirs(tmp_path, {**gt, "tiny": gt["same"][:12, :14]},
                           {**pred, "tiny": pred["same"][:12, :14]})
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--vgg", str(vgg_file)], monkeypatch) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "tiny.png: 14x12" in err[0] and "16x16" in err[0]
    assert sorted(r["name"] for r in read_csv(pdir / "metrics.csv")) == sorted(gt)


def test_help_mentions_dists(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli(["--help"], monkeypatch)
    text = " ".join(capsys.readouterr().out.split())
    assert "LPIPS (v0.1, VGG, lin) and DISTS" in text and "--vgg" in text


# ---- pairing and per-pair problems ---------------------------------------------------------------

def test_unmatched_names_exit_2_one_line(tmp_path, photos, monkeypatch, capsys):
    gt, pred = photos
    gt = {**gt, "only_gt": gt["same"]}
    pred = {**pred, "only_pred": pred["same"]}
    pdir, gdir = make_dirs(tmp_path, gt, pred)
    assert cli(["--pred", str(pdir), "--gt", str(gdir)], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "only_pred" in err[0] and "only_gt" in err[0]
    assert not (pdir / "metrics.csv").exists()


def test_allow_missing_scores_the_predictions_there_are(tmp_path, photos, monkeypatch, capsys):
    """What `degsr sr` wrote when it failed on some inputs: ground truth without a prediction is a
    skipped pair with --allow-missing (exit 1); a prediction without ground truth stays an error."""
    gt, pred = photos
    pdir, gdir = make_dirs(tmp_path, {**gt, "only_gt": gt["same"]}, pred)
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json", "--allow-missing"],
               monkeypatch) == 1
    cap = capsys.readouterr()
    errs = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errs) == 1 and "only_gt.png: no prediction" in errs[0]
    assert json.loads(cap.out)["n"] == 3
    (pdir / "stray.png").write_bytes((pdir / "same.png").read_bytes())
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--allow-missing"], monkeypatch) == 2
    assert "stray" in capsys.readouterr().err


def test_json_keys_do_not_depend_on_what_was_scored(folders, vgg_file, monkeypatch, capsys):
    pdir, gdir = folders  # --crop-border 10000: every pair skipped
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json", "--vgg", str(vgg_file),
                "--crop-border", "10000"], monkeypatch) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 0 and all(summary[k] is None for k in ("psnr_y", "ssim_y", "lpips", "dists"))


def test_a_pair_out_of_memory_is_skipped(folders, monkeypatch, capsys):
    import degsr.evaluation as ev

    real = ev.score_pair

    def tight(p, g, *args, **kw):
        if p.stem == "chelsea":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: 13224719200 bytes")
        return real(p, g, *args, **kw)

    monkeypatch.setattr(ev, "score_pair", tight)
    pdir, gdir = folders
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json"], monkeypatch) == 1
    cap = capsys.readouterr()
    errs = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errs) == 1 and "chelsea.png: out of memory" in errs[0]
    assert json.loads(cap.out)["n"] == 2


def test_pairing_rules(tmp_path, photos):
    gt, _ = photos
    g, p = tmp_path / "g", tmp_path / "p"
    g.mkdir()
    p.mkdir()
    _save(gt["same"], g / "x_HR.png")  # no tag stripping: x does not pair with x_HR
    _save(gt["same"], p / "x.png")
    with pytest.raises(UserError, match="x_HR"):
        pair_images(p, g)
    _save(gt["same"], g / "x.jpg")
    _save(gt["same"], g / "x.png")  # two gt images with one stem: ambiguous
    (g / "x_HR.png").unlink()
    with pytest.raises(UserError, match="ambiguous"):
        pair_images(p, g)
    (g / "x.png").unlink()
    (p / "notes.txt").write_text("not an image")
    assert pair_images(p, g) == [("x", p / "x.png", g / "x.jpg")]
    with pytest.raises(UserError, match="no such folder"):
        pair_images(tmp_path / "missing", g)


def test_size_mismatch_skipped_others_scored(tmp_path, photos, monkeypatch, capsys):
    gt, pred = photos
    pred = {**pred, "chelsea": pred["chelsea"][:-2]}  # 2 rows short
    pdir, gdir = make_dirs(tmp_path, gt, pred)
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json"], monkeypatch) == 1
    cap = capsys.readouterr()
    errs = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errs) == 1 and "chelsea" in errs[0] and "size" in errs[0]
    assert errs[0].endswith("(ground truth not a multiple of the SR scale? crop it to 56x46 from "
                            "the top left, as the benchmarks' 'GTmod' sets are)")
    summary = json.loads(cap.out)
    assert summary["n"] == 2
    assert [r["name"] for r in read_csv(pdir / "metrics.csv")] == ["astronaut", "same"]
    assert summary["psnr_y"] == pytest.approx(ref_psnr(pred["astronaut"], gt["astronaut"], 0))


def test_names_that_are_not_utf8_are_scored_and_written(tmp_path, photos, monkeypatch, capsys):
    """A Latin-1 name on a UTF-8 system (an old archive): the CSV row holds the name's bytes,
    the table escapes them (a strict UTF-8 stdout, as pytest's, refuses them raw)."""
    import os

    gt, pred = photos
    name = os.fsdecode(b"caf\xe9")
    (tmp_path / name).mkdir()
    pdir, gdir = make_dirs(tmp_path / name, {name: gt["astronaut"]}, {name: pred["astronaut"]})
    assert cli(["--pred", str(pdir), "--gt", str(gdir)], monkeypatch) == 0
    assert "caf\\udce9/pred" in capsys.readouterr().out
    assert (pdir / "metrics.csv").read_bytes().splitlines()[1].startswith(b"caf\xe9,")
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_bad_options_are_user_errors(folders, monkeypatch, capsys):
    pdir, gdir = folders
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--crop-border", "-1"], monkeypatch) == 2
    assert cli(["--pred", str(pdir), "--gt", str(gdir), "--lpips-vgg", str(pdir / "nope.pth")],
               monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "crop-border" in err[0] and "nope.pth" in err[1]


# ---- as a user runs it -------------------------------------------------------------------------------

def test_subprocess_json(folders):
    pdir, gdir = folders
    proc = subprocess.run([sys.executable, "-m", "degsr", "eval", "--pred", str(pdir), "--gt", str(gdir),
                           "--crop-border", str(CROP), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = read_csv(pdir / "metrics.csv")
    assert summary["n"] == len(rows) == 3 and summary["psnr_inf"] == 2
    assert summary["psnr_y"] == pytest.approx(float(rows[0]["psnr_y"]), abs=1e-5)
