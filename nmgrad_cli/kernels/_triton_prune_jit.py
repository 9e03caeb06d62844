"""The Triton prune kernel (private: import it through :mod:`nmgrad_cli.kernels.triton_prune`).

This file holds only ``@triton.jit`` code so that :mod:`.triton_prune` can load it twice, once
compiled for the GPU and once wrapped by the Triton interpreter for CPU tensors, whatever
``TRITON_INTERPRET`` was when triton was first imported.

Layout: the kernel sees a logical matrix X[r, l] (R rows, blocks of M along l) through two strides,
so features (X = dY, blocks of 4 columns) and tokens (X = dY^T, blocks of 4 rows) are the same code.
One program owns a tile of BLOCK_R rows x BLOCK_G blocks, loads it as one [BLOCK_R, BLOCK_G*M]
tile (coalesced along whichever axis has stride 1), and splits it into the M columns a0..a3 of
[BLOCK_R, BLOCK_G] blocks, which stay in registers. Block k = r * G + g is the row-major block
index of ``prune()``'s ``to_blocks`` view, which is how supplied uniforms (K, U) are addressed. The
in-kernel Philox stream: one call (seed, r * ceil(G / q) + g // q) gives four uniforms for the q = 4 / U
blocks g of row r that share it (U = 4: one call per block, keyed (seed, k)).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nmgrad_cli.methods import METHODS

# method codes (constexpr globals, as the compiler requires), each method's ``kernel_code``
GREEDY = tl.constexpr(METHODS["greedy"].kernel_code)
RANDOM = tl.constexpr(METHODS["random"].kernel_code)
MVUE = tl.constexpr(METHODS["mvue"].kernel_code)
MVUE12 = tl.constexpr(METHODS["mvue12"].kernel_code)
APPROX = tl.constexpr(METHODS["approx-mvue"].kernel_code)


@triton.jit
def _rand4x(seed, offset):
    """Four uniforms in [0, 1) per offset: Philox4x32-10 exactly as ``tl.rand4x``.

    Written out here because ``tl.rand4x`` is jitted when triton is imported, so the interpreted
    copy of this module could not call it; the stream is the same on both paths."""
    c0 = offset.to(tl.uint32)
    c1 = (offset >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    seed64 = seed.to(tl.uint64)  # seed: a scalar tensor (do_not_specialize); tl.to_tensor is not in Triton 3.6
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.math.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = tl.math.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = tl.mul(_c2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(_c0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return _to_uniform(c0), _to_uniform(c1), _to_uniform(c2), _to_uniform(c3)


@triton.jit
def _to_uniform(x):
    """uint32 -> float32 in [0, 1) (as triton.language.random.uint_to_uniform_float)."""
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x * 4.6566127342e-10


@triton.jit
def _div(num, den):
    """num / den rounded to nearest (IEEE), 0 where den == 0 (the reference's safe_div)."""
    ok = den != 0
    return tl.where(ok, tl.math.div_rn(num, tl.where(ok, den, 1.0)), 0.0)


@triton.jit
def _finite(a):
    """|a| < inf: False for NaN and +-inf."""
    return tl.abs(a) < float("inf")


@triton.jit
def _poison(y, finite):
    """The reference's rule: a block with a non-finite value comes out all NaN."""
    return tl.where(finite, y, float("nan"))


@triton.jit
def _before(kj, ki, j_first: tl.constexpr, larger_first: tl.constexpr):
    """Whether element j is ordered before element i (ties: lower index first)."""
    if larger_first:
        if j_first:
            res = kj >= ki
        else:
            res = kj > ki
    else:
        if j_first:
            res = kj <= ki
        else:
            res = kj < ki
    return res.to(tl.int32)


@triton.jit
def _rank_keep4(k0, k1, k2, k3, N: tl.constexpr, larger_first: tl.constexpr):
    """keep_i iff fewer than N of the 4 keys precede key i (the reference's kept_by_rank)."""
    r0 = _before(k1, k0, False, larger_first) + _before(k2, k0, False, larger_first)
    r0 += _before(k3, k0, False, larger_first)
    r1 = _before(k0, k1, True, larger_first) + _before(k2, k1, False, larger_first)
    r1 += _before(k3, k1, False, larger_first)
    r2 = _before(k0, k2, True, larger_first) + _before(k1, k2, True, larger_first)
    r2 += _before(k3, k2, False, larger_first)
    r3 = _before(k0, k3, True, larger_first) + _before(k1, k3, True, larger_first)
    r3 += _before(k2, k3, True, larger_first)
    return r0 < N, r1 < N, r2 < N, r3 < N


@triton.jit
def _ceil_step(c, prev, u):
    """Systematic sampling: [prev, c) contains one of u, u+1, ...  <=>  ceil(c - u) > ceil(prev - u)."""
    return tl.math.ceil(c - u) > tl.math.ceil(prev - u)


@triton.jit
def _mvue12_pair(a0, a1, u):
    """MVUE 1:2 on one pair: p_i = |a_i| / (|a_0| + |a_1|), kept value a_i / p_i = sign(a_i) (|a_0| + |a_1|)
    in closed form (the reference's kept_values); exact if <= 1 non-zero. Two divisions per pair."""
    top = tl.maximum(tl.abs(a0), tl.abs(a1))
    inv = _inv_max(top)
    m0 = tl.abs(a0) * inv  # scaled by the max, as the reference (no overflow of the sum)
    m1 = tl.abs(a1) * inv
    lam = m0 + m1
    rl = _div(1.0, lam)
    p0 = tl.minimum(m0 * rl, 1.0)
    p1 = tl.minimum(m1 * rl, 1.0)
    few = ((m0 > 0).to(tl.int32) + (m1 > 0).to(tl.int32)) <= 1
    p0 = tl.where(few, (m0 > 0).to(tl.float32), p0)
    p1 = tl.where(few, (m1 > 0).to(tl.float32), p1)
    c0 = p0
    c1 = p0 + p1
    keep0 = _ceil_step(tl.minimum(c0, 1.0), 0.0, u)
    keep1 = _ceil_step(tl.minimum(c1, 1.0), tl.minimum(c0, 1.0), u)
    big = _unscaled(lam, top)
    y0 = tl.where(keep0, _kept(a0, p0, big), 0.0)
    y1 = tl.where(keep1, _kept(a1, p1, big), 0.0)
    return y0, y1


@triton.jit
def _unscaled(lam, top):
    """lam (in the scaled magnitudes' units) in a's units: lam * max|a|, or lam * 2^-126 where a
    subnormal max was scaled by 2^126 (the reference's kept_values)."""
    return tl.where(top < 1.1754943508222875e-38, lam * 1.1754943508222875e-38, lam * top)


@triton.jit
def _inv_max(top):
    """1 / max |a|, or 2^126 when max is below float32's smallest normal (the reference's scaling)."""
    return tl.where(top < 1.1754943508222875e-38, 8.507059173023462e37, tl.math.div_rn(1.0, top))


@triton.jit
def _scaled4(a0, a1, a2, a3):
    """|a_i| * (1 / max |a|) (the reference's scaled_magnitudes): no sum of the block overflows."""
    inv = _inv_max(tl.maximum(tl.maximum(tl.abs(a0), tl.abs(a1)), tl.maximum(tl.abs(a2), tl.abs(a3))))
    return tl.abs(a0) * inv, tl.abs(a1) * inv, tl.abs(a2) * inv, tl.abs(a3) * inv


@triton.jit
def _others4(x0, x1, x2, x3):
    """sum_{k != j} x_k summed directly, in the reference's order (base.sum_of_others)."""
    x01 = x0 + x1
    x32 = x3 + x2
    return x32 + x1, x0 + x32, x01 + x3, x01 + x2


@triton.jit
def _mvue24(a0, a1, a2, a3, u):
    """Exact MVUE 2:4: water-filling p_i = min(1, |a_i| / lam), sum p = 2, systematic sampling.

    Closed forms, no sort and two divisions per block: lam = S/2, or R = the sum of the other three
    when max|a| > R (that element is then kept exactly: at 2:4 at most one saturates unless the
    block has at most two non-zeros); p_i = |a_i| * (1 / lam) on the scaled magnitudes; a kept
    unsaturated element is sign(a_i) * lam * max|a| (= a_i / p_i), a saturated one a_i itself.
    R is summed directly (never S - max: no cancellation).
    """
    top = tl.maximum(tl.maximum(tl.abs(a0), tl.abs(a1)), tl.maximum(tl.abs(a2), tl.abs(a3)))
    m0, m1, m2, m3 = _scaled4(a0, a1, a2, a3)
    o0, o1, o2, o3 = _others4(m0, m1, m2, m3)
    s = ((m0 + m1) + m2) + m3
    # the others' sum of the largest element (the first one on ties)
    first0 = (m0 >= m1) & (m0 >= m2) & (m0 >= m3)
    first1 = (m1 >= m2) & (m1 >= m3)
    rest = tl.where(first0, o0, tl.where(first1, o1, tl.where(m2 >= m3, o2, o3)))
    mx = tl.maximum(tl.maximum(m0, m1), tl.maximum(m2, m3))
    lam = tl.where(mx <= rest, s * 0.5, rest)
    rl = _div(1.0, lam)
    p0 = tl.minimum(m0 * rl, 1.0)
    p1 = tl.minimum(m1 * rl, 1.0)
    p2 = tl.minimum(m2 * rl, 1.0)
    p3 = tl.minimum(m3 * rl, 1.0)
    nnz = (m0 > 0).to(tl.int32) + (m1 > 0).to(tl.int32) + (m2 > 0).to(tl.int32) + (m3 > 0).to(tl.int32)
    few = nnz <= 2
    p0 = tl.where(few, (m0 > 0).to(tl.float32), p0)
    p1 = tl.where(few, (m1 > 0).to(tl.float32), p1)
    p2 = tl.where(few, (m2 > 0).to(tl.float32), p2)
    p3 = tl.where(few, (m3 > 0).to(tl.float32), p3)
    c0 = p0
    c1 = c0 + p1
    c2 = c1 + p2
    c3 = c2 + p3
    c0 = tl.minimum(c0, 2.0)
    c1 = tl.minimum(c1, 2.0)
    c2 = tl.minimum(c2, 2.0)
    c3 = tl.minimum(c3, 2.0)
    k0 = _ceil_step(c0, 0.0, u)
    k1 = _ceil_step(c1, c0, u)
    k2 = _ceil_step(c2, c1, u)
    k3 = _ceil_step(c3, c2, u)
    big = _unscaled(lam, top)
    y0 = tl.where(k0, _kept(a0, p0, big), 0.0)
    y1 = tl.where(k1, _kept(a1, p1, big), 0.0)
    y2 = tl.where(k2, _kept(a2, p2, big), 0.0)
    y3 = tl.where(k3, _kept(a3, p3, big), 0.0)
    return y0, y1, y2, y3


@triton.jit
def _kept(a, p, big):
    """A kept element's value: a itself when saturated (p = 1), else sign(a) * lam * max|a| = a / p."""
    return tl.where(p >= 1.0, a, tl.where(a < 0, -big, big))


@triton.jit
def _draw4(m0, m1, m2, m3, u):
    """One-hot draw with P(i) = m_i / sum m: keep i iff C_{i-1} <= u * C_3 < C_i."""
    c0 = m0
    c1 = c0 + m1
    c2 = c1 + m2
    c3 = c2 + m3
    thr = u * c3
    return thr < c0, (c0 <= thr) & (thr < c1), (c1 <= thr) & (thr < c2), (c2 <= thr) & (thr < c3)


@triton.jit
def _approx24(a0, a1, a2, a3, u0, u1):
    """approx-MVUE 2:4: first draw proportional to |a_i|, second among the other three likewise.

    Kept a_i becomes a_i / p_i, p_i = t_i + |a_i| sum_{j != i} t_j / (S - |a_j|), t_i = |a_i| / S,
    on the scaled magnitudes, with S - |a_j| and sum_{j != i} summed directly (no cancellation).
    """
    m0, m1, m2, m3 = _scaled4(a0, a1, a2, a3)
    s = ((m0 + m1) + m2) + m3
    t0 = _div(m0, s)
    t1 = _div(m1, s)
    t2 = _div(m2, s)
    t3 = _div(m3, s)
    o0, o1, o2, o3 = _others4(m0, m1, m2, m3)
    r0 = _div(t0, o0)
    r1 = _div(t1, o1)
    r2 = _div(t2, o2)
    r3 = _div(t3, o3)
    q0, q1, q2, q3 = _others4(r0, r1, r2, r3)
    p0 = tl.minimum(t0 + m0 * q0, 1.0)
    p1 = tl.minimum(t1 + m1 * q1, 1.0)
    p2 = tl.minimum(t2 + m2 * q2, 1.0)
    p3 = tl.minimum(t3 + m3 * q3, 1.0)
    # at most 2 non-zeros: each is kept for sure (p would round to just under 1), as the reference
    few = ((m0 > 0).to(tl.int32) + (m1 > 0).to(tl.int32) + (m2 > 0).to(tl.int32) + (m3 > 0).to(tl.int32)) <= 2
    p0 = tl.where(few & (m0 > 0), 1.0, p0)
    p1 = tl.where(few & (m1 > 0), 1.0, p1)
    p2 = tl.where(few & (m2 > 0), 1.0, p2)
    p3 = tl.where(few & (m3 > 0), 1.0, p3)
    k0, k1, k2, k3 = _draw4(m0, m1, m2, m3, u0)
    q0 = tl.where(k0, 0.0, m0)
    q1 = tl.where(k1, 0.0, m1)
    q2 = tl.where(k2, 0.0, m2)
    q3 = tl.where(k3, 0.0, m3)
    j0, j1, j2, j3 = _draw4(q0, q1, q2, q3, u1)
    k0 = k0 | (j0 & (q0 > 0))
    k1 = k1 | (j1 & (q1 > 0))
    k2 = k2 | (j2 & (q2 > 0))
    k3 = k3 | (j3 & (q3 > 0))
    y0 = tl.where(k0, _div(a0, p0), 0.0)
    y1 = tl.where(k1, _div(a1, p1), 0.0)
    y2 = tl.where(k2, _div(a2, p2), 0.0)
    y3 = tl.where(k3, _div(a3, p3), 0.0)
    return y0, y1, y2, y3


@triton.jit
def _cutlass_idx(nz0, nz1, nz2, nz3):
    """The two kept positions of a 2:4 block as torch's CUTLASS compressor encodes them."""
    e0 = nz0 & nz1
    e1 = (~nz0) & nz1
    e2 = (~nz0) & (~nz1)
    idx0 = e1.to(tl.int32) | (e2.to(tl.int32) << 1)
    idx1 = (e0 | e2 | nz3).to(tl.int32) | ((e1 | (~nz1)).to(tl.int32) << 1)
    return idx0, idx1


@triton.jit
def _cutlass_meta_offset(r, c, R):
    """Where int16 metadata element (r, c) of an R-row matrix goes in CUTLASS's reordered layout
    (ColumnMajorInterleaved<2> with rows regrouped by 32 and 2x2 swizzles): torch's
    ``_calculate_meta_reordering_scatter_offsets`` for int16, per element."""
    dr = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8  # (BR,)
    odd_r = (dr % 2)[:, None]
    odd_c = (c % 2)[None, :]
    swap = ((odd_r == 0) & (odd_c == 1)).to(tl.int64) - ((odd_r == 1) & (odd_c == 0)).to(tl.int64)
    dr2 = dr[:, None] + swap
    dc2 = c[None, :] - swap
    return (dc2 // 2) * (R * 2) + dr2 * 2 + dc2 % 2


@triton.jit
def _to_out(y, dtype: tl.constexpr, OUT_BF16: tl.constexpr):
    """float32 -> the output dtype, rounded to nearest even. For bf16 the rounding is done on the
    bits (as the hardware's cvt.rn does), because the Triton interpreter truncates fp32 -> bf16."""
    if OUT_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        res = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        res = y.to(dtype)
    return res


@triton.jit
def _nonzero(o):
    return o.to(tl.float32) != 0.0


@triton.jit
def _pick4(idx, y0, y1, y2, y3):
    return tl.where(idx == 0, y0, tl.where(idx == 1, y1, tl.where(idx == 2, y2, y3)))


@triton.jit(do_not_specialize=["seed"])
def prune_kernel(
    x_ptr,
    y_ptr,
    u_ptr,
    vals_ptr,
    meta_ptr,
    R,
    L,
    G,
    sxr,
    sxl,
    syr,
    syl,
    seed,
    METHOD: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    U: tl.constexpr,
    PHILOX: tl.constexpr,
    COMPRESS: tl.constexpr,
    CSLT: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Prune X[r, l] (R x L, blocks of M along l) into Y[r, l]; optionally (COMPRESS) also the
    compressed values [R, L/2] and metadata: CUTLASS's [R, L/16] int16 (4 blocks each, in CUTLASS's
    order), or with CSLT cuSPARSELt's bytes (one nibble per block, ``cslt_layout``'s byte formula,
    ``meta_ptr`` = the buffer's metadata region as uint8) and then no Y at all."""
    # one grid axis (2^31 - 1 programs; axes 1 and 2 stop at 65,535): row tiles vary fastest
    pid = tl.program_id(0)
    n_r = (R + BLOCK_R - 1) // BLOCK_R  # (tl.cdiv is jitted at import: the interpreted copy cannot call it)
    pid_r = pid % n_r
    pid_g = pid // n_r
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)  # (BG,)
    l = pid_g * (BLOCK_G * M) + tl.arange(0, BLOCK_G * M)  # (BG*M,)
    r64 = r.to(tl.int64)
    l64 = l.to(tl.int64)
    rmask = r < R
    xmask = rmask[:, None] & (l < L)[None, :]
    x = tl.load(x_ptr + r64[:, None] * sxr + l64[None, :] * sxl, mask=xmask, other=0.0).to(tl.float32)

    # uniforms of block k = r * G + g
    k = r64[:, None] * G + g[None, :]  # (BR, BG)
    kmask = rmask[:, None] & (g < G)[None, :]
    if PHILOX:  # one Philox call gives four uniforms: 4 / U blocks share it (U = 4: one call per block)
        if U == 1:  # block g of row r: call (r, g // 4), lane g % 4
            gq = pid_g * (BLOCK_G // 4) + tl.arange(0, BLOCK_G // 4)
            c0, c1, c2, c3 = _rand4x(seed, r64[:, None] * ((G + 3) // 4) + gq[None, :])
            u0 = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_R, BLOCK_G))
            u1 = u0
            u2 = u0
            u3 = u0
        elif U == 2:  # block g of row r: call (r, g // 2), lanes (0, 1) for even g, (2, 3) for odd g
            gh = pid_g * (BLOCK_G // 2) + tl.arange(0, BLOCK_G // 2)
            c0, c1, c2, c3 = _rand4x(seed, r64[:, None] * ((G + 1) // 2) + gh[None, :])
            u0 = tl.reshape(tl.join(c0, c2), (BLOCK_R, BLOCK_G))
            u1 = tl.reshape(tl.join(c1, c3), (BLOCK_R, BLOCK_G))
            u2 = u0
            u3 = u1
        else:
            u0, u1, u2, u3 = _rand4x(seed, k)
    else:
        u0 = tl.full((BLOCK_R, BLOCK_G), 0.0, tl.float32)
        u1 = u0
        u2 = u0
        u3 = u0
        if U > 0:
            u0 = tl.load(u_ptr + k * U, mask=kmask, other=0.0)
        if U > 1:
            u1 = tl.load(u_ptr + k * U + 1, mask=kmask, other=0.0)
        if U > 2:
            u2 = tl.load(u_ptr + k * U + 2, mask=kmask, other=0.0)
        if U > 3:
            u3 = tl.load(u_ptr + k * U + 3, mask=kmask, other=0.0)

    if M == 4:
        x4 = tl.reshape(x, (BLOCK_R, BLOCK_G, 2, 2))  # [.., j1, j2] = element 2*j1 + j2
        ev, od = tl.split(x4)
        a0, a2 = tl.split(ev)
        a1, a3 = tl.split(od)
        if METHOD == GREEDY:
            k0, k1, k2, k3 = _rank_keep4(tl.abs(a0), tl.abs(a1), tl.abs(a2), tl.abs(a3), N, True)
            y0 = tl.where(k0, a0, 0.0)
            y1 = tl.where(k1, a1, 0.0)
            y2 = tl.where(k2, a2, 0.0)
            y3 = tl.where(k3, a3, 0.0)
        elif METHOD == RANDOM:
            k0, k1, k2, k3 = _rank_keep4(u0, u1, u2, u3, N, False)
            scale = M / N
            y0 = tl.where(k0, a0 * scale, 0.0)
            y1 = tl.where(k1, a1 * scale, 0.0)
            y2 = tl.where(k2, a2 * scale, 0.0)
            y3 = tl.where(k3, a3 * scale, 0.0)
        elif METHOD == MVUE:  # noqa: SIM114 (constexpr branches, one per code)
            y0, y1, y2, y3 = _mvue24(a0, a1, a2, a3, u0)
        elif METHOD == MVUE12:  # noqa: SIM114
            y0, y1 = _mvue12_pair(a0, a1, u0)
            y2, y3 = _mvue12_pair(a2, a3, u1)
        elif METHOD == APPROX:  # an unknown code leaves y0.. undefined: a compile error, never a wrong kernel
            y0, y1, y2, y3 = _approx24(a0, a1, a2, a3, u0, u1)
        fin = _finite(a0) & _finite(a1) & _finite(a2) & _finite(a3)
        y0 = _poison(y0, fin)
        y1 = _poison(y1, fin)
        y2 = _poison(y2, fin)
        y3 = _poison(y3, fin)
        o0 = _to_out(y0, y_ptr.dtype.element_ty, OUT_BF16)
        o1 = _to_out(y1, y_ptr.dtype.element_ty, OUT_BF16)
        o2 = _to_out(y2, y_ptr.dtype.element_ty, OUT_BF16)
        o3 = _to_out(y3, y_ptr.dtype.element_ty, OUT_BF16)
        out = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BLOCK_R, BLOCK_G * M))
        if COMPRESS:
            # -0.0 and values that underflow in the output dtype count as zeros
            # (compared in float32: the interpreter's emulated bf16 would see -0.0's sign bit)
            idx0, idx1 = _cutlass_idx(_nonzero(o0), _nonzero(o1), _nonzero(o2), _nonzero(o3))
            v0 = _pick4(idx0, o0, o1, o2, o3)
            v1 = _pick4(idx1, o0, o1, o2, o3)
            lv = pid_g * (BLOCK_G * 2) + tl.arange(0, BLOCK_G * 2)
            vmask = rmask[:, None] & (lv < G * 2)[None, :]
            vals = tl.reshape(tl.join(v0, v1), (BLOCK_R, BLOCK_G * 2))
            tl.store(vals_ptr + r64[:, None] * (G * 2) + lv[None, :], vals, mask=vmask)
            nib = idx0 | (idx1 << 2)  # (BR, BG)
            if CSLT:
                # rows r and r + 8 of each 16-row group share a byte (low / high nibble)
                n16 = tl.permute(tl.reshape(nib, (BLOCK_R // 16, 2, 8, BLOCK_G)), (0, 2, 3, 1))
                lo, hi = tl.split(n16)  # (BR/16, 8, BG) each
                byte = tl.reshape(lo | (hi << 4), (BLOCK_R // 2, BLOCK_G))
                i = tl.arange(0, BLOCK_R // 2)
                rl = (pid_r * BLOCK_R + (i // 8) * 16 + i % 8).to(tl.int64)  # (BR/2,) the low-nibble rows
                q = g % 8
                off = (rl // 64) * 8 * L + (rl % 64) // 16 * 64 + 8 * (rl % 8)
                off = off[:, None] + ((g // 8) * 256 + 2 * (q % 4) + q // 4).to(tl.int64)[None, :]
                bmask = (rl < R)[:, None] & (g < G)[None, :]
                tl.store(meta_ptr + off, byte.to(tl.uint8), mask=bmask)
            else:
                n4 = tl.reshape(nib, (BLOCK_R, BLOCK_G // 4, 2, 2))  # [.., j1, j2] = block 4q + 2*j1 + j2
                ne, no = tl.split(n4)
                n0, n2 = tl.split(ne)
                n1, n3 = tl.split(no)
                meta = n0 | (n1 << 4) | (n2 << 8) | (n3 << 12)
                q = pid_g * (BLOCK_G // 4) + tl.arange(0, BLOCK_G // 4)
                qmask = rmask[:, None] & (q < G // 4)[None, :]
                tl.store(meta_ptr + _cutlass_meta_offset(r64, q.to(tl.int64), R), meta.to(tl.int16), mask=qmask)
    else:
        x2 = tl.reshape(x, (BLOCK_R, BLOCK_G, 2))
        a0, a1 = tl.split(x2)
        if METHOD == GREEDY:
            k0 = tl.abs(a0) >= tl.abs(a1)
            y0 = tl.where(k0, a0, 0.0)
            y1 = tl.where(k0, 0.0, a1)
        elif METHOD == RANDOM:
            k0 = u0 <= u1
            y0 = tl.where(k0, a0 * 2.0, 0.0)
            y1 = tl.where(k0, 0.0, a1 * 2.0)
        # mvue, mvue12 and approx-mvue are one estimator at 1:2 (the reference runs mvue's code);
        # an unknown code leaves y0, y1 undefined: a compile error, never a wrong kernel
        elif METHOD == MVUE:  # noqa: SIM114 (constexpr branches, one per code)
            y0, y1 = _mvue12_pair(a0, a1, u0)
        elif METHOD == MVUE12:  # noqa: SIM114
            y0, y1 = _mvue12_pair(a0, a1, u0)
        elif METHOD == APPROX:
            y0, y1 = _mvue12_pair(a0, a1, u0)
        fin = _finite(a0) & _finite(a1)
        y0 = _poison(y0, fin)
        y1 = _poison(y1, fin)
        out = _to_out(tl.reshape(tl.join(y0, y1), (BLOCK_R, BLOCK_G * M)), y_ptr.dtype.element_ty, OUT_BF16)

    if not CSLT:  # the cuSPARSELt buffer is the whole output
        tl.store(y_ptr + r64[:, None] * syr + l64[None, :] * syl, out, mask=xmask)
