"""The interface every pruning method implements, on blocks.

All functions here take ``a``: ``(K, M)`` blocks in the compute dtype (float32, or float64) and
return tensors of the same shape. A method is defined by two functions, which subclasses implement
as ``_marginals`` and ``_prepare``/``_draw``:

- ``marginals(a, n) -> (p, v)``: ``p[k, i]`` = P(element i of block k is kept), ``v[k, i]`` = the
  value it has when kept (0 where p is 0). The exact moments follow: E[g^] = p v, E[g^^2] = p v^2.
- ``sample(a, n, u) -> g^``: one draw, a deterministic function of the uniforms
  ``u`` ``(K, n_uniforms)`` in [0, 1). Fast kernels implement the same function of the same
  uniforms, which is how they are tested against this reference.

A draw is split in two, which subclasses implement as ``_prepare`` and ``_draw``: ``prepare(a, n)``
computes everything that depends on the blocks only (the law: keep-probabilities, their running
sums, the kept values), once; ``draw(state, u)`` applies uniforms to it, and takes ``u`` of shape
``(..., K, n_uniforms)``: any leading dims are independent draws of the same blocks (broadcast
against the state, never copied through the law). ``sample(a, n, u) == draw(prepare(a, n), u)``
bit for bit, so Monte Carlo prepares a record once and draws many (``metrics.monte_carlo``).

The public ``marginals``/``sample`` add the one rule every method and backend shares: a block
holding a NaN or an infinity comes out all NaN (p and v too), so a non-finite gradient is never
pruned into a finite one (docs/methods.md, "Numerics").
"""

from __future__ import annotations

import math
import sys
from typing import ClassVar, NamedTuple

import torch

from ..errors import PatternError
from ..patterns import Pattern


class Prepared(NamedTuple):
    """A prepared draw (:meth:`PruningMethod.prepare`): the method's law of the blocks and the
    mask of blocks holding a NaN or an infinity (None when there are none)."""

    law: tuple
    bad: torch.Tensor | None


