"""Stage 2: the degradation-guided LoRA on SD-Turbo as a LightningModule (METHOD.md "Stage 2").

Manual optimisation with two AdamW optimisers: the generator (LoRA, UNet ``conv_in``, modulation)
on ``mse_weight·MSE + lpips_weight·LPIPS + gan_weight·GAN_G`` and the discriminator heads on
``gan_weight·D``. The generator's GAN term runs inside ``disc.frozen_heads()``, so no gradient of
it reaches the discriminator (the reference's open bug #25). Online negatives (``sr.neg_prob``)
get the negative prompt and their own upsampled LR as target; the GAN terms judge the
positive-prompt output of every sample (the negatives run a second time with the positive prompt,
as more rows of the same call; the reference runs the whole batch twice). The degradation vector
comes from the frozen stage-1 estimator on the model's own LR (clean samples: the clean LR), or
from the engine (oracle).
Checkpoints hold only the trainable tensors (adapter + discriminator heads + optimisers).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from degsr.config.fields import as_dataclass

from degsr.degradation.negatives import online_negatives
from degsr.degradation.resize import upsample
from degsr.metrics.fidelity import psnr_y, ssim_y
from degsr.seeding import batch_generator
from degsr.sr.config import DiscConfig, LoraConfig, ModelConfig, SRConfig
from degsr.sr.model import SRModel, save_adapter
from degsr.training.guard import NonFiniteGuard
from degsr.training.val_means import SampleMeans


def _q(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] on the 8-bit grid (what a saved PNG holds)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0


class SRModule(L.LightningModule):
    def __init__(self, model: ModelConfig, lora: LoraConfig, disc: DiscConfig, sr: SRConfig,
                 degradation, seed: int = 0, images_every_n_steps: int = 500,
                 max_nonfinite_skips: int = 20):
        super().__init__()
        self.guard = NonFiniteGuard(max_nonfinite_skips)  # generator steps
        self.guard_d = NonFiniteGuard(max_nonfinite_skips)  # discriminator steps
        self.val_means = SampleMeans()
        self._drop_g = self._drop_d = False  # drop the step being accumulated
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable tensors only
        self.cfg: SRConfig = as_dataclass(sr)
        self.degradation = as_dataclass(degradation)
        self.seed, self.images_every = seed, images_every_n_steps
        self.net = SRModel(as_dataclass(model), as_dataclass(lora))
        self._checkpoint(self.cfg.gradient_checkpointing)
        self.estimator = None
        if self.cfg.estimator and self.net.modulation is not None:  # plain LoRA: d is unused
            from degsr.errors import UserError
            from degsr.estimator.export import load_estimator
            try:
                self.estimator = load_estimator(self.cfg.estimator)
            except UserError as e:
                raise UserError(f"sr.estimator: {e}") from None
        self.lpips = None
        if self.cfg.lpips_weight > 0:
            from degsr.metrics.lpips import LPIPS
            self.lpips = LPIPS.from_files(self.cfg.lpips_vgg)
        self.disc = None
        if self.cfg.gan_weight > 0:
            from degsr.sr.discriminator import build_discriminator
            self.disc = build_discriminator(as_dataclass(disc))

    def _checkpoint(self, parts: list[str]) -> None:
        """Gradient checkpointing of the listed parts (diffusers' own, per model, then per part)."""
        comp = self.net.comp
        if "unet" in parts:
            comp.unet.enable_gradient_checkpointing()
        if {"vae_encoder", "vae_decoder"} & set(parts):
            comp.vae.enable_gradient_checkpointing()
            comp.vae.encoder.gradient_checkpointing = "vae_encoder" in parts
            comp.vae.decoder.gradient_checkpointing = "vae_decoder" in parts

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def degradation_vector(self, batch: dict) -> torch.Tensor:
        """(B, 2) [blur, noise]: the frozen estimator on the LR the model sees, or the oracle."""
        if self.net.modulation is None:  # plain LoRA (ablation): the vector is not used
            return torch.zeros(batch["lr"].shape[0], 2, device=batch["lr"].device)
        if self.estimator is None:
            return batch["scores"]
        self.estimator.eval()
        return self.estimator(batch["lr"]).to(batch["lr"].dtype)

    def reconstruction_losses(self, sr: torch.Tensor, target: torch.Tensor) -> dict:
        out = {"mse": F.mse_loss(sr.float(), target.float())}
        if self.lpips is not None:
            out["lpips"] = self.lpips(sr.float(), target.float()).mean()
        return out

    # ------------------------------------------------------------------ training
    def generator_loss(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """The generator's weighted loss, its terms, and the batch (with negatives, ``sr`` and
        ``fake``: the outputs the GAN terms judge, every sample under the positive prompt as
        METHOD.md says; for the online negatives that is a second output, made in the same UNet
        call as k more rows: one call, so the modulation a recomputing gradient checkpoint
        reads is the call's own)."""
        cfg = self.cfg
        batch = online_negatives(batch, g, cfg.neg_prob)
        d, neg, x = self.degradation_vector(batch), batch["negative"], batch["lr_up"] * 2 - 1
        b = x.shape[0]
        idx = neg.nonzero().flatten() if self.disc is not None else None  # (one host sync)
        if idx is not None and idx.numel():  # the negatives again, with the positive prompt
            x, d = torch.cat([x, x[idx]]), torch.cat([d, d[idx]])
            neg = torch.cat([neg, torch.zeros_like(neg[idx])])
        out = self.net(x, d, negative=neg, generator=g)
        sr = out[:b]
        terms = self.reconstruction_losses(sr, batch["target"] * 2 - 1)
        fake = sr if out.shape[0] == b else sr.index_copy(0, idx, out[b:])
        if self.disc is not None:
            with self.disc.frozen_heads():  # no GAN gradient into the heads (reference bug #25)
                terms["gan_g"] = self.disc.loss_g(fake, generator=g)
        weights = {"mse": cfg.mse_weight, "lpips": cfg.lpips_weight, "gan_g": cfg.gan_weight}
        loss = sum(weights[k] * v for k, v in terms.items())
        return loss, terms, {**batch, "sr": sr, "fake": fake, "d": d[:b]}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        cfg = self.cfg
        g = batch_generator(self, 3000, device=batch["lr"].device)
        loss, terms, batch = self.generator_loss(batch, g)
        sr = batch["sr"]
        opt_g, opt_d = self._optimizers()
        step_now = (batch_idx + 1) % cfg.accumulate == 0
        bs = sr.shape[0]
        # a non-finite loss on any rank drops the whole (accumulated) step on every rank: no
        # more backward until the step, which then runs without gradients (guard module doc)
        self._drop_g |= self.guard.skip(self, loss, what="generator loss")
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=bs)
        if not self._drop_g:
            self.manual_backward(loss / cfg.accumulate)
        if step_now:
            if self._drop_g:
                opt_g.zero_grad(set_to_none=True)
            terms["grad_norm"] = self._clip(self.net.trainable_parameters())
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            self._drop_g = False
        if self.disc is not None:
            loss_d = cfg.gan_weight * self.disc.loss_d(batch["gt"] * 2 - 1, batch["fake"].detach(),
                                                       generator=g)
            self._drop_d |= self.guard_d.skip(self, loss_d, what="discriminator loss")
            if not self._drop_d:
                self.manual_backward(loss_d / cfg.accumulate)
            if step_now:  # the raw optimizer: Lightning counts every LightningOptimizer.step()
                if self._drop_d:  # as a global step; max_steps means generator steps
                    opt_d.zero_grad(set_to_none=True)
                terms["grad_norm_d"] = self._clip(self.disc.head_parameters())
                opt_d.optimizer.step()
                opt_d.zero_grad(set_to_none=True)
                self._drop_d = False
            terms["disc"] = loss_d
            terms.update(self.disc.last_outputs)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/negatives", batch["negative"].float().mean(), batch_size=bs)
        if self.global_step % self.images_every == 0 and batch_idx % cfg.accumulate == 0:
            self._log_panel("train/panel", batch["lr_up"], _q(sr.detach()), batch["gt"], batch["d"],
                            batch["negative"])

    def _clip(self, params) -> torch.Tensor:
        """Clip the gradient norm of ``params`` to ``sr.grad_clip`` (0: measure only), as the
        reference clips both its generator and its discriminator steps; return the norm before."""
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(list(params), clip)

    def _optimizers(self):
        opts = self.optimizers()
        return (opts[0], opts[1]) if isinstance(opts, (list, tuple)) else (opts, None)

    def configure_optimizers(self):
        cfg = self.cfg
        opt_g = torch.optim.AdamW(self.net.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
        if self.disc is None:
            return opt_g
        opt_d = torch.optim.AdamW(list(self.disc.head_parameters()), lr=cfg.disc_lr,
                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        return [opt_g, opt_d]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "scores" not in batch:  # real paired folders: no engine scores, estimator required
            if self.estimator is None and self.net.modulation is not None:
                return
            lr_up = upsample(batch["lr"], batch["hr"].shape[-2:], self.degradation.upsample_mode)
            batch = {**batch, "lr_up": lr_up, "gt": batch["hr"]}
        d = self.degradation_vector(batch)
        # the posterior mean of the LR latent, as `degsr sr`: a sample's score does not depend on
        # the rank or batch it lands in
        sr = _q(self.net(batch["lr_up"] * 2 - 1, d, guidance_scale=self.net.model_cfg.guidance_scale,
                         posterior_mean=True))
        name = "val" if dataloader_idx == 0 else "val_real"
        metrics = {"psnr_y": psnr_y(sr, batch["gt"]).clamp(max=100),
                   "ssim_y": ssim_y(sr, batch["gt"])}
        if self.lpips is not None:
            metrics["lpips"] = self.lpips(sr, batch["gt"], normalize=True)
        for k, v in metrics.items():  # per sample; the padding of the DDP split left out
            self.val_means.add(f"{name}/{k}", v, batch.get("keep"))
        if batch_idx == 0:
            self._log_panel(f"{name}/panel", batch["lr_up"], sr, batch["gt"], d)

    def on_validation_epoch_end(self) -> None:
        means = self.val_means.compute(self.trainer.strategy)
        if means:  # equal on all ranks (summed over them)
            self.log_dict(means, sync_dist=True)

    def discard_validation(self) -> None:
        """Forget the validation pass so far (cut short by a preemption): it logs nothing."""
        self.val_means.clear()

    def _log_panel(self, key: str, lr_up, sr, hr, d, negative=None, n: int = 4) -> None:
        """LR-up | SR | HR side by side, a few samples, to W&B, each captioned with the
        degradation vector the model was given (and whether it was an online negative)."""
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(self.logger, WandbLogger) or self.trainer.sanity_checking:
            return
        rows = [torch.cat([a, b, c], dim=-1).float().cpu() for a, b, c in zip(lr_up[:n], sr[:n], hr[:n])]
        neg = negative[:n].tolist() if negative is not None else [False] * len(rows)
        captions = [f"LR up | SR | HR; blur {v[0]:.2f} noise {v[1]:.2f}" + ("; negative" if m else "")
                    for v, m in zip(d[:n].float().tolist(), neg)]
        self.logger.log_image(key, rows, step=self.global_step, caption=captions)

    # ------------------------------------------------------------------ checkpoints / export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"net.{k}" for k in self.net.trainable_state()}
        if self.disc is not None:
            keep |= {f"disc.{n}" for n, _ in self.disc.named_parameters()
                     if not n.startswith("backbone.")}
            keep |= {f"disc.{n}" for n, _ in self.disc.named_buffers() if not n.startswith("backbone.")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["nonfinite"] = self.guard.state_dict()
        checkpoint["nonfinite_d"] = self.guard_d.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.load_state_dict(checkpoint.get("nonfinite", {}))
        self.guard_d.load_state_dict(checkpoint.get("nonfinite_d", {}))

    def export(self, path) -> None:
        save_adapter(self.net, path, extra={
            "scale": self.degradation.scale, "upsample_mode": self.degradation.upsample_mode,
            # absolute: `degsr sr` may run from another folder
            "estimator": str(Path(self.cfg.estimator).expanduser().resolve())
            if self.cfg.estimator else None})
