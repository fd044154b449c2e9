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
from degsr.config.fields import as_dataclass
from torch import Tensor

from degsr.config.schema import DegradationConfig
from degsr.degradation import ops
from degsr.degradation.jpeg import jpeg
from degsr.degradation.filtering import filter_per_sample
from degsr.degradation.kernels import blur_kernels, draw_blur_params, sample_sinc_kernels
from degsr.degradation.resize import (RESIZE_MODES, apply_resize, clean_downsample, resize_taps,
                                      scatter_taps, tap_bound, upsample)
from degsr.degradation.scores import degradation_scores
from degsr.errors import UserError


def _mode_draw(g: torch.Generator, n: int, allowed) -> Tensor:
    ids = ops.constant([RESIZE_MODES.index(m) for m in allowed], torch.long, g.device)
    return ids[torch.randint(len(ids), (n,), generator=g, device=g.device)]


KERNEL_SIZE = 21  # every blur kernel is padded to this size (the largest allowed)
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
    def _round(g: torch.Generator, n: int, rc, tag: str) -> tuple[dict, dict]:
        """The draws of one order: those of its blur kernels (for :func:`blur_kernels`, which
        builds both orders' at once) and its other parameters."""
        kd = draw_blur_params(n, g, kernel_sizes=rc.kernel_sizes, kernel_types=rc.kernel_types,
                              kernel_probs=rc.kernel_probs, sigma_range=rc.blur_sigma,
                              betag_range=rc.betag, betap_range=rc.betap, sinc_prob=rc.sinc_prob,
                              max_size=KERNEL_SIZE)
        p = {f"{tag}_applied": ops.bernoulli(g, n, rc.blur_prob)}
        i = tag[-1]
        p[f"resize{i}_scale"], p[f"resize{i}_kind"] = ops.scale_factors(g, n, rc.resize_probs,
                                                                      rc.resize_range)
        p[f"resize{i}_mode"] = _mode_draw(g, n, rc.resize_modes)
        p[f"noise{i}_gaussian"] = ops.bernoulli(g, n, rc.gaussian_noise_prob)
        p[f"noise{i}_gray"] = ops.bernoulli(g, n, rc.gray_noise_prob)
        p[f"noise{i}_sigma"] = ops.uniform(g, n, *rc.noise_sigma)
        p[f"noise{i}_poisson_scale"] = ops.uniform(g, n, *rc.poisson_scale)
        p[f"jpeg{i}_quality"] = ops.uniform(g, n, *rc.jpeg_quality)
        return kd, p

    def sample(self, n: int, g: torch.Generator) -> dict:
        """Every parameter of ``n`` samples: ``{"params": {name: (n,)}, "kernels": {...}}``."""
        cfg, p, k = self.cfg, {}, {}
        (kd1, p1), (kd2, p2) = (self._round(g, n, rc, tag)
                                for rc, tag in ((cfg.first, "blur1"), (cfg.second, "blur2")))
        # both orders' kernels in one batch: half the launches of building them apart
        both, kp = blur_kernels({name: torch.cat([kd1[name], kd2[name]]) for name in kd1},
                                KERNEL_SIZE)
        for tag, rows, rest in (("blur1", slice(0, n), p1), ("blur2", slice(n, None), p2)):
            k[tag] = both[rows]
            p.update({f"{tag}_{name.removeprefix('blur_')}": v[rows] for name, v in kp.items()})
            p.update(rest)
        k["final"], sp = sample_sinc_kernels(n, g, kernel_sizes=cfg.final_kernel_sizes,
                                             prob=cfg.final_sinc_prob)
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

    def _plans(self, p: dict, host: Tensor, sizes: list[tuple[int, int]], dtype) -> list[dict]:
        """The resize matrices of every stage for inputs of each of ``sizes`` (HR sizes), built
        once a call for every render of the draw, per group.

        Sizes are base x factor (resize 2 relative to the LR size, as the reference). The groups
        (runs of the samples sorted by resize-1 scale, :func:`partition_by_area`) share a
        canvas: their largest size. Decided on the host from ``host`` (:meth:`_host_scales`);
        the taps of each stage are built for all samples and all sizes at once: half the
        launches for two sizes, the rows of the smaller one padded to the longer output.
        """
        s1, s2 = host
        device, b, s = p["resize1_scale"].device, s1.shape[0], self.cfg.scale
        order = torch.argsort(s1, stable=True)
        cost = ACCEL_GROUP_COST if ops.on_accelerator(device) else GROUP_COST
        cuts = partition_by_area(s1[order].tolist(), cost)
        # lengths on the host: b rows of H, then b of W, of each input in turn
        rows = 2 * len(sizes)
        n_hr = torch.tensor([n for hw in sizes for n in hw]).repeat_interleave(b)
        n_lr = n_hr // s
        size1 = (n_hr * s1.repeat(rows)).to(torch.long).clamp(min=1)
        size2 = (n_lr * s2.repeat(rows)).to(torch.long).clamp(min=1)
        # one upload while the device queue is empty
        order_d, n_hr_d, n_lr_d, size1_d, size2_d = torch.cat(
            [order, n_hr, n_lr, size1, size2]).to(device).split([b] + [rows * b] * 4)
        rep = lambda t: t.repeat(rows)  # noqa: E731

        def taps(n_in, n_out, host_in, host_out, modes):
            return resize_taps(n_in, n_out, rep(modes), int(host_out.max()), dtype,
                               taps=tap_bound(host_in, host_out))

        t1 = taps(n_hr_d, size1_d, n_hr, size1, p["resize1_mode"])
        t2 = taps(size1_d, size2_d, size1, size2, p["resize2_mode"])
        tf = taps(size2_d, n_lr_d, size2, n_lr, p["final_mode"])

        def matrices(t, k, idx, canvas_out, canvas_in):  # input k; idx: samples (None: all)
            sel = [slice(a * b, (a + 1) * b) if idx is None else idx + a * b
                   for a in (2 * k, 2 * k + 1)]  # its H rows, then its W rows
            return [scatter_taps(t[0][sel[r], :canvas_out[r]], t[1][sel[r], :canvas_out[r]],
                                 canvas_in[r]) for r in (0, 1)]  # H rows, then W rows

        plans = []
        for k, hw in enumerate(sizes):
            mine = slice(2 * k * b, (2 * k + 2) * b)
            h1, w1 = size1[mine].view(2, b)
            canvas2 = tuple(int(n.max()) for n in size2[mine].view(2, b))
            groups = []
            for i, j in zip(cuts[:-1], cuts[1:]):
                idx, host_idx = order_d[i:j], order[i:j]
                canvas1 = (int(h1[host_idx].max()), int(w1[host_idx].max()))
                groups.append({"idx": idx, "r1": matrices(t1, k, idx, canvas1, hw),
                               "r2": matrices(t2, k, idx, canvas2, canvas1)})
            plans.append({"groups": groups, "canvas2": canvas2,
                          "final": matrices(tf, k, None, (hw[0] // s, hw[1] // s), canvas2)})
        return plans

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
        _not_empty(hr)
        return self.apply(hr, self.sample(hr.shape[0], generator), generator)

    def apply(self, hr: Tensor, draw: dict, generator: torch.Generator) -> dict:
        _not_empty(hr)
        cfg, g, p = self.cfg, generator, draw["params"]
        b, c, h, w = hr.shape
        s = cfg.scale
        if c != 3 or h % s or w % s:
            raise UserError(f"degradation: HR batch must be (B, 3, H, W) with H, W multiples of "
                            f"scale {s}; got {tuple(hr.shape)}")
        if not same_device(hr.device, g.device):
            raise ValueError(f"generator on {g.device} but images on {hr.device}")
        measured_blur = cfg.blur_label == "measured"
        host = self._host_scales(p)  # before any pixel work is queued: it waits for the draws only
        hr = hr if hr.is_floating_point() else hr.float() / 255.0  # uint8 crops from the loader
        plans = self._plans(p, host, [(h, w)] + ([self._probe_size()] if measured_blur else []),
                            hr.dtype)
        plan = plans[0]
        gt = (ops.usm_sharpen(hr, cfg.usm_weight, cfg.usm_threshold, cfg.usm_radius, cfg.usm_sigma)
              if cfg.usm_sharpen else hr)
        resized = self._front(gt, draw, plan)
        lr = self._render(plan, resized, draw, g)
        scores = degradation_scores(p, cfg)
        if measured_blur:
            scores[:, 0] = torch.where(p["clean"].bool(), 0.0,
                                       self.measured_blur(draw, hr, plans[1]))
        if cfg.noise_label == "measured":  # what the LR really carries: vs the same draw rendered
            quiet = self._render(plan, resized, draw, None)  # without noise and JPEG
            visible = (lr - quiet).flatten(1).std(1) * 255
            scores[:, 1] = torch.where(p["clean"].bool(), 0.0,
                                       (visible / cfg.noise_label_ref).clamp(0, 1))

        # the no-degradation switch: the LR is the clean (antialiased bicubic) downsample
        lr = ops.on_subset(p["clean"], lr, lambda i: quantize(clean_downsample(hr[i], s)), True)
        return {"hr": hr, "gt": gt, "lr": lr, "lr_up": upsample(lr, (h, w), cfg.upsample_mode),
                "clean": p["clean"], "scores": scores, "params": dict(p)}

    def _probe_size(self) -> tuple[int, int]:
        n = self.cfg.blur_label_probe * self.cfg.scale
        return n, n

    def measured_blur(self, draw: dict, like: Tensor, plan: dict | None = None) -> Tensor:
        """(B,) blur label: ``1 - gain``, clipped to [0, 1]. The draw's linear chain (both blurs,
        the resizes, the final sinc; no noise, no JPEG) renders a fixed white-noise probe, and
        ``gain`` is the least-squares factor of the clean (antialiased bicubic) downsample of the
        probe in that render: the chain's mean frequency response over the LR band, relative to
        a clean LR. 0: as sharp as a clean LR; 0.5: half of its detail gone. The probe is the
        same for every call and sample and does not touch the call's generator, so the label is
        a function of the draw alone (not of the crop, its content or its size). ``plan``: the
        draw's resize plan for the probe, if already built (:meth:`_plans`)."""
        key = (like.device, like.dtype)
        if key not in self._probes:
            g = torch.Generator().manual_seed(0)
            probe = torch.rand(1, 3, *self._probe_size(), generator=g, dtype=torch.float64)
            ref = clean_downsample(probe, self.cfg.scale)
            ref = ref - ref.mean((-2, -1), keepdim=True)
            self._probes[key] = (probe.to(*key), (ref / ref.square().sum()).to(*key))
        probe, ref = self._probes[key]
        p = draw["params"]
        x = probe.expand(p["clean"].shape[0], -1, -1, -1)
        if plan is None:
            plan = self._plans(p, self._host_scales(p), [self._probe_size()], x.dtype)[0]
        q = self._render(plan, self._front(x, draw, plan), draw, None)
        gain = ((q - q.mean((-2, -1), keepdim=True)) * ref).sum((1, 2, 3))
        return (1 - gain).clamp(0, 1)

    def _front(self, x: Tensor, draw: dict, plan: dict) -> list[Tensor]:
        """The part of the chain every render of ``draw`` on ``x`` shares: blur 1 (before any
        noise), then resize 1 per group of ``plan`` (``x``'s, :meth:`_plans`; see :meth:`_render`)."""
        x = self._blur(x, draw["params"], draw["kernels"]["blur1"], "blur1")
        return [apply_resize(x[gr["idx"]], *gr["r1"]) for gr in plan["groups"]]

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


def _not_empty(hr: Tensor) -> None:
    """An empty batch is a caller's bug: named here, not as a ``max()`` of nothing deep in the
    resize plan (and before any draw or work)."""
    if hr.shape[0] == 0:
        raise ValueError(f"degradation: the engine needs at least one image, got an empty batch "
                         f"of shape {tuple(hr.shape)}")
