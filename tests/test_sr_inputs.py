"""``degsr sr``'s inputs as users have them: palette PNGs with per-entry alpha (pngquant,
TinyPNG) and usage errors that need only the adapter's adapter.json."""

import json
import warnings

import numpy as np
from PIL import Image

from degsr.io import read_image


def test_a_palette_png_with_alpha_bytes_reads_without_a_warning(tmp_path):
    """pngquant's PNG8: a palette and a tRNS chunk with one alpha byte per entry. Its colours
    and alpha come back (from the palette, written out here), and PIL's 'Palette images with
    Transparency expressed in bytes should be converted to RGBA images' warning is not printed
    on every such input (it went to the user's terminal as two stray lines)."""
    idx = (np.arange(6 * 7).reshape(6, 7) % 4).astype(np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette.ravel().tolist())
    im.save(tmp_path / "p8.png", transparency=bytes([255, 128, 0, 64]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb, alpha = read_image(tmp_path / "p8.png", alpha=True)
    assert np.array_equal(rgb.permute(1, 2, 0).numpy(), palette[idx])
    assert np.array_equal(alpha[0].numpy(), np.array([255, 128, 0, 64], np.uint8)[idx])


def test_a_scale_the_adapter_was_not_trained_for_is_one_line_before_out_and_the_model(
        tmp_path, capsys, monkeypatch):
    """--scale 2 with an x4 adapter: exit 2, one line, read from adapter.json alone: no --out
    folder left behind (as for the other usage errors) and no minutes spent loading SD-Turbo
    first."""
    from degsr.cli import main
    from degsr.inference.upscale import Upscaler

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.json").write_text(json.dumps(
        {"format": "degsr-adapter", "format_version": 1, "model": {}, "lora": {}, "scale": 4}))
    (adapter / "adapter.safetensors").write_bytes(b"")
    Image.new("RGB", (5, 3)).save(tmp_path / "a.png")

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the usage error")

    monkeypatch.setattr(Upscaler, "load", load)
    assert main(["sr", "--adapter", str(adapter), str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "o"), "--scale", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scale 2 does not match the adapter's scale 4" in err, err
    assert not (tmp_path / "o").exists()


def _png(path, rows: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written byte by byte (PIL does not write 16-bit gray + alpha)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = rows.shape[:2]
    raw = b"".join(b"\x00" + rows[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_a_16_bit_gray_png_with_alpha_gives_a_gray_output(tmp_path):
    """PNG colour type 4 at 16 bits (gray + alpha, a scanner's or a GIMP export) opens in PIL
    as RGBA; it is a gray input all the same, so its output is written gray (LA), as an 8-bit
    one's is, not in the model's colours. RGBA at 16 bits stays colour."""
    from degsr.io import output_style

    gray = np.arange(4 * 5 * 2, dtype=np.uint16).reshape(4, 5, 2) * 1000
    _png(tmp_path / "ga16.png", gray, 4)
    _png(tmp_path / "rgba16.png", np.concatenate([gray, gray], 2), 6)
    assert Image.open(tmp_path / "ga16.png").mode == "RGBA"  # what made it look colour
    assert output_style(tmp_path / "ga16.png") == (True, None)
    assert output_style(tmp_path / "rgba16.png") == (False, None)
