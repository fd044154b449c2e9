"""Image decoding shared by every reader (files, shards) and ``degsr sr``'s output names."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from degsr.errors import UserError
from degsr.io import output_targets, read_image

ORIENTATION = 0x0112  # the EXIF tag


def save_with_orientation(array: np.ndarray, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, exif=exif)


@pytest.fixture
def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[100:140, 200:260])  # 40 x 60, RGB


@pytest.mark.parametrize("orientation, turn", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(photo, tmp_path, orientation, turn):
    """EXIF 6 = shown turned 90 degrees clockwise (np.rot90 k=-1), 8 = counter-clockwise, 3 = 180."""
    save_with_orientation(photo, tmp_path / "p.png", orientation)
    got = read_image(tmp_path / "p.png").permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.rot90(photo, turn))


def test_sixteen_bit_gray_is_scaled_not_clipped(photo, tmp_path):
    """A 16-bit file made from an 8-bit image (v * 257: 0 -> 0, 255 -> 65535) reads back as it."""
    gray8 = photo[..., 1]
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = read_image(tmp_path / "g16.png").permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.repeat(gray8[..., None], 3, axis=2))


def test_sixteen_bit_gray_and_rgb_of_one_picture_read_alike(tmp_path):
    """PIL decodes 16-bit colour to 8 bits by the high byte; gray (decoded here) must match."""
    import tifffile  # scikit-image's dependency
    v = np.array([[0, 255, 256, 383, 32767, 33024, 51300, 65535]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", np.repeat(v[..., None], 3, 2), photometric="rgb")
    Image.fromarray(v).save(tmp_path / "g.png")
    want = [x // 256 for x in v[0].tolist()]  # the high byte, by integer division
    assert read_image(tmp_path / "rgb.tif")[0, 0].tolist() == want
    assert read_image(tmp_path / "g.png")[0, 0].tolist() == want


def test_float_image_is_a_one_line_error(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserError, match=r"f\.tif: .*float"):
        read_image(tmp_path / "f.tif")


def test_shards_store_and_stream_the_shown_image(photo, tmp_path):
    """A sideways photo and a 16-bit one go through `degsr shards` and the train stream's decoder
    as a viewer shows them; the index records the shown size."""
    import webdataset as wds

    from degsr.data.shards import write_shards
    from degsr.data.samples import decode_image

    src = tmp_path / "src"
    src.mkdir()
    save_with_orientation(photo, src / "side.png", 6)
    Image.fromarray(photo[..., 0].astype(np.uint16) * 257).save(src / "deep.png")
    write_shards([str(src)], str(tmp_path / "shards"), min_bytes=0, min_side=8)
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")),
                                  shardshuffle=False))
    by_name = {Path(json.loads(s["json"])["source"]).name: s for s in samples}
    side, deep = by_name["side.png"], by_name["deep.png"]
    assert np.array_equal(decode_image(side), np.rot90(photo, -1))
    meta = json.loads(side["json"])
    assert (meta["width"], meta["height"]) == (photo.shape[0], photo.shape[1])
    assert np.array_equal(decode_image(deep), np.repeat(photo[..., :1], 3, axis=2))


def test_output_targets_report_clashes_and_do_a_file_once(tmp_path):
    out = tmp_path / "out"
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    paths = [d1 / "a.png", d2 / "a.png", d1 / "a.png", d1 / "b.jpg", d1 / "b.png", out / "c.png"]
    pairs, problems = output_targets(paths, out)
    assert pairs == [(d1 / "a.png", out / "a.png"), (d1 / "b.jpg", out / "b.png")]
    assert len(problems) == 3
    assert problems[0].startswith(f"{d2 / 'a.png'}:") and str(d1 / "a.png") in problems[0]
    assert problems[1].startswith(f"{d1 / 'b.png'}:") and str(d1 / "b.jpg") in problems[1]
    assert problems[2].startswith(f"{out / 'c.png'}:") and "overwrite an input" in problems[2]


def test_alpha_of_la_and_palette_images(photo, tmp_path):
    gray, a = photo[..., 0], photo[..., 2]
    Image.fromarray(np.dstack([gray, a]), mode="LA").save(tmp_path / "la.png")
    rgb, alpha = read_image(tmp_path / "la.png", alpha=True)
    assert np.array_equal(alpha[0].numpy(), a) and np.array_equal(rgb[1].numpy(), gray)
    pal = Image.fromarray((photo[..., 0] // 64).astype(np.uint8), mode="P")  # indices 0..3
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.info["transparency"] = 0  # index 0 is see-through
    pal.save(tmp_path / "p.png", transparency=0)
    _, alpha = read_image(tmp_path / "p.png", alpha=True)
    assert np.array_equal(alpha[0].numpy(), np.where(photo[..., 0] // 64 == 0, 0, 255))
    assert read_image(tmp_path / "p.png", alpha=False).shape == (3, 40, 60)
    Image.fromarray(photo).save(tmp_path / "rgb.png")
    assert read_image(tmp_path / "rgb.png", alpha=True)[1] is None


def test_to_uint8_rounds_and_clips():
    """Float [0, 1] -> uint8: nearest level (k + 0.3 -> k, k + 0.7 -> k + 1), values outside
    [0, 1] clipped (not wrapped modulo 256); uint8 passes through. Reference: numpy float64."""
    import torch

    from degsr.io import to_uint8

    k = np.arange(0, 255, 7, dtype=np.float64)
    levels = np.concatenate([(k + 0.3) / 255, (k + 0.7) / 255, [-0.4, -0.001, 1.001, 1.6]])
    img = torch.tensor(levels, dtype=torch.float32).view(1, 1, -1).expand(3, 2, -1)
    want = np.clip(np.floor(levels * 255 + 0.5), 0, 255).astype(np.uint8)
    got = to_uint8(img)
    assert got.shape == (2, len(levels), 3) and got.dtype == np.uint8
    assert np.array_equal(got[0, :, 1], want)
    u8 = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert np.array_equal(to_uint8(u8), u8.permute(1, 2, 0).numpy())


def test_expand_inputs_lists_a_folder_sorted(tmp_path):
    """A folder's images in sorted path order (subfolders too), whatever the directory order."""
    from degsr.io import expand_inputs

    names = ["b.png", "a.jpg", "sub/c.png", "B.webp", "0.tif"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    paths, problems = expand_inputs([str(tmp_path)])
    assert problems == [] and paths == sorted(tmp_path / n for n in names)


def test_symlinked_subfolders_are_followed_once_each(tmp_path, photo):
    """A dataset folder assembled from links to other disks: `degsr shards`, `degsr sr` and the
    validation folder read a linked folder's images (os.walk and Path.rglob skip them); a link
    loop and a folder reachable twice are read once; a folder named like an image is no image."""
    from degsr.data.shards import find_images
    from degsr.io import expand_inputs
    from degsr.walk import files_under

    other = tmp_path / "other_disk"
    (other / "deep").mkdir(parents=True)
    data = tmp_path / "data"
    (data / "own" / "x.png").mkdir(parents=True)  # a folder named like an image
    for path in (data / "own" / "a.png", other / "b.JPG", other / "deep" / "c.png"):
        Image.fromarray(photo).save(path, format="PNG")
    (data / "linked").symlink_to(other, target_is_directory=True)
    (data / "again").symlink_to(other, target_is_directory=True)  # the same real folder twice
    (other / "deep" / "loop").symlink_to(data, target_is_directory=True)  # back up: a loop
    want = {data / "own" / "a.png", data / "again" / "b.JPG", data / "again" / "deep" / "c.png"}
    found = files_under(data, (".png", ".jpg"))
    assert len(found) == 3 and found == sorted(found)
    # each real file once, under whichever link the walk reached first
    assert sorted(p.resolve() for p in found) == sorted(p.resolve() for p in want)
    assert expand_inputs([str(data)]) == (found, [])
    assert find_images([str(data)]) == ([str(p) for p in found], [])


def test_hidden_files_and_folders_are_not_inputs(tmp_path, photo):
    """macOS's ._a.png resource fork and a NAS's .@__thumb/a.png thumbnail beside the photo
    a.png: neither is an input (the thumbnail took a.png's output name), as for a glob."""
    from degsr.data.shards import find_images
    from degsr.io import expand_inputs

    (tmp_path / ".@__thumb").mkdir()
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo[:8, :8]).save(tmp_path / ".@__thumb" / "a.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert expand_inputs([str(tmp_path)]) == ([tmp_path / "a.png"], [])
    assert expand_inputs([str(tmp_path / "*.png")]) == ([tmp_path / "a.png"], [])
    assert find_images([str(tmp_path)]) == ([str(tmp_path / "a.png")], [])


def test_a_folder_reached_twice_is_named_the_same_whatever_the_listing_order(tmp_path, photo,
                                                                            monkeypatch):
    """files_under kept the alias os.walk met first, in the file system's listing order (hash
    order on ext4: another after a copy): the same folder gave other paths, and
    data.val_folder's first data.val_crops images another subset, on another machine. A real
    folder is named by its own path; links to it are read only where nothing else reaches it."""
    from degsr.walk import files_under

    data = tmp_path / "data"
    (data / "z_real").mkdir(parents=True)
    Image.fromarray(photo).save(data / "z_real" / "a.png", format="PNG")
    (data / "a_link").symlink_to(data / "z_real", target_is_directory=True)
    real_scandir = os.scandir

    class Listed:  # os.scandir listing the links first, as a file system may
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = iter(sorted(it, key=lambda e: (not e.is_symlink(), e.name)))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

    for order in (False, True):
        monkeypatch.setattr(os, "scandir", Listed if order else real_scandir)
        assert files_under(data, (".png",)) == [data / "z_real" / "a.png"], order


# ------------------------------------------------------------ guards, atomic writes, inputs
def test_pixel_guard_is_lifted_while_any_reader_needs_it_and_then_restored():
    from degsr.io import any_pixel_count

    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    with any_pixel_count():
        with any_pixel_count():
            assert Image.MAX_IMAGE_PIXELS is None
        assert Image.MAX_IMAGE_PIXELS is None  # the outer reader still reads
    assert Image.MAX_IMAGE_PIXELS == before


def test_read_image_names_a_missing_file_and_a_folder(tmp_path):
    with pytest.raises(UserError, match=r"nope\.png: no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(UserError, match="a folder, not an image"):
        read_image(tmp_path)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    import os

    from degsr.io import atomic_write, atomic_write_bytes

    target = tmp_path / "t.txt"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        assert Path(tmp) != target and Path(tmp).parent == tmp_path  # beside it, not on it
        Path(tmp).write_bytes(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file's mode, not 0600


def test_written_by_degsr_only_for_pngs_save_png_wrote(tmp_path):
    import torch

    from degsr.io import save_png, written_by_degsr

    img = torch.rand(3, 8, 8)
    save_png(img, tmp_path / "ours.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "theirs.png")
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "GIMP 2.10")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiff.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "gimp.png", pnginfo=info)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert written_by_degsr(tmp_path / "ours.png")
    for name in ("theirs.png", "tiff.tif", "gimp.png", "junk.png", "missing.png"):
        assert not written_by_degsr(tmp_path / name), name


def test_make_out_folder_refuses_a_file(tmp_path):
    from degsr.io import make_out_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        make_out_folder(tmp_path / "f")
    make_out_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_expand_inputs_leaves_out_only_degsrs_own_outputs_inside_out(tmp_path):
    import torch

    from degsr.io import expand_inputs, save_png

    src, out = tmp_path / "in", tmp_path / "in" / "out"
    out.mkdir(parents=True)
    save_png(torch.rand(3, 4, 4), src / "made_elsewhere.png")  # degsr's, but not in --out
    save_png(torch.rand(3, 4, 4), out / "earlier.png")  # the first run's output
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out / "photo.png")  # the user's
    paths, problems = expand_inputs([str(src)], out)
    assert problems == [] and paths == [src / "made_elsewhere.png", out / "photo.png"]
    paths, _ = expand_inputs([str(src)])  # no --out: everything is an input
    assert paths == sorted([src / "made_elsewhere.png", out / "earlier.png", out / "photo.png"])


def test_a_glob_rerun_leaves_out_the_first_runs_outputs(tmp_path):
    """'in/**/*.png' --out in/sr run twice: the glob finds the first run's outputs too; they are
    not inputs (as in a folder), a file named on its own still is."""
    import torch

    from degsr.io import expand_inputs, save_png

    src, out = tmp_path / "in", tmp_path / "in" / "sr"
    out.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src / "a.png")
    save_png(torch.rand(3, 16, 16), out / "a.png")  # the first run's output
    assert expand_inputs([str(src / "**" / "*.png")], out) == ([src / "a.png"], [])
    assert expand_inputs([str(out / "a.png")], out) == ([out / "a.png"], [])
    paths, problems = expand_inputs([str(out / "*.png")], out)
    assert paths == [] and problems == [f"{out / '*.png'}: pattern matches only degsr's earlier "
                                        f"outputs in {out}"]


