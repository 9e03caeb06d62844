"""One-pass CPU versions of the 1:2 and 2:4 methods, fused by ``torch.compile``.

Written over the M columns of the (K, M) block tensor so that the compiler emits one loop over
blocks with the block in registers; the eager reference needs a dozen passes over memory (a sort
among them). Same function of the same uniforms as the reference up to float32 rounding.

Uniforms are either given, or made inside the fused loop from a counter-based hash of
(key, block, j) with key = splitmix64(seed) (:func:`hash_uniforms`, the CPU analogue of in-kernel
Philox on the GPU), which saves the separate pass of ``torch.rand``. The seed is drawn from the
caller's generator, so draws stay reproducible; they differ from the reference backend's draws for
the same generator state (same law, other random numbers). Which methods run here and how many
uniforms each takes come from the registry (``kernel_code``, ``n_uniforms``).
"""

from __future__ import annotations

import functools

import torch

from ..methods import METHODS
from ..patterns import Pattern

FUSED_PATTERNS = {(1, 2), (2, 4)}
FUSED_METHODS = {name for name, meth in METHODS.items() if meth.kernel_code is not None}
"""Derived from the registry: the methods that declare a ``kernel_code``."""


def supports(method: str, n: int, m: int) -> bool:
    return method in FUSED_METHODS and (n, m) in FUSED_PATTERNS


def n_uniforms(method: str, n: int, m: int) -> int:
    """Uniforms per block: the registry's ``n_uniforms`` (one number for the reference and kernels)."""
    return METHODS[method].n_uniforms(Pattern(n, m))


def _rank_keep(keys: list[torch.Tensor], n: int, larger_first: bool) -> list[torch.Tensor]:
    """keep_i iff fewer than n elements precede i (ties: lower index first)."""
    out = []
    for i, ki in enumerate(keys):
        rank = torch.zeros_like(ki, dtype=torch.int32)
        for j, kj in enumerate(keys):
            if j == i:
                continue
            if larger_first:
                before = kj >= ki if j < i else kj > ki
            else:
                before = kj <= ki if j < i else kj < ki
            rank = rank + before.to(torch.int32)
        out.append(rank < n)
    return out


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def _systematic(p: list[torch.Tensor], n: int, u: torch.Tensor) -> list[torch.Tensor]:
    c = torch.zeros_like(u)
    prev = torch.ceil(c - u)
    keep = []
    for pi in p:
        c = torch.clamp(c + pi, max=float(n))
        cur = torch.ceil(c - u)
        keep.append(cur > prev)
        prev = cur
    return keep


_TINY = torch.finfo(torch.float32).tiny


def _scaled(mag: list[torch.Tensor]) -> list[torch.Tensor]:
    """|a_i| * (1 / max |a|) (the reference's scaled_magnitudes): no sum of a block overflows."""
    top = functools.reduce(torch.maximum, mag)
    inv = torch.where(top < _TINY, 1.0 / _TINY, 1.0 / top)
    return [mi * inv for mi in mag]


def _mvue_cols(a: list[torch.Tensor], mag: list[torch.Tensor], n: int, u: torch.Tensor):
    mag = _scaled(mag)
    s = functools.reduce(torch.add, mag)
    if n == 1:
        lam = s
    else:  # 2:4 closed form: the largest is kept exactly when it exceeds the other three
        is_top = _rank_keep(mag, 1, larger_first=True)
        top = functools.reduce(torch.maximum, mag)
        # the other three summed directly: S - top would cancel catastrophically when top dominates
        rest = functools.reduce(torch.add, [torch.where(t, 0.0, mi) for t, mi in zip(is_top, mag)])
        lam = torch.where(top > rest, rest, s * 0.5)
    p = [torch.clamp(_div(mi, lam), max=1.0) for mi in mag]
    nnz = functools.reduce(torch.add, [(mi > 0).to(torch.int32) for mi in mag])
    few = nnz <= n
    p = [torch.where(few, (mi > 0).to(mi.dtype), pi) for mi, pi in zip(mag, p)]
    keep = _systematic(p, n, u)
    return [torch.where(k, _div(ai, pi), 0.0) for ai, pi, k in zip(a, p, keep)]


def _draw(mag: list[torch.Tensor], u: torch.Tensor) -> list[torch.Tensor]:
    total = functools.reduce(torch.add, mag)
    thr = u * total
    c = torch.zeros_like(u)
    keep = []
    for mi in mag:
        nxt = c + mi
        keep.append((c <= thr) & (thr < nxt))
        c = nxt
    return keep


def _others(x: list[torch.Tensor]) -> list[torch.Tensor]:
    """sum_{k != j} x_k summed directly, in the reference's order (base.sum_of_others)."""
    m = len(x)
    before = [torch.zeros_like(x[0])]
    for j in range(1, m):
        before.append(x[0] if j == 1 else before[-1] + x[j - 1])
    after = [torch.zeros_like(x[0])] * m
    for j in range(m - 2, -1, -1):
        after[j] = x[m - 1] if j == m - 2 else after[j + 1] + x[j + 1]
    return [b + c for b, c in zip(before, after)]


def _approx_cols(a: list[torch.Tensor], mag: list[torch.Tensor], n: int, u: list[torch.Tensor]):
    if n == 1:  # mvue's law: the same code, as in the reference
        return _mvue_cols(a, mag, 1, u[0])
    mag = _scaled(mag)
    s = functools.reduce(torch.add, mag)
    t = [_div(mi, s) for mi in mag]
    r = [_div(ti, oi) for ti, oi in zip(t, _others(mag))]
    p = [torch.clamp(ti + mi * ri, max=1.0) for ti, mi, ri in zip(t, mag, _others(r))]
    nnz = functools.reduce(torch.add, [(mi > 0).to(torch.int32) for mi in mag])
    p = [torch.where(nnz <= n, (mi > 0).to(mi.dtype), pi) for mi, pi in zip(mag, p)]
    keep = _draw(mag, u[0])
    rest = [torch.where(k, 0.0, mi) for k, mi in zip(keep, mag)]
    second = _draw(rest, u[1])
    keep = [k | (k2 & (ri > 0)) for k, k2, ri in zip(keep, second, rest)]
    return [torch.where(k, _div(ai, pi), 0.0) for ai, pi, k in zip(a, p, keep)]


