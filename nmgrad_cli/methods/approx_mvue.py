"""approx-mvue: draw N = 1 or 2 elements one after another with probability proportional to |a_i|.

The cheap kernel-friendly variant of MVUE used in practice (Hu et al. 2024). First draw i with
t_i = |a_i|/S; for N = 2 a second from the others with |a_j|/(S - |a_i|). Kept elements become
a_i / p_i with the exact inclusion probability p_i = t_i + |a_i| sum_{j != i} t_j / (S - |a_j|), so
it is unbiased. For N = 1 it equals mvue. Undefined for N > 2.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import register
from .base import PruningMethod, safe_div


def draw_proportional(mag: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-hot draw per row with P(i) = mag_i / sum(mag): keep i iff C_{i-1} <= u*S < C_i."""
    c = mag.cumsum(-1)
    thr = u * c[..., -1:]
    prev = torch.nn.functional.pad(c[..., :-1], (1, 0))
    return (prev <= thr) & (thr < c)


@register
class ApproxMvue(PruningMethod):
    name = "approx-mvue"
    summary = "draw 1 or 2 elements sequentially proportional to |a_i| (unbiased, cheap)"

    def check(self, pattern: Pattern) -> None:
        if pattern.n > 2:
            raise self._undefined(pattern, "it needs N = 1 or 2 (e.g. 1:2, 2:4, 2:8); use mvue")

    def n_uniforms(self, pattern: Pattern) -> int:
        return pattern.n

    def marginals(self, a: torch.Tensor, n: int):
        mag = a.abs()
        s = mag.sum(-1, keepdim=True)
        t = safe_div(mag, s.expand_as(mag))
        if n == 1:
            p = t
        else:
            r = safe_div(t, s - mag)  # t_j / (S - |a_j|), 0 where a_j is the only non-zero
            p = t + mag * (r.sum(-1, keepdim=True) - r)
            p = p.clamp_(max=1.0)
        # at most N non-zeros: every one is kept for sure (p would round to just under 1)
        few = (mag > 0).sum(-1, keepdim=True) <= n
        p = torch.where(few, (mag > 0).to(p.dtype), p)
        return p, safe_div(a, p)

    def sample(self, a: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
        mag = a.abs()
        keep = draw_proportional(mag, u[..., :1])
        if n == 2:
            rest = torch.where(keep, torch.zeros_like(mag), mag)
            keep = keep | (draw_proportional(rest, u[..., 1:2]) & (rest > 0))
        _, v = self.marginals(a, n)
        return torch.where(keep, v, torch.zeros_like(v))

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        """N = 1: one element kept, pi_ij = 0. N = 2: P(i then j) + P(j then i) =
        t_i |a_j| / (S - |a_i|) + t_j |a_i| / (S - |a_j|), with S - |a_i| summed from the others."""
        p, _ = self.marginals(a, n)
        mag = a.abs()
        m = a.shape[-1]
        eye = torch.eye(m, dtype=torch.bool, device=a.device)
        if n == 1:
            out = torch.zeros(*a.shape, m, dtype=a.dtype, device=a.device)
        else:
            s = mag.sum(-1, keepdim=True)
            t = safe_div(mag, s.expand_as(mag))
            others = torch.where(eye, torch.zeros_like(mag[..., None, :]), mag[..., None, :]).sum(-1)  # (K, M)
            first_i = safe_div(t, others)[..., :, None] * mag[..., None, :]  # i first, then j
            out = first_i + first_i.transpose(-1, -2)
            few = ((mag > 0).sum(-1, keepdim=True) <= n)[..., None]
            nz = (mag > 0).to(a.dtype)
            out = torch.where(few, nz[..., :, None] * nz[..., None, :], out)
        out = torch.where(eye, torch.diag_embed(p), out)
        return out
