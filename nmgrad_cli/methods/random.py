"""random: keep a uniformly random N of M, scaled by M/N (unbiased, high variance)."""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import register
from .base import PruningMethod, kept_by_rank


@register
class Random(PruningMethod):
    name = "random"
    summary = "keep a uniformly random N of M, scaled by M/N (unbiased, Var = sum a^2 (M/N - 1))"

    def n_uniforms(self, pattern: Pattern) -> int:
        return pattern.m  # one key per element; the N smallest keys are kept

    def marginals(self, a: torch.Tensor, n: int):
        m = a.shape[-1]
        return torch.full_like(a, n / m), a * (m / n)

    def sample(self, a: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
        m = a.shape[-1]
        keep = kept_by_rank(u, n, descending=False)
        return torch.where(keep, a * (m / n), torch.zeros_like(a))

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        m = a.shape[-1]
        pair = n * (n - 1) / (m * (m - 1))  # a given pair among the C(M, N) equally likely subsets
        eye = torch.eye(m, dtype=a.dtype, device=a.device)
        return (pair + (n / m - pair) * eye).expand(*a.shape, m).clone()
