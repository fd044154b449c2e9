"""Stage 1: the degradation estimator as a LightningModule (METHOD.md, "Stage 1").

Training batches arrive degraded by the DataModule (``lr``, ``scores``, ``hr``, ...). The
objective (``estimator.objective``) is ``supervised`` (MSE to the engine's scores), ``ranking``
(margin ranking on pairs made here from ``hr``, plus clean/worst anchors) or ``both``; with
``estimator.within_crop_weight`` and ``data.degradations_per_crop`` >= 2, plus an MSE on the
differences between the degradations of each crop (:func:`~degsr.estimator.losses.within_crop_mse`).
Validation reports per-score Spearman and Pearson correlation on the fixed synthetic set.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from degsr.config.fields import as_dataclass
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from degsr.config.schema import DegradationConfig
from degsr.degradation.pipeline import Degrader
from degsr.estimator.config import EstimatorConfig
from degsr.estimator.losses import anchor_loss, margin_ranking, within_crop_mse
from degsr.estimator.network import SCORES, DegradationEstimator
from degsr.estimator.pairs import clean_lr, ranking_batches, worst_draw
from degsr.seeding import batch_generator
from degsr.training.guard import NonFiniteGuard
from degsr.training.val_means import SampleMeans


class EstimatorModule(L.LightningModule):
    def __init__(self, cfg: EstimatorConfig, degradation: DegradationConfig, seed: int = 0,
                 max_nonfinite_skips: int = 20):
        super().__init__()
        self.guard = NonFiniteGuard(max_nonfinite_skips)
        self._drop_step = False
        self.cfg: EstimatorConfig = as_dataclass(cfg)
        self.degradation: DegradationConfig = as_dataclass(degradation)
        self.seed = seed
        self.net = DegradationEstimator(self.cfg.net)
        self.degrader = Degrader(self.degradation)
        with warnings.catch_warnings():  # "Spearman keeps every value": the val set is fixed and small
            warnings.simplefilter("ignore", UserWarning)
            self.val_metrics = torch.nn.ModuleDict({
                f"{kind}_{name}": cls() for name in SCORES
                for kind, cls in (("spearman", SpearmanCorrCoef), ("pearson", PearsonCorrCoef))})
        self._val_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_means = SampleMeans()

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.net(lr)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every term of the configured objective (unweighted), on one degraded batch."""
        cfg, out = self.cfg, {}
        regress = cfg.objective in ("supervised", "both")
        if regress or cfg.within_crop_weight > 0:
            pred = self.net(batch["lr"])
            if regress:
                out["supervised"] = F.mse_loss(pred, batch["scores"])
            if cfg.within_crop_weight > 0:
                out["within_crop"] = within_crop_mse(pred, batch["scores"], batch["crop"])
        if cfg.objective in ("ranking", "both"):
            hr = batch["hr"]
            g = batch_generator(self, 2000, device=hr.device)
            terms = []
            for i, (name, (a, b)) in enumerate(ranking_batches(self.degrader, hr, g).items()):
                pa, pb = self.net(torch.cat([a["lr"], b["lr"]])).chunk(2)
                terms.append(margin_ranking(pa[:, i], pb[:, i], a["scores"][:, i],
                                            b["scores"][:, i], cfg.margin, cfg.min_gap))
            out["ranking"] = sum(terms)
            # the top anchor at its own label: 1 under the modelled labels (the worst draw is
            # their maximum by construction); under the measured ones, what that LR carries
            # (no draw is their maximum for every crop: JPEG error depends on the content)
            worst = self.degrader.apply(hr, worst_draw(self.degrader, hr.shape[0], g), g)
            pred_clean, pred_worst = self.net(
                torch.cat([clean_lr(batch["hr"], self.degradation.scale), worst["lr"]])).chunk(2)
            out["anchor"] = anchor_loss(pred_clean, pred_worst, worst["scores"])
        return out

    def objective(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted training loss and its unweighted terms (:meth:`losses`)."""
        terms = self.losses(batch)
        weights = {"supervised": self.cfg.supervised_weight, "ranking": self.cfg.ranking_weight,
                   "anchor": self.cfg.anchor_weight, "within_crop": self.cfg.within_crop_weight}
        return sum(weights[k] * v for k, v in terms.items()), terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, terms = self.objective(batch)
        bs = batch["lr"].shape[0]
        if self.guard.skip(self, loss):  # every rank agreed; the backward still runs on every
            self._drop_step = True  # rank (DDP needs it), on_before_optimizer_step drops the update
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "scores" not in batch:  # paired real-world folders carry no labels
            return
        keep = batch.get("keep")  # False: a repeat that evens out the DDP ranks
        pred, true = self.net(batch["lr"]), batch["scores"]
        self.val_means.add("mse", (pred - true).square().mean(1), keep)
        if keep is not None:
            pred, true = pred[keep], true[keep]
        if pred.shape[0]:
            for i, name in enumerate(SCORES):
                for kind in ("spearman", "pearson"):
                    self.val_metrics[f"{kind}_{name}"].update(pred[:, i], true[:, i])
            self._val_pairs.append((pred.detach().cpu(), true.detach().cpu()))
        if batch_idx == 0:
            self._log_examples(batch["lr"][:8], pred[:8], true[:8])

    def on_validation_epoch_end(self) -> None:
        means = self.val_means.compute(self.trainer.strategy)
        if not means:
            return
        self.log("val/mse", means["mse"], sync_dist=True)  # equal on all ranks (summed)
        values = {key: metric.compute() for key, metric in self.val_metrics.items()}
        for metric in self.val_metrics.values():
            metric.reset()
        values["spearman_mean"] = torch.stack([values[f"spearman_{n}"] for n in SCORES]).mean()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=True)  # equal on all
        # ranks already (torchmetrics gathers in compute()); sync_dist only says so to Lightning
        if self._val_pairs:  # this rank's share (may be empty: fewer samples than ranks)
            pred, true = (torch.cat(x) for x in zip(*self._val_pairs))
            self._val_pairs.clear()
            self._log_scatter(pred, true)

    def discard_validation(self) -> None:
        """Forget the validation pass so far (cut short by a preemption): it logs nothing."""
        self.val_means.clear()
        for metric in self.val_metrics.values():
            metric.reset()
        self._val_pairs.clear()

    def _wandb(self):
        from lightning.pytorch.loggers import WandbLogger

        ok = isinstance(self.logger, WandbLogger) and not self.trainer.sanity_checking
        return self.logger if ok else None

    def _log_examples(self, lr: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> None:
        """A few validation LR crops captioned with true and predicted (blur, noise)."""
        if (logger := self._wandb()) is None:
            return
        captions = [f"true {t[0]:.2f}/{t[1]:.2f} pred {p[0]:.2f}/{p[1]:.2f}"
                    for t, p in zip(true.tolist(), pred.tolist())]
        logger.log_image("val/examples", [x.float().cpu() for x in lr], step=self.global_step,
                         caption=captions)

    def _log_scatter(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        if (logger := self._wandb()) is None:
            return
        import wandb

        for i, name in enumerate(SCORES):
            table = wandb.Table(data=torch.stack([true[:, i], pred[:, i]], 1).tolist(),
                                columns=["true", "predicted"])
            logger.experiment.log({
                f"val/scatter_{name}": wandb.plot.scatter(table, "true", "predicted"),
                f"val/hist_{name}": wandb.Histogram(
                    np_histogram=np.histogram(pred[:, i].numpy(), bins=20, range=(0.0, 1.0))),
                "trainer/global_step": self.global_step})

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._drop_step:  # a non-finite loss since the last step: no update (guard module doc)
            optimizer.zero_grad(set_to_none=True)
            self._drop_step = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.load_state_dict(checkpoint.get("nonfinite", {}))

    def export(self, path) -> None:
        """Write ``estimator.safetensors`` + ``estimator.json`` (what stage 2 and inference load)."""
        from degsr.estimator.export import save_estimator

        save_estimator(self.net, path)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr,
                                weight_decay=self.cfg.weight_decay)
        total = self.trainer.max_steps if self._trainer is not None else 0
        factor = lr_factor(self.cfg.lr_schedule, self.cfg.warmup_steps, total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(schedule: str, warmup: int, total: int):
    """The learning-rate multiplier at optimizer step ``k``: linear warm-up over ``warmup``
    steps, then 1 (``constant``) or a cosine from 1 down to 0 at step ``total`` (``cosine``)."""
    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / (total - warmup))))
    return factor
