"""Batched blur-kernel generation for the Real-ESRGAN second-order degradation.

Formulas follow Real-ESRGAN / BasicSR (``basicsr/data/degradations.py``), but every
function works on a whole batch with per-sample parameters (tensors of shape ``(B,)``),
on any device, in float32 or float64, without a Python loop over samples.

Kernels of different odd sizes share one ``(B, S, S)`` tensor: see :func:`mask_to_sizes`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from degsr.degradation.ops import constant

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc")
"""Index order of ``params["kernel_type"]``."""
TINY_TAP = 1e-20


def _batch(value, like: Tensor) -> Tensor:
    """``value`` (scalar or tensor) as a 1-D tensor on ``like``'s device and dtype."""
    return torch.as_tensor(value, device=like.device, dtype=like.dtype).reshape(-1)


def kernel_grid(size: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Coordinate grids ``(x, y)``, each ``(size, size)``, centred on 0 (``size`` odd).

    ``x`` varies along columns and ``y`` along rows, as ``np.meshgrid`` in BasicSR.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    ax = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def sigma_matrix_inverse(sigma_x, sigma_y, theta) -> Tensor:
    """Inverse of ``Σ = R diag(σx², σy²) Rᵀ`` (``R`` the rotation by ``θ``), shape ``(B, 2, 2)``.

    Computed in closed form: ``Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ``.
    """
    sigma_x = torch.as_tensor(sigma_x).reshape(-1)
    sigma_x, sigma_y, theta = torch.broadcast_tensors(sigma_x, _batch(sigma_y, sigma_x), _batch(theta, sigma_x))
    c, s = torch.cos(theta), torch.sin(theta)
    a, b = sigma_x.pow(-2), sigma_y.pow(-2)
    off = (a - b) * c * s
    row0 = torch.stack([a * c * c + b * s * s, off], dim=-1)
    row1 = torch.stack([off, a * s * s + b * c * c], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def _normalise(kernels: Tensor) -> Tensor:
    """Divide each ``(S, S)`` kernel by its sum."""
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def _quadratic_form(size: int, sigma_x, sigma_y, theta) -> Tensor:
    """``q = [x y] Σ⁻¹ [x y]ᵀ`` on the centred ``size × size`` grid, ``(B, size, size)``."""
    inv = sigma_matrix_inverse(sigma_x, sigma_y, theta)  # (B, 2, 2)
    x, y = kernel_grid(size, device=inv.device, dtype=inv.dtype)
    x, y = x[None], y[None]
    return inv[:, 0, 0, None, None] * x * x + 2 * inv[:, 0, 1, None, None] * x * y + inv[:, 1, 1, None, None] * y * y


def gaussian_family_kernels(size: int, sigma_x, sigma_y, theta, beta=None, family: str = "gaussian") -> Tensor:
    """Bivariate Gaussian-family kernels ``(B, size, size)``, each normalised to sum 1.

    With ``q = [x y] Σ⁻¹ [x y]ᵀ``:
    ``"gaussian"``: ``exp(-q/2)``; ``"generalized"``: ``exp(-0.5 q^β)``; ``"plateau"``: ``1 / (q^β + 1)``.
    """
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if family == "gaussian":
        return _normalise(torch.exp(-0.5 * q))
    if beta is None:
        raise ValueError(f"family {family!r} needs beta")
    qb = q.pow(_batch(beta, q)[:, None, None])
    if family == "generalized":
        return _normalise(torch.exp(-0.5 * qb))
    if family == "plateau":
        return _normalise(1.0 / (qb + 1.0))
    raise ValueError(f"unknown family {family!r}; expected 'gaussian', 'generalized' or 'plateau'")


def _bessel_j1(z: Tensor) -> Tensor:
    """``torch.special.bessel_j1``, computed on the CPU where the device lacks it (e.g. float64 on MPS)."""
    try:
        return torch.special.bessel_j1(z)
    except (RuntimeError, NotImplementedError, TypeError):
        return torch.special.bessel_j1(z.detach().cpu().double()).to(device=z.device, dtype=z.dtype)


def circular_sinc_kernels(size: int, omega_c) -> Tensor:
    """Circular low-pass (jinc) kernels ``(B, size, size)`` with cut-off ``ω_c`` (rad/pixel).

    ``k(r) = ω_c J1(ω_c r) / (2π r)``, centre ``ω_c² / (4π)`` (the ``r → 0`` limit); normalised to sum 1.
    """
    omega_c = torch.as_tensor(omega_c).reshape(-1)
    if not omega_c.is_floating_point():
        omega_c = omega_c.float()
    x, y = kernel_grid(size, device=omega_c.device, dtype=omega_c.dtype)
    r = torch.sqrt(x * x + y * y)[None]
    w = omega_c[:, None, None]
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    k = w * _bessel_j1(w * r_safe) / (2 * math.pi * r_safe)
    k = torch.where(r > 0, k, w * w / (4 * math.pi))
    return _normalise(k)


def mask_to_sizes(kernels: Tensor, sizes: Tensor) -> Tensor:
    """Zero each kernel outside its central ``sizes[b] × sizes[b]`` window and renormalise.

    ``kernels`` is ``(B, S, S)``, ``sizes`` ``(B,)`` odd ints ``≤ S``. Every family here is a
    pointwise function of the centred coordinates followed by normalisation, and the ``k``-grid
    coincides with the central ``k × k`` window of the ``S``-grid. So a kernel generated at size
    ``k`` and zero-padded to ``S`` (as BasicSR's ``pad_to`` does) equals the ``S``-grid kernel
    masked to that window and renormalised; this lets mixed sizes live in one tensor.
    """
    size = kernels.shape[-1]
    sizes = sizes.to(kernels.device).reshape(-1)  # validated as Python lists by the samplers:
    # a check on the tensor here would cost three host syncs per call on the training path
    dist = (torch.arange(size, device=kernels.device) - size // 2).abs()
    inside = dist[None, :] <= (sizes[:, None] // 2)  # (B, S)
    mask = inside[:, :, None] & inside[:, None, :]
    # Taps below 1e-20 (e.g. the tails of a sigma-0.2 Gaussian) are zeroed: float32 would hold
    # some of them as denormals, which make CPU convolutions several times slower.
    mask = mask & (kernels.abs() > TINY_TAP)
    return _normalise(kernels * mask.to(kernels.dtype))


def kernel_std(kernels: Tensor) -> Tensor:
    """Effective spatial std ``(B,)`` in pixels: ``sqrt(trace(M) / 2)``, M the central second-moment matrix.

    For sinc kernels this is not a useful width: an ideal circular low-pass has zero second
    moment, and truncated jincs give small values of either sign (clamped at 0 here).
    """
    x, y = kernel_grid(kernels.shape[-1], device=kernels.device, dtype=kernels.dtype)
    mass = kernels.sum(dim=(-2, -1))
    mx = (kernels * x).sum(dim=(-2, -1)) / mass
    my = (kernels * y).sum(dim=(-2, -1)) / mass
    dx2 = (x[None] - mx[:, None, None]) ** 2
    dy2 = (y[None] - my[:, None, None]) ** 2
    trace = (kernels * (dx2 + dy2)).sum(dim=(-2, -1)) / mass
    return torch.sqrt(torch.clamp(trace / 2, min=0))


def _uniform(generator: torch.Generator, batch: int, low, high, device, dtype) -> Tensor:
    """``U[low, high]`` of shape ``(B,)``, drawn in float64 on the generator's device (dtype-independent)."""
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
    low, high = float(low), float(high)  # Python floats: kernel arguments, no upload
    return (u * (high - low) + low).to(device=device, dtype=dtype)


def _check_sizes(kernel_sizes, max_size: int) -> None:
    if not kernel_sizes or any(k % 2 == 0 or not 1 <= k <= max_size for k in kernel_sizes):
        raise ValueError(f"kernel sizes must be odd and in [1, {max_size}], got {list(kernel_sizes)}")


def _choice(generator: torch.Generator, batch: int, values, device) -> Tensor:
    """Uniform draw ``(B,)`` long from the list ``values``."""
    idx = torch.randint(len(values), (batch,), generator=generator, device=generator.device)
    return constant(list(values), torch.long, generator.device)[idx].to(device)


def _split_beta(generator: torch.Generator, batch: int, beta_range, device, dtype) -> Tensor:
    """BasicSR's β rule: with prob 0.5 ``U[low, 1]``, else ``U[1, high]``."""
    low_half = _uniform(generator, batch, 0.0, 1.0, device, dtype) < 0.5
    below = _uniform(generator, batch, beta_range[0], 1.0, device, dtype)
    above = _uniform(generator, batch, 1.0, beta_range[1], device, dtype)
    return torch.where(low_half, below, above)


def sample_blur_kernels(batch: int, generator: torch.Generator, *, max_size: int = 21,
                        **draw_args) -> tuple[Tensor, dict[str, Tensor]]:
    """Real-ESRGAN blur kernels ``(B, max_size, max_size)`` and their parameters: the draws of
    :func:`draw_blur_params` (its keyword arguments) built by :func:`blur_kernels`."""
    return blur_kernels(draw_blur_params(batch, generator, max_size=max_size, **draw_args), max_size)


def draw_blur_params(batch: int, generator: torch.Generator, *, kernel_sizes, kernel_types,
                     kernel_probs, sigma_range, betag_range, betap_range, sinc_prob,
                     max_size: int = 21, device=None, dtype=torch.float32) -> dict[str, Tensor]:
    """Every random draw of ``batch`` Real-ESRGAN blur kernels, in a fixed order from
    ``generator`` (a seed fixes them bit for bit): ``(B,)`` tensors ``size``, ``type`` (indexing
    :data:`KERNEL_TYPES`), ``sigma_x``, ``sigma_y``, ``theta``, ``beta_g``, ``beta_p``, ``omega``."""
    device = torch.device(device) if device is not None else generator.device
    unknown = set(kernel_types) - set(KERNEL_TYPES[:-1])
    if unknown or len(kernel_types) != len(kernel_probs):
        raise ValueError(f"bad kernel_types {list(kernel_types)} / kernel_probs {list(kernel_probs)}")
    _check_sizes(kernel_sizes, max_size)
    size = _choice(generator, batch, kernel_sizes, device)
    is_sinc = _uniform(generator, batch, 0.0, 1.0, device, torch.float64) < sinc_prob
    probs = constant(list(kernel_probs), torch.float64, device)
    cdf = torch.cumsum(probs / probs.sum(), dim=0)
    pick = torch.searchsorted(cdf, _uniform(generator, batch, 0.0, 1.0, device, torch.float64), right=True)
    type_ids = constant([KERNEL_TYPES.index(t) for t in kernel_types], torch.long, device)
    ktype = torch.where(is_sinc, len(KERNEL_TYPES) - 1, type_ids[pick.clamp(max=len(kernel_types) - 1)])

    sx = _uniform(generator, batch, *sigma_range, device, dtype)
    sy_aniso = _uniform(generator, batch, *sigma_range, device, dtype)
    theta_aniso = _uniform(generator, batch, -math.pi, math.pi, device, dtype)
    beta_g = _split_beta(generator, batch, betag_range, device, dtype)
    beta_p = _split_beta(generator, batch, betap_range, device, dtype)
    omega = torch.where(size < 13, _uniform(generator, batch, math.pi / 3, math.pi, device, dtype),
                        _uniform(generator, batch, math.pi / 5, math.pi, device, dtype))
    aniso = (ktype == 1) | (ktype == 3) | (ktype == 5)
    return {"size": size, "type": ktype, "sigma_x": sx, "sigma_y": torch.where(aniso, sy_aniso, sx),
            "theta": torch.where(aniso, theta_aniso, torch.zeros_like(theta_aniso)),
            "beta_g": beta_g, "beta_p": beta_p, "omega": omega}


def blur_kernels(draws: dict[str, Tensor], max_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The kernels ``(B, max_size, max_size)`` of :func:`draw_blur_params`'s ``draws`` (drawn
    with the same ``max_size``: a larger drawn size would be cut to it silently) and the
    parameters recorded for them (``params["kernel_type"]`` indexes :data:`KERNEL_TYPES`; unused
    float parameters are 0). All families are built for the whole batch from one quadratic form
    and selected with ``torch.where``; the draws of several calls, concatenated, build at once."""
    size, ktype = draws["size"], draws["type"]
    sx, sy, theta, beta_g, beta_p = (draws[k] for k in ("sigma_x", "sigma_y", "theta", "beta_g", "beta_p"))
    is_sinc = ktype == len(KERNEL_TYPES) - 1
    fam = ktype[:, None, None] // 2  # 0 gaussian, 1 generalized, 2 plateau, 3 sinc
    q = _quadratic_form(max_size, sx, sy, theta)
    beta = torch.where(fam == 1, beta_g[:, None, None], beta_p[:, None, None])
    qb = torch.where(fam == 0, q, q.pow(beta))  # as gaussian_family_kernels, one family a sample
    raw = torch.where(fam == 2, 1.0 / (qb + 1.0), torch.exp(-0.5 * qb))
    kernels = torch.where(fam == 3, circular_sinc_kernels(max_size, draws["omega"]), _normalise(raw))
    kernels = mask_to_sizes(kernels, size)

    zero = torch.zeros_like(sx)
    fam = fam[:, 0, 0]
    params = {
        "kernel_size": size,
        "kernel_type": ktype,
        "sigma_x": torch.where(is_sinc, zero, sx),
        "sigma_y": torch.where(is_sinc, zero, sy),
        "theta": torch.where(is_sinc, zero, theta),
        "beta": torch.where(fam == 1, beta_g, torch.where(fam == 2, beta_p, zero)),
        "omega_c": torch.where(is_sinc, draws["omega"], zero),
        "blur_std": kernel_std(kernels),
    }
    return kernels, params


def sample_sinc_kernels(batch: int, generator: torch.Generator, *, kernel_sizes, prob: float, max_size: int = 21,
                        device=None, dtype=torch.float32) -> tuple[Tensor, dict[str, Tensor]]:
    """Real-ESRGAN's final sinc: with prob ``prob`` a sinc (ω_c ~ U[π/3, π]), else a centred delta.

    Returns ``(B, max_size, max_size)`` kernels and ``{"final_sinc", "final_kernel_size",
    "final_omega_c"}``; an identity sample has kernel size 1 (the delta) and ω_c 0.
    """
    device = torch.device(device) if device is not None else generator.device
    _check_sizes(kernel_sizes, max_size)
    is_sinc = _uniform(generator, batch, 0.0, 1.0, device, torch.float64) < prob
    size = _choice(generator, batch, kernel_sizes, device)
    omega = _uniform(generator, batch, math.pi / 3, math.pi, device, dtype)
    size = torch.where(is_sinc, size, torch.ones_like(size))
    omega = torch.where(is_sinc, omega, torch.zeros_like(omega))
    # Masking any kernel with a positive centre to size 1 gives the exact delta.
    kernels = mask_to_sizes(circular_sinc_kernels(max_size, torch.where(is_sinc, omega, math.pi)), size)
    return kernels, {"final_sinc": is_sinc, "final_kernel_size": size, "final_omega_c": omega}
