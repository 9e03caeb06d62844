"""random: keep a uniformly random N of M, scaled by M/N (unbiased, high variance)."""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import register
from .base import PruningMethod, smallest_keys


@register
class Random(PruningMethod):
    name = "random"
    summary = "keep a uniformly random N of M, scaled by M/N (unbiased, Var = sum a^2 (M/N - 1))"
    kernel_code = 1

    def n_uniforms(self, pattern: Pattern) -> int:
        return pattern.m  # one key per element; the N smallest keys are kept

    def _marginals(self, a: torch.Tensor, n: int):
        m = a.shape[-1]
        return torch.full_like(a, n / m), a * (m / n)

    def _prepare(self, a: torch.Tensor, n: int):
        return a * (a.shape[-1] / n), n

    def _kept(self, law, u: torch.Tensor):
        v, n = law
        return smallest_keys(u, n), v  # the N smallest keys, as kept_by_rank(u, n, descending=False)

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        m = a.shape[-1]
        pair = n * (n - 1) / (m * (m - 1))  # a given pair among the C(M, N) equally likely subsets
        eye = torch.eye(m, dtype=a.dtype, device=a.device)
        return (pair + (n / m - pair) * eye).expand(*a.shape, m).clone()
