"""Image quality metrics: LPIPS (VGG, lin) and DISTS on a plain-torch VGG16; Y-channel PSNR/SSIM
(BasicSR convention)."""

from degsr.metrics.dists import DISTS, default_dists_path
from degsr.metrics.fidelity import psnr_y, rgb_to_y, ssim_y
from degsr.metrics.lpips import LPIPS, VGG16Features, default_lin_path

__all__ = ["DISTS", "default_dists_path", "LPIPS", "VGG16Features", "default_lin_path", "psnr_y", "ssim_y", "rgb_to_y"]
