"""User-facing tools run as subprocesses: degsr degrade and the benchmarks."""

import json
import subprocess

import numpy as np
from PIL import Image


def test_degrade_writes_pairs_params_and_reports_bad_inputs(tmp_path, degsr_cmd):
    import skimage.data

    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "astro.png")
    Image.fromarray(skimage.data.chelsea()[:100, :90]).save(tmp_path / "small.jpg")  # < crop: padded
    (tmp_path / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    args = [*degsr_cmd, "degrade", str(tmp_path / "astro.png"), str(tmp_path / "broken.png"),
            str(tmp_path / "missing.png"), str(tmp_path / "small.jpg"), "--preset", "realesrgan",
            "--seed", "3", "--n-per-image", "2", "--crop", "128", "--scale", "4", "--out", str(out)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 2 and "broken.png" in err[0] and "missing.png" in err[1]
    records = [json.loads(line) for line in (out / "params.jsonl").read_text().splitlines()]
    assert [rec["stem"] for rec in records] == ["astro_0", "astro_1", "small_0", "small_1"]
    for rec in records:
        hr = np.asarray(Image.open(out / f"{rec['stem']}_hr.png"))
        lq = np.asarray(Image.open(out / f"{rec['stem']}_lq.png"))
        assert hr.shape == (128, 128, 3) and lq.shape == (32, 32, 3)
        assert 0 <= rec["scores"]["blur"] <= 1 and 0 <= rec["scores"]["noise"] <= 1
        p = rec["params"]
        assert p["resize1_mode"] in ("area", "bilinear", "bicubic") and isinstance(p["clean"], bool)
        assert 30 <= p["jpeg1_quality"] <= 95 and p["blur1_kernel_size"] in range(7, 22, 2)
    # the HR written is an actual crop of the source (un-sharpened), on the same seed again
    src = np.asarray(Image.open(tmp_path / "astro.png"))
    hr0 = np.asarray(Image.open(out / "astro_0_hr.png"))
    hits = [(y, x) for y in range(0, 385) for x in range(0, 385)
            if src[y, x, 0] == hr0[0, 0, 0] and np.array_equal(src[y:y + 128, x:x + 128], hr0)]
    assert hits
    again = tmp_path / "again"
    subprocess.run([*args[:-1], str(again)], capture_output=True, text=True)
    assert (again / "params.jsonl").read_text() == (out / "params.jsonl").read_text()
    assert (again / "astro_1_lq.png").read_bytes() == (out / "astro_1_lq.png").read_bytes()


def test_degrade_rejects_bad_options(tmp_path, degsr_cmd):
    for bad, word in ((["--crop", "130"], "--crop 130"), (["--scale", "0"], "--scale"),
                      (["--seed", "-1"], "--seed")):
        r = subprocess.run([*degsr_cmd, "degrade", "x.png", *bad, "--out", str(tmp_path)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and word in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_degrade_applies_overrides_and_reports_a_stem_clash(tmp_path, degsr_cmd):
    """key=value items are config overrides (they were taken for image paths), wherever they
    stand; a.jpg beside a.png is one error line and the other images are still degraded."""
    import skimage.data

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        Image.fromarray(skimage.data.astronaut()[:80, :80]).save(src / name)
    r = subprocess.run([*degsr_cmd, "degrade", "degradation.no_degradation_prob=1", str(src),
                        "--crop", "64", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(src / "a.png") in err[0] and str(src / "a.jpg") in err[0]
    records = [json.loads(line) for line in (tmp_path / "out" / "params.jsonl").read_text().splitlines()]
    assert [rec["stem"] for rec in records] == ["a_0", "b_0"]
    assert all(rec["params"]["clean"] and rec["scores"] == {"blur": 0.0, "noise": 0.0}
               for rec in records)  # the override reached the engine: every sample clean


def test_bench_options_are_checked_before_anything_runs(degsr_cmd):
    r = subprocess.run([*degsr_cmd, "bench", "degradation", "--iters", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--iters: must be >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_degradation_prints_json(degsr_cmd):
    r = subprocess.run([*degsr_cmd, "bench", "degradation", "--size", "64", "--batch", "2",
                        "--iters", "1", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["img_per_s"] > 0 and out["per_image_img_per_s"] > 0 and out["device"].startswith("cpu")


def test_bench_estimator_tiny_prints_json(degsr_cmd):
    """The tiny config degrades each crop 4 times (within-crop loss) and schedules its lr."""
    r = subprocess.run([*degsr_cmd, "bench", "estimator", "--config", "estimator_tiny", "--batch",
                        "8", "--size", "64", "--device", "cpu", "--steps", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bench"] == "estimator" and out["batch"] == 8 and out["size"] == 64
    assert out["img_per_s"] > 0 and out["train_only_img_per_s"] > 0
    bad = subprocess.run([*degsr_cmd, "bench", "estimator", "--config", "estimator_tiny", "--batch",
                          "6", "--device", "cpu"], capture_output=True, text=True)
    assert bad.returncode != 0 and "data.degradations_per_crop (4)" in bad.stderr


def test_bench_loader_prints_json(tmp_path, degsr_cmd):
    from degsr.data.photos import write_photos

    write_photos(tmp_path / "img", ("astronaut", "coins"))
    subprocess.run([*degsr_cmd, "shards", str(tmp_path / "img"), "--out", str(tmp_path / "sh"),
                    "--min-side", "64", "--min-bytes", "0"], check=True, capture_output=True)
    r = subprocess.run([*degsr_cmd, "bench", "loader", "--shards", str(tmp_path / "sh"), "--folder",
                        str(tmp_path / "img"), "--workers", "0", "--crop", "64", "--batch", "2",
                        "--batches", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shard_samples_per_s"] > 0 and out["folder_samples_per_s"] > 0 and out["images"] == 2


def test_bench_train_prints_json(degsr_cmd):
    r = subprocess.run([*degsr_cmd, "bench", "train", "--arch", "tiny", "--batch", "1", "--size", "64",
                        "--steps", "1", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["img_per_s"] > 0 and out["peak_mem_gib"] > 0 and out["trainable_params"] > 0


def test_verbose_before_or_after_the_subcommand():
    from degsr.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["config", "a.yaml"]).verbose is False
    assert parse(["-v", "config", "a.yaml"]).verbose is True
    assert parse(["config", "a.yaml", "-v"]).verbose is True
    assert parse(["degrade", "x.png", "--out", "o", "--verbose"]).verbose is True


def test_a_reader_that_leaves_early_is_no_traceback(degsr_cmd):
    """`degsr config ... | head -0`: the pipe closes before degsr writes; it exits 141 (as a
    process killed by SIGPIPE) without Python's BrokenPipeError traceback or exit message."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs/sr_tiny.yaml"
    p = subprocess.Popen([*degsr_cmd, "config", str(tiny)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # long before the child has imported torch and printed
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err


def test_degrade_at_scale_3(tmp_path, capsys):
    """--scale 3 (a scale the config allows) failed on every --crop: the config's cross-check
    compared it with the default data.crop_size 512, which degrade does not use."""
    import skimage.data

    from degsr.cli import main

    Image.fromarray(skimage.data.astronaut()[:100, :100]).save(tmp_path / "a.png")
    out = tmp_path / "out"
    rc = main(["degrade", str(tmp_path / "a.png"), "--scale", "3", "--crop", "48", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out / "a_0_hr.png").size == (48, 48)
    assert Image.open(out / "a_0_lq.png").size == (16, 16)


def test_degrade_rerun_replaces_the_earlier_pairs(tmp_path, capsys):
    """A rerun into the same --out with a smaller --n-per-image left the earlier a_1, a_2 pairs
    beside a params.jsonl that no longer listed them; they go now (only pairs the old
    params.jsonl names and degsr wrote). A rerun that writes nothing leaves the earlier run."""
    import skimage.data

    from degsr.cli import main

    Image.fromarray(skimage.data.astronaut()[:80, :80]).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes_1_hr.png").write_bytes(b"mine")  # not degsr's, not in params.jsonl: kept
    base = ["degrade", str(tmp_path / "a.png"), "--crop", "32", "--out", str(out)]
    assert main([*base, "--n-per-image", "3"]) == 0
    assert main([*base, "--n-per-image", "1", "--seed", "1"]) == 0
    stems = [json.loads(x)["stem"] for x in (out / "params.jsonl").read_text().splitlines()]
    assert stems == ["a_0"]
    assert sorted(p.name for p in out.iterdir()) == ["a_0_hr.png", "a_0_lq.png", "notes_1_hr.png",
                                                     "params.jsonl"]
    before = (out / "params.jsonl").read_bytes()
    assert main(["degrade", str(tmp_path / "missing.png"), "--crop", "32", "--out", str(out)]) == 1
    assert (out / "params.jsonl").read_bytes() == before and (out / "a_0_lq.png").is_file()
    capsys.readouterr()


def test_degrade_on_a_missing_device_creates_no_folder(tmp_path, capsys):
    from degsr.cli import main

    out = tmp_path / "out"
    assert main(["degrade", "x.png", "--device", "nodevice", "--out", str(out)]) == 2
    assert "--device nodevice: not available" in capsys.readouterr().err and not out.exists()


def test_bench_infer_refuses_a_negative_memory_cap(capsys):
    """--mem-cap-gib -1 parsed, and on a GPU became set_per_process_memory_fraction's
    ValueError traceback after the model was built; it is argparse's one line now."""
    import pytest

    from degsr.cli import build_parser

    for bad in ("-1", "nan", "lots"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["bench", "infer", "--mem-cap-gib", bad])
        assert e.value.code == 2 and "--mem-cap-gib" in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "infer", "--mem-cap-gib", "24"]).mem_cap_gib == 24


def test_bench_infer_refuses_a_memory_cap_it_cannot_apply(capsys):
    """On the CPU the cap was ignored without a word, and the timings read as a capped run's."""
    from degsr.cli import main

    assert main(["bench", "infer", "--arch", "tiny", "--device", "cpu", "--sizes", "64",
                 "--mem-cap-gib", "24"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mem-cap-gib caps CUDA memory; on --device cpu" in err


def test_bench_infer_caps_the_memory_of_the_gpu_it_runs_on(monkeypatch):
    """--device cuda:1 --mem-cap-gib capped GPU 0 (the current device), with GPU 1's total."""
    import types

    import pytest
    import torch

    from degsr.bench import infer
    from degsr.cli import build_parser

    class Stop(Exception):
        pass

    capped = []

    def cap(fraction, device=None):
        capped.append((round(fraction, 3), device))
        raise Stop

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=96 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", cap)
    for device, index in (("cuda:1", 1), ("cuda", 0)):
        args = build_parser().parse_args(["bench", "infer", "--device", device, "--sizes", "64",
                                          "--mem-cap-gib", "24"])
        with pytest.raises(Stop):
            infer.run(args)
        assert capped[-1] == (0.25, index)
