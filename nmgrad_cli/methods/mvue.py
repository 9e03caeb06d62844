"""mvue: the exact minimum-variance unbiased N:M pruning, for any N:M.

Keep-probabilities by water-filling, p_i = min(1, |a_i| / lam) with sum_i p_i = N, then exactly N
elements drawn with those marginals by systematic sampling (:func:`.base.systematic_sample`); a kept
element becomes a_i / p_i.
Blocks with at most N non-zeros are kept exactly. The probabilities are computed from the
magnitudes scaled by the block's max (:func:`.base.scaled_magnitudes`), so no sum overflows.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import register
from .base import (
    PruningMethod,
    safe_div,
    scaled_magnitudes,
    sort_descending,
    systematic_bounds,
    systematic_joint,
    systematic_keep_running,
)


def water_fill(mag: torch.Tensor, n: int) -> torch.Tensor:
    """p_i = min(1, mag_i / lam) with sum p = n (p = 1[mag > 0] where at most n are non-zero)."""
    return water_fill_lam(mag, n)[0]


def water_fill_lam(mag: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, lam): :func:`water_fill`'s probabilities and the level lam (K, 1) they come from.

    With s sorted descending and k elements saturated (p = 1), lam_k = (s_{k+1} + .. + s_M)/(n - k);
    the right k is the smallest one with s_{k+1} <= lam_k (k = n - 1 always qualifies). p_i is
    mag_i * (1 / lam): one division per block, as the kernels compute it.
    """
    s = sort_descending(mag)  # (K, M)
    tail = s.flip(-1).cumsum(-1).flip(-1)[..., :n]  # (K, n): tail[k] = s_k + .. + s_M (0-based)
    k = torch.arange(n, device=mag.device, dtype=mag.dtype)
    lam = tail / (n - k)  # (K, n)
    valid = s[..., :n] <= lam
    first = valid.to(torch.int8).argmax(-1, keepdim=True)  # smallest valid k
    lam_star = lam.gather(-1, first)  # (K, 1)
    p = (mag * safe_div(torch.ones_like(lam_star), lam_star)).clamp_(max=1.0)
    few = (mag > 0).sum(-1, keepdim=True) <= n
    return torch.where(few, (mag > 0).to(mag.dtype), p), lam_star


def kept_values(a: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """a_i / p_i in closed form: a_i where saturated (p = 1), else sign(a_i) * lam * max|a| (lam in
    the scaled magnitudes' units, times the scale: max|a|, or the dtype's smallest normal where
    :func:`.base.scaled_magnitudes` scaled a subnormal max by its inverse); 0 where p = 0."""
    top = a.abs().amax(-1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    big = lam * torch.where(top < tiny, tiny, top)
    return torch.where(p >= 1, a, torch.where(p > 0, torch.where(a < 0, -big, big), 0.0))


@register
class Mvue(PruningMethod):
    name = "mvue"
    summary = "exact minimum-variance unbiased N:M (water-filling + systematic sampling)"
    kernel_code = 2

    def n_uniforms(self, pattern: Pattern) -> int:
        return 1

    def _marginals(self, a: torch.Tensor, n: int):
        p, lam = water_fill_lam(scaled_magnitudes(a), n)
        return p, kept_values(a, p, lam)

    def _prepare(self, a: torch.Tensor, n: int):
        p, v = self._marginals(a, n)
        return (*systematic_bounds(p, n), v, n)

    def _kept(self, law, u: torch.Tensor):
        _, c, v, n = law  # prev is c shifted: systematic_keep_running reads it from c
        return systematic_keep_running(c, u[..., :1], n), v  # systematic sampling, u broadcast over the draws

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        return systematic_joint(water_fill(scaled_magnitudes(a), n), n)