class PruningMethod:
    """Base class: subclasses set the class attributes and implement ``_marginals``, ``_prepare``
    and ``_draw``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    unbiased: ClassVar[bool] = True
    kernel_code: ClassVar[int | None] = None
    """The method's code in the fused CPU and Triton kernels (they run 1:2 and 2:4), or None when no
    kernel implements it. Declared once here: the kernel tables are derived from the registry."""

    def check(self, pattern: Pattern) -> None:
        """Raise :class:`PatternError` when the method is undefined for ``pattern``."""

    def n_uniforms(self, pattern: Pattern) -> int:
        """How many uniforms in [0, 1) one block's draw consumes (the reference and every kernel)."""
        return 0

    def draw_uniforms(self, k: int, pattern: Pattern, device, generator=None) -> torch.Tensor:
        """The uniforms in [0, 1) one draw of ``k`` blocks consumes, (k, n_uniforms), float32."""
        return torch.rand(k, self.n_uniforms(pattern), generator=generator, device=device)

    def marginals(self, a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, v) of every element; NaN for the whole of a block with a non-finite value."""
        p, v = self._marginals(a, n)
        bad = nonfinite_or_none(a)
        if bad is None:  # nothing to poison: skip two passes
            return p, v
        return poison(p, bad), poison(v, bad)

    def sample(self, a: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
        """One draw with uniforms ``u``; all NaN for a block with a non-finite value."""
        return self.draw(self.prepare(a, n), u)

    def prepare(self, a: torch.Tensor, n: int) -> Prepared:
        """The part of a draw of blocks ``a`` (K, M) that does not depend on the uniforms."""
        return Prepared(self._prepare(a, n), nonfinite_or_none(a))

    def draw(self, state: Prepared, u: torch.Tensor) -> torch.Tensor:
        """Draws with uniforms ``u`` (..., K, n_uniforms) from a :meth:`prepare` d state: (..., K, M);
        all NaN for a block with a non-finite value."""
        out = self._draw(state.law, u)
        return out if state.bad is None else poison(out, state.bad)

    def _marginals(self, a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _prepare(self, a: torch.Tensor, n: int) -> tuple:
        """The law of blocks ``a`` as a tuple of tensors (K, ...) that :meth:`_draw` reads."""
        raise NotImplementedError

    def kept(self, state: Prepared, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, v): the keep-mask (..., K, M) of the draws with uniforms ``u`` and the kept values
        v (K, M), so that ``draw(state, u) == where(keep, v, 0)`` on the finite blocks. Monte Carlo
        reduces a draw's <g^, g> and ||g^||^2 from these without building the draw."""
        return self._kept(state.law, u)

    def _draw(self, law: tuple, u: torch.Tensor) -> torch.Tensor:
        """Draws from ``_prepare``'s law with uniforms (..., K, n_uniforms): (..., K, M)."""
        keep, v = self._kept(law, u)
        return torch.where(keep, v, torch.zeros_like(v))

    def _kept(self, law: tuple, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`kept` from ``_prepare``'s law: the methods that keep elements unchanged in value."""
        raise NotImplementedError

    def joint_marginals(self, a: torch.Tensor, n: int) -> torch.Tensor:
        """Second-order inclusion probabilities, ``(K, M, M)``: ``pi[k, i, j]`` = P(elements i and j
        of block k are both kept), ``pi[k, i, i] = p_i``. With :meth:`marginals` they give the exact
        covariance of a block, Cov(g^_i, g^_j) = pi_ij v_i v_j - p_i v_i p_j v_j (blocks are independent)."""
        raise NotImplementedError

    def _undefined(self, pattern: Pattern, hint: str) -> PatternError:
        return PatternError(f"method '{self.name}' is not defined for pattern {pattern}: {hint}")


def nonfinite_blocks(a: torch.Tensor) -> torch.Tensor:
    """(K, 1) bool: the blocks holding a NaN or an infinity."""
    return ~torch.isfinite(a).all(-1, keepdim=True)


def nonfinite_or_none(a: torch.Tensor) -> torch.Tensor | None:
    """:func:`nonfinite_blocks`, or None when every block is finite. A sum of finite values is
    finite unless it overflows, so one quick reduction clears the common case; a non-finite sum
    (a NaN, an infinity, or an overflow) takes the block-by-block check."""
    if math.isfinite(float(a.sum())):
        return None
    bad = nonfinite_blocks(a)
    return bad if bool(bad.any()) else None


def sort_descending(x: torch.Tensor) -> torch.Tensor:
    """``torch.sort(x, -1, descending=True).values``; for rows of 2 or 4 a sorting network of
    maximum/minimum passes (the same values: a sort only moves them; 2.5x quicker than the sort on
    (K, 4) blocks). Rows holding a NaN may come out otherwise (NaN propagates), which no caller
    reads: those blocks are all NaN (:func:`poison`)."""
    m = x.shape[-1]
    if m not in (2, 4):
        return torch.sort(x, dim=-1, descending=True).values
    cols = list(x.unbind(-1))
    pairs = [(0, 1)] if m == 2 else [(0, 1), (2, 3), (0, 2), (1, 3), (1, 2)]
    for i, j in pairs:
        cols[i], cols[j] = torch.maximum(cols[i], cols[j]), torch.minimum(cols[i], cols[j])
    return torch.stack(cols, -1)


def poison(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``x`` with every element of the ``bad`` blocks set to NaN."""
    return torch.where(bad, torch.full_like(x, float("nan")), x)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (so zero blocks give zeros, never NaN)."""
    return torch.where(den != 0, num / den, 0.0)  # the inf/NaN of x / 0 is never selected


def scaled_magnitudes(a: torch.Tensor) -> torch.Tensor:
    """|a_i| / max_j |a_j| per block, as |a_i| * (1 / max) (zeros for a zero block).

    Keep-probabilities depend only on the ratios of the magnitudes, so they are computed from
    these: the largest is 1 (to rounding) and a block's sum is at most M, so no sum overflows (four
    1e38 values in float32) or loses the small elements to underflow. One division per block: a
    subnormal max (below the dtype's smallest normal, where 1 / max would overflow) is multiplied by
    1 / tiny instead, a power of two. A magnitude below ~2^-149 (float32) of the max becomes 0 and
    is never kept."""
    mag = a.abs()
    top = mag.amax(-1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    return mag * torch.where(top < tiny, 1.0 / tiny, 1.0 / top)


def running_sum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums along the last dim, added left to right in x's dtype (the order the
    kernels add in; ``torch.cumsum`` on the CPU accumulates float32 in float64)."""
    cols = list(x.unbind(-1))
    for j in range(1, len(cols)):
        cols[j] = cols[j - 1] + cols[j]
    return torch.stack(cols, -1)


def sum_of_others(x: torch.Tensor) -> torch.Tensor:
    """``out[.., j] = sum_{k != j} x[.., k]`` for x >= 0, summed directly as (x_0 + .. + x_{j-1}) +
    (x_{M-1} + .. + x_{j+1}): sum(x) - x_j cancels to 0 when x_j dominates (|x_j| ~ 2^24 x the rest
    in float32), which made approx-mvue's probabilities wrong."""
    cols = x.unbind(-1)
    m = len(cols)
    if m == 1:
        return torch.zeros_like(x)
    before, after = [None] * m, [None] * m  # x_0 + .. + x_{j-1}; x_{M-1} + .. + x_{j+1} (running_sum's adds)
    before[1], after[m - 2] = cols[0], cols[m - 1]
    for j in range(2, m):
        before[j] = before[j - 1] + cols[j - 1]
    for j in range(m - 3, -1, -1):
        after[j] = after[j + 1] + cols[j + 1]
    out = [after[0] + 0.0] + [before[j] + after[j] for j in range(1, m - 1)] + [before[m - 1] + 0.0]
    return torch.stack(out, -1)


def systematic_bounds(p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_{i-1}, C_i) of :func:`systematic_sample`: the running sums of ``p``, clamped at n."""
    c = torch.cumsum(p, dim=-1).clamp_(max=float(n))
    return torch.nn.functional.pad(c[..., :-1], (1, 0)), c


def systematic_keep(prev: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`systematic_sample`'s keep-mask from its bounds; ``u`` (..., K, 1) broadcasts."""
    return torch.ceil(c - u) > torch.ceil(prev - u)


def systematic_keep_running(c: torch.Tensor, u: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``systematic_keep(prev, c, u)`` for the bounds of :func:`systematic_bounds`, where prev is c
    shifted right by one (0 first): ceil(C_{i-1} - u) is then ceil(C_i - u) of the element before,
    so one subtraction and one ceil serve both bounds (the same mask, bit for bit).

    With ``n`` (the bounds' clamp) and rows of 2, 4 or 8: t_i = ceil(C_i - u) is an integer in
    [0, n], non-decreasing along the row, so t_i > t_{i-1} iff some k in 1..n has
    C_{i-1} - u <= k - 1 < C_i - u: the OR over k of the rising edges of the monotone masks
    C_i - u > k - 1 (:func:`rising_edges`, a few integer ops per row instead of strided passes)."""
    x = c - u
    if n is not None and _ROW_INT.get(x.shape[-1]) is not None:
        keep = rising_edges(x > 0.0)
        for k in range(1, n):
            keep |= rising_edges(x > float(k))
        return keep
    t = torch.ceil(x)
    keep = torch.empty(t.shape, dtype=torch.bool, device=t.device)
    torch.gt(t[..., :1], 0.0, out=keep[..., :1])  # ceil(0 - u) is 0 for u in [0, 1)
    torch.gt(t[..., 1:], t[..., :-1], out=keep[..., 1:])
    return keep


_ROW_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64} if sys.byteorder == "little" else {}
"""The integer a row of M bools is, byte i = element i (little-endian only)."""


def rising_edges(below: torch.Tensor) -> torch.Tensor:
    """``below_i and not below_{i-1}`` (below_{-1} = False) along the last dim of a bool mask that
    is non-decreasing along it (False then True): the first True of each row. For rows of 2, 4 or 8
    a row's bytes are one integer x and the mask is x ^ (x << 8), one pass over K integers; any
    other row length (or a non-contiguous mask) takes the comparison of shifted slices."""
    itype = _ROW_INT.get(below.shape[-1])
    if itype is None or not below.is_contiguous() or below.storage_offset() % below.shape[-1]:
        keep = torch.empty(below.shape, dtype=torch.bool, device=below.device)
        keep[..., :1] = below[..., :1]
        torch.gt(below[..., 1:], below[..., :-1], out=keep[..., 1:])
        return keep
    x = below.view(itype)
    low = (1 << (8 * (below.shape[-1] - 1))) - 1  # drop the last byte before the shift: no overflow
    return torch.bitwise_xor(x, torch.bitwise_and(x, low).bitwise_left_shift_(8)).view(torch.bool)


def systematic_sample(p: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask with marginals ``p`` (rows summing to at most n), one uniform per row.

    Systematic sampling: with C_i = p_1 + .. + p_i (clamped at n so rounding can never admit an
    extra element), element i is kept iff [C_{i-1}, C_i) contains one of u, u+1, .., u+n-1, i.e.
    iff ceil(C_i - u) > ceil(C_{i-1} - u). Since every p_i <= 1 each element is hit at most once.
    """
    prev, c = systematic_bounds(p, n)
    return systematic_keep(prev, c, u)


def kept_by_rank(keys: torch.Tensor, n: int, descending: bool) -> torch.Tensor:
    """Boolean mask of the n first elements of each row ordered by ``keys`` (ties: lower index).
    Rows of up to 8 take :func:`smallest_keys`' sort-free rank (of -keys when ``descending``);
    keys must not be NaN there (a NaN block's output is all NaN whatever the mask)."""
    if keys.shape[-1] <= 8:
        return smallest_keys(-keys if descending else keys, n)
    order = torch.sort(keys, dim=-1, descending=descending, stable=True).indices
    keep = torch.zeros_like(keys, dtype=torch.bool)
    return keep.scatter_(-1, order[..., :n], True)


def smallest_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``kept_by_rank(keys, n, descending=False)`` (the n smallest keys of each row, ties: lower
    index), the same mask without a sort for rows of up to 8: element i is kept iff fewer than n
    keys come before it (k_j <= k_i for j < i, k_j < k_i for j > i). Keys must not be NaN."""
    m = keys.shape[-1]
    if m > 8:  # M^2 comparisons: beyond 8 the sort is quicker
        return kept_by_rank(keys, n, descending=False)
    cols = keys.unbind(-1)
    # one comparison per pair j < i: [k_j <= k_i] counts for i, and [k_i < k_j] = 1 - [k_j <= k_i]
    # (no NaN) for j, whose m - 1 - j constant ones move into its threshold
    before = [torch.zeros(cols[0].shape, dtype=torch.int8, device=keys.device) for _ in range(m)]
    for i in range(m):
        for j in range(i):
            le = cols[j] <= cols[i]
            before[i].add_(le.view(torch.int8))
            before[j].sub_(le.view(torch.int8))
    return torch.stack([before[i] < n - (m - 1 - i) for i in range(m)], -1)


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
