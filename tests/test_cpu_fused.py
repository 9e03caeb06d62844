"""The fused CPU path computes the reference's function of the same uniforms."""

from __future__ import annotations

import pytest
import torch

from nmgrad_cli import METHODS, prune
from nmgrad_cli.kernels import cpu_fused
from nmgrad_cli.patterns import parse_pattern

CASES = [(m, p) for m in cpu_fused.FUSED_METHODS for p in ("1:2", "2:4") if cpu_fused.supports(m, int(p[0]), int(p[2]))]


def blocks_and_uniforms(method: str, pattern: str, k: int = 4096, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pat = parse_pattern(pattern)
    a = torch.randn(k, pat.m, generator=gen) * torch.rand(k, pat.m, generator=gen) ** 3
    a[::9] = 0.0  # zero blocks
    a[1::9, 0] = 0.0  # a zero inside a block
    a[2::9, -1] *= 100.0  # dominant elements
    a[3::9] = 1.5  # ties
    a[4::9, 1:] = 0.0  # one non-zero
    u = torch.rand(k, METHODS[method].n_uniforms(pat), generator=gen)
    return a, u, pat


@pytest.mark.parametrize("method, pattern", sorted(CASES))
def test_columnwise_function_equals_reference(method, pattern):
    a, u, pat = blocks_and_uniforms(method, pattern)
    ref = METHODS[method].sample(a, pat.n, u)
    out = cpu_fused.eager_sample(a, u, method, pat.n)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)
    assert ((out != 0).sum(-1) <= pat.n).all()


@pytest.mark.parametrize("method", ["mvue", "greedy", "approx-mvue"])
def test_compiled_prune_equals_reference(method):
    if not cpu_fused.compile_available():
        pytest.fail("no C++ compiler found: torch.compile cannot build the fused CPU kernels")
    gen = torch.Generator().manual_seed(1)
    n_u = METHODS[method].n_uniforms(parse_pattern("2:4"))
    x = torch.randn(96, 250, generator=gen)  # padded last block
    x[:, :8] = 0.0
    u = torch.rand(96 * 63, n_u, generator=gen)
    ref = prune(x, method, "2:4", uniforms=u, backend="reference")
    out = prune(x, method, "2:4", uniforms=u, backend="fused")
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)
    # a second shape, blocked along dim 0, reuses the dynamic-shape kernel
    y = torch.randn(33, 4 * 7, generator=gen)
    u = torch.rand(9 * 28, n_u, generator=gen)
    ref = prune(y, method, "2:4", dim=0, uniforms=u, backend="reference")
    out = prune(y, method, "2:4", dim=0, uniforms=u, backend="fused")
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)


def test_seeded_fused_draw_uses_hash_uniforms_and_is_reproducible():
    from nmgrad_cli.kernels.cpu_fused import fused_sample_seeded, hash_uniforms

    a, _, pat = blocks_and_uniforms("mvue", "2:4", k=2048, seed=3)
    seed = torch.tensor(987654321012345, dtype=torch.int64)
    u = hash_uniforms(seed, len(a), 1)
    ref = METHODS["mvue"].sample(a, pat.n, u)
    out = fused_sample_seeded(a, seed, "mvue", pat.n)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    x = torch.randn(64, 64)
    assert torch.equal(prune(x, "mvue", "2:4", generator=g1, backend="fused"),
                       prune(x, "mvue", "2:4", generator=g2, backend="fused"))


def test_hash_uniforms_are_uniform():
    """Mean 1/2 and variance 1/12 within 5 standard errors, no duplicate-heavy output, in [0, 1)."""
    from nmgrad_cli.kernels.cpu_fused import hash_uniforms

    n = 1 << 18
    u = hash_uniforms(torch.tensor(42, dtype=torch.int64), n, 1).double().flatten()
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / n**0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180) ** 0.5 / n**0.5  # sd of (u-1/2)^2 is sqrt(1/180)
    # consecutive counters are not correlated
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 5 / n**0.5
    hist = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = n / 64
    chi2 = (((hist - expected) ** 2) / expected).sum().item()
    assert chi2 < 63 + 5 * (2 * 63) ** 0.5
