"""One numerics rule on every backend (docs/methods.md, "Numerics").

Backends: the reference (``methods/*.py``), the fused CPU code (``cpu_fused``, run eagerly here: the
compiled kernel is the same function, checked in test_cpu_fused.py) and Triton (interpreter). Each
test feeds every backend the same blocks and uniforms.
"""

from __future__ import annotations

import math

import pytest
import torch

from nmgrad_cli import METHODS, marginals, prune
from nmgrad_cli.kernels import cpu_fused
from nmgrad_cli.patterns import Pattern, parse_pattern

KERNEL_PATTERNS = ("1:2", "2:4")
BACKENDS = ("reference", "fused", "triton")


def run(backend: str, blocks: torch.Tensor, u: torch.Tensor, method: str, pattern: str, monkeypatch=None):
    """One draw of (K, M) float32 blocks with uniforms u on ``backend``."""
    pat = parse_pattern(pattern)
    if backend == "reference":
        return METHODS[method].sample(blocks, pat.n, u)
    if backend == "fused":
        return cpu_fused.eager_sample(blocks, u, method, pat.n)
    pytest.importorskip("triton")
    from nmgrad_cli.kernels.triton_prune import triton_sample_blocks

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return triton_sample_blocks(blocks, u, method, pat.n)


def cases(methods=None):
    pats = [(p, parse_pattern(p)) for p in KERNEL_PATTERNS]
    return [(m, p) for m in (methods or METHODS) for p, pat in pats if cpu_fused.supports(m, pat.n, pat.m)]


def uniforms(k: int, method: str, pattern: str, seed: int = 0) -> torch.Tensor:
    n_u = METHODS[method].n_uniforms(parse_pattern(pattern))
    return torch.rand(k, n_u, generator=torch.Generator().manual_seed(seed))


# --- approx-mvue: no cancellation when one element dominates ---------------------------------------