def _fused(a: torch.Tensor, u: torch.Tensor, method: str, n: int) -> torch.Tensor:
    m = a.shape[-1]
    cols = list(a.unbind(-1))
    mag = [c.abs() for c in cols]
    us = list(u.unbind(-1)) if u.shape[-1] else []
    if method == "greedy":
        keep = _rank_keep(mag, n, larger_first=True)
        out = [torch.where(k, c, 0.0) for k, c in zip(keep, cols)]
    elif method == "random":
        keep = _rank_keep(us, n, larger_first=False)
        out = [torch.where(k, c * (m / n), 0.0) for k, c in zip(keep, cols)]
    elif method == "mvue":
        out = _mvue_cols(cols, mag, n, us[0])
    elif method == "mvue12":
        out = []
        for pair in range(m // 2):
            sl = slice(2 * pair, 2 * pair + 2)
            out += _mvue_cols(cols[sl], mag[sl], 1, us[pair])
    elif method == "approx-mvue":
        out = _approx_cols(cols, mag, n, us)
    else:  # a method that declares a kernel_code but has no column-wise code here
        raise ValueError(f"no fused kernel for {method}: add its column-wise code to cpu_fused._fused")
    # a block with a NaN or an infinity comes out all NaN (the reference's rule)
    finite = functools.reduce(torch.logical_and, [mi < float("inf") for mi in mag])
    return torch.stack([torch.where(finite, o, float("nan")) for o in out], -1)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x < 2^32 held in int64, in two 16-bit halves so nothing overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, constants 0x7feb352d / 0x846ca68b)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_MASK64 = (1 << 64) - 1


def seed_key(seed: int) -> int:
    """The splitmix64 finalizer of the whole 64-bit ``seed``, as a signed int64 (the hash's key).

    Every bit of the seed changes about half the key's bits, so neighbouring seeds (s, s + 1,
    s ^ 1) give unrelated streams; XOR-ing the raw seed into the counter made them permutations
    of one stream."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def _hash_from_key(key: torch.Tensor, k: int, n_u: int, device=None) -> torch.Tensor:
    idx = torch.arange(k * n_u, device=device, dtype=torch.int64)
    x = _lowbias32((idx ^ key) & _M32)
    x = _lowbias32(x ^ ((key >> 32) & _M32) ^ ((idx >> 32) & _M32))
    return ((x >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(k, n_u)


def hash_uniforms(seed: torch.Tensor | int, k: int, n_u: int, device=None) -> torch.Tensor:
    """(k, n_u) float32 uniforms in [0, 1) with 24 random bits: u[b, j] = H(key, b * n_u + j) with
    key = :func:`seed_key` (seed): two rounds of a 32-bit mixer, the key's low half XOR-ed into the
    counter before the first and its high half (with the counter's high bits) before the second."""
    return _hash_from_key(_key_tensor(seed, device), k, n_u, device)


def _key_tensor(seed: torch.Tensor | int, device=None) -> torch.Tensor:
    # a 0-d tensor, so compiled code does not specialise on it
    return torch.tensor(seed_key(int(seed)), dtype=torch.int64, device=device)


def _fused_seeded(a: torch.Tensor, key: torch.Tensor, method: str, n: int, n_u: int) -> torch.Tensor:
    return _fused(a, _hash_from_key(key, a.shape[0], n_u, a.device), method, n)


@functools.cache
def _compiled(method: str, n: int, m: int, seeded: bool):
    if seeded:
        fn = functools.partial(_fused_seeded, method=method, n=n, n_u=n_uniforms(method, n, m))
    else:
        fn = functools.partial(_fused, method=method, n=n)
    return torch.compile(fn, dynamic=True)


# Every variant shares the code object of _fused (or _fused_seeded), and dynamo counts each
# (method, pattern, seeded) variant as a recompile of that code: with torch's default limit of 8 a
# process that uses more variants would silently fall back to eager for the rest. There are at most
# 2 x 5 x 2 = 20 variants, each compiled once for dynamic K.
_RECOMPILE_LIMIT = 64


def _run(fn, *args) -> torch.Tensor:
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return fn(*args)


def fused_sample(a: torch.Tensor, u: torch.Tensor, method: str, n: int) -> torch.Tensor:
    """The method's draw on blocks ``a`` (K, M) with uniforms ``u`` (K, U), in one fused pass."""
    return _run(_compiled(method, n, a.shape[-1], False), a, u)


def fused_sample_seeded(a: torch.Tensor, seed: torch.Tensor, method: str, n: int) -> torch.Tensor:
    """The draw with uniforms ``hash_uniforms(seed, K, U)`` made inside the fused pass."""
    return _run(_compiled(method, n, a.shape[-1], True), a, _key_tensor(seed, a.device))


def eager_sample(a: torch.Tensor, u: torch.Tensor, method: str, n: int) -> torch.Tensor:
    """The same column-wise function run eagerly (for tests of the compiled code path)."""
    return _fused(a, u, method, n)


@functools.cache
def compile_available() -> bool:
    """Whether torch.compile can build CPU kernels here (it needs a C++ compiler); looked up once,
    since the backend resolver asks on every call."""
    import shutil

    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++"))