def test_expand_inputs_globs_literal_names_and_problems(tmp_path):
    from degsr.io import expand_inputs

    for name in ("b.png", "a.png", "[1].png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.png").mkdir()  # a folder whose name matches the pattern
    (tmp_path / "empty").mkdir()
    paths, problems = expand_inputs([str(tmp_path / "*.png"), str(tmp_path / "[1].png"),
                                     str(tmp_path / "*.jpg"), str(tmp_path / "empty")])
    assert paths == [tmp_path / "[1].png", tmp_path / "a.png", tmp_path / "b.png",
                     tmp_path / "[1].png"]  # the glob sorted, no folder; the literal name as given
    assert len(problems) == 2
    assert problems[0].startswith(str(tmp_path / "*.jpg")) and "matches no file" in problems[0]
    assert problems[1].startswith(str(tmp_path / "empty")) and "no images" in problems[1]


def test_images_by_key_and_pair_folders(tmp_path):
    from degsr.io import images_by_key, pair_folders

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for name in ("2.png", "1.png", "10.png", ".hidden.png", "notes.txt"):
        (a / name).write_bytes(b"")
    for name in ("10.png", "2.png", "1.png", "extra.png"):
        (b / name).write_bytes(b"")
    assert set(images_by_key(a, "--a")) == {"1", "2", "10"}  # hidden and non-images left out
    extra = []
    pairs = pair_folders(a, b, "--a", "--b", unmatched_b=extra)
    assert pairs == [(k, a / f"{k}.png", b / f"{k}.png") for k in ("1", "10", "2")]
    assert extra == [b / "extra.png"]
    with pytest.raises(UserError, match=r"1 in --b without a match: extra\.png"):
        pair_folders(a, b, "--a", "--b")
    for i in range(7):
        (b / f"x{i}.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"8 in --b without a match: extra\.png, x0\.png, x1\.png, "
                                        r"x2\.png, x3\.png \(\+3 more\)"):
        pair_folders(a, b, "--a", "--b")
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="folder holds no images"):
        images_by_key(tmp_path / "e", "--e")
    with pytest.raises(UserError, match="no such folder"):
        images_by_key(tmp_path / "nope", "--e")


