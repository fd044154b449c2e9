"""Inference utilities: colour correction and tiling (METHOD.md, "Inference")."""

from degsr.inference.colorfix import (COLOR_FIX_MODES, adain_color_fix, color_fix,
                                      wavelet_color_fix, wavelet_decompose)
from degsr.inference.tiling import (crop_to, gaussian_weights, pad_to_multiple, tile_starts,
                                    tiled_decode, tiled_encode, tiled_latent_apply)

__all__ = ["COLOR_FIX_MODES", "adain_color_fix", "color_fix", "wavelet_color_fix",
           "wavelet_decompose", "crop_to", "gaussian_weights", "pad_to_multiple", "tile_starts",
           "tiled_decode", "tiled_encode", "tiled_latent_apply"]
