"""Poisson sampling by table inversion, for the rates the degradation's shot noise uses.

The shot noise draws Poisson(L q / 255) with q an integer in 0..255 and L a power of two in
1..256 (:func:`degsr.degradation.ops.poisson_levels`): at most 9 x 256 distinct rates. For each
rate the CDF ``C[k] = P(X <= k)`` is tabulated once (float64, per device), and a count is drawn
by inversion, ``X = min{k : C[k] > u}`` with ``u ~ U[0, 1)`` in float64 from the caller's
generator. A guide table ``G[m] = min{k : C[k] > m / M}`` brackets the answer for
``u in [m/M, (m+1)/M)`` to ``[G[m], G[m+1]]``; almost always the bracket holds at most one CDF
step and one comparison settles it, the rest (far tails) are searched in their bracket.

On the CPU this replaces ``torch.poisson`` (a per-element sampler, serial there: ~40 ms per
million draws against ~15 ms here); on accelerators ``torch.poisson`` runs in parallel and is
kept. The draws
follow the same distribution (up to the float64 CDF, truncated where the tail is below 1e-100)
but are not the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

Q_LEVELS = 256  # q in 0..255
MAX_LOG2_LEVELS = 8  # L = 2**e, e in 0..8
K_MAX = 512  # counts tabulated: P(X >= 512) < 1e-100 for the largest rate, 256
GUIDE = 1024  # guide-table resolution M (a power of two: m / M is exact)
_TABLES: dict[str, tuple[Tensor, Tensor, Tensor]] = {}


def rates() -> Tensor:
    """(9 * 256,) float64 rates of the table rows: row ``e * 256 + q`` is ``2**e * q / 255``."""
    e = torch.arange(MAX_LOG2_LEVELS + 1, dtype=torch.float64).view(-1, 1)
    q = torch.arange(Q_LEVELS, dtype=torch.float64).view(1, -1)
    return (torch.exp2(e) * q / 255.0).reshape(-1)


def poisson_cdf(lam: Tensor) -> Tensor:
    """(R, K_MAX) float64 CDFs of Poisson(``lam``), the last entry set to 1."""
    lam = lam.view(-1, 1)
    k = torch.arange(K_MAX, dtype=torch.float64).view(1, -1)
    log_pmf = k * torch.log(lam.clamp_min(1e-300)) - lam - torch.lgamma(k + 1)
    pmf = torch.where(lam > 0, torch.exp(log_pmf), (k == 0).to(torch.float64))
    cdf = torch.cumsum(pmf, dim=1).clamp(max=1.0)
    cdf[:, -1] = 1.0  # u < 1 always finds a count; the cut tail is below 1e-100
    return cdf


def tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per device, built once: the CDFs (rows, K_MAX) float64; per (row, guide bin m), the
    bracket start ``lo = G[m]`` as float32, negated minus one where the bracket is wide
    (``G[m+1] - G[m] > 1``), and ``C[lo]`` (float64)."""
    key = str(device)
    if key not in _TABLES:
        cdf = poisson_cdf(rates())
        marks = (torch.arange(GUIDE + 1, dtype=torch.float64) / GUIDE).expand(cdf.shape[0], -1)
        guide = torch.searchsorted(cdf, marks.contiguous(), right=True).clamp(max=K_MAX - 1)
        lo, hi = guide[:, :-1], guide[:, 1:]
        at_lo = torch.gather(cdf, 1, lo)
        lo_mark = torch.where(hi - lo > 1, -1 - lo, lo).to(torch.float32)
        _TABLES[key] = tuple(t.contiguous().to(device) for t in (cdf, lo_mark, at_lo))
    return _TABLES[key]


def sample_counts(rows: Tensor, g: torch.Generator) -> Tensor:
    """Poisson counts (float32, ``rows``' shape) for table rows ``rows`` (long, see :func:`rates`).

    One float64 uniform per element from ``g``, in ``rows``' element order.
    """
    cdf, lo_mark, at_lo = tables(rows.device)
    r = rows.reshape(-1)
    u = torch.rand(r.shape, generator=g, device=g.device, dtype=torch.float64)
    at = torch.add((u * GUIDE).long(), r, alpha=GUIDE)  # r * M + floor(u * M), exact
    lo = lo_mark.view(-1)[at]
    x = lo + (at_lo.view(-1)[at] <= u)  # exact where the bracket [G[m], G[m+1]] has one step
    wide = (lo < 0).nonzero().flatten()
    if wide.numel():  # far tails: binary search in the bracket, C[lo - 1] <= u < C[hi]
        uw, base = u[wide], r[wide] * K_MAX
        low = (-1 - lo[wide]).long()
        high = torch.full_like(low, K_MAX - 1)
        for _ in range(K_MAX.bit_length()):
            mid = (low + high) // 2
            left = cdf.view(-1)[base + mid] > uw
            low, high = torch.where(left, low, mid + 1), torch.where(left, mid, high)
        x[wide] = low.to(x.dtype)
    return x.view(rows.shape)


def rows_for(q: Tensor, levels: Tensor) -> Tensor:
    """Table rows of integer values ``q`` (0..255, float) at power-of-two ``levels`` (broadcast)."""
    e = torch.log2(levels).round().long()
    return e * Q_LEVELS + q.long()