def test_preset_path_unknown_is_a_user_error():
    from degsr.io import preset_path

    assert preset_path("s3diff").is_file()
    with pytest.raises(UserError, match="degradation preset 'nope' not found"):
        preset_path("nope")


def test_atomic_write_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """config.yaml, final.json, exports, PNGs: without an fsync before the rename a crash of the
    machine could leave an empty file where a complete one was (processes killed were fine)."""
    import os

    from degsr import io

    order, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (order.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (order.append(("replace", str(a))),
                                                        real_replace(a, b))[1])
    io.atomic_write_bytes(tmp_path / "final.json", b"{}")
    assert [step for step, _ in order] == ["fsync", "replace"]
    assert order[0][1] == order[1][1] and Path(order[0][1]).parent == tmp_path  # the temp file
    assert (tmp_path / "final.json").read_bytes() == b"{}"


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])
def test_the_alpha_of_a_sideways_photo_is_turned_with_it(photo, tmp_path, orientation, turn):
    """An RGBA file with an EXIF orientation: colour and alpha come back turned alike (np.rot90
    of what was written), so the alpha still lies over its pixels."""
    a = (np.arange(40 * 60).reshape(40, 60) % 251).astype(np.uint8)  # no symmetry to hide a turn
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(np.dstack([photo, a]), mode="RGBA").save(tmp_path / "s.png", exif=exif)
    rgb, alpha = read_image(tmp_path / "s.png", alpha=True)
    assert np.array_equal(rgb.permute(1, 2, 0).numpy(), np.rot90(photo, turn))
    assert np.array_equal(alpha[0].numpy(), np.rot90(a, turn))


