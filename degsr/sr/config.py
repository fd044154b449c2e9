"""LoRA and degradation-modulation sizes of Stage 2 (METHOD.md, "Stage 2").

Defaults are the reference S3Diff values: rank 16 on the VAE encoder (31 layers), rank 32 on the
UNet (257 layers), alpha 8 (scale alpha / rank), 64 random Fourier frequencies per score, a 256-wide
degradation MLP and 64-wide block embeddings. Target names follow peft's rule: a module matches a
target when its dotted name equals it or ends with ``"." + target``. The VAE targets are matched
inside ``vae.encoder`` only (the decoder stays frozen and un-adapted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from degsr.config.fields import Checked, choice, existing_path, number, plain, positive, prob, subset

VAE_TARGETS = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_q", "to_k",
               "to_v", "to_out.0"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
                "conv_out", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class LoraConfig(Checked):
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



POS_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and "
              "natural lighting.")
NEG_PROMPT = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, "
              "low resolution, oversmooth")
ARCH_NAMES = ["tiny", "sd-turbo"]


@dataclass
class ModelConfig(Checked):
    """Stage-2 base model (``model.*`` keys): SD-Turbo from a local diffusers folder.

    With ``pretrained`` unset, ``arch`` builds the architecture from :mod:`degsr.sr.arch` with
    random (seeded) weights -- for tests and smoke runs only.
    """

    pretrained: Optional[str] = existing_path(None, "local diffusers folder of SD-Turbo (unet/, "
                                              "vae/, text_encoder/, tokenizer/, scheduler/, "
                                              "model_index.json); None = random weights of arch")
    arch: str = choice("tiny", ARCH_NAMES, "architecture built with random weights when "
                       "pretrained is None")
    timestep: int = number(999, "the single UNet timestep t", lo=0)
    pos_prompt: str = plain(POS_PROMPT, "positive prompt (encoded once, then the text encoder is "
                            "dropped)")
    neg_prompt: str = plain(NEG_PROMPT, "negative prompt: online negatives in training, the "
                            "unconditional branch of classifier-free guidance at inference")
    guidance_scale: float = number(1.07, "inference CFG: eps = eps_neg + g (eps_pos - eps_neg); "
                                   "1 = positive prompt only (no second branch)", lo=0)
    seed: int = plain(0, "seed of the random weights when pretrained is None")

    def check(self):
        if not isinstance(self.timestep, int) or isinstance(self.timestep, bool):
            yield "timestep", f"must be an integer, got {self.timestep!r}"
        for key in ("pos_prompt", "neg_prompt"):
            if not isinstance(getattr(self, key), str):
                yield key, f"must be a string, got {getattr(self, key)!r}"




DIFFAUG_OPS = ["color", "translation", "cutout"]


@dataclass
class DiscConfig(Checked):
    """Stage-2 vision-aided discriminator (``disc.*`` keys; METHOD.md "Stage 2").

    Defaults are the reference (vision-aided-gan ``cv_type='dino'``, ``conv_multi_level``,
    ``multilevel_sigmoid_s``): a frozen DINO ViT-B/16 at 224², the LayerNorm-ed outputs of
    transformer blocks 5, 9 and 12 (1-based; the reference's ``get_intermediate_layers(n=8)[0, 4,
    -1]``), spectral-normed heads of width 128, real label 0.8, DiffAugment
    ``color,translation,cutout``. The GAN loss weight lives in the stage config.
    """

    backbone: Optional[str] = existing_path(None, "local transformers folder of a ViT (e.g. "
                                            "facebook/dino-vitb16 saved with save_pretrained); "
                                            "None = random weights of `arch` (tests / benchmarks "
                                            "only)")
    arch: str = choice("tiny", ["tiny", "dino-vitb16"], "backbone built when `backbone` is None: "
                       "tiny (random 32-wide ViT) or dino-vitb16 (the ViT-B/16 layout, random)")
    levels: List[int] = plain([5, 9, 12], "1-based transformer blocks whose (final-LayerNorm-ed) "
                              "outputs feed the heads: all but the last give patch-token grids "
                              "(conv heads), the last gives its CLS token (MLP head)")
    input_size: int = positive(224, "images are resized (area) to this square size; a multiple "
                               "of the patch size, at least 4 patches")
    diffaug: str = plain("color,translation,cutout", "DiffAugment policy applied to each batch "
                         "before the backbone ('' = off)")
    real_label: float = prob(0.8, "BCE target of real images (and of the generator's fakes); "
                             "fakes are 0 in the D loss")
    head_channels: int = positive(128, "hidden width of each head")
    norm: str = choice("imagenet", ["imagenet", "reference"], "input normalisation: ImageNet "
                       "mean/std (DINO's own) or the reference's CLIP mean with ImageNet std")

    def check(self):
        ops = [p.strip() for p in str(self.diffaug).split(",") if p.strip()]
        bad = [p for p in ops if p not in DIFFAUG_OPS]
        if bad:
            yield "diffaug", f"unknown DiffAugment ops {bad}; choose from {DIFFAUG_OPS}"
        lv = self.levels
        if (not isinstance(lv, (list, tuple)) or not lv
                or any(not isinstance(i, int) or i < 1 for i in lv)
                or any(b <= a for a, b in zip(lv, lv[1:]))):
            yield "levels", f"must be a non-empty increasing list of block numbers >= 1, got {lv!r}"



CHECKPOINT_PARTS = ["unet", "vae_encoder", "vae_decoder"]


@dataclass
class SRConfig(Checked):
    """Stage 2 training (``sr.*`` keys; METHOD.md "Stage 2", the reference's recipe)."""

    estimator: Optional[str] = existing_path(None, "stage-1 export (folder or .safetensors) that "
                                             "scores each LR; None = the engine's true scores "
                                             "(an oracle ablation)")
    mse_weight: float = number(2.0, "weight of the MSE to the target", lo=0)
    lpips_weight: float = number(5.0, "weight of LPIPS(VGG) to the target", lo=0)
    gan_weight: float = number(0.5, "weight of the generator GAN loss and of the D loss", lo=0)
    lpips_vgg: Optional[str] = existing_path(None, "torchvision VGG16 weights file for LPIPS "
                                             "(vgg16-397923af.pth); needed when lpips_weight > 0")
    neg_prob: float = prob(0.05, "online negatives: per-sample probability of the negative prompt "
                           "with the sample's own upsampled LR as target")
    lr: float = positive(2e-5, "AdamW learning rate of the generator (LoRA, conv_in, modulation)")
    disc_lr: float = positive(2e-5, "AdamW learning rate of the discriminator heads")
    betas: List[float] = plain([0.9, 0.999], "AdamW betas")
    weight_decay: float = number(1e-2, "AdamW weight decay", lo=0)
    grad_clip: float = number(1.0, "clip the gradient norm of each optimizer step, generator "
                            "and discriminator (0 = off)", lo=0)
    accumulate: int = positive(1, "batches per optimizer step (manual optimisation)")
    gradient_checkpointing: List[str] = subset(
        [], CHECKPOINT_PARTS, "parts whose activations are recomputed in the backward pass instead "
        "of kept (less memory, slower): vae_decoder alone keeps the most for the least time "
        "(docs/benchmarks.md); all three to fit a 24 GB card", empty_ok=True)

    def check(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"must be two numbers in [0, 1), got {list(self.betas)}"