@pytest.mark.parametrize("block", [[3e7, 1.0, 1.0, 1.0], [1.0, -1.0, 3e7, 1.0], [1.0, 1.0, 1.0, -1e9]])
def test_approx_mvue_dominant_block_exact_marginals_are_unbiased(block):
    x = torch.tensor([block])
    for dtype in (torch.float32, torch.float64):
        p, v = marginals(x.to(dtype), "approx-mvue", "2:4", dtype=dtype)
        torch.testing.assert_close(p * v, x.to(dtype), rtol=1e-6, atol=0.0)
        small = x[0].abs() < 10
        # each small element is kept w.p. ~1/3 (second draw among three equal ones), as sign(a) * 3
        torch.testing.assert_close(p[0, small], torch.full((3,), 1 / 3, dtype=dtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [[3e7, 1.0, 1.0, 1.0], [1.0, -1.0, 3e7, 1.0]])
def test_approx_mvue_dominant_block_monte_carlo_mean(block, backend, monkeypatch):
    """Mean of K = 4096 draws within 5 standard errors of the block; sd of a small element is
    sqrt(p (1 - p)) * 3 = sqrt(2) (p = 1/3), of the dominant one ~0."""
    k = 4096
    x = torch.tensor([block]).expand(k, 4).contiguous()
    out = run(backend, x, uniforms(k, "approx-mvue", "2:4"), "approx-mvue", "2:4", monkeypatch)
    mean = out.double().mean(0)
    target = torch.tensor(block, dtype=torch.float64)
    small = target.abs() < 10
    assert (mean[small] - target[small]).abs().max().item() < 5 * math.sqrt(2.0) / math.sqrt(k)
    torch.testing.assert_close(mean[~small], target[~small], rtol=1e-6, atol=0)  # kept (almost) always


# --- NaN / Inf: a block with a non-finite value comes out all NaN, on every backend ----------------


BAD_VALUES = [float("nan"), float("inf"), -float("inf")]


def poisoned_blocks(m: int, bad: float) -> torch.Tensor:
    x = torch.randn(8, m, generator=torch.Generator().manual_seed(3))
    x[1, 0] = bad  # one bad value
    x[3, -1] = bad
    x[5] = bad  # a whole bad block
    x[6] = 0.0
    x[6, 1] = bad  # bad among zeros
    return x


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, pattern", cases())
def test_nonfinite_block_is_all_nan_on_every_backend(method, pattern, backend, bad, monkeypatch):
    pat = parse_pattern(pattern)
    x = poisoned_blocks(pat.m, bad)
    u = uniforms(len(x), method, pattern)
    out = run(backend, x, u, method, pattern, monkeypatch)
    bad_rows = torch.tensor([1, 3, 5, 6])
    assert out[bad_rows].isnan().all()
    good = torch.ones(len(x), dtype=torch.bool)
    good[bad_rows] = False
    assert torch.isfinite(out[good]).all()
    ref = METHODS[method].sample(x[good], pat.n, u[good])  # the finite blocks are untouched
    torch.testing.assert_close(out[good], ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("method", list(METHODS))
def test_nonfinite_rule_for_every_method_and_pattern_in_prune_and_marginals(method, bad):
    for pattern in ("1:2", "2:4", "3:8", "1:4", "4:8"):
        pat = parse_pattern(pattern)
        try:
            METHODS[method].check(pat)
        except Exception:
            continue
        x = torch.randn(3, 2 * pat.m, generator=torch.Generator().manual_seed(1))
        x[1, pat.m + 1] = bad  # second block of row 1
        out = prune(x, method, pattern, generator=torch.Generator().manual_seed(0))
        assert out[1, pat.m :].isnan().all() and torch.isfinite(out[1, : pat.m]).all()
        assert torch.isfinite(out[[0, 2]]).all()
        p, v = marginals(x, method, pattern)
        assert p[1, pat.m :].isnan().all() and v[1, pat.m :].isnan().all()
        assert torch.isfinite(p[[0, 2]]).all()


def test_nonfinite_block_with_the_fused_and_triton_backends_of_prune(monkeypatch):
    """[inf, 1, 2, 3] at 2:4: the issue's case (ref, fused and Triton gave three different answers)."""
    x = torch.tensor([[float("inf"), 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0]])
    u = uniforms(2, "mvue", "2:4")
    outs = [prune(x, "mvue", "2:4", uniforms=u, backend="reference")]
    if cpu_fused.compile_available():
        outs.append(prune(x, "mvue", "2:4", uniforms=u, backend="fused"))
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    outs.append(prune(x, "mvue", "2:4", uniforms=u, backend="triton"))
    for out in outs:
        assert out[0, :4].isnan().all()
        torch.testing.assert_close(out[0, 4:], outs[0][0, 4:], rtol=1e-6, atol=0)


# --- overflow: probabilities from magnitudes scaled by the block's max ----------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, pattern", cases())
def test_huge_float32_blocks_do_not_overflow_to_zeros(method, pattern, backend, monkeypatch):
    """Four 1e38 values sum past float32's max (3.4e38): the kept values must be finite, non-zero
    and unbiased (1e38 / p with p = N/M, i.e. 2e38), not zeros."""
    pat = parse_pattern(pattern)
    x = torch.full((64, pat.m), 1e38)
    x[1::2, 0] = -1e38
    out = run(backend, x, uniforms(64, method, pattern), method, pattern, monkeypatch)
    assert torch.isfinite(out).all()
    kept = out != 0
    assert (kept.sum(-1) == pat.n).all()
    expect = x * (pat.m / pat.n) if METHODS[method].unbiased else x
    torch.testing.assert_close(out[kept], expect[kept], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, pattern", cases(["mvue", "approx-mvue"]))
def test_tiny_subnormal_blocks_keep_their_law(method, pattern, backend, monkeypatch):
    """Subnormal magnitudes (1e-40): their sums and ratios are computed after scaling by the max."""
    pat = parse_pattern(pattern)
    x = torch.tensor([[1e-40, 2e-40, 3e-40, 4e-40][: pat.m]]).expand(2000, pat.m).contiguous()
    out = run(backend, x, uniforms(2000, method, pattern, seed=2), method, pattern, monkeypatch)
    assert ((out != 0).sum(-1) == pat.n).all()
    p, v = marginals(x[:1].double(), method, pattern, dtype=torch.float64)
    freq = (out != 0).double().mean(0)
    assert ((freq - p[0]).abs() < 5 * (p[0] * (1 - p[0]) / 2000).sqrt() + 1e-12).all()


def test_fp16_is_computed_in_float32_and_an_out_of_range_kept_value_is_inf():
    """[40000, 40000] at 1:2: the kept value a / p = 80000 is computed in float32 (exact), and as it
    exceeds fp16's max (65504) the fp16 output holds +-inf there, as a float -> half cast does (so an
    AMP GradScaler sees the overflow); values within range are exact."""
    for method in ("mvue", "approx-mvue", "mvue12", "random"):
        x = torch.tensor([[40000.0, -40000.0, 30000.0, 30000.0]], dtype=torch.float16)
        u = uniforms(2, method, "1:2")
        full = prune(x.float(), method, "1:2", uniforms=u)
        half = prune(x, method, "1:2", uniforms=u)
        assert half.dtype == torch.float16
        assert sorted(full[0, :2].abs().tolist()) == [0.0, 80000.0]
        assert torch.equal(half, full.half())
        assert half[0, :2].isinf().sum() == 1 and (half[0, :2] == 0).sum() == 1
        assert sorted(half[0, 2:].tolist()) == [0.0, 60000.0]


def test_fp16_overflow_on_the_triton_kernel_is_the_same_cast(monkeypatch):
    """The kernel loads fp16, computes in float32 and rounds once to fp16: as the reference."""
    pytest.importorskip("triton")
    from nmgrad_cli.kernels import triton_prune

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.tensor([[40000.0, -40000.0, 30000.0, 30000.0]] * 4, dtype=torch.float16)
    for method in ("mvue", "approx-mvue", "mvue12", "random"):
        u = uniforms(8, method, "1:2")
        out = triton_prune.prune_2d(x, method, "1:2", uniforms=u, tile=(4, 2))
        assert out.dtype == torch.float16
        assert torch.equal(out, prune(x.float(), method, "1:2", uniforms=u).half())
        assert (out[:, :2].isinf().sum(-1) == 1).all() and (out[:, 2:].abs().max(-1).values == 60000).all()


# --- 1:2: approx-mvue is mvue -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_approx_mvue_is_mvue_at_1_2_for_the_same_uniforms(backend, monkeypatch):
    """The same estimator at 1:2: identical output for the same uniforms, boundaries included (u on,
    just below and just above p_1 = |a_1| / S, where u * S < |a_1| and u < |a_1| / S can disagree)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3000, 2, generator=gen)
    a[::11, 1] = 0.0
    p0 = a[:, 0].abs() / (a[:, 0].abs() + a[:, 1].abs())
    p0 = torch.nan_to_num(p0, nan=0.5)
    us = [p0, torch.nextafter(p0, torch.zeros_like(p0)), torch.nextafter(p0, torch.ones_like(p0)),
          torch.rand(3000, generator=gen)]
    for u in us:
        u = u.clamp(0.0, 1.0 - 2**-24)[:, None]
        mv = run(backend, a, u, "mvue", "1:2", monkeypatch)
        ap = run(backend, a, u, "approx-mvue", "1:2", monkeypatch)
        assert torch.equal(mv, ap)
    pm, vm = marginals(a, "mvue", "1:2")
    pa, va = marginals(a, "approx-mvue", "1:2")
    assert torch.equal(pm, pa) and torch.equal(vm, va)


# --- the fused hash: neighbouring seeds give unrelated streams ------------------------------------


def test_neighbouring_seeds_give_uncorrelated_hash_streams():
    """u(s) and u(t) for t = s + 1, s ^ 1, s ^ 2^32, s + 2^32: not a permutation of each other, and
    the correlation of u_s[i] with u_t[i ^ d] (d < 8, which a counter XOR-ed with the seed would
    make 1) is within 5 / sqrt(n) for every d: an estimate of a zero correlation has sd 1/sqrt(n)."""
    from nmgrad_cli.kernels.cpu_fused import hash_uniforms

    n = 1 << 16
    idx = torch.arange(n)
    for s in (0, 12345, (1 << 40) + 6):
        us = hash_uniforms(s, n, 1).double().flatten()
        for t in (s + 1, s ^ 1, s ^ (1 << 32), s + (1 << 32), s ^ 2):
            ut = hash_uniforms(t, n, 1).double().flatten()
            assert not torch.equal(us.sort().values, ut.sort().values)
            for d in range(8):
                corr = torch.corrcoef(torch.stack([us, ut[idx ^ d]]))[0, 1].item()
                assert abs(corr) < 5 / math.sqrt(n), (s, t, d, corr)


def test_seed_key_mixes_all_64_bits():
    from nmgrad_cli.kernels.cpu_fused import seed_key

    base = seed_key(1234)
    for bit in range(64):
        flipped = seed_key(1234 ^ (1 << bit))
        changed = bin((base ^ flipped) & ((1 << 64) - 1)).count("1")
        assert 12 <= changed <= 52, (bit, changed)  # ~32 of 64 bits: binomial sd 4


@pytest.mark.parametrize("t_of", [lambda s: s + 1, lambda s: s ^ 1, lambda s: s ^ (1 << 32)])
def test_triton_philox_neighbouring_seeds_are_uncorrelated(t_of, monkeypatch):
    """Philox is keyed by the whole 64-bit seed (k0 = low, k1 = high half) and counts blocks, with no
    XOR of seed and counter: mvue 1:2 on equal pairs keeps the first element iff u < 1/2, a fair bit
    per block; the bits of seeds s and t agree on half the blocks (within 5 sd = 5 / (2 sqrt(n)))."""
    pytest.importorskip("triton")
    from nmgrad_cli.kernels import triton_prune

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dy = torch.ones(64, 128)  # 4096 pairs
    n = dy.numel() // 2
    s = 987654321
    a = triton_prune.prune_2d(dy, "mvue", "1:2", seed=s, tile=(64, 64))[:, 0::2] != 0
    b = triton_prune.prune_2d(dy, "mvue", "1:2", seed=t_of(s), tile=(64, 64))[:, 0::2] != 0
    assert abs(a.double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert abs((a == b).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)


# --- the registry drives the kernel tables --------------------------------------------------------


def test_kernel_tables_are_derived_from_the_registry():
    from nmgrad_cli.kernels import triton_prune

    codes = {name: meth.kernel_code for name, meth in METHODS.items() if meth.kernel_code is not None}
    assert len(set(codes.values())) == len(codes)  # one code per method
    assert cpu_fused.FUSED_METHODS == set(codes)
    assert triton_prune._METHOD_CODES == codes
    for name in codes:
        for pattern in KERNEL_PATTERNS:
            pat = parse_pattern(pattern)
            expect = METHODS[name].n_uniforms(pat)
            assert triton_prune.n_uniforms(name, pat.m) == expect
            assert cpu_fused.n_uniforms(name, pat.n, pat.m) == expect
    pytest.importorskip("triton")
    jit = triton_prune._jit_module(True)
    consts = {"greedy": jit.GREEDY, "random": jit.RANDOM, "mvue": jit.MVUE, "mvue12": jit.MVUE12,
              "approx-mvue": jit.APPROX}
    assert {k: getattr(v, "value", v) for k, v in consts.items()} == codes


def test_a_method_declaring_a_kernel_code_without_kernel_code_is_an_error(monkeypatch):
    """A new method that declares a kernel_code but has no kernel branch fails loudly on both kernels
    (it would otherwise fall through to another method's code)."""

    class Fake(type(METHODS["mvue"])):
        name = "fake"
        kernel_code = 99

    monkeypatch.setitem(METHODS, "fake", Fake())
    with pytest.raises(ValueError, match="no fused kernel for fake"):
        cpu_fused.eager_sample(torch.ones(4, 4), torch.zeros(4, 1), "fake", 2)
    pytest.importorskip("triton")
    from nmgrad_cli.kernels import triton_prune

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(triton_prune._METHOD_CODES, "fake", 99)
    monkeypatch.setitem(triton_prune._N_UNIFORMS, ("fake", 2), 1)
    for pattern in ("1:2", "2:4"):
        monkeypatch.setitem(triton_prune._N_UNIFORMS, ("fake", 4), 1)
        with pytest.raises(Exception, match="y0|y1"):
            triton_prune.prune_2d(torch.ones(4, 8), "fake", pattern, seed=1)


def test_pattern_is_a_frozen_value():
    pat = parse_pattern("2:4")
    assert pat == Pattern(2, 4) and str(pat) == "2:4" and parse_pattern(pat) is pat
    with pytest.raises(AttributeError):
        pat.n = 3  # type: ignore[misc]


def test_mvue_kept_values_closed_form():
    """The reference's kept values are a_i itself when saturated, else sign(a_i) * lam * max|a|:
    equal to a_i / p_i up to float32 rounding, also for a subnormal block (scaled by 2^126)."""
    from nmgrad_cli.methods.base import scaled_magnitudes
    from nmgrad_cli.methods.mvue import kept_values, water_fill_lam

    tiny = torch.finfo(torch.float32).tiny
    a = torch.tensor([[0.3, -0.2, 0.1, 4.0], [1.0, -1.0, 2.0, -0.5], [3.0, 0.0, 0.0, -1.0],
                      [tiny / 4, -tiny / 8, tiny / 16, tiny / 2]])
    p, lam = water_fill_lam(scaled_magnitudes(a), 2)
    v = kept_values(a, p, lam)
    assert v[0, 3] == 4.0 and p[0, 3] == 1.0  # the dominant element is kept exactly
    assert torch.equal(v[2], a[2])  # at most 2 non-zeros: kept exactly
    s = a[1].abs().sum()
    torch.testing.assert_close(v[1], torch.sign(a[1]) * s / 2, rtol=4e-7, atol=0)
    ok = p > 0
    torch.testing.assert_close((p * v)[ok], a[ok], rtol=1e-6, atol=0)  # unbiased to rounding
    assert (v[3] != 0).all() and torch.isfinite(v).all()
