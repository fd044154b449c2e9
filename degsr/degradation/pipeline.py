"""The Real-ESRGAN second-order degradation, batched, every draw per sample (METHOD.md).

``Degrader(cfg)(hr, generator)`` turns a batch of HR crops in [0, 1] into a dict:

- ``hr``: the HR crops as given; ``gt``: the training target (USM-sharpened when
  ``usm_sharpen``, else ``hr``; the LR is synthesised from it, as Real-ESRGAN does);
- ``lr``: (B, 3, H/scale, W/scale), clamped and quantised to 1/255;
- ``lr_up``: the LR upsampled back to H x W with ``upsample_mode`` (clamped to [0, 1]);
- ``scores``: (B, 2) [blur, noise] in [0, 1]: measured (:meth:`Degrader.measured_blur`, the
  noise re-render) or modelled (:mod:`degsr.degradation.scores`), per ``blur_label``/``noise_label``;
- ``clean``: (B,) bool, the no-degradation samples (LR = antialiased bicubic downsample of HR);
- ``params``: every sampled parameter, (B,) tensors.

Samples whose sizes differ after a resize share a canvas (see :mod:`degsr.degradation.resize`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from degsr.config.fields import as_dataclass
from torch import Tensor

from degsr.config.schema import DegradationConfig
from degsr.degradation import ops
from degsr.degradation.jpeg import jpeg
from degsr.degradation.filtering import filter_per_sample
from degsr.degradation.kernels import sample_blur_kernels, sample_sinc_kernels
from degsr.degradation.resize import (RESIZE_MODES, apply_resize, resize_matrices, resize_taps,
                                      scatter_taps, tap_bound)
from degsr.degradation.scores import degradation_scores
from degsr.errors import UserError


def _mode_draw(g: torch.Generator, n: int, allowed) -> Tensor:
    ids = ops.constant([RESIZE_MODES.index(m) for m in allowed], torch.long, g.device)
    return ids[torch.randint(len(ids), (n,), generator=g, device=g.device)]


GROUP_COST = 1.0  # fixed cost of one more group (its own calls), in units of the HR area
ACCEL_GROUP_COST = 16.0  # the same on accelerators: launches cost more there, pixels less


def partition_by_area(scales: list[float], group_cost: float) -> list[int]:
    """Cut points ``[0, ..., n]`` splitting ascending ``scales`` into runs, minimising the sum
    over runs of (run length x its largest scale², the padded canvas area) + ``group_cost``."""
    n = len(scales)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * scales[j - 1] ** 2 + group_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(cut[cuts[-1]])
    return cuts[::-1]


def quantize(x: Tensor) -> Tensor:
    return (x * 255.0).round().clamp(0, 255) / 255.0


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one; an index-less ``cuda`` (a generator made with
    ``device="cuda"``) is the current CUDA device, which ``cuda:N`` tensors are on."""
    return a.type == b.type and (None in (a.index, b.index) or a.index == b.index)


