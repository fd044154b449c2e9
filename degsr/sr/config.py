"""LoRA and degradation-modulation sizes of Stage 2 (METHOD.md, "Stage 2").

Defaults are the reference S3Diff values: rank 16 on the VAE encoder (31 layers), rank 32 on the
UNet (257 layers), alpha 8 (scale alpha / rank), 64 random Fourier frequencies per score, a 256-wide
degradation MLP and 64-wide block embeddings. Target names follow peft's rule: a module matches a
target when its dotted name equals it or ends with ``"." + target``. The VAE targets are matched
inside ``vae.encoder`` only (the decoder stays frozen and un-adapted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from degsr.config.fields import plain, positive

VAE_TARGETS = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_q", "to_k",
               "to_v", "to_out.0"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
                "conv_out", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class LoraConfig:
    """Stage-2 adapters: modulated LoRA on the VAE encoder and the UNet (``lora.*`` keys)."""

    vae_rank: int = positive(16, "LoRA rank r of the VAE-encoder layers")
    unet_rank: int = positive(32, "LoRA rank r of the UNet layers")
    alpha: float = positive(8.0, "LoRA alpha: the update is scaled by alpha / r")
    vae_targets: List[str] = plain(VAE_TARGETS, "VAE-encoder module names (suffix match, as peft) "
                                   "that get LoRA")
    unet_targets: List[str] = plain(UNET_TARGETS, "UNet module names (suffix match, as peft) that "
                                    "get LoRA; the UNet conv_in is trained fully instead")
    fourier_dim: int = positive(64, "random Fourier frequencies per degradation score "
                                "(embedding width 2 scores x sin/cos x fourier_dim)")
    mlp_dim: int = positive(256, "width of each network's degradation MLP (Linear + ReLU)")
    block_embed_dim: int = positive(64, "width of the learned block-id embeddings and their "
                                    "Linear + ReLU")
    modulated: bool = plain(True, "modulate every LoRA by the degradation (C per block and "
                                  "sample); False = plain LoRA, no modulation networks (ablation)")

    def check(self):
        for key in ("vae_targets", "unet_targets"):
            value = getattr(self, key)
            if (not isinstance(value, (list, tuple)) or not value
                    or any(not isinstance(t, str) or not t for t in value)):
                yield key, f"must be a non-empty list of module names, got {value!r}"

    def problems(self) -> list[str]:
        """Every failed check, one line each naming its key (configs built outside the loader)."""
        from dataclasses import fields
        out = [f"{f.name}: {msg}" for f in fields(self)
               if "check" in f.metadata and (msg := f.metadata["check"](getattr(self, f.name)))]
        out += [f"{key}: {msg}" for key, msg in self.check()]
        return out
