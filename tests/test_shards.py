"""``degsr shards`` and ``expand_shard_pattern``: real image files in, real tar shards out."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

import degsr.cli
from degsr.data.shard_sets import expand_shard_pattern
from degsr.data.shards import prepare_image, write_shards
from degsr.errors import UserError

SMALL = ["--min-bytes", "0", "--min-side", "16"]  # the skimage photos are small


def cli(*argv) -> int:
    return degsr.cli.main(["shards", *map(str, argv)])


@pytest.fixture
def photos(tmp_path) -> dict[str, Path]:
    """Four photos as PNG/JPEG plus generated WebP and BMP images, in src/ and src/sub/."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        "astronaut": (src / "astronaut.png", skimage.data.astronaut(), "PNG"),
        "coffee": (src / "coffee.JPG", skimage.data.coffee(), "JPEG"),
        "chelsea": (src / "sub" / "chelsea.png", skimage.data.chelsea(), "PNG"),
        "rocket": (src / "sub" / "rocket.jpeg", skimage.data.rocket(), "JPEG"),
        "noise": (src / "sub" / "noise.webp", rng.integers(0, 256, (96, 128, 3), np.uint8), "WEBP"),
        "gradient": (src / "gradient.bmp", np.tile(np.arange(160, dtype=np.uint8), (80, 1)), "BMP"),
    }
    for path, array, fmt in files.values():
        Image.fromarray(array).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    (src / "notes.txt.bak").write_text("not an image, ignored by the folder walk")
    return {k: v[0] for k, v in files.items()}


def read_samples(paths) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def check_index(out: Path, name: str = "train") -> list[dict]:
    """index.json agrees with the tar files on disk; returns the samples, in order."""
    index = json.loads((out / "index.json").read_text())
    assert index["name"] == name
    on_disk = sorted(p.name for p in out.iterdir() if re.fullmatch(rf"{name}-\d{{6}}\.tar", p.name))
    assert on_disk == [s["file"] for s in index["shards"]]
    assert not list(out.glob(".*.tmp"))
    for shard in index["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        assert len(keys) == shard["samples"]
    samples = read_samples(out / s["file"] for s in index["shards"])
    assert len(samples) == index["total"] == sum(s["samples"] for s in index["shards"])
    assert len({s["__key__"] for s in samples}) == len(samples)
    return samples


def by_source(samples) -> dict[str, dict]:
    return {json.loads(s["json"])["source"]: s for s in samples}


def check_round_trip(out: Path, photos: dict[str, Path]) -> None:
    samples = check_index(out)
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 2]
    assert index["skipped"] == 0 and index["options"]["per_shard"] == 2
    got = by_source(samples)
    assert set(got) == {str(p) for p in photos.values()}
    for name in ("astronaut", "chelsea"):
        assert got[str(photos[name])]["png"] == photos[name].read_bytes()
    for name in ("coffee", "rocket"):
        assert got[str(photos[name])]["jpg"] == photos[name].read_bytes()
    assert got[str(photos["noise"])]["webp"] == photos["noise"].read_bytes()
    bmp = got[str(photos["gradient"])]  # BMP is re-encoded as PNG, pixel-exact
    assert set(bmp) >= {"png", "json"} and "bmp" not in bmp
    stored = np.asarray(Image.open(io.BytesIO(bmp["png"])).convert("RGB"))
    assert np.array_equal(stored, np.asarray(Image.open(photos["gradient"]).convert("RGB")))
    meta = json.loads(got[str(photos["coffee"])]["json"])
    assert (meta["width"], meta["height"]) == (600, 400)


def test_round_trip_in_process(photos, tmp_path, capsys):
    out = tmp_path / "shards"
    assert cli(tmp_path / "src", "--out", out, "--per-shard", 2, *SMALL) == 0
    check_round_trip(out, photos)
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1 and stdout[0].startswith("3 shards, 6 samples, 0 skipped")
    assert str(out) in stdout[0]


