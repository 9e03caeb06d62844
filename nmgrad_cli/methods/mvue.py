"""mvue: the exact minimum-variance unbiased N:M pruning, for any N:M.

Keep-probabilities by water-filling, p_i = min(1, |a_i| / lam) with sum_i p_i = N, then exactly N
elements drawn with those marginals by systematic sampling; a kept element becomes a_i / p_i.
Blocks with at most N non-zeros are kept exactly.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import register
from .base import PruningMethod, safe_div, systematic_joint, systematic_sample


def water_fill(mag: torch.Tensor, n: int) -> torch.Tensor:
    """p_i = min(1, mag_i / lam) with sum p = n (p = 1[mag > 0] where at most n are non-zero).

    With s sorted descending and k elements saturated (p = 1), lam_k = (s_{k+1} + .. + s_M)/(n - k);
    the right k is the smallest one with s_{k+1} <= lam_k (k = n - 1 always qualifies).
    """
    s = torch.sort(mag, dim=-1, descending=True).values  # (K, M)
    tail = s.flip(-1).cumsum(-1).flip(-1)[..., :n]  # (K, n): tail[k] = s_k + .. + s_M (0-based)
    k = torch.arange(n, device=mag.device, dtype=mag.dtype)
    lam = tail / (n - k)  # (K, n)
    valid = s[..., :n] <= lam
    first = valid.to(torch.int8).argmax(-1, keepdim=True)  # smallest valid k
    lam_star = lam.gather(-1, first)  # (K, 1)
    p = safe_div(mag, lam_star.expand_as(mag)).clamp_(max=1.0)
    few = (mag > 0).sum(-1, keepdim=True) <= n
    return torch.where(few, (mag > 0).to(mag.dtype), p)


@register
class Mvue(PruningMethod):
    name = "mvue"
    summary = "exact minimum-variance unbiased N:M (water-filling + systematic sampling)"

    def n_uniforms(self, pattern: Pattern) -> int:
        return 1

    def marginals(self, a: torch.Tensor, n: int):
        p = water_fill(a.abs(), n)
        return p, safe_div(a, p)

    def sample(self, a: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
        p, v = self.marginals(a, n)
        keep = systematic_sample(p, n, u[..., :1])
        return torch.where(keep, v, torch.zeros_like(v))

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        return systematic_joint(water_fill(a.abs(), n), n)
