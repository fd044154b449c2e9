"""Typed schema of a degsr run: every key a YAML file or a ``key=value`` override may set.

Defaults are the ``s3diff`` degradation preset of METHOD.md; the preset files under
``configs/degradation/`` spell every value out so that they read on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from degsr.config.fields import (choice, distribution, number, odd_sizes, plain, positive, prob,
                                 span, subset)

KERNEL_TYPES = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso"]
RESIZE_MODES = ["area", "bilinear", "bicubic"]
SCALES = [1, 2, 3, 4, 8]
ODD_7_21 = [7, 9, 11, 13, 15, 17, 19, 21]


@dataclass
class RoundConfig:
    """One round (order) of the Real-ESRGAN degradation: blur -> resize -> noise -> JPEG."""

    blur_prob: float = prob(1.0, "probability that this round blurs at all")
    kernel_sizes: List[int] = odd_sizes(ODD_7_21, "odd kernel sizes, one drawn uniformly per sample")
    kernel_types: List[str] = subset(KERNEL_TYPES, KERNEL_TYPES, "blur kernel families")
    kernel_probs: List[float] = distribution([0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
                                             "probability of each entry of kernel_types")
    sinc_prob: float = prob(0.1, "probability that the blur kernel is a circular sinc instead")
    blur_sigma: List[float] = span([0.2, 1.5], "Gaussian sigma range (pixels)", lo=0.01)
    betag: List[float] = span([0.5, 2.0], "generalized-Gaussian shape beta range", lo=0.01)
    betap: List[float] = span([1.0, 1.5], "plateau shape beta range", lo=0.01)
    resize_probs: List[float] = distribution([0.2, 0.7, 0.1], "up / down / keep", size=3)
    resize_range: List[float] = span([0.3, 1.5], "resize factor range (up draws from [1, high], "
                                     "down from [low, 1])", lo=0.01)
    resize_modes: List[str] = subset(RESIZE_MODES, RESIZE_MODES, "interpolation modes, one per sample")
    gaussian_noise_prob: float = prob(0.5, "Gaussian (else Poisson) noise")
    noise_sigma: List[float] = span([1.0, 15.0], "Gaussian noise sigma range, in 1/255 units", lo=0)
    poisson_scale: List[float] = span([0.05, 2.0], "Poisson noise scale range", lo=0)
    gray_noise_prob: float = prob(0.4, "probability that the noise is the same on all channels")
    jpeg_quality: List[float] = span([60.0, 95.0], "JPEG quality range", lo=1, hi=100)

    def check(self):
        if len(self.kernel_probs) != len(self.kernel_types):
            yield "kernel_probs", (f"must list one probability per kernel type "
                                   f"({len(self.kernel_types)}), got {len(self.kernel_probs)}")


def _second_round() -> RoundConfig:
    return RoundConfig(blur_prob=0.5, blur_sigma=[0.2, 1.0], resize_probs=[0.3, 0.4, 0.3],
                       resize_range=[0.6, 1.2], noise_sigma=[1.0, 12.0], poisson_scale=[0.05, 1.0],
                       jpeg_quality=[60.0, 100.0])


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order synthesis, drawn per sample (METHOD.md, 'Synthetic degradation')."""

    scale: int = choice(4, SCALES, "HR size / LR size")
    first: RoundConfig = field(default_factory=RoundConfig)
    second: RoundConfig = field(default_factory=_second_round)
    final_sinc_prob: float = prob(0.8, "probability of the final sinc filter")
    final_kernel_sizes: List[int] = odd_sizes(ODD_7_21, "kernel sizes of the final sinc")
    final_resize_modes: List[str] = subset(RESIZE_MODES, RESIZE_MODES,
                                           "modes of the final resize to HR/scale")
    no_degradation_prob: float = prob(0.01, "the LR is the clean downsampled HR")
    upsample_mode: str = choice("bicubic", ["bicubic", "bilinear", "nearest"],
                                "how the LR is upsampled back to HR size (model input)")
    noise_label: str = choice("measured", ["params", "measured"],
                              "noise score: 'measured' = std of the noise + JPEG artefacts the LR "
                              "really carries (the draw re-rendered without them), / "
                              "noise_label_ref; 'params' = modelled from the sampled parameters "
                              "(cheaper, but only ~0.3-0.4 rank-correlated with what is visible)")
    noise_label_ref: float = positive(16.0, "measured artefact std (1/255 units) that scores 1")
    blur_label: str = choice("measured", ["params", "measured"],
                             "blur score: 'measured' = 1 - the gain of the draw's blurs and "
                             "resizes on a fixed white-noise probe against its clean downsample "
                             "(the share of the LR's detail they removed); 'params' = the "
                             "effective std modelled from the sampled parameters")
    blur_label_probe: int = positive(32, "LR side (pixels, >= 8) of the probe of the measured blur "
                                     "label (its HR side: x scale)")
    usm_sharpen: bool = plain(False, "sharpen the HR target with unsharp masking (realesrgan)")
    usm_weight: float = number(0.5, "unsharp-mask weight", lo=0)
    usm_threshold: float = number(10.0, "unsharp-mask threshold, in 1/255 units", lo=0)
    usm_radius: int = positive(51, "unsharp-mask Gaussian kernel size (odd)")
    usm_sigma: float = positive(8.0, "unsharp-mask Gaussian sigma")

    def check(self):
        if self.usm_radius % 2 == 0:
            yield "usm_radius", f"must be odd, got {self.usm_radius}"
        if self.blur_label_probe < 8:  # a few pixels: a one-pixel probe has no detail to measure
            yield "blur_label_probe", f"must be at least 8 (LR pixels), got {self.blur_label_probe}"


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    name: str = plain("degsr", "run name: the run directory is <dir>/<name> (no timestamp, so a "
                               "requeued job finds its own checkpoints)")
    dir: str = plain("runs", "parent folder of run directories")
    seed: int = number(0, "base seed; each rank and worker derives its own stream", lo=0,
                       hi=2**32 - 1)  # Lightning's seed_everything (numpy) takes 32 bits
    export_dir: str = plain("export", "where the stage's export goes, relative to the run directory")

    def check(self):
        if self.name.strip() in ("", ".", "..") or "/" in self.name or "\\" in self.name:
            yield "name", (f"must be a folder name (not empty, no '/'), got {self.name!r}: the run "
                           "directory is <run.dir>/<run.name>")
        parts = Path(self.export_dir).parts
        if not parts or Path(self.export_dir).is_absolute() or ".." in parts or "~" in self.export_dir:
            yield "export_dir", (f"must be a folder inside the run directory (relative, no '..'), "
                                 f"got {self.export_dir!r}: two runs must not export to one place")