def test_round_trip_subprocess(photos, tmp_path, degsr_cmd):
    # a folder, a single file and a .txt list with a relative path, across two SRC kinds
    listing = tmp_path / "src" / "sub" / "list.txt"
    listing.write_text("# photos\nchelsea.png\n\nrocket.jpeg\nnoise.webp\n")
    srcs = [photos["astronaut"], photos["coffee"], photos["gradient"], listing]
    out = tmp_path / "shards"
    r = subprocess.run([*degsr_cmd, "shards", *map(str, srcs), "--out", str(out),
                        "--per-shard", "2", *SMALL], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    check_round_trip(out, photos)
    assert "3 shards, 6 samples, 0 skipped" in r.stdout


def test_skips_are_listed_not_fatal(photos, tmp_path, capsys):
    src = tmp_path / "src"
    jpeg = photos["rocket"].read_bytes()
    (src / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "text.png").write_text("this is not a PNG\n" * 100)
    noise = np.random.default_rng(1).integers(0, 256, (300, 40, 3), np.uint8)
    Image.fromarray(noise).save(src / "narrow.png")  # many bytes, but 40 px wide
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src / "tiny.png")  # ~100 bytes
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src / 'astronaut.png'}\nsrc/missing.jpg\n")
    out = tmp_path / "shards"
    assert cli(src, listing, "--out", out, "--min-bytes", 1000, "--min-side", 64) == 0
    assert "6 samples, 5 skipped" in capsys.readouterr().out
    rows = (out / "skipped.tsv").read_text().splitlines()
    assert rows[0] == "path\treason"
    reasons = dict(r.split("\t") for r in rows[1:])
    assert set(reasons) == {str(src / n) for n in ("truncated.jpg", "text.png", "narrow.png",
                                                   "tiny.png", "missing.jpg")}
    assert reasons[str(src / "truncated.jpg")].startswith("cannot decode")
    assert "truncated" in reasons[str(src / "truncated.jpg")]
    assert reasons[str(src / "text.png")].startswith("cannot decode")
    assert "--min-side 64" in reasons[str(src / "narrow.png")]
    assert "--min-bytes 1000" in reasons[str(src / "tiny.png")]
    assert reasons[str(src / "missing.jpg")].startswith("not found")
    assert json.loads((out / "index.json").read_text())["skipped"] == 5
    assert len(check_index(out)) == 6  # astronaut listed twice: kept once


@pytest.mark.parametrize("workers", [1, 2])
def test_a_photo_stored_twice_is_kept_once(photos, tmp_path, capsys, workers):
    """A byte-identical copy in another folder, and a second SRC reaching files again through a
    symlink: one sample each, the others listed as duplicates of the one kept."""
    src = tmp_path / "src"
    copy = src / "sub" / "astronaut copy.png"
    copy.write_bytes(photos["astronaut"].read_bytes())
    again = tmp_path / "again"  # another path to src/sub
    again.symlink_to(src / "sub", target_is_directory=True)
    other = src / "astronaut.jpg"  # the same photo in another encoding: not a duplicate
    Image.open(photos["astronaut"]).save(other, quality=95)
    out = tmp_path / "shards"
    assert cli(src, again, "--out", out, "--workers", workers, *SMALL) == 0
    assert "7 samples, 5 skipped" in capsys.readouterr().out
    samples = by_source(check_index(out))
    rows = dict(r.split("\t") for r in (out / "skipped.tsv").read_text().splitlines()[1:])
    assert str(other) in samples
    groups = [{str(photos["astronaut"]), str(copy), str(again / copy.name)}] + [
        {str(photos[n]), str(again / photos[n].name)} for n in ("chelsea", "rocket", "noise")]
    assert set(rows) == set().union(*groups) - set(samples)  # nothing else skipped
    for group in groups:  # whichever the shuffle met first is kept, the others name it
        kept = group & set(samples)
        assert len(kept) == 1
        assert all(rows[p] == f"duplicate of {next(iter(kept))}" for p in group - kept)


def test_max_side_downscales_to_png(photos, tmp_path):
    out = tmp_path / "shards"
    assert cli(tmp_path / "src", "--out", out, "--max-side", 300, *SMALL) == 0
    got = by_source(check_index(out))
    for name in ("astronaut", "coffee", "rocket"):
        sample = got[str(photos[name])]
        assert "png" in sample and "jpg" not in sample
        meta = json.loads(sample["json"])
        im = Image.open(io.BytesIO(sample["png"]))
        assert im.format == "PNG" and max(im.size) == 300 == max(meta["width"], meta["height"])
        assert im.size == (meta["width"], meta["height"])
    assert json.loads(got[str(photos["coffee"])]["json"])["resized_from"] == [600, 400]
    assert got[str(photos["noise"])]["webp"] == photos["noise"].read_bytes()  # already small


