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
    kernel_code = 0

    def _marginals(self, a: torch.Tensor, n: int):
        keep = kept_by_rank(a.abs(), n, descending=True)
        return keep.to(a.dtype), torch.where(keep, a, torch.zeros_like(a))

    def _prepare(self, a: torch.Tensor, n: int):
        keep = kept_by_rank(a.abs(), n, descending=True)
        return (torch.where(keep, a, torch.zeros_like(a)),)

    def _draw(self, law, u: torch.Tensor) -> torch.Tensor:
        (out,) = law  # deterministic: every draw is the same
        shape = (*u.shape[:-1], out.shape[-1])
        return out if out.shape == shape else out.expand(shape)

    def _kept(self, law, u: torch.Tensor):
        (out,) = law
        keep = out != 0  # a kept zero is a zero either way
        return keep.expand(*u.shape[:-1], out.shape[-1]), out

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        keep = kept_by_rank(a.abs(), n, descending=True).to(a.dtype)
        return keep[..., :, None] * keep[..., None, :]  # deterministic: both kept iff each is