STAGES = ["estimator", "sr"]


def _sections():
    """Section schemas that live beside the code they configure (imported late: no cycles)."""
    from degsr.data.config import DataConfig
    from degsr.estimator.config import EstimatorConfig
    from degsr.sr.config import DiscConfig, LoraConfig, ModelConfig, SRConfig
    from degsr.training.config import LoggerConfig, TrainerConfig
    return (DataConfig, EstimatorConfig, LoggerConfig, TrainerConfig, ModelConfig, LoraConfig,
            DiscConfig, SRConfig)


(DataConfig, EstimatorConfig, LoggerConfig, TrainerConfig, ModelConfig, LoraConfig, DiscConfig,
 SRConfig) = _sections()


@dataclass
class Config:
    """The whole config tree of one run."""

    stage: str = choice("estimator", STAGES, "what `degsr fit` trains: estimator = stage 1, "
                                             "sr = stage 2")
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    sr: SRConfig = field(default_factory=SRConfig)

    def check(self):
        for key in ("crop_size", "val_crop_size"):  # (a bad scale is its own problem)
            if self.degradation.scale in SCALES and getattr(self.data, key) % self.degradation.scale:
                yield f"data.{key}", (f"must be a multiple of degradation.scale "
                                      f"({self.degradation.scale}), got {getattr(self.data, key)}")
        need = 2 ** sum(1 for d in self.estimator.net.downscales if d == 2)  # its smallest input
        for key in ("crop_size", "val_crop_size"):
            side = getattr(self.data, key) // max(1, self.degradation.scale)
            if self.stage == "estimator" and self.degradation.scale in SCALES and 0 < side < need:
                yield f"data.{key}", (f"gives {side}x{side} LR crops (/ degradation.scale), "
                                      f"smaller than the {need}x{need} the estimator's stride-2 "
                                      "stages (estimator.net.downscales) need")
        if (self.stage == "estimator" and self.estimator.within_crop_weight > 0
                and self.data.degradations_per_crop < 2):
            yield "estimator.within_crop_weight", ("needs data.degradations_per_crop >= 2 (each "
                                                   "crop degraded several times), got "
                                                   f"{self.data.degradations_per_crop}")
        if self.stage == "sr" and self.trainer.precision == "16-mixed":
            yield "trainer.precision", ("stage sr steps its discriminator outside Lightning's "
                                        "loss scaler: use bf16-mixed or 32-true, not 16-mixed")
        if self.stage == "sr" and self.trainer.strategy == "ddp":
            yield "trainer.strategy", ("stage sr's generator and discriminator steps each leave the "
                                       "other's parameters without gradients, which plain ddp "
                                       "rejects: use ddp_find_unused_parameters_true (or auto)")
        if self.stage == "sr":  # manual optimisation: Lightning's own two keys do not apply
            if self.trainer.accumulate_grad_batches != 1:
                yield "trainer.accumulate_grad_batches", ("stage sr optimises by hand: use "
                                                          "sr.accumulate instead")
            if self.trainer.gradient_clip_val:
                yield "trainer.gradient_clip_val", "stage sr optimises by hand: use sr.grad_clip instead"
            if self.data.batches_per_epoch % self.sr.accumulate:
                yield "sr.accumulate", (f"must divide data.batches_per_epoch "
                                        f"({self.data.batches_per_epoch}): a step's batches would "
                                        "straddle two epochs")
        epoch = self.data.batches_per_epoch * self.data.echo  # training batches per epoch
        if self.stage == "estimator" and epoch % self.trainer.accumulate_grad_batches:
            # Lightning steps at an epoch's last batch whatever is accumulated: the steps would
            # drift off the batch count that trainer.val_every_n_steps is turned into (fit.py)
            yield "trainer.accumulate_grad_batches", (
                f"must divide the training batches of an epoch (data.batches_per_epoch x "
                f"data.echo = {epoch}): a step's batches would straddle two epochs")
        if self.stage == "sr" and self.sr.lpips_weight > 0 and not self.sr.lpips_vgg:
            yield "sr.lpips_vgg", ("required when sr.lpips_weight > 0: the path of torchvision's "
                                   "VGG16 weights (vgg16-397923af.pth), or set sr.lpips_weight=0")
