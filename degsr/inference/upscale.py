"""Upscaling one image with a trained adapter: the fast path of METHOD.md "Inference".

Per image: the estimator scores the raw LR (or the user dials ``blur``/``noise``); the LR is
upsampled to ``scale ×`` its size, reflect-padded to a multiple of 64; with one degradation vector
for the call the modulated LoRA is **merged** into the weights (no unmerged LoRA cost; kept for the
next call with the same vector, refolded from the kept originals otherwise), the VAE
encodes (tiled when large), the UNet predicts ε once with CFG as one batched call (latent tiles
with Gaussian blending when large), x0 is decoded (tiled), cropped back and colour-fixed against
the upsampled LR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from degsr.errors import UserError
from degsr.inference.colorfix import color_fix
from degsr.inference.tiling import crop_to, pad_to_multiple, tiled_decode, tiled_encode, tiled_latent_apply
from degsr.sr.model import load_adapter
from degsr.sr.onestep import denoise

PAD_MULTIPLE = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class UpscaleOptions:
    guidance: float = 1.07
    blur: float | None = None
    noise: float | None = None
    color_fix: str = "wavelet"
    tile: int = 96
    tile_overlap: int = 32
    vae_tile: int = 1024  # pixels per VAE tile side (encoder input / decoder output)


def compile_parts(comp) -> None:
    """torch.compile (in place) what runs per image: the UNet, the VAE encoder and decoder."""
    for part in (comp.unet, comp.vae.encoder, comp.vae.decoder):
        part.compile(dynamic=False)  # static shapes: a batch-2 (CFG) call must not turn the batch-1 graph dynamic


class Upscaler:
    """A loaded adapter on its base model, ready to upscale a batch of same-size images a call."""

    def __init__(self, net, meta: dict, estimator=None, compile: bool = False, merge: bool = True):
        self.net, self.meta, self.merge = net, meta, merge
        first = next(net.comp.unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.scale = int(meta.get("scale", 4))
        self.upsample_mode = meta.get("upsample_mode", "bicubic")
        self.estimator = estimator
        if compile:
            compile_parts(self.net.comp)

    @classmethod
    def load(cls, adapter, pretrained=None, estimator=None, device="cpu", precision="fp32",
             compile: bool = False) -> "Upscaler":
        """An adapter export on its base folder, with its stage-1 estimator (or ``estimator``)."""
        device = torch.device(device)
        net, meta = load_adapter(adapter, pretrained, device=device, dtype=DTYPES[precision])
        est = estimator or meta.get("estimator")
        if est:
            from degsr.estimator.export import load_estimator
            est = load_estimator(est, device=device)
        return cls(net, meta, est, compile)

    def check(self, opts: UpscaleOptions) -> None:
        """UserError when ``opts`` leave a score to an estimator this adapter lacks: ``sr`` says
        so once, before it reads any image, not in one identical line per image."""
        if self.net.modulation is not None and self.estimator is None and (
                opts.blur is None or opts.noise is None):
            raise UserError("this adapter has no estimator recorded: pass --estimator EXPORT, or "
                            "both --blur and --noise")

    def degradation(self, lr: torch.Tensor, opts: UpscaleOptions) -> torch.Tensor:
        """(B, 2) [blur, noise]: the user's dial where given, the estimator's score otherwise."""
        zeros = torch.zeros(lr.shape[0], 2, device=lr.device)
        if self.net.modulation is None:  # a plain-LoRA adapter (ablation) ignores the degradation
            return zeros
        self.check(opts)
        need = opts.blur is None or opts.noise is None
        try:
            est = self.estimator(lr.float()) if need else zeros
        except UserError as e:  # too small to estimate: the dial still works
            raise UserError(f"{e} (or set the degradation yourself: --blur B --noise N)") from None
        blur = est[:, 0] if opts.blur is None else torch.full_like(est[:, 0], opts.blur)
        noise = est[:, 1] if opts.noise is None else torch.full_like(est[:, 1], opts.noise)
        return torch.stack([blur, noise], 1)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, opts: UpscaleOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, h, w) LR in [0, 1] -> (SR (B, 3, s·h, s·w) in [0, 1], d (B, 2)).

        The LoRA is merged for the call when every image of the batch has the same degradation
        vector (always at B = 1; at B > 1 when ``blur`` and ``noise`` are both dialled), else it
        runs unmerged with per-sample modulation."""
        comp = self.net.comp
        lr = lr.to(self.device)
        h, w = lr.shape[-2] * self.scale, lr.shape[-1] * self.scale
        kw = {} if self.upsample_mode == "nearest" else {"align_corners": False}
        lr_up = F.interpolate(lr.float(), size=(h, w), mode=self.upsample_mode, **kw).clamp(0, 1)
        d = self.degradation(lr, opts)
        x, _ = pad_to_multiple(lr_up * 2 - 1, PAD_MULTIPLE)
        f = comp.vae_scale_factor
        self._modulate(d, cfg_batch=opts.guidance != 1)
        z = tiled_encode(lambda t: comp.vae.encode(t.to(self.dtype)).latent_dist.mode()
                         * comp.scaling_factor, x, opts.vae_tile, opts.vae_tile // 4, f)
        g = None if opts.guidance == 1 else opts.guidance
        x0 = tiled_latent_apply(lambda zt: denoise(comp, zt.to(self.dtype), guidance_scale=g),
                                z, opts.tile, opts.tile_overlap)
        out = tiled_decode(lambda zt: comp.vae.decode(zt.to(self.dtype) / comp.scaling_factor).sample,
                           x0, opts.vae_tile // f, opts.vae_tile // f // 4, f)
        out = crop_to(out.float().clamp(-1, 1), h, w) * 0.5 + 0.5
        return color_fix(out, lr_up, opts.color_fix).clamp(0, 1), d

    def _modulate(self, d: torch.Tensor, cfg_batch: bool) -> None:
        """Fold the LoRA, modulated by d, into the weights (``merge``, one vector for the batch;
        it stays folded for the next call with the same vector), or set the per-sample
        modulation and run the LoRA layers unmerged."""
        if self.merge and (self.net.modulation is None or bool((d == d[:1]).all())):
            self.net.fold(d)
        else:
            self.net.set_degradation(d, cfg_batch=cfg_batch)
