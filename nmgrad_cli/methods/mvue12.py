"""mvue12: MVUE 1:2 on each pair of a block, a valid unbiased N:2N pruning (the 2:4 baseline).

Var per pair = 2 |a_1| |a_2|. At 1:2 (one pair) it is mvue.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from . import get_method, register
from .base import PruningMethod


@register
class Mvue12(PruningMethod):
    name = "mvue12"
    summary = "MVUE 1:2 on each pair of the block: valid, unbiased N:2N (e.g. 2:4)"
    kernel_code = 3

    def check(self, pattern: Pattern) -> None:
        if pattern.m != 2 * pattern.n:
            raise self._undefined(pattern, "it needs M = 2N, e.g. 1:2, 2:4 or 4:8")

    def n_uniforms(self, pattern: Pattern) -> int:
        return pattern.n  # one per pair

    def _marginals(self, a: torch.Tensor, n: int):
        p, v = get_method("mvue")._marginals(a.reshape(-1, 2), 1)
        return p.reshape(a.shape), v.reshape(a.shape)

    def _prepare(self, a: torch.Tensor, n: int):
        return get_method("mvue")._prepare(a.reshape(-1, 2), 1)  # (K * N, 2): the pairs

    def _kept(self, law, u: torch.Tensor):
        keep, v = get_method("mvue")._kept(law, u.reshape(*u.shape[:-2], -1, 1))  # one uniform per pair
        return keep.reshape(*u.shape[:-1], -1), v.reshape(u.shape[-2], -1)

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        p, _ = self.marginals(a, n)
        out = p[..., :, None] * p[..., None, :]  # different pairs are drawn independently
        within = get_method("mvue").joint_marginals(a.reshape(-1, 2), 1).reshape(*a.shape[:-1], -1, 2, 2)
        for q in range(a.shape[-1] // 2):
            out[..., 2 * q : 2 * q + 2, 2 * q : 2 * q + 2] = within[..., q, :, :]
        return out
