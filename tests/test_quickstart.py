"""``degsr quickstart``: one short end-to-end run (checked against independent computations of
its outputs), a rerun that reuses everything, and the one-line errors."""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

MINUTES = "0.75"


def _img(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def _y(img: np.ndarray) -> np.ndarray:
    """BT.601 Y on 0-255, written out channel by channel (independent of degsr's matmul)."""
    r, g, b = (img[..., i].astype(np.float64) / 255.0 for i in range(3))
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def _psnr_y(a: np.ndarray, b: np.ndarray, border: int) -> float:
    ya, yb = (_y(x)[border:-border, border:-border] for x in (a, b))
    return float(10 * np.log10(255.0**2 / np.mean((ya - yb) ** 2)))


def _laplacian_var(img: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian by an explicit 3x3 correlation loop."""
    y = _y(img)
    k = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    h, w = y.shape
    out = np.zeros((h - 2, w - 2))
    for dy in range(3):
        for dx in range(3):
            out += k[dy, dx] * y[dy:dy + h - 2, dx:dx + w - 2]
    return float(out.var())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, degsr_cmd_module):
    out = tmp_path_factory.mktemp("qs") / "out"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [*degsr_cmd_module, "quickstart", "--out", str(out), "--minutes", MINUTES]
    t0 = time.monotonic()
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    t1 = time.monotonic()
    assert first.returncode == 0, first.stderr[-4000:]
    stamps = {p: p.stat().st_mtime_ns for p in [
        out / "prior/vae/diffusion_pytorch_model.safetensors",
        out / "runs/estimator/export/estimator.safetensors",
        out / "runs/sr/export/adapter.safetensors",
        out / "runs/sr/checkpoints/last.ckpt", out / "eval/degsr/chelsea.png"]}
    t2 = time.monotonic()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    t3 = time.monotonic()
    assert second.returncode == 0, second.stderr[-4000:]
    return {"out": out, "first": first, "second": second, "stamps": stamps,
            "t_first": t1 - t0, "t_second": t3 - t2}


@pytest.fixture(scope="module")
def degsr_cmd_module():
    import sys

    exe = Path(sys.executable).with_name("degsr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "degsr"]


def test_outputs_match_independent_computations(runs):
    out = runs["out"]
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["photos"]) == ["chelsea", "coffee", "immunohistochemistry"]
    for name, e in res["photos"].items():
        hr = _img(out / "eval/hr" / f"{name}.png")
        src = _img(out / "photos/heldout" / f"{name}.png")
        h, w = hr.shape[:2]
        assert h % 4 == 0 and w % 4 == 0 and np.array_equal(hr, src[:h, :w])
        lr = _img(out / "eval/lr" / f"{name}.png")
        assert np.array_equal(lr, np.asarray(Image.fromarray(hr).resize((w // 4, h // 4),
                                                                         Image.BICUBIC)))
        up = F.interpolate(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255, size=(h, w),
                           mode="bicubic", align_corners=False).clamp(0, 1)
        up = (up[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(_img(out / "eval/bicubic" / f"{name}.png"), up)
        for method, folder in (("bicubic", "bicubic"), ("degsr", "degsr")):
            img = _img(out / "eval" / folder / f"{name}.png")
            assert img.shape == hr.shape
            assert e[method]["psnr_y"] == pytest.approx(_psnr_y(img, hr, 4), abs=1e-5)
            assert e[method]["sharpness"] == pytest.approx(_laplacian_var(img), rel=1e-9)
        assert e["hr"]["sharpness"] == pytest.approx(_laplacian_var(hr), rel=1e-9)
        gap = e["degsr"]["psnr_y"] - e["bicubic"]["psnr_y"]
        assert e["targets"]["psnr_within_2db"] == (gap >= -2)
        report = (out / "report.md").read_text()
        assert f"| {name} | degsr | {e['degsr']['psnr_y']:.2f} |" in report
    # SR output is not the bicubic baseline: the model did something
    assert not np.array_equal(_img(out / "eval/degsr/chelsea.png"),
                              _img(out / "eval/bicubic/chelsea.png"))


def test_comparison_is_bicubic_sr_hr_side_by_side(runs):
    out = runs["out"]
    comp = _img(out / "comparison.png")
    panels = [_img(out / "eval" / f / "chelsea.png") for f in ("bicubic", "degsr", "hr")]
    w = panels[0].shape[1]
    assert comp.shape == (panels[0].shape[0], 3 * w, 3)
    for i, panel in enumerate(panels):
        assert np.array_equal(comp[:, i * w:(i + 1) * w], panel)


def test_prior_is_a_fitted_sd_turbo_style_folder(runs):
    """The stand-in prior loads like SD-Turbo, and its VAE reconstructs a held-out photo better
    than the random tiny VAE it started from."""
    from diffusers import AutoencoderKL

    from degsr.quickstart.prior import PRIOR_ARCH
    from degsr.sr.folder_check import check_pretrained_folder
    from degsr.sr.tiny_folder import save_tiny_pretrained

    out = runs["out"]
    configs = check_pretrained_folder(out / "prior")
    assert configs["vae"]["latent_channels"] == configs["unet"]["in_channels"] == 16
    assert configs["scheduler"]["prediction_type"] == "v_prediction"
    adapter = json.loads((out / "runs/sr/export/adapter.json").read_text())
    assert adapter["estimator"] == str(out / "runs/estimator/export")
    config = (out / "runs/sr/config.yaml").read_text()
    assert f"pretrained: {out / 'prior'}" in config
    random_dir = out.parent / "random_base"
    save_tiny_pretrained(random_dir, seed=0, **PRIOR_ARCH)
    x = torch.from_numpy(_img(out / "eval/hr/chelsea.png")[:128, :128]).permute(2, 0, 1)[None]
    x = x.float() / 127.5 - 1

    def psnr(folder):
        vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        return float(10 * torch.log10(4 / F.mse_loss(rec, x)))

    assert psnr(out / "prior") > psnr(random_dir) + 3


def test_every_fit_makes_its_steps_unless_its_time_cap_stopped_it(runs):
    """--minutes sets steps, not seconds: each fit makes its calibrated steps scaled by
    minutes / 10, or names itself as capped (a machine more than CAP x slower)."""
    from degsr.quickstart.run import CALIBRATION

    out = runs["out"]
    state = json.loads((out / "quickstart.json").read_text())
    want = {k: max(1, round(n * float(MINUTES) / 10)) for k, (n, _) in CALIBRATION.items()}
    stamp = json.loads((out / "prior/quickstart_prior.json").read_text())
    made = {"vae": stamp["vae"]["steps"], "unet": stamp["unet"]["steps"],
            "stage1": state["steps"]["stage1"]["detail"]["global_step"],
            "stage2": state["steps"]["stage2"]["detail"]["global_step"]}
    cut = [line for s in ("prior", "stage1", "stage2")
           for line in state["steps"][s]["detail"]["capped"]]
    for fit in want:
        if made[fit] != want[fit]:
            name = f"prior/{fit}" if fit in ("vae", "unet") else fit
            assert made[fit] < want[fit] and f"{name}: {made[fit]} of {want[fit]} steps" in cut
    report = (out / "report.md").read_text()
    assert ("Stopped at the time cap" in report) == bool(cut)


def test_stages_logged_to_separate_wandb_offline_runs(runs):
    out = runs["out"]
    est = list((out / "runs/estimator/wandb").glob("offline-run-*"))
    sr = list((out / "runs/sr/wandb").glob("offline-run-*"))
    assert len(est) == 1 and len(sr) == 1
    # Lightning hands wandb.init anonymous=None, which wandb warns about at every start
    assert "anonymous setting" not in runs["first"].stderr


def test_rerun_reuses_everything(runs):
    out, second = runs["out"], runs["second"]
    for step in ("photos", "shards", "prior", "stage1", "stage2", "sr"):
        assert f"{step}: already complete, reused" in second.stderr
    for path, mtime in runs["stamps"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert runs["t_second"] < runs["t_first"] / 3
    state = json.loads((out / "quickstart.json").read_text())
    assert state["steps"]["stage2"]["status"] == "reused"
    assert state["steps"]["stage2"]["seconds"] > 0  # the timing of the run that trained it


def test_bad_input_is_one_line_and_loses_nothing(tmp_path, degsr_cmd_module):
    keep = tmp_path / "out" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    cases = [(["--out", str(keep.parent), "--minutes", m], "--minutes must be a finite number > 0")
             for m in ("0", "-2", "inf", "nan")]
    cases += [(["--out", str(keep / "sub")], "cannot write there"),
              (["--out", str(keep)], "exists and is not a folder"),
              (["--out", str(keep.parent), "--pretrained", str(tmp_path / "nope")],
               "model.pretrained")]
    for args, message in cases:
        r = subprocess.run([*degsr_cmd_module, "quickstart", *args], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert keep.read_text() == "mine"
    assert sorted(p.name for p in keep.parent.iterdir()) == ["keep.txt"]


def test_busy_cores_from_two_proc_stat_samples(monkeypatch):
    """The idle-core count comes from the busy share of the jiffies between two samples."""
    import io

    from degsr.errors import UserError
    from degsr.quickstart import run as qs

    lines = iter(["cpu  100 0 50 800 50 0 0 0 0 0\n",      # busy 150 of 1000
                  "cpu  400 0 150 1100 50 0 0 0 0 0\n"])   # +400 busy of +700 in all
    monkeypatch.setattr("builtins.open", lambda *a, **k: io.StringIO(next(lines)))
    before, after = qs._cpu_times(), qs._cpu_times()
    assert before == (150, 1000) and after == (550, 1700)
    assert qs.busy_cores(before, after, 2) == pytest.approx(2 * 400 / 700)
    monkeypatch.setattr(qs, "_cpu_times", lambda: None)   # no /proc/stat: the load average
    monkeypatch.setattr(qs.os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    monkeypatch.setattr(qs.os, "cpu_count", lambda: 4)
    assert qs.pick_threads(None) == 2 and qs.pick_threads(3) == 3
    with pytest.raises(UserError, match="--threads"):
        qs.pick_threads(0)


def test_prior_fits_anneal_over_their_steps_and_stop_at_their_cap(monkeypatch, tmp_path):
    """Each prior fit makes exactly its steps, its learning rate on the cosine of step / steps
    (closed form) however slow the machine (the VAE fit below sees 90 % of its cap gone at every
    step: the time must not move the schedule, or a slow day gives another prior); with a cap
    already passed it makes one step and says it was capped."""
    from degsr.quickstart import prior
    from degsr.sr.components import load_components
    from degsr.sr.config import ModelConfig
    from degsr.sr.tiny_folder import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "base", seed=0, **prior.PRIOR_ARCH)
    comp = load_components(ModelConfig(pretrained=str(tmp_path / "base")))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    lrs = []
    real_anneal = prior._anneal

    def anneal(opt, base, progress):
        real_anneal(opt, base, progress)
        lrs.append(opt.param_groups[0]["lr"])
    monkeypatch.setattr(prior, "_anneal", anneal)
    s = prior.PriorSettings(vae_steps=4, unet_steps=3, vae_cap=100.0, unet_cap=1e6,
                            vae_batch=2, unet_batch=1, unet_crop=32)
    clock = [0.0]  # the fit's start, then 90 s later at every look

    def slow():
        t, clock[0] = clock[0], 90.0
        return t
    with monkeypatch.context() as m:
        m.setattr(prior.time, "monotonic", slow)
        vae = prior.fit_vae(comp.vae, images, s)
    assert (vae["steps"], vae["planned_steps"], vae["capped"]) == (4, 4, False)
    np.testing.assert_allclose(lrs, [s.vae_lr * 0.5 * (1 + np.cos(np.pi * k / 4))
                                     for k in range(4)], rtol=1e-6)
    lrs.clear()
    unet = prior.fit_unet(comp, images, s)
    assert (unet["steps"], unet["capped"]) == (3, False)
    np.testing.assert_allclose(lrs, [s.unet_lr * 0.5 * (1 + np.cos(np.pi * k / 3))
                                     for k in range(3)], rtol=1e-6)
    s.vae_cap = s.unet_cap = 1e-9   # the cap is passed before the first step ends
    assert [prior.fit_vae(comp.vae, images, s)[k] for k in ("steps", "capped")] == [1, True]
    assert [prior.fit_unet(comp, images, s)[k] for k in ("steps", "capped")] == [1, True]


def test_a_capped_fit_is_warned_about_and_named_in_the_report(caplog):
    from degsr.quickstart import run as qs
    from degsr.quickstart.markdown import _capped

    assert qs.capped("sr", 650, 650, 540.0) == []
    with caplog.at_level("WARNING", logger="degsr"):
        assert qs.capped("sr", 300, 650, 540.0) == ["sr: 300 of 650 steps"]
    assert "stopped at its time cap (540 s) after 300 of 650 steps" in caplog.text
    steps = {"prior": {"detail": {"capped": ["prior/unet: 9 of 10 steps"]}},
             "stage1": {"status": "reused"}, "stage2": {"detail": {"capped": []}}}
    text = "\n".join(_capped({"steps": steps}))
    assert "**Stopped at the time cap**: prior/unet: 9 of 10 steps." in text
    steps["prior"]["detail"]["capped"] = []
    assert _capped({"steps": steps}) == []


def test_a_stage_stopped_by_sigusr1_is_not_marked_done(tmp_path):
    """fit() returns status 'preempted' after SIGUSR1 (saved, not exported): the quickstart
    stops with one line instead of marking the stage done (every rerun then failed)."""
    from degsr.errors import UserError
    from degsr.quickstart import run as qs

    with pytest.raises(UserError, match="stopped by SIGUSR1 at step 4.*rerun"):
        qs._stage(tmp_path, {"status": "preempted", "global_step": 4, "last_checkpoint": "x"})
    assert not (tmp_path / qs.DONE).exists()
    qs._stage(tmp_path, {"status": "finished"})
    assert (tmp_path / qs.DONE).is_file()


def test_sr_outputs_of_another_adapter_are_redone(runs, degsr_cmd_module):
    """The SR outputs carry a stamp of the adapter and base that made them: outputs of another
    (a --pretrained run in the same --out, or a set mixed by an interrupted sr) are redone.
    Last in this file: it changes the shared run."""
    out = runs["out"]
    stamp = out / "eval" / "degsr" / ".made_by.json"
    made = json.loads(stamp.read_text())
    assert made["pretrained"] == str(out / "prior")
    stamp.write_text(json.dumps({**made, "adapter": [0, 0]}))  # as if another adapter made them
    before = (out / "eval/degsr/chelsea.png").stat().st_mtime_ns
    r = subprocess.run([*degsr_cmd_module, "quickstart", "--out", str(out), "--minutes", MINUTES],
                       capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sr: already complete, reused" not in r.stderr
    assert (out / "eval/degsr/chelsea.png").stat().st_mtime_ns != before
    assert json.loads(stamp.read_text()) == made
