"""approx-mvue: draw N = 1 or 2 elements one after another with probability proportional to |a_i|.

The cheap kernel-friendly variant of MVUE used in practice (Hu et al. 2024). First draw i with
t_i = |a_i|/S; for N = 2 a second from the others with |a_j|/(S - |a_i|). Kept elements become
a_i / p_i with the exact inclusion probability p_i = t_i + |a_i| sum_{j != i} t_j / (S - |a_j|), so
it is unbiased. For N = 1 the law is mvue's (p_i = |a_i|/S), so N = 1 runs mvue's code: at 1:2
(and 1:M) approx-mvue and mvue are one estimator, with identical draws for the same uniform.
Undefined for N > 2.

Numerics: magnitudes are scaled by the block's max, and S - |a_j| and sum_{j != i} are summed
directly over the other elements (:func:`.base.sum_of_others`), never by subtraction.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import get_method, register
from .base import PruningMethod, rising_edges, running_sum, safe_div, scaled_magnitudes, sum_of_others


def draw_proportional(mag: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-hot draw per row with P(i) = mag_i / sum(mag): keep i iff C_{i-1} <= u*S < C_i."""
    return proportional_keep_running(running_sum(mag), u)


def proportional_bounds(mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_{i-1}, C_i) of :func:`draw_proportional`: running sums of ``mag`` added left to right."""
    c = running_sum(mag)
    return torch.nn.functional.pad(c[..., :-1], (1, 0)), c


def proportional_keep(prev: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`draw_proportional`'s one-hot mask from its bounds; ``u`` (..., K, 1) broadcasts."""
    thr = u * c[..., -1:]
    return (prev <= thr) & (thr < c)


def proportional_keep_running(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``proportional_keep(prev, c, u)`` for prev = c shifted right by one (0 first), as
    :func:`proportional_bounds` makes it: C_{i-1} <= thr is not(thr < C_{i-1}), the previous
    element's test, so one comparison pass serves both bounds (the same mask; thr >= 0 >= C_{-1})."""
    return rising_edges(u * c[..., -1:] < c)  # thr < C_i is non-decreasing along the row


class SecondBounds:
    """The second draw's running sums of a prepared approx-mvue law: running_sum(where(keep, 0,
    mag)) for the first element taken out. From the second use of the law on (Monte Carlo draws
    one record many times) they are looked up in a table of the M + 1 possible sums, built once,
    instead of summed per draw; a single draw (a prune) sums them as before. Bit for bit the same
    sums: the table is added in running_sum's order."""

    def __init__(self, mag: torch.Tensor):
        self.mag, self.table, self.used = mag, None, 0

    def __call__(self, below: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(..., K, M) running sums of the rest, given the first draw's mask ``below`` (thr < C_i)
        and its one-hot ``keep``."""
        self.used += 1
        k, m = self.mag.shape
        if self.used < 2 and below.dim() == 2:
            return running_sum(torch.where(keep, 0.0, self.mag))
        if self.table is None:  # rows j K .. (j + 1) K: column j zeroed; the last K rows: none
            sums = torch.empty(m + 1, k, m, dtype=self.mag.dtype, device=self.mag.device)
            for j in range(m):
                sums[j] = running_sum(self.mag.index_fill(-1, torch.tensor([j], device=self.mag.device), 0.0))
            sums[m] = running_sum(self.mag)
            self.table = (sums.view(-1, m), torch.arange(k, device=self.mag.device) + m * k)
        sums, base = self.table
        # the first element taken is j = M - (number of True in below), or none (row M) when all False
        flags = below.view(torch.uint8)
        count = flags[..., 0].to(torch.int16)
        for i in range(1, m):
            count += flags[..., i]
        rows = torch.sub(base, count, alpha=k)  # (..., K): (M - count) K + k
        return sums.index_select(0, rows.view(-1)).view(below.shape)


@register
class ApproxMvue(PruningMethod):
    name = "approx-mvue"
    summary = "draw 1 or 2 elements sequentially proportional to |a_i| (unbiased, cheap)"
    kernel_code = 4

    def check(self, pattern: Pattern) -> None:
        if pattern.n > 2:
            raise self._undefined(pattern, "it needs N = 1 or 2 (e.g. 1:2, 2:4, 2:8); use mvue")

    def n_uniforms(self, pattern: Pattern) -> int:
        return pattern.n

    def _marginals(self, a: torch.Tensor, n: int):
        if n == 1:
            return get_method("mvue")._marginals(a, 1)
        return self._law(scaled_magnitudes(a), a, n)

    def _law(self, mag: torch.Tensor, a: torch.Tensor, n: int):
        s = running_sum(mag)[..., -1:]
        t = safe_div(mag, s.expand_as(mag))
        r = safe_div(t, sum_of_others(mag))  # t_j / (S - |a_j|), 0 where a_j is the only non-zero
        p = (t + mag * sum_of_others(r)).clamp_(max=1.0)
        # at most N non-zeros: every one is kept for sure (p would round to just under 1)
        few = (mag > 0).sum(-1, keepdim=True) <= n
        p = torch.where(few, (mag > 0).to(p.dtype), p)
        return p, safe_div(a, p)

    def _prepare(self, a: torch.Tensor, n: int):
        if n == 1:
            return ("mvue", get_method("mvue")._prepare(a, 1))
        mag = scaled_magnitudes(a)
        _, v = self._law(mag, a, n)
        return ("two", mag, *proportional_bounds(mag), v, SecondBounds(mag))

    def _kept(self, law, u: torch.Tensor):
        if law[0] == "mvue":  # N = 1: mvue's law and draw
            return get_method("mvue")._kept(law[1], u)
        _, mag, _, c, v, second = law  # the bounds' prev is c shifted: proportional_keep_running reads it from c
        below = u[..., :1] * c[..., -1:] < c  # (..., K, M): true from the first element drawn on
        keep = rising_edges(below)  # proportional_keep_running's mask
        c2 = second(below, keep)  # running_sum(where(keep, 0, mag)), from a table when drawn often
        # (a kept element of the second draw always has rest > 0: C2_i > C2_{i-1} >= 0 <= thr2)
        return keep | proportional_keep_running(c2, u[..., 1:2]), v

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        """N = 1: one element kept, pi_ij = 0. N = 2: P(i then j) + P(j then i) =
        t_i |a_j| / (S - |a_i|) + t_j |a_i| / (S - |a_j|), with S - |a_i| summed from the others."""
        p, _ = self.marginals(a, n)
        mag = scaled_magnitudes(a)  # the ratios are all that matter (no overflow of S)
        m = a.shape[-1]
        eye = torch.eye(m, dtype=torch.bool, device=a.device)
        if n == 1:
            out = torch.zeros(*a.shape, m, dtype=a.dtype, device=a.device)
        else:
            s = running_sum(mag)[..., -1:]
            t = safe_div(mag, s.expand_as(mag))
            others = sum_of_others(mag)  # (K, M): S - |a_i| summed from the others, as in marginals
            first_i = safe_div(t, others)[..., :, None] * mag[..., None, :]  # i first, then j
            out = first_i + first_i.transpose(-1, -2)
            few = ((mag > 0).sum(-1, keepdim=True) <= n)[..., None]
            nz = (mag > 0).to(a.dtype)
            out = torch.where(few, nz[..., :, None] * nz[..., None, :], out)
        out = torch.where(eye, torch.diag_embed(p), out)
        return out
