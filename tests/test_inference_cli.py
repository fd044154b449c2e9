"""``degsr sr`` / ``degsr eval`` / ``degsr bench infer`` on the tiny model and real photos."""

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base folder, a stage-1 export and a (perturbed) adapter that records it."""
    from degsr.estimator.config import tiny_net
    from degsr.estimator.export import save_estimator
    from degsr.estimator.network import DegradationEstimator
    from degsr.sr.tiny_folder import save_tiny_pretrained
    from degsr.sr.config import LoraConfig, ModelConfig
    from degsr.sr.model import SRModel, save_adapter

    root = tmp_path_factory.mktemp("trained")
    save_tiny_pretrained(root / "base")
    torch.manual_seed(0)
    save_estimator(DegradationEstimator(tiny_net()), root / "est")
    net = SRModel(ModelConfig(pretrained=str(root / "base")), LoraConfig())
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_adapter(net, root / "adapter", extra={"scale": 4, "upsample_mode": "bicubic",
                                              "estimator": str(root / "est")})
    return root


def test_merged_path_equals_unmerged(trained):
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    lr = torch.rand(1, 3, 24, 20)
    opts = UpscaleOptions(color_fix="none")
    w = up.net.comp.unet.conv_out.base_layer.weight
    w0 = w.detach().clone()
    merged, d = up(lr, opts)
    assert not torch.equal(w, w0)  # folded, and kept for the next call with the same vector
    up.merge = False
    unmerged, d2 = up(lr, opts)
    assert torch.equal(w, w0)  # the unmerged call put the original weights back first
    assert torch.equal(d, d2)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=2e-5)
    up.merge = True
    again, _ = up(lr, opts)  # weights restored after the merged call
    torch.testing.assert_close(again, merged, rtol=0, atol=0)


def test_a_refold_that_fails_half_way_leaves_the_base_weights(trained, monkeypatch):
    """An upscaler kept alive after an error (a notebook, a server): the vector-2 fold fails
    after the VAE encoder was refolded; the next vector-1 call must not reuse the mixed weights."""
    import degsr.sr.model as model_mod
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    base = {k: v.clone() for k, v in up.net.comp.state_dict().items()}
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    d1 = UpscaleOptions(color_fix="none", blur=0.1, noise=0.2)
    first, _ = up(lr, d1)
    real = model_mod.fold

    def fails_on_the_unet(module, c, **kw):
        if module is up.net.comp.unet:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(module, c, **kw)

    monkeypatch.setattr(model_mod, "fold", fails_on_the_unet)
    with pytest.raises(RuntimeError, match="simulated"):
        up(lr, UpscaleOptions(color_fix="none", blur=0.9, noise=0.8))
    for k, v in up.net.comp.state_dict().items():  # LoRA factors included: nothing changed
        assert torch.equal(v, base[k]), k
    monkeypatch.setattr(model_mod, "fold", real)
    again, _ = up(lr, d1)
    assert torch.equal(again, first)


def test_sr_then_eval_on_real_photos_with_a_bad_file(trained, tmp_path, degsr_cmd):
    from degsr.data.photos import load_photo

    hr = load_photo("chelsea")[:128, :160]
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(hr).save(tmp_path / "gt" / "cat.png")
    lr = np.asarray(Image.fromarray(hr).resize((40, 32), Image.BICUBIC))
    Image.fromarray(lr).save(tmp_path / "in" / "cat.png")
    (tmp_path / "in" / "broken.png").write_text("not an image")
    (tmp_path / "in" / "more").mkdir()  # another cat: its output name is taken
    Image.fromarray(lr).save(tmp_path / "in" / "more" / "cat.jpg")
    out = tmp_path / "out"
    cmd = [*degsr_cmd, "sr", "--adapter", str(trained / "adapter"), "--pretrained", str(trained / "base"),
           str(tmp_path / "in"), "--out", str(out), "--tile", "8", "--tile-overlap", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and sum("broken.png" in e for e in errors) == 1
    assert f"error: {tmp_path / 'in' / 'more' / 'cat.jpg'}: its output" in "\n".join(errors)
    sr = np.asarray(Image.open(out / "cat.png"))
    assert sr.shape == (128, 160, 3)
    stamp = (out / "cat.png").stat().st_mtime_ns
    r2 = subprocess.run(cmd, capture_output=True, text=True)  # rerun: finished outputs are kept
    assert (out / "cat.png").stat().st_mtime_ns == stamp and "1 already there" in r2.stderr
    (tmp_path / "in" / "broken.png").unlink()
    r3 = subprocess.run([*cmd[:-5], str(tmp_path / "in"), "--out", str(tmp_path / "in")],
                        capture_output=True, text=True)
    assert r3.returncode == 1 and "would overwrite an input" in r3.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "in" / "cat.png")), lr)
    ev = subprocess.run([*degsr_cmd, "eval", "--pred", str(out), "--gt", str(tmp_path / "gt"), "--json"],
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    summary = json.loads(ev.stdout)
    assert summary["n"] == 1 and summary["psnr_y"] > 5


def test_sr_dial_overrides_estimator_and_rejects_bad_values(trained, tmp_path, degsr_cmd):
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    lr = torch.rand(1, 3, 16, 16)
    _, d = up(lr, UpscaleOptions(blur=0.9, noise=0.1, color_fix="none"))
    assert d.tolist() == [[pytest.approx(0.9), pytest.approx(0.1)]]
    r = subprocess.run([*degsr_cmd, "sr", "--adapter", str(trained / "adapter"), "x.png", "--out",
                        str(tmp_path), "--blur", "1.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "--blur" in r.stderr and "Traceback" not in r.stderr


def test_bench_infer_prints_json(degsr_cmd):
    r = subprocess.run([*degsr_cmd, "bench", "infer", "--arch", "tiny", "--device", "cpu", "--sizes", "64",
                        "--batch", "2", "--iters", "1", "--tiled", "128", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert set(out["ms_per_image"]["64"]) == {"bare", "ours", "ours_refold", "ours_unmerged"}
    assert out["batch_512"]["bare_img_per_s"] > 0 and out["batch_512"]["ours_img_per_s"] > 0
    assert out["tiled"]["size"] == 128 and out["tiled"]["s_per_image"] > 0


def test_a_batch_equals_one_image_at_a_time(trained):
    """B = 2 with the estimator's own vector per image (unmerged, per-sample modulation) and
    with one dialled vector (merged) give what two single-image (merged) calls give."""
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    lr = torch.rand(2, 3, 20, 24)
    for opts in (UpscaleOptions(color_fix="wavelet"),
                 UpscaleOptions(color_fix="adain", blur=0.3, noise=0.6)):
        batched, d = up(lr, opts)
        singles = [up(lr[i:i + 1], opts) for i in range(2)]
        assert not torch.equal(d[0], d[1]) or opts.blur is not None  # distinct vectors, unless dialled
        for i, (one, d1) in enumerate(singles):
            torch.testing.assert_close(d[i:i + 1], d1, rtol=0, atol=1e-6)
            torch.testing.assert_close(batched[i:i + 1], one, rtol=0, atol=2e-5)


def test_sr_batch_groups_images_by_size(trained, tmp_path, degsr_cmd):
    from degsr.data.photos import load_photo

    (tmp_path / "in").mkdir()
    photo = load_photo("coffee")
    crops = {"a": photo[:24, :32], "b": photo[40:64, 100:132], "c": photo[80:104, 200:232],
             "odd": photo[:20, :20]}
    for name, img in crops.items():
        Image.fromarray(np.ascontiguousarray(img)).save(tmp_path / "in" / f"{name}.png")
    base = [*degsr_cmd, "sr", "--adapter", str(trained / "adapter"), "--pretrained",
            str(trained / "base"), str(tmp_path / "in")]
    for batch in ("1", "2"):
        r = subprocess.run([*base, "--out", str(tmp_path / f"b{batch}"), "--batch", batch],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    for name, img in crops.items():
        one = np.asarray(Image.open(tmp_path / "b1" / f"{name}.png")).astype(int)
        two = np.asarray(Image.open(tmp_path / "b2" / f"{name}.png")).astype(int)
        assert one.shape == (img.shape[0] * 4, img.shape[1] * 4, 3)
        assert np.abs(one - two).max() <= 1  # float rounding may flip a pixel by one level
    r = subprocess.run([*base, "--out", str(tmp_path / "x"), "--batch", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--batch" in r.stderr


def test_sr_keeps_transparency(trained, tmp_path, degsr_cmd):
    """An RGBA input: the RGB goes through the model exactly as without alpha (the same pixels
    saved as RGB), the alpha is upscaled beside it: transparent left half, opaque right half."""
    from degsr.data.photos import load_photo

    rgb = np.ascontiguousarray(load_photo("coffee")[40:64, 100:132])  # 24 x 32
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 16:] = 255
    (tmp_path / "in").mkdir()
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "in" / "logo.png")
    Image.fromarray(rgb).save(tmp_path / "in" / "plain.png")
    r = subprocess.run([*degsr_cmd, "sr", "--adapter", str(trained / "adapter"), "--pretrained",
                        str(trained / "base"), str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    logo, plain = Image.open(tmp_path / "out" / "logo.png"), Image.open(tmp_path / "out" / "plain.png")
    assert logo.mode == "RGBA" and plain.mode == "RGB" and logo.size == (128, 96)
    out = np.asarray(logo)
    assert np.array_equal(out[..., :3], np.asarray(plain))
    assert (out[:, :60, 3] == 0).all() and (out[:, 68:, 3] == 255).all()
    assert (np.diff(out[:, 56:72, 3].astype(int), axis=1) >= 0).all()  # a ramp at the edge


def test_sr_rerun_with_out_inside_the_input_folder(trained, tmp_path, degsr_cmd):
    """--out inside the input folder: the rerun skips the finished outputs instead of taking
    them for inputs; a file whose name looks like a glob is a file; outputs get an ordinary
    file's mode (mkstemp's 0600 was kept); a device that is not there is one line."""
    import os

    from degsr.data.photos import load_photo

    src = tmp_path / "photos"
    src.mkdir()
    for name, (y, x) in {"a": (0, 0), "photo [1]": (40, 100)}.items():
        Image.fromarray(np.ascontiguousarray(load_photo("coffee")[y:y + 16, x:x + 24])).save(
            src / f"{name}.png")
    base = [*degsr_cmd, "sr", "--adapter", str(trained / "adapter"), "--pretrained",
            str(trained / "base")]
    r = subprocess.run([*base, str(src), "--out", str(src / "sr")], capture_output=True, text=True)
    assert r.returncode == 0 and "2 written" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([*base, str(src), "--out", str(src / "sr")], capture_output=True, text=True)
    assert r.returncode == 0 and "0 written, 2 already there, 0 failed" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([*base, str(src / "photo [1].png"), "--out", str(tmp_path / "one")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "one" / "photo [1].png").is_file(), r.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "one" / "photo [1].png").stat().st_mode & 0o777 == 0o666 & ~umask
    r = subprocess.run([*base, str(src), "--out", str(tmp_path / "x"), "--device", "gpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--device gpu" in r.stderr


def _sr(trained, *args) -> int:
    """``degsr sr`` in this process (its exit status)."""
    from degsr.cli import main

    return main(["sr", "--adapter", str(trained / "adapter"), "--pretrained", str(trained / "base"),
                 *map(str, args)])


def _crop(y, x, h=16, w=24):
    from degsr.data.photos import load_photo

    return Image.fromarray(np.ascontiguousarray(load_photo("coffee")[y:y + h, x:x + w]))


def test_sr_skips_and_replaces_only_files_it_wrote(trained, tmp_path, capsys):
    """A file in --out that degsr did not write is neither taken for a finished output nor
    replaced, even with --overwrite; an input folder's own photo inside --out stays an input
    (the first run's outputs there do not); a symbolic link loop, a folder where an output
    would go: one line each, the rest is done."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _crop(0, 0).save(src / "b.png")
    _crop(40, 100).save(src / "sub" / "b.png")  # the user's photo, inside --out
    _crop(80, 200).save(src / "d.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    mine = (src / "sub" / "b.png").read_bytes()
    for overwrite in ([], ["--overwrite"]):
        assert _sr(trained, src, "--out", src / "sub", *overwrite) == 1
        err = capsys.readouterr().err
        assert f"{src / 'b.png'}: output {src / 'sub' / 'b.png'} would overwrite an input" in err
        assert f"{src / 'sub' / 'b.png'}: its output name" in err  # the same name as b.png's
        assert "loop.png: cannot resolve" in err
        assert "1 written, 0 already there, 3 failed" in err, err
        assert (src / "sub" / "b.png").read_bytes() == mine
        assert Image.open(src / "sub" / "d.png").size == (96, 64)
    other = tmp_path / "other"
    (other / "b.png").mkdir(parents=True)
    _crop(0, 0).save(other / "d.png")
    theirs = (other / "d.png").read_bytes()
    assert _sr(trained, src / "b.png", src / "d.png", "--out", other, "--overwrite") == 1
    err = capsys.readouterr().err
    assert err.count("exists and is not a degsr output") == 2 and "0 written" in err, err
    assert (other / "d.png").read_bytes() == theirs and (other / "b.png").is_dir()


def test_sr_output_keeps_the_inputs_colour_profile(trained, tmp_path, capsys):
    """The output's values are the input's colour space's: an RGB ICC profile (a phone's P3)
    goes with them, or a viewer shows them as sRGB; a gray one with a gray input's gray output;
    a gray one in an RGB file does not fit it."""
    from PIL import ImageCms

    rgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    gray_icc = rgb_icc[:16] + b"GRAY" + rgb_icc[20:]
    _crop(0, 0).save(tmp_path / "p3.jpg", icc_profile=rgb_icc)
    _crop(0, 0).convert("RGBA").save(tmp_path / "logo.png", icc_profile=rgb_icc)
    _crop(0, 0).convert("L").save(tmp_path / "gray.png", icc_profile=gray_icc)
    _crop(0, 0).save(tmp_path / "mismatch.png", icc_profile=gray_icc)
    _crop(0, 0).save(tmp_path / "plain.png")
    assert _sr(trained, *sorted(tmp_path.glob("*.*")), "--out", tmp_path / "out") == 0, \
        capsys.readouterr().err
    got = {p.stem: Image.open(p).info.get("icc_profile") for p in (tmp_path / "out").iterdir()}
    assert got == {"p3": rgb_icc, "logo": rgb_icc, "gray": gray_icc, "mismatch": None,
                   "plain": None}


def test_a_gray_input_gives_a_gray_output_the_luma_of_the_colour_one(trained, tmp_path, capsys):
    """A black-and-white photo comes back gray (L; LA with its alpha), not tinted by the
    model's colour: the luma (ITU-R 601-2, computed here in numpy) of what the same pixels as
    RGB give, to the rounding of PIL's fixed-point conversion."""
    gray = np.asarray(_crop(0, 0).convert("L"))
    Image.fromarray(gray).save(tmp_path / "bw.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([gray, np.full_like(gray, 200)])).save(tmp_path / "bwa.png")
    assert _sr(trained, *sorted(tmp_path.glob("*.png")), "--out", tmp_path / "out") == 0, \
        capsys.readouterr().err
    out = {p.stem: Image.open(p) for p in (tmp_path / "out").iterdir()}
    assert {k: im.mode for k, im in out.items()} == {"bw": "L", "bwa": "LA", "rgb": "RGB"}
    rgb = np.asarray(out["rgb"]).astype(np.float64)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert np.abs(np.asarray(out["bw"]).astype(np.float64) - luma).max() <= 1.0
    assert np.array_equal(np.asarray(out["bwa"])[..., 0], np.asarray(out["bw"]))


def test_an_adapter_without_estimator_is_one_line_before_any_image(trained, tmp_path, capsys):
    """No estimator recorded (stage 2 trained without one), none given, one score not dialled:
    one line, exit 2, no image read; both scores dialled: it runs."""
    import json
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    meta = json.loads((adapter / "adapter.json").read_text())
    (adapter / "adapter.json").write_text(json.dumps({**meta, "estimator": None}))
    for name in "abc":
        _crop(0, 0).save(tmp_path / f"{name}.png")
    images = sorted(tmp_path.glob("*.png"))
    from degsr.cli import main

    def sr(*dials) -> int:
        return main([*map(str, ["sr", "--adapter", adapter, "--pretrained", trained / "base",
                                *images, "--out", tmp_path / "o", *dials])])

    assert sr("--noise", "0.3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no estimator recorded" in err, err
    assert sr("--noise", "0.3", "--blur", "0.2") == 0


def test_sr_sigterm_mid_write_leaves_no_partial_file(trained, tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, timeout, scancel) while an output is being written: the temporary file
    is removed as on Ctrl-C, degsr exits 143, and the caller's SIGTERM handler is back."""
    import os
    import signal

    import degsr.io

    _crop(0, 0).save(tmp_path / "a.png")

    def interrupted(path, data):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:10])
                f.flush()
                os.kill(os.getpid(), signal.SIGTERM)
                f.write(data[10:])
        degsr.io.atomic_write(path, write)

    monkeypatch.setattr(degsr.io, "atomic_write_bytes", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert _sr(trained, tmp_path / "a.png", "--out", tmp_path / "out") == 143
    assert "terminated" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


def test_sr_rejects_a_guidance_or_out_it_cannot_use(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _crop(0, 0).save(tmp_path / "a.png")
    for args, says in ((["--out", tmp_path / "o", "--guidance", "nan"], "--guidance"),
                       (["--out", tmp_path / "o", "--guidance", "inf"], "--guidance"),
                       (["--out", tmp_path / "file" / "sub"], "cannot create the folder")):
        assert _sr(trained, tmp_path / "a.png", *args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "o").exists()


CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes"


def test_sr_out_of_memory_splits_the_batch_and_reports_only_what_does_not_fit(
        trained, tmp_path, monkeypatch, capsys):
    """A batch that runs out of memory is retried one image at a time; an image that alone does
    not fit is one error line, the others are written, exit status 1."""
    import degsr.cli
    from degsr.data.photos import load_photo
    from degsr.inference.upscale import Upscaler

    (tmp_path / "in").mkdir()
    photo = load_photo("coffee")
    for name, img in {"a": photo[:24, :32], "b": photo[40:64, 100:132],
                      "big": photo[:40, :40]}.items():
        Image.fromarray(np.ascontiguousarray(img)).save(tmp_path / "in" / f"{name}.png")
    real, calls = Upscaler.__call__, []

    def tight(self, lr, opts):
        calls.append(tuple(lr.shape))
        if lr.shape[0] > 1 or lr.shape[-1] >= 40:  # batches of two and the 40 x 40 image
            raise RuntimeError(CPU_OOM)
        return real(self, lr, opts)

    monkeypatch.setattr(Upscaler, "__call__", tight)
    rc = degsr.cli.main(["sr", "--adapter", str(trained / "adapter"), "--pretrained",
                         str(trained / "base"), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                         "--batch", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1 and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "b.png"]
    assert len(err) == 1 and "big.png" in err[0] and "out of memory" in err[0]
    assert calls == [(2, 3, 24, 32), (1, 3, 24, 32), (1, 3, 24, 32), (1, 3, 40, 40)]
    monkeypatch.setattr(Upscaler, "__call__", lambda self, lr, opts: 1 / 0)  # not a memory error
    with pytest.raises(ZeroDivisionError):
        degsr.cli.main(["sr", "--adapter", str(trained / "adapter"), "--pretrained",
                        str(trained / "base"), str(tmp_path / "in"), "--out", str(tmp_path / "p")])


def test_too_small_to_estimate_points_to_the_dial(trained):
    from degsr.errors import UserError
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    tiny = torch.rand(1, 3, 1, 1)
    with pytest.raises(UserError, match=r"too small .*--blur B --noise N"):
        up(tiny, UpscaleOptions(color_fix="none"))
    out, d = up(tiny, UpscaleOptions(color_fix="none", blur=0.2, noise=0.1))
    assert out.shape == (1, 3, 4, 4) and d.tolist() == [[pytest.approx(0.2), pytest.approx(0.1)]]


def test_sr_batch_of_many_sizes_does_not_wait_for_the_end(trained, tmp_path, capsys, monkeypatch):
    """--batch 2 over images of six different sizes: no two share a size, so no batch fills;
    at most 2 × batch images are held, the oldest partial batch going through first."""
    import degsr.inference.upscale as upscale
    import degsr.io

    for i in range(6):
        _crop(8 * i, 0, h=8 + i, w=12).save(tmp_path / f"{i}.png")
    read, calls = [], []
    real_read, real_call = degsr.io.read_image, upscale.Upscaler.__call__
    monkeypatch.setattr(degsr.io, "read_image", lambda p, **k: read.append(p) or real_read(p, **k))
    monkeypatch.setattr(upscale.Upscaler, "__call__", lambda self, lr, opts: calls.append(
        (len(read), lr.shape[-2])) or real_call(self, lr, opts))
    assert _sr(trained, *sorted(tmp_path.glob("*.png")), "--out", tmp_path / "out", "--batch", 2) == 0
    assert calls == [(5, 8), (6, 9), (6, 10), (6, 11), (6, 12), (6, 13)]
    assert len(list((tmp_path / "out").glob("*.png"))) == 6


def _atrous(x: torch.Tensor, levels: int = 5):
    """(high, low) of the à-trous decomposition in float64, written out: the 9 shifted copies per
    level with clamped (replicate) indices, dilations 1, 2, 4, ..."""
    k = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    h, w = x.shape[-2:]
    low = x.double()
    for lvl in range(levels):
        d = 2 ** lvl
        nxt = torch.zeros_like(low)
        for a in range(3):
            rows = torch.clamp(torch.arange(h) + (a - 1) * d, 0, h - 1)
            for b in range(3):
                cols = torch.clamp(torch.arange(w) + (b - 1) * d, 0, w - 1)
                nxt += k[a][b] / 16 * low[..., rows[:, None], cols[None, :]]
        low = nxt
    return x.double() - low, low


@torch.no_grad()
def test_upscale_is_the_one_step_cfg_formula_on_the_padded_bicubic_input(trained):
    """Upscaler (CFG 1.07, no colour fix) against the method written out on the networks (the
    LoRA folded for d, as the call left it; merged == unmerged is tested above): bicubic x4 (the
    adapter's mode), reflect pad to 64 (numpy), posterior mean x sf, eps = eps_neg + g (eps_pos -
    eps_neg), x0, decode, clamp, crop the top left, [0, 1]; the same with latent tiles of the
    given size and overlap (the blending itself is tested in test_inference_ops). Then the
    wavelet fix:
    high(out) + low(bicubic LR), clamped, with the decomposition written out."""
    import math

    import torch.nn.functional as F

    from degsr.inference.tiling import tiled_latent_apply
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    assert up.upsample_mode == "bicubic" and up.scale == 4
    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(4))
    opts = UpscaleOptions(color_fix="none", blur=0.7, noise=0.2)
    fixed, _ = up(lr, UpscaleOptions(color_fix="wavelet", blur=0.7, noise=0.2))
    got, d = up(lr, opts)
    assert d.tolist() == [[pytest.approx(0.7), pytest.approx(0.2)]]

    lr_up = F.interpolate(lr, size=(48, 40), mode="bicubic", align_corners=False).clamp(0, 1)
    x = torch.from_numpy(np.pad((lr_up * 2 - 1).numpy(), ((0, 0), (0, 0), (0, 16), (0, 24)),
                                mode="reflect"))
    comp, g = up.net.comp, opts.guidance
    sf, ab = comp.scaling_factor, comp.alpha_bar_t
    z = comp.vae.encode(x).latent_dist.mode() * sf
    emb = torch.cat([comp.pos_embeds, comp.neg_embeds])

    def x0_of(zt, scale=g):
        e_pos, e_neg = comp.unet(torch.cat([zt, zt]), torch.full((2,), 999), emb).sample.chunk(2)
        eps = e_neg + scale * (e_pos - e_neg)
        return ((zt.double() - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)).float()

    def image(x0):
        return comp.vae.decode(x0 / sf).sample.clamp(-1, 1)[..., :48, :40] * 0.5 + 0.5

    want = image(x0_of(z))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # the positive branch alone is measurably different: the check above does see the CFG
    assert (image(x0_of(z, 1.0)) - want).abs().max() > 1e-3
    # latent tiles of 4 with overlap 2 on the 8 x 8 latent (the blending is tested on its own)
    tiled, _ = up(lr, UpscaleOptions(color_fix="none", blur=0.7, noise=0.2, tile=4,
                                     tile_overlap=2))
    torch.testing.assert_close(tiled, image(tiled_latent_apply(x0_of, z, 4, 2)), rtol=0,
                               atol=2e-5)

    high, _ = _atrous(want)
    _, low = _atrous(lr_up)
    torch.testing.assert_close(fixed.double(), (high + low).clamp(0, 1), rtol=0, atol=2e-5)


@torch.no_grad()
def test_one_dialled_score_keeps_the_estimators_other_score(trained):
    """--noise alone: the blur column is the exported estimator's blur score of the raw LR
    (column 0 of its output, loaded here on its own), the noise column is the dial; and the
    other way round."""
    from degsr.estimator.export import load_estimator
    from degsr.inference.upscale import Upscaler, UpscaleOptions

    up = Upscaler.load(trained / "adapter", trained / "base")
    est = load_estimator(trained / "est")
    lr = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(5))
    scores = est(lr)
    assert (scores[:, 0] - scores[:, 1]).abs().min() > 1e-4  # the columns can be told apart
    d = up.degradation(lr, UpscaleOptions(noise=0.35))
    torch.testing.assert_close(d[:, 0], scores[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(d[:, 1], torch.full((2,), 0.35), rtol=0, atol=1e-7)
    d = up.degradation(lr, UpscaleOptions(blur=0.6))
    torch.testing.assert_close(d[:, 0], torch.full((2,), 0.6), rtol=0, atol=1e-7)
    torch.testing.assert_close(d[:, 1], scores[:, 1], rtol=0, atol=1e-6)


def test_sr_vae_tile_reaches_the_vae_and_is_checked(trained, tmp_path, degsr_cmd, monkeypatch):
    """--vae-tile sets the VAE's tiles (encoder in pixels, decoder in latent pixels); a size that
    is not a multiple of 64 is one line before anything loads."""
    import degsr.cli
    import degsr.inference.upscale as upscale

    seen = {}
    real_encode, real_decode = upscale.tiled_encode, upscale.tiled_decode
    monkeypatch.setattr(upscale, "tiled_encode", lambda fn, x, tile, overlap, f: (
        seen.update(encode=(tile, overlap)), real_encode(fn, x, tile, overlap, f))[1])
    monkeypatch.setattr(upscale, "tiled_decode", lambda fn, z, tile, overlap, f: (
        seen.update(decode=(tile, overlap, f)), real_decode(fn, z, tile, overlap, f))[1])
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((48, 40, 3), 128, np.uint8)).save(tmp_path / "in" / "a.png")
    assert degsr.cli.main(["sr", "--adapter", str(trained / "adapter"), "--pretrained",
                           str(trained / "base"), str(tmp_path / "in"), "--out",
                           str(tmp_path / "out"), "--vae-tile", "128"]) == 0
    f = seen["decode"][2]
    assert seen["encode"] == (128, 32) and seen["decode"] == (128 // f, 128 // f // 4, f)
    assert np.asarray(Image.open(tmp_path / "out" / "a.png")).shape == (192, 160, 3)
    r = subprocess.run([*degsr_cmd, "sr", "--adapter", str(trained / "adapter"), "x.png", "--out",
                        str(tmp_path / "bad"), "--vae-tile", "100"], capture_output=True, text=True)
    assert r.returncode != 0 and "--vae-tile must be a multiple of 64" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()
