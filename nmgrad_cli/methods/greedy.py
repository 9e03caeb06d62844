"""greedy: keep the N largest magnitudes of each block unchanged (minimum MSE, biased)."""

from __future__ import annotations

import torch

from . import register
from .base import PruningMethod, kept_by_rank


@register
class Greedy(PruningMethod):
    name = "greedy"
    summary = "keep the N largest |a_i| of each block (minimum MSE, biased)"
    unbiased = False

    def marginals(self, a: torch.Tensor, n: int):
        keep = kept_by_rank(a.abs(), n, descending=True)
        return keep.to(a.dtype), torch.where(keep, a, torch.zeros_like(a))

    def sample(self, a: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
        keep = kept_by_rank(a.abs(), n, descending=True)
        return torch.where(keep, a, torch.zeros_like(a))

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        keep = kept_by_rank(a.abs(), n, descending=True).to(a.dtype)
        return keep[..., :, None] * keep[..., None, :]  # deterministic: both kept iff each is