class Degrader:
    """The degradation engine for one preset (a ``DegradationConfig``).

    ``sample(n, g)`` draws every parameter of ``n`` samples (and builds their kernels);
    ``apply(hr, draw, g)`` runs the chain with them, taking only the noise fields from ``g``.
    ``degrader(hr, g)`` does both. Splitting them lets callers degrade the same crop with
    controlled changes (stage-1 ranking pairs) or keep a fixed validation draw.
    """

    def __init__(self, cfg: DegradationConfig):
        self.cfg = as_dataclass(cfg)
        self._probes: dict = {}  # (device, dtype) -> the blur label's probe and its reference

    @staticmethod
    def _round(g: torch.Generator, n: int, rc, tag: str, p: dict, k: dict, dtype) -> None:
        kernels, kp = sample_blur_kernels(
            n, g, kernel_sizes=rc.kernel_sizes, kernel_types=rc.kernel_types,
            kernel_probs=rc.kernel_probs, sigma_range=rc.blur_sigma, betag_range=rc.betag,
            betap_range=rc.betap, sinc_prob=rc.sinc_prob, dtype=dtype)
        k[tag] = kernels
        p.update({f"{tag}_{name.removeprefix('blur_')}": v for name, v in kp.items()})
        p[f"{tag}_applied"] = ops.bernoulli(g, n, rc.blur_prob)
        i = tag[-1]
        p[f"resize{i}_scale"], p[f"resize{i}_kind"] = ops.scale_factors(g, n, rc.resize_probs,
                                                                      rc.resize_range)
        p[f"resize{i}_mode"] = _mode_draw(g, n, rc.resize_modes)
        p[f"noise{i}_gaussian"] = ops.bernoulli(g, n, rc.gaussian_noise_prob)
        p[f"noise{i}_gray"] = ops.bernoulli(g, n, rc.gray_noise_prob)
        p[f"noise{i}_sigma"] = ops.uniform(g, n, *rc.noise_sigma)
        p[f"noise{i}_poisson_scale"] = ops.uniform(g, n, *rc.poisson_scale)
        p[f"jpeg{i}_quality"] = ops.uniform(g, n, *rc.jpeg_quality)

    def sample(self, n: int, g: torch.Generator, dtype=torch.float32) -> dict:
        """Every parameter of ``n`` samples: ``{"params": {name: (n,)}, "kernels": {...}}``."""
        cfg, p, k = self.cfg, {}, {}
        self._round(g, n, cfg.first, "blur1", p, k, dtype)
        self._round(g, n, cfg.second, "blur2", p, k, dtype)
        k["final"], sp = sample_sinc_kernels(n, g, kernel_sizes=cfg.final_kernel_sizes,
                                             prob=cfg.final_sinc_prob, dtype=dtype)
        p.update(sp)
        p["final_jpeg_first"] = ops.bernoulli(g, n, 0.5)
        p["final_mode"] = _mode_draw(g, n, cfg.final_resize_modes)
        p["clean"] = ops.bernoulli(g, n, cfg.no_degradation_prob)
        return {"params": p, "kernels": k}

    @staticmethod
    def _blur(x: Tensor, p: dict, kernels: Tensor, tag: str, inplace: bool = False) -> Tensor:
        """Blur the samples whose ``<tag>_applied`` holds, each with its own kernel."""
        return ops.on_subset(p[f"{tag}_applied"], x,
                             lambda i: filter_per_sample(x[i], kernels[i]), inplace)

    @staticmethod
    def _noise(x: Tensor, p: dict, i: str, g: torch.Generator) -> Tensor:
        gauss, gray = p[f"noise{i}_gaussian"], p[f"noise{i}_gray"]
        return ops.split_apply(gauss, x, lambda j: (x[j] + ops.gaussian_noise(
            g, x[j], p[f"noise{i}_sigma"][j], gray[j])).clamp_(0, 1), lambda j: (x[j] + ops.poisson_noise(
            g, x[j], p[f"noise{i}_poisson_scale"][j], gray[j], ~gauss[j])).clamp_(0, 1))

    @staticmethod
    def _host_scales(p: dict) -> Tensor:
        """(2, B) the resize-1 and resize-2 draws, copied to the host: the call's one host sync.
        Taken before any pixel work is queued, it waits only for the draws on an accelerator."""
        return torch.stack([p["resize1_scale"], p["resize2_scale"]]).cpu()

    def _plan(self, p: dict, host: Tensor, hw: tuple[int, int], lr_hw: tuple[int, int],
              dtype) -> dict:
        """The resize matrices of every stage, built once a call for both renders, per group.

        Sizes are base x factor (resize 2 relative to the LR size, as the reference). The groups
        (runs of the samples sorted by resize-1 scale, :func:`partition_by_area`) share a
        canvas: their largest size. Decided on the host from ``host`` (:meth:`_host_scales`),
        with the taps of each stage built for all samples at once.
        """
        s1, s2 = host
        device, b = p["resize1_scale"].device, s1.shape[0]
        size1 = [(n * s1).to(torch.long).clamp(min=1) for n in hw]
        size2 = [(n * s2).to(torch.long).clamp(min=1) for n in lr_hw]
        full = [torch.full_like(size1[0], n) for n in (*hw, *lr_hw)]
        order = torch.argsort(s1, stable=True)
        cost = GROUP_COST if device.type == "cpu" else ACCEL_GROUP_COST
        cuts = partition_by_area(s1[order].tolist(), cost)
        # one upload while the device queue is empty: order and every size
        dev = torch.stack([order, *size1, *size2, *full]).to(device)
        order_d, sizes1, sizes2, full_d = dev[0], dev[1:3], dev[3:5], dev[5:]
        both = lambda t: torch.cat([t, t])  # noqa: E731  (rows H then W)

        def taps(n_in, n_out, host_in, host_out, modes):
            size_out = int(torch.cat(host_out).max())
            return resize_taps(n_in.reshape(-1), n_out.reshape(-1), both(modes), size_out, dtype,
                               taps=tap_bound(torch.cat(host_in), torch.cat(host_out)))

        t1 = taps(full_d[:2], sizes1, full[:2], size1, p["resize1_mode"])
        t2 = taps(sizes1, sizes2, size1, size2, p["resize2_mode"])
        canvas2 = tuple(int(n.max()) for n in size2)

        def matrices(t, rows, canvas_out, canvas_in):  # rows: samples (None: all, no gather)
            sel = [slice(k * b, (k + 1) * b) if rows is None else rows + k * b for k in (0, 1)]
            return [scatter_taps(t[0][sel[k], :canvas_out[k]], t[1][sel[k], :canvas_out[k]],
                                 canvas_in[k]) for k in (0, 1)]  # H rows, then W rows

        groups = []
        for i, j in zip(cuts[:-1], cuts[1:]):
            idx, host_idx = order_d[i:j], order[i:j]
            canvas1 = tuple(int(n[host_idx].max()) for n in size1)
            groups.append({"idx": idx, "r1": matrices(t1, idx, canvas1, hw),
                           "r2": matrices(t2, idx, canvas2, canvas1)})
        tf = taps(sizes2, full_d[2:], size2, full[2:], p["final_mode"])
        return {"groups": groups, "canvas2": canvas2, "final": matrices(tf, None, lr_hw, canvas2)}

    def _middle(self, y: Tensor, p: dict, k: dict, g: torch.Generator | None, group: dict) -> Tensor:
        """The group's samples after resize 1 (``y``): noise -> JPEG -> blur 2 -> resize 2."""
        idx = group["idx"]
        q = {name: p[name][idx] for name in ("noise1_gaussian", "noise1_gray", "noise1_sigma",
                                             "noise1_poisson_scale", "jpeg1_quality", "blur2_applied")}
        fresh = g is not None  # y is this render's own tensor (else shared by both renders)
        if fresh:  # g None: the draw without its noise and JPEG (measured noise label)
            y = jpeg(self._noise(y, q, "1", g), q["jpeg1_quality"])
        y = self._blur(y, q, k["blur2"][idx], "blur2", inplace=fresh)
        return apply_resize(y, *group["r2"])

    def __call__(self, hr: Tensor, generator: torch.Generator) -> dict:
        return self.apply(hr, self.sample(hr.shape[0], generator), generator)

    def apply(self, hr: Tensor, draw: dict, generator: torch.Generator) -> dict:
        cfg, g, p = self.cfg, generator, draw["params"]
        b, c, h, w = hr.shape
        s = cfg.scale
        if c != 3 or h % s or w % s:
            raise UserError(f"degradation: HR batch must be (B, 3, H, W) with H, W multiples of "
                            f"scale {s}; got {tuple(hr.shape)}")
        if not same_device(hr.device, g.device):
            raise ValueError(f"generator on {g.device} but images on {hr.device}")
        host = self._host_scales(p)  # before any pixel work is queued
        hr = hr if hr.is_floating_point() else hr.float() / 255.0  # uint8 crops from the loader
        gt = (ops.usm_sharpen(hr, cfg.usm_weight, cfg.usm_threshold, cfg.usm_radius, cfg.usm_sigma)
              if cfg.usm_sharpen else hr)
        plan, resized = self._front(gt, draw, host)
        lr = self._render(plan, resized, draw, g)
        scores = degradation_scores(p, cfg)
        if cfg.blur_label == "measured":
            scores[:, 0] = torch.where(p["clean"].bool(), 0.0, self.measured_blur(draw, hr, host))
        if cfg.noise_label == "measured":  # what the LR really carries: vs the same draw rendered
            quiet = self._render(plan, resized, draw, None)  # without noise and JPEG
            visible = (lr - quiet).flatten(1).std(1) * 255
            scores[:, 1] = torch.where(p["clean"].bool(), 0.0,
                                       (visible / cfg.noise_label_ref).clamp(0, 1))

        # the no-degradation switch: the LR is the clean (antialiased bicubic) downsample
        lr = ops.on_subset(p["clean"], lr, lambda i: quantize(clean_downsample(hr[i], s)), True)
        return {"hr": hr, "gt": gt, "lr": lr, "lr_up": upsample(lr, (h, w), cfg.upsample_mode),
                "clean": p["clean"], "scores": scores, "params": dict(p)}

    def measured_blur(self, draw: dict, like: Tensor, host: Tensor | None = None) -> Tensor:
        """(B,) blur label: ``1 - gain``, clipped to [0, 1]. The draw's linear chain (both blurs,
        the resizes, the final sinc; no noise, no JPEG) renders a fixed white-noise probe, and
        ``gain`` is the least-squares factor of the clean (antialiased bicubic) downsample of the
        probe in that render: the chain's mean frequency response over the LR band, relative to
        a clean LR. 0: as sharp as a clean LR; 0.5: half of its detail gone. The probe is the
        same for every call and sample and does not touch the call's generator, so the label is
        a function of the draw alone (not of the crop, its content or its size). ``host``: the
        draw's :meth:`_host_scales`, if already taken."""
        n, s = self.cfg.blur_label_probe, self.cfg.scale
        key = (like.device, like.dtype)
        if key not in self._probes:
            g = torch.Generator().manual_seed(0)
            probe = torch.rand(1, 3, n * s, n * s, generator=g, dtype=torch.float64)
            ref = clean_downsample(probe, s)
            ref = ref - ref.mean((-2, -1), keepdim=True)
            self._probes[key] = (probe.to(*key), (ref / ref.square().sum()).to(*key))
        probe, ref = self._probes[key]
        x = probe.expand(draw["params"]["clean"].shape[0], -1, -1, -1)
        q = self._render(*self._front(x, draw, host), draw, None)
        gain = ((q - q.mean((-2, -1), keepdim=True)) * ref).sum((1, 2, 3))
        return (1 - gain).clamp(0, 1)

    def _front(self, x: Tensor, draw: dict, host: Tensor | None = None) -> tuple[dict, list[Tensor]]:
        """The part of the chain every render of ``draw`` on ``x`` shares: the resize plan for
        ``x``'s size, blur 1 (before any noise), resize 1 per group (see :meth:`_render`)."""
        p, s = draw["params"], self.cfg.scale
        h, w = x.shape[-2:]
        host = self._host_scales(p) if host is None else host
        plan = self._plan(p, host, (h, w), (h // s, w // s), x.dtype)
        x = self._blur(x, p, draw["kernels"]["blur1"], "blur1")
        return plan, [apply_resize(x[gr["idx"]], *gr["r1"]) for gr in plan["groups"]]

    def _render(self, plan: dict, resized: list[Tensor], draw: dict,
                g: torch.Generator | None) -> Tensor:
        """The degraded LR of ``draw`` from the resize-1 outputs of the plan's groups
        (quantised); ``g`` None: without noise and JPEG."""
        p, artefacts = draw["params"], g is not None
        # first order: blur -> resize (done) -> noise -> JPEG; second order: blur -> resize
        b, y0 = sum(len(gr["idx"]) for gr in plan["groups"]), resized[0]
        mid = y0.new_empty(b, y0.shape[1], *plan["canvas2"])
        for group, y in zip(plan["groups"], resized):
            mid[group["idx"]] = self._middle(y, p, draw["kernels"], g, group)
        x = self._noise(mid, p, "2", g) if artefacts else mid
        # final: [resize to LR + sinc] and JPEG, in a random order per sample; JPEG runs only
        # on the samples that take it at that point
        first, quality = p["final_jpeg_first"], p["jpeg2_quality"]
        if artefacts:
            x = ops.on_subset(first, x, lambda i: jpeg(x[i], quality[i]), inplace=True)
        x = filter_per_sample(apply_resize(x, *plan["final"]), draw["kernels"]["final"])
        if artefacts:
            x = ops.on_subset(~first, x, lambda i: jpeg(x[i], quality[i]), inplace=True)
        return quantize(x)


def clean_downsample(x: Tensor, scale: int) -> Tensor:
    """The clean LR of ``x`` (not quantised): antialiased bicubic to 1/scale, as the
    no-degradation samples and the stage-1 anchor at 0."""
    size = (x.shape[-2] // scale, x.shape[-1] // scale)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def upsample(lr: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``F.interpolate(lr, size, mode, align_corners=False)`` clamped to [0, 1]; the modes
    :func:`resize_matrices` covers run as two matrix products (faster than the bicubic kernel)."""
    if mode not in RESIZE_MODES:
        return F.interpolate(lr, size=size, mode=mode).clamp(0, 1)
    mode_id = ops.constant([RESIZE_MODES.index(mode)], torch.long, lr.device)
    rh, rw = (resize_matrices(ops.constant([n_in], torch.long, lr.device),
                              ops.constant([n_out], torch.long, lr.device), mode_id, n_in, n_out,
                              lr.dtype)[0] for n_in, n_out in zip(lr.shape[-2:], size))
    return torch.matmul(rh, torch.matmul(lr, rw.T)).clamp_(0, 1)