def test_output_style_keeps_an_icc_profile_only_where_it_fits(photo, tmp_path):
    """(gray, icc) of a file: an RGB profile (bytes 16-20 of the header: the colour space,
    'RGB ') is kept for a colour file, a GRAY one for a gray file; a profile of the other kind,
    or of another space (CMYK), is dropped, as is an unreadable file's."""
    from degsr.io import output_style

    rgb_icc = b"\0" * 16 + b"RGB " + b"\1" * 108
    gray_icc = b"\0" * 16 + b"GRAY" + b"\2" * 108
    cmyk_icc = b"\0" * 16 + b"CMYK" + b"\3" * 108
    colour, gray = Image.fromarray(photo), Image.fromarray(photo[..., 0])
    cases = {"c_rgb": (colour, rgb_icc, (False, rgb_icc)), "c_gray": (colour, gray_icc, (False, None)),
             "c_cmyk": (colour, cmyk_icc, (False, None)), "g_gray": (gray, gray_icc, (True, gray_icc)),
             "g_rgb": (gray, rgb_icc, (True, None)), "c_none": (colour, None, (False, None)),
             "g_none": (gray, None, (True, None))}
    for name, (im, icc, _) in cases.items():
        im.save(tmp_path / f"{name}.png", **({} if icc is None else {"icc_profile": icc}))
    assert {n: output_style(tmp_path / f"{n}.png") for n in cases} == {
        n: want for n, (_, _, want) in cases.items()}
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert output_style(tmp_path / "junk.png") == (False, None)


