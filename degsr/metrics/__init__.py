"""Image quality metrics: LPIPS (VGG, lin; plain torch) and Y-channel PSNR/SSIM (BasicSR convention)."""

from degsr.metrics.fidelity import psnr_y, rgb_to_y, ssim_y
from degsr.metrics.lpips import LPIPS, VGG16Features, default_lin_path

__all__ = ["LPIPS", "VGG16Features", "default_lin_path", "psnr_y", "ssim_y", "rgb_to_y"]
