"""``degsr sr``'s inputs as users have them: palette PNGs with per-entry alpha (pngquant,
TinyPNG) and usage errors that need only the adapter's adapter.json."""

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