def test_save_png_writes_gray_with_its_alpha_and_the_profile(tmp_path):
    """save_png(gray=True): one gray channel, the luma L = (299 R + 587 G + 114 B) / 1000 of PIL's
    ITU-R 601-2 conversion (computed here in integers, rounded half up as PIL does), and the
    alpha of an RGBA image kept beside it (LA); icc_profile is stored as given."""
    import torch

    from degsr.io import save_png

    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (5, 6, 4), np.uint8)
    save_png(torch.from_numpy(rgba).permute(2, 0, 1), tmp_path / "g.png", gray=True,
             icc_profile=b"\0" * 16 + b"GRAY" + b"\2" * 108)
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "LA" and im.info["icc_profile"] == b"\0" * 16 + b"GRAY" + b"\2" * 108
    r, g, b = (rgba[..., i].astype(np.int64) for i in range(3))
    luma = np.asarray(im)[..., 0].astype(np.int64)
    assert np.abs(luma - (r * 299 + g * 587 + b * 114 + 500) // 1000).max() <= 1
    assert np.array_equal(np.asarray(im)[..., 1], rgba[..., 3])
    save_png(torch.from_numpy(rgba[..., :3]).permute(2, 0, 1), tmp_path / "l.png", gray=True)
    assert Image.open(tmp_path / "l.png").mode == "L"


def test_pair_folders_reads_any_case_of_suffix_and_sorts_by_key(tmp_path):
    """Suffixes in any case (a camera's IMG_1.JPG) are images; pairs come sorted by their KEY,
    not by file name: with the scale tag stripped, 'b_LR4.png' (key 'b') goes before 'b2.png'
    (key 'b2'), although '2' sorts before '_'."""
    from degsr.data.validation import pair_key
    from degsr.io import images_by_key, pair_folders

    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    for name in ("IMG_1.JPG", "c.Png", "b2.png", "b_LR4.png"):
        (lr / name).write_bytes(b"")
    for name in ("IMG_1_HR.jpeg", "c_HR.TIF", "b2_HR.png", "b_HR.png"):
        (hr / name).write_bytes(b"")
    assert set(images_by_key(lr, "--lr")) == {"IMG_1", "c", "b2", "b_LR4"}
    pairs = pair_folders(lr, hr, "--lr", "--hr", key=pair_key)
    assert [(k, a.name, b.name) for k, a, b in pairs] == [
        ("IMG_1", "IMG_1.JPG", "IMG_1_HR.jpeg"), ("b", "b_LR4.png", "b_HR.png"),
        ("b2", "b2.png", "b2_HR.png"), ("c", "c.Png", "c_HR.TIF")]