def test_rerun_leaves_no_stale_shards(photos, tmp_path):
    out = tmp_path / "shards"
    assert cli(tmp_path / "src", "--out", out, "--per-shard", 2, *SMALL) == 0
    assert len(list(out.glob("train-*.tar"))) == 3
    (out / ".train-000009.tar.tmp").write_bytes(b"left by a crashed run")
    (out / "train-extra.tar").write_bytes(b"not ours")  # not <name>-NNNNNN.tar: untouched
    assert cli(photos["astronaut"], photos["coffee"], photos["chelsea"], "--out", out,
               "--per-shard", 2, *SMALL) == 0
    samples = check_index(out)
    assert sorted(p.name for p in out.glob("train-0*.tar")) == ["train-000000.tar",
                                                                "train-000001.tar"]
    assert len(samples) == 3 and (out / "train-extra.tar").exists()
    assert not (out / ".train-000009.tar.tmp").exists()
    with pytest.raises(UserError, match="already holds shard set 'train'"):
        write_shards([photos["astronaut"]], out, name="val", min_bytes=0, min_side=16)


def test_no_usable_image_exits_2(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "shards"
    assert cli(src, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable images" in err[0] and "1 skipped" in err[0]
    assert str(out / "skipped.tsv") in err[0] and not list(out.glob("*.tar"))


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli(missing, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    (tmp_path / "file").write_text("x")
    assert cli(tmp_path, "--out", tmp_path / "file") == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli(tmp_path, "--out", tmp_path / "o", "--per-shard", 0) == 2
    assert "--per-shard" in capsys.readouterr().err
    assert cli(tmp_path, "--out", tmp_path / "file" / "sub") == 2  # under a file: cannot create
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create" in err[0] and str(tmp_path / "file" / "sub") in err[0]


def test_mpo_kept_as_jpeg_and_lists_with_a_bom(tmp_path):
    """A multi-picture JPEG (phones, cameras) keeps its bytes as ``jpg``; a .txt list saved
    with a byte-order mark (Windows tools) reads its first line too."""
    src = tmp_path / "src"
    src.mkdir()
    first, second = skimage.data.astronaut()[:96, :128], skimage.data.coffee()[:96, :128]
    Image.fromarray(first).save(src / "pair.jpg", format="MPO", save_all=True,
                                append_images=[Image.fromarray(second)], quality=90)
    assert Image.open(src / "pair.jpg").format == "MPO"
    Image.fromarray(second).save(src / "plain.png")
    (src / "list.txt").write_bytes(b"\xef\xbb\xbfpair.jpg\r\nplain.png\n")
    out = tmp_path / "shards"
    assert cli(src / "list.txt", "--out", out, *SMALL) == 0
    got = by_source(check_index(out))
    assert set(got) == {str(src / "pair.jpg"), str(src / "plain.png")}
    assert got[str(src / "pair.jpg")]["jpg"] == (src / "pair.jpg").read_bytes()


def test_photos_over_pils_pixel_guard_are_read(tmp_path, monkeypatch):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS (a guard against hostile files; 179 MP by
    default): a shard set of one's own 200 MP photos with --max-side must still work. Here the
    guard is lowered to 1000 pixels so that a 64 x 96 photo trips it."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()[:64, :96]).save(src / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(src / "big.png")
    assert cli(src, "--out", tmp_path / "o", "--max-side", 48, *SMALL) == 0
    meta = json.loads(check_index(tmp_path / "o")[0]["json"])
    assert (meta["width"], meta["height"], meta["resized_from"]) == (48, 32, [96, 64])
    # kept at full size, the training stream and every file reader decode it too
    from degsr.data.stream import decode_image, read_shard
    from degsr.io import read_image

    assert cli(src, "--out", tmp_path / "full", *SMALL) == 0
    (_, parts), = read_shard(str(tmp_path / "full" / "train-000000.tar"))
    assert decode_image(parts).shape == (64, 96, 3)
    assert read_image(src / "big.png").shape == (3, 64, 96)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the guard is back for everything else


def test_workers_give_identical_shards(photos, tmp_path):
    outs = [tmp_path / "w1", tmp_path / "w2"]
    for out, w in zip(outs, (1, 2)):
        assert cli(tmp_path / "src", "--out", out, "--per-shard", 4, "--workers", w, *SMALL) == 0
    names = sorted(p.name for p in outs[0].glob("*.tar"))
    assert names == sorted(p.name for p in outs[1].glob("*.tar")) and len(names) == 2
    for n in names:  # fixed tar mtime: whole files are byte-identical
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes()
    a, b = (read_samples(sorted(o.glob("*.tar"))) for o in outs)
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]


def test_images_are_shuffled_by_seed_unless_path_order_is_asked(photos, tmp_path):
    """Default: a seeded shuffle of the found images (a shard mixes the folders), the same for the
    same seed, another for another; --order path: the sorted walk. Keys still count 0, 1, ..."""
    def sources(out, *args):
        assert cli(tmp_path / "src", "--out", out, "--per-shard", 2, *SMALL, *args) == 0
        samples = check_index(out)
        keys = [s["__key__"] for s in samples]
        assert [k[:8] for k in keys] == [f"{i:08d}" for i in range(len(keys))]
        return [json.loads(s["json"])["source"] for s in samples]

    walk = sorted(str(p) for p in photos.values())  # src/*.{bmp,png,...} before src/sub/...
    assert sources(tmp_path / "path", "--order", "path") == walk
    first = sources(tmp_path / "a")
    assert sorted(first) == walk and first != walk  # 6 images: 1 chance in 720 to stay in order
    assert sources(tmp_path / "b", "--seed", "0") == first
    assert sources(tmp_path / "c", "--seed", "1") != first
    for a, b in zip(sorted((tmp_path / "a").glob("*.tar")), sorted((tmp_path / "b").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["options"]["order"] == "random" and index["options"]["seed"] == 1


def test_very_large_images_are_named_with_the_memory_a_worker_needs(photos, tmp_path,
                                                                    monkeypatch):
    from degsr import console

    said = []
    monkeypatch.setattr(console.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    monkeypatch.setattr("degsr.data.shards.LARGE_PIXELS", 300 * 300)  # the photos: 512² and less
    assert cli(tmp_path / "src", "--out", tmp_path / "out", *SMALL) == 0
    sizes = {k: getattr(skimage.data, k)().shape[:2] for k in ("astronaut", "coffee", "chelsea",
                                                              "rocket")}
    big = sorted((h * w, str(photos[k])) for k, (h, w) in sizes.items() if h * w > 300 * 300)
    assert len(said) == 1 and said[0].startswith(
        f"{len(big)} image(s) above 0 MP, the largest {big[-1][1]} ({big[-1][0] / 1e6:.0f} MP)")
    said.clear()
    assert cli(tmp_path / "src", "--out", tmp_path / "small", *SMALL, "--max-side", 300) == 0
    assert said == []  # stored smaller: nothing to say


def test_tiff_photos_in_a_folder_are_packed_pixel_exact(tmp_path):
    """A folder of TIFFs (scans, exports of raw files) held no images for `degsr shards` while
    `degsr sr` and data.val_folder read them: every folder reader takes the same suffixes now.
    RGB and gray TIFFs are stored as PNG with the pixels PIL decodes from the file."""
    src = tmp_path / "tiffs"
    src.mkdir()
    rgb = skimage.data.astronaut()[:96, :128]
    Image.fromarray(rgb).save(src / "a.tif")
    Image.fromarray(rgb[..., 0]).save(src / "b.TIFF")
    summary = write_shards([src], tmp_path / "out", min_side=16, min_bytes=0)
    assert summary.total == 2 and not summary.skipped
    got = by_source(read_samples(sorted((tmp_path / "out").glob("*.tar"))))
    for name, want in (("a.tif", rgb), ("b.TIFF", np.repeat(rgb[..., :1], 3, axis=2))):
        sample = got[str(src / name)]
        assert "png" in sample
        stored = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert np.array_equal(stored, want), name


def test_expand_shard_pattern(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    files = [d / f"train-{i:06d}.tar" for i in range(3)]
    for f in reversed(files):
        f.write_bytes(b"")
    (d / "index.json").write_text(json.dumps(
        {"name": "train", "shards": [{"file": f.name, "samples": 1} for f in files]}))
    want = [str(f) for f in files]
    assert expand_shard_pattern(str(d / "*.tar")) == want
    assert expand_shard_pattern(str(d / "train-{000000..000002}.tar")) == want
    assert expand_shard_pattern(str(d)) == want
    assert expand_shard_pattern(str(d / "index.json")) == want
    (d / "copied-in.tar").write_bytes(b"")  # a folder with an index means its set
    assert expand_shard_pattern(str(d)) == want
    assert len(expand_shard_pattern(str(d / "*.tar"))) == 4
    (d / "index.json").write_text('{"name": "some other tool"}')  # not ours: the folder's tars
    assert expand_shard_pattern(str(d)) == sorted([*want, str(d / "copied-in.tar")])
    assert expand_shard_pattern(str(files[1])) == [str(files[1])]
    odd = tmp_path / "set[1]" / "a{b}.tar"  # glob and brace characters in an existing name
    odd.parent.mkdir()
    odd.write_bytes(b"")
    assert expand_shard_pattern(str(odd)) == [str(odd)]
    assert expand_shard_pattern(str(odd.parent)) == [str(odd)]
    with pytest.raises(UserError, match="no shard files match .*val-"):
        expand_shard_pattern(str(d / "val-*.tar"))
    with pytest.raises(UserError, match=r"2 of 5 shard files do not exist: .*train-000003\.tar"):
        expand_shard_pattern(str(d / "train-{000000..000004}.tar"))
    with pytest.raises(UserError, match="no shard files match"):
        expand_shard_pattern(str(tmp_path / "empty-dir-missing.tar"))
    # a range without the files' zero padding (or with padding they lack) names a file it meant
    with pytest.raises(UserError, match=r"train-000000\.tar exists: write the range as its files "
                                        r"are numbered, 6 digits \(e\.g\. \{000000\.\.000009\}\)$"):
        expand_shard_pattern(str(d / "train-{0..2}.tar"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "s7.tar").write_bytes(b"")
    with pytest.raises(UserError, match=r"s7\.tar exists: write the range as its files are "
                                        r"numbered, without zero padding \(e\.g\. \{0\.\.9\}\)$"):
        expand_shard_pattern(str(tmp_path / "flat" / "s{0006..0007}.tar"))
    with pytest.raises(UserError, match=r"do not exist: [^;]*$"):  # no such file: no hint
        expand_shard_pattern(str(d / "train-{000007..000008}.tar"))


def test_the_padding_hint_survives_odd_names_and_lists_a_folder_once(tmp_path, monkeypatch):
    """The hint that follows a missing range: a file whose number runs on in a digit int() does
    not read ('t-0\u00b2.tar', a superscript two) made the one-line error a ValueError
    traceback; and each of the first 20 missing files globbed the whole folder again (seconds in
    a folder of 50k shards, on the error path)."""
    import os

    import degsr.data.shard_sets as shard_sets

    (tmp_path / "t-0\u00b2.tar").write_bytes(b"")
    with pytest.raises(UserError, match=r"do not exist: [^;]*$"):  # no such number: no hint
        expand_shard_pattern(str(tmp_path / "t-{0..1}.tar"))
    for i in range(30):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    listed = []
    real_scandir, real_listdir = os.scandir, os.listdir
    monkeypatch.setattr(os, "scandir", lambda *a: listed.append(a) or real_scandir(*a))
    monkeypatch.setattr(os, "listdir", lambda *a: listed.append(a) or real_listdir(*a))
    monkeypatch.setattr(shard_sets.os, "scandir", os.scandir)
    with pytest.raises(UserError, match=r"do not exist: [^;]*$"):  # past the set's end: no hint
        expand_shard_pattern(str(tmp_path / "s-{000020..000060}.tar"))
    assert len(listed) <= 1, listed
    listed.clear()
    with pytest.raises(UserError, match=r"s-000000\.tar exists: write the range as its files are "
                                        r"numbered, 6 digits"):
        expand_shard_pattern(str(tmp_path / "s-{0..40}.tar"))
    assert len(listed) <= 1, listed


def test_tars_beside_an_index_it_does_not_name_are_warned_about_once(photos, tmp_path,
                                                                     monkeypatch):
    """A folder with an index means its set: a tar copied in beside it was dropped without a
    word. Now one line per folder and process names it (the pattern is expanded by every setup);
    a set as `degsr shards` leaves it, rerun with fewer shards included, says nothing."""
    from degsr import console

    said = []
    monkeypatch.setattr(console.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    monkeypatch.setattr("degsr.data.shard_sets._told_stray", set())
    out = tmp_path / "shards"
    write_shards([tmp_path / "src"], out, per_shard=2, min_side=16, min_bytes=0)
    write_shards([photos["coffee"]], out, per_shard=2, min_side=16, min_bytes=0)  # 3 shards -> 1
    assert expand_shard_pattern(str(out)) == [str(out / "train-000000.tar")] and said == []
    for name in ("copied-in.tar", "b.tar", "old-000001.tar", "a.tar"):
        (out / name).write_bytes(b"")
    for _ in range(2):
        assert expand_shard_pattern(str(out)) == [str(out / "train-000000.tar")]
    assert said == [f"{out}: 4 .tar files beside its index.json are not in the set it names and "
                    "are not read (a.tar, b.tar, copied-in.tar and 1 more); name them explicitly "
                    "or rewrite the set with `degsr shards`"]
    assert len(expand_shard_pattern(str(out / "*.tar"))) == 5 and len(said) == 1  # named: read
    one = tmp_path / "one"
    one.mkdir()
    (one / "index.json").write_text(json.dumps({"shards": [{"file": "t-000000.tar"}]}))
    (one / "t-000000.tar").write_bytes(b"")
    (one / "x.tar").write_bytes(b"")
    expand_shard_pattern(str(one))
    assert said[1].startswith(f"{one}: 1 .tar file beside its index.json is not in the set it "
                              "names and is not read (x.tar);")


def test_sources_overlapping_resolves_links_and_whole_path_parts(photos, tmp_path):
    from degsr.data.shard_sets import sources_overlapping

    src = tmp_path / "src"
    out = tmp_path / "shards"
    write_shards([src / "sub", photos["astronaut"]], out, min_side=16, min_bytes=0)
    urls = expand_shard_pattern(str(out))
    (tmp_path / "link").symlink_to(src / "sub", target_is_directory=True)
    assert sources_overlapping(urls, str(src)) == [str(src / "sub"), str(photos["astronaut"])]
    assert sources_overlapping(urls, str(src / "sub")) == [str(src / "sub")]
    assert sources_overlapping(urls, str(tmp_path / "link")) == [str(src / "sub")]
    assert sources_overlapping(urls, str(src / "sub" / "deeper")) == [str(src / "sub")]
    assert sources_overlapping(urls, str(src / "su")) == []  # a name prefix is not a parent
    listed = json.loads((out / "index.json").read_text())
    listed["sources"] = [str(src / "sub" / "LIST.TXT")]  # a list is not opened, whatever its case
    (out / "index.json").write_text(json.dumps(listed))
    assert sources_overlapping(urls, str(src)) == []
    assert sources_overlapping(urls, str(tmp_path / "elsewhere")) == []
    assert sources_overlapping([str(tmp_path / "x.tar")], str(src)) == []  # no index: nothing


def test_failed_run_keeps_previous_set(photos, tmp_path, monkeypatch):
    import degsr.data.shards as shards

    out = tmp_path / "shards"
    assert cli(tmp_path / "src", "--out", out, "--per-shard", 2, *SMALL) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(path, **kw):
        calls.append(path)
        if len(calls) == 4:  # after two new shards were completed
            raise KeyboardInterrupt
        return real(path, **kw)

    real = shards.prepare_image
    monkeypatch.setattr(shards, "prepare_image", failing)
    assert cli(photos["astronaut"], photos["coffee"], photos["chelsea"], photos["rocket"],
               photos["noise"], "--out", out, "--per-shard", 1, *SMALL) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temps, nothing replaced


def test_a_rerun_with_no_usable_image_keeps_the_previous_set_and_its_skip_list(photos, tmp_path,
                                                                                capsys):
    out = tmp_path / "shards"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert cli(tmp_path / "src", broken, "--out", out, *SMALL) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert str(broken) in before["skipped.tsv"].decode()
    capsys.readouterr()
    assert cli(broken, "--out", out, *SMALL) == 2  # nothing usable this time
    err = capsys.readouterr().err
    assert "no usable images" in err and str(out / "skipped.failed.tsv") in err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    rejects = after.pop("skipped.failed.tsv").decode().splitlines()
    assert after == before and len(rejects) == 2 and rejects[1].startswith(f"{broken}\t")
    assert cli(tmp_path / "src", "--out", out, *SMALL) == 0  # a good run clears the failed list
    assert not (out / "skipped.failed.tsv").exists()
    assert (out / "skipped.tsv").read_text() == "path\treason\n"


def _killed_on_rocket(path, **options):
    """prepare_image, except that the worker given rocket dies as the OOM killer ends it."""
    import os
    import signal

    if "rocket" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_image(path, **options)


def test_a_worker_killed_mid_run_is_one_line_not_a_hang(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("degsr.data.shards.prepare_image", _killed_on_rocket)
    out = tmp_path / "out"
    assert cli(tmp_path / "src", "--out", out, "--workers", 2, *SMALL) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers: a worker process died while preparing" in err, err
    assert not list(out.glob("*.tar")) and not list(out.glob(".*"))  # no shard, no temp file


def test_a_skipped_file_with_an_undecodable_name_is_listed_escaped(tmp_path):
    """A name in a legacy encoding (Latin-1 bytes, as in old zips) that a size filter skips:
    skipped.tsv lists it with the byte escaped, and the set is written."""
    import os

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(src / "good.png")
    Image.fromarray(skimage.data.astronaut()[:8, :8]).save(
        os.fsdecode(os.fsencode(str(src)) + b"/petit_caf\xe9.png"))
    assert cli(src, "--out", tmp_path / "out", *SMALL) == 0
    rows = (tmp_path / "out" / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"{src}/petit_caf\\udce9.png\t"), rows


def _padded_png(path: Path, size: tuple[int, int], n_bytes: int) -> Path:
    """A flat PNG of ``size`` (w, h) made exactly ``n_bytes`` long by bytes after its IEND
    chunk (decoders stop at IEND: the picture is unchanged)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < n_bytes
    path.write_bytes(data + bytes(n_bytes - len(data)))
    return path


def test_default_filters_are_384_px_and_100_kb(tmp_path, capsys):
    """Without --min-side / --min-bytes (CLI and write_shards alike), an image is kept when its
    file has at least 100 000 bytes and its shorter side at least 384 pixels: the limits
    themselves pass, one byte or one pixel less is skipped."""
    src = tmp_path / "src"
    src.mkdir()
    keep = _padded_png(src / "keep.png", (384, 500), 100_000)
    few_bytes = _padded_png(src / "bytes.png", (500, 400), 99_999)
    narrow = _padded_png(src / "narrow.png", (383, 500), 150_000)
    short = _padded_png(src / "short.png", (600, 383), 150_000)
    for run in ("cli", "api"):
        out = tmp_path / f"shards-{run}"
        if run == "cli":
            assert cli(src, "--out", out) == 0
        else:
            write_shards([src], out)
        assert set(by_source(check_index(out))) == {str(keep)}
        rows = (out / "skipped.tsv").read_text().splitlines()[1:]
        reasons = dict(r.split("\t") for r in rows)
        assert set(reasons) == {str(few_bytes), str(narrow), str(short)}
        assert "99999 bytes < --min-bytes 100000" in reasons[str(few_bytes)]
        assert "--min-side 384" in reasons[str(narrow)] and "--min-side 384" in reasons[str(short)]


def test_min_side_applies_to_the_downscaled_image(tmp_path):
    """--max-side shrinks first; an image whose shorter side then falls under --min-side is
    skipped (a panorama 1000 x 350 at --max-side 400 becomes 400 x 140)."""
    from degsr.data.shards import prepare_image

    pano = tmp_path / "pano.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (350, 1000, 3), np.uint8)).save(pano)
    reason, sample = prepare_image(str(pano), min_side=300, max_side=400)
    assert sample is None and "too small after --max-side 400: 400x140" in reason
    reason, sample = prepare_image(str(pano), min_side=140, max_side=400)
    assert reason is None and sample[2:4] == (400, 140)


def test_max_side_rounds_each_side_and_keeps_an_image_at_the_limit(tmp_path):
    """--max-side M: only an image whose longer side EXCEEDS M is resized, to M along it and
    round(short · M / long) across (LANCZOS, compared with PIL's own resize to that size);
    one whose longer side is M keeps its original bytes."""
    rng = np.random.default_rng(7)
    big = rng.integers(0, 256, (70, 100, 3), np.uint8)  # 100 x 70 -> 64 x 44.8: 45, not 44
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big[:40, :64]).save(tmp_path / "edge.png")  # longer side exactly 64
    reason, (ext, data, w, h, resized_from) = prepare_image(str(tmp_path / "big.png"),
                                                            max_side=64)
    assert reason is None and (ext, w, h, resized_from) == ("png", 64, 45, [100, 70])
    want = np.asarray(Image.fromarray(big).resize((64, 45), Image.LANCZOS))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), want)
    tall = prepare_image(str(tmp_path / "big.png"), max_side=37)[1]  # 37 x 25.9: 26
    assert tall[2:] == (37, 26, [100, 70])
    reason, (ext, data, w, h, resized_from) = prepare_image(str(tmp_path / "edge.png"),
                                                            max_side=64)
    assert reason is None and resized_from is None and (w, h) == (64, 40)
    assert data == (tmp_path / "edge.png").read_bytes()


def test_keys_hold_no_dot_and_the_index_names_the_seed_only_when_shuffled(tmp_path):
    """__key__ = 8-digit running index + '_' + the stem with every run of characters outside
    [A-Za-z0-9_-] made one '_' (a dot would split the sample in WebDataset), cut to 48 and
    stripped of '_' at its ends, 'img' when nothing is left; index.json records the seed of a
    shuffled set and null for --order path."""
    src = tmp_path / "src"
    src.mkdir()
    names = {"my.photo v2.png": "my_photo_v2", "é€.png": "img", "a-b_c.png": "a-b_c",
             "x" * 60 + ".png": "x" * 48}
    for i, name in enumerate(names):
        Image.fromarray(np.full((20, 20, 3), i * 40, np.uint8)).save(src / name)
    out = tmp_path / "out"
    write_shards([src], out, min_side=16, min_bytes=0, order="path")
    samples = check_index(out)
    got = {Path(json.loads(s["json"])["source"]).name: s["__key__"] for s in samples}
    order = [Path(json.loads(s["json"])["source"]).name for s in samples]
    assert got == {n: f"{order.index(n):08d}_{stem}" for n, stem in names.items()}
    assert json.loads((out / "index.json").read_text())["options"]["seed"] is None
    write_shards([src], tmp_path / "shuffled", min_side=16, min_bytes=0, seed=3)
    assert json.loads((tmp_path / "shuffled" / "index.json").read_text())["options"]["seed"] == 3


def test_a_txt_list_of_shards_is_expanded(tmp_path):
    """``data.train_shards=list.txt``: one shard, glob or brace pattern a line (relative to the
    list's folder), blank lines and comments left out; a missing one is named with the list.
    It was read as a tar itself ('damaged ... truncated header', then '1000 corrupt')."""
    d = tmp_path / "shards"
    d.mkdir()
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        (d / name).write_bytes(b"")
    listed = tmp_path / "train.txt"
    listed.write_text(f"# my shards\nshards/{{00000..00001}}.tar\n\n{d / '00002.tar'}\n")
    assert expand_shard_pattern(str(listed)) == [str(d / f"0000{i}.tar") for i in range(3)]
    listed.write_text("shards/00001.tar\nshards/0000[01].tar\n")  # in the order listed, each once
    assert expand_shard_pattern(str(listed)) == [str(d / "00001.tar"), str(d / "00000.tar")]
    listed.write_text("shards/00000.tar\nshards/00009.tar\n")
    with pytest.raises(UserError, match=r"train\.txt: no shard files match .*00009\.tar"):
        expand_shard_pattern(str(listed))
    listed.write_text("# nothing\n")
    with pytest.raises(UserError, match="names no shard"):
        expand_shard_pattern(str(listed))
    listed.write_text("pipe:cat /data/{0..1}.tar\nhttps://host/s-0.tar\n")  # URLs are themselves
    assert expand_shard_pattern(str(listed)) == ["pipe:cat /data/0.tar", "pipe:cat /data/1.tar",
                                                 "https://host/s-0.tar"]
