"""The interface every pruning method implements, on blocks.

All functions here take ``a``: ``(K, M)`` blocks in the compute dtype (float32, or float64) and
return tensors of the same shape. A method is defined by two functions:

- ``marginals(a, n) -> (p, v)``: ``p[k, i]`` = P(element i of block k is kept), ``v[k, i]`` = the
  value it has when kept (0 where p is 0). The exact moments follow: E[g^] = p v, E[g^^2] = p v^2.
- ``sample(a, n, u) -> g^``: one draw, a deterministic function of the uniforms
  ``u`` ``(K, n_uniforms)`` in [0, 1). Fast kernels implement the same function of the same
  uniforms, which is how they are tested against this reference.
"""

from __future__ import annotations

import torch

from ..errors import PatternError
from ..patterns import Pattern


class PruningMethod:
    """Base class: subclasses set the class attributes and implement the two functions."""

    name: str = ""
    summary: str = ""
    unbiased: bool = True

    def check(self, pattern: Pattern) -> None:
        """Raise :class:`PatternError` when the method is undefined for ``pattern``."""

    def n_uniforms(self, pattern: Pattern) -> int:
        """How many uniforms in [0, 1) one block's draw consumes."""
        return 0

    def marginals(self, a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample(self, a: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        """Second-order inclusion probabilities, ``(K, M, M)``: ``pi[k, i, j]`` = P(elements i and j
        of block k are both kept), ``pi[k, i, i] = p_i``. With :meth:`marginals` they give the exact
        covariance of a block, Cov(g^_i, g^_j) = pi_ij v_i v_j - p_i v_i p_j v_j (blocks are independent)."""
        raise NotImplementedError

    def _undefined(self, pattern: Pattern, hint: str) -> PatternError:
        return PatternError(f"method '{self.name}' is not defined for pattern {pattern}: {hint}")


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (so zero blocks give zeros, never NaN)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def systematic_sample(p: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask with marginals ``p`` (rows summing to at most n), one uniform per row.

    Systematic sampling: with C_i = p_1 + .. + p_i (clamped at n so rounding can never admit an
    extra element), element i is kept iff [C_{i-1}, C_i) contains one of u, u+1, .., u+n-1, i.e.
    iff ceil(C_i - u) > ceil(C_{i-1} - u). Since every p_i <= 1 each element is hit at most once.
    """
    c = torch.cumsum(p, dim=-1).clamp_(max=float(n))
    prev = torch.nn.functional.pad(c[..., :-1], (1, 0))
    return torch.ceil(c - u) > torch.ceil(prev - u)


def kept_by_rank(keys: torch.Tensor, n: int, descending: bool) -> torch.Tensor:
    """Boolean mask of the n first elements of each row ordered by ``keys`` (ties: lower index)."""
    order = torch.sort(keys, dim=-1, descending=descending, stable=True).indices
    keep = torch.zeros_like(keys, dtype=torch.bool)
    return keep.scatter_(-1, order[..., :n], True)


def systematic_joint(p: torch.Tensor, n: int) -> torch.Tensor:
    """Second-order inclusion probabilities of :func:`systematic_sample`, (K, M, M).

    Element i is kept iff u mod 1 falls in the arc A_i = [C_{i-1}, C_i) of the unit circle (its
    length p_i <= 1), so P(i and j kept) = |A_i intersect A_j|: the overlap of the two intervals
    [b_i, b_i + p_i), b_i = C_{i-1} mod 1, shifted by -1, 0 or +1.
    """
    c = torch.cumsum(p, dim=-1).clamp_(max=float(n))
    prev = torch.nn.functional.pad(c[..., :-1], (1, 0))
    start = prev - torch.floor(prev)  # (K, M) in [0, 1)
    end = start + (c - prev)
    bi, ei = start[..., :, None], end[..., :, None]
    out = torch.zeros(*p.shape, p.shape[-1], dtype=p.dtype, device=p.device)
    for shift in (-1.0, 0.0, 1.0):
        bj, ej = start[..., None, :] + shift, end[..., None, :] + shift
        out += (torch.minimum(ei, ej) - torch.maximum(bi, bj)).clamp_(min=0)
    return out
