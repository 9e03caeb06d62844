"""Pruning methods: hand-computed blocks, the N:M invariant, exact laws, unbiasedness, variance."""

from __future__ import annotations

import math

import pytest
import torch

from nmgrad_cli import METHODS, marginals, prune
from nmgrad_cli.errors import MethodError, PatternError
from nmgrad_cli.methods import is_defined
from nmgrad_cli.methods.mvue import water_fill
from nmgrad_cli.patterns import parse_pattern

ALL = list(METHODS)
UNBIASED = [m for m in ALL if METHODS[m].unbiased]




def draw(block, method, pattern, u):
    """One draw of a single block with the given uniforms."""
    x = torch.tensor([block], dtype=torch.float64)
    return prune(x, method, pattern, uniforms=torch.tensor([u], dtype=torch.float64))[0].tolist()


def law(block, method, pattern):
    p, v = marginals(torch.tensor([block], dtype=torch.float64), method, pattern)
    return p[0].tolist(), v[0].tolist()


# --- tier 1: tiny hand-computed blocks -------------------------------------------------------


def test_greedy_keeps_largest_and_breaks_ties_by_index():
    assert draw([1.0, -3.0, 2.0, 0.5], "greedy", "2:4", []) == [0.0, -3.0, 2.0, 0.0]
    assert draw([1.0, 1.0, 1.0, 1.0], "greedy", "2:4", []) == [1.0, 1.0, 0.0, 0.0]
    assert draw([0.0, -2.0, 0.0, 0.0, 5.0, 1.0, 1.0, 3.0], "greedy", "3:8", []) == [0, -2, 0, 0, 5, 0, 0, 3]


def test_random_keeps_smallest_keys_scaled_by_m_over_n():
    assert draw([1.0, 2.0, 3.0, 4.0], "random", "2:4", [0.9, 0.1, 0.5, 0.3]) == [0.0, 4.0, 0.0, 8.0]
    p, v = law([1.0, 2.0, 3.0, -4.0], "random", "1:4")
    assert p == [0.25] * 4 and v == [4.0, 8.0, 12.0, -16.0]


def test_mvue_1_2_closed_form():
    p, v = law([1.0, -3.0], "mvue", "1:2")
    assert p == [0.25, 0.75] and v == [4.0, -4.0]
    assert draw([1.0, -3.0], "mvue", "1:2", [0.1]) == [4.0, 0.0]
    assert draw([1.0, -3.0], "mvue", "1:2", [0.3]) == [0.0, -4.0]


def test_mvue_2_4_balanced_case():
    # |a4| = 4 <= 1 + 2 + 3: p_i = 2|a_i|/S, kept value sign(a_i) S/2
    p, v = law([1.0, -2.0, 3.0, 4.0], "mvue", "2:4")
    assert p == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert v == pytest.approx([5.0, -5.0, 5.0, 5.0])
    # C = [.2, .6, 1.2, 2.0]; u = .5 hits .5 (element 2) and 1.5 (element 4)
    assert draw([1.0, -2.0, 3.0, 4.0], "mvue", "2:4", [0.5]) == pytest.approx([0.0, -5.0, 0.0, 5.0])


def test_mvue_2_4_dominant_element_kept_exactly():
    # |a4| = 10 > 1 + 1 + 2: a4 kept as is, one of the rest with prob |a_i|/R, value sign(a_i) R
    p, v = law([1.0, -1.0, 2.0, 10.0], "mvue", "2:4")
    assert p == pytest.approx([0.25, 0.25, 0.5, 1.0])
    assert v == pytest.approx([4.0, -4.0, 4.0, 10.0])
    for u in (0.0, 0.3, 0.6, 0.99):
        out = draw([1.0, -1.0, 2.0, 10.0], "mvue", "2:4", [u])
        assert out[3] == 10.0 and sum(o != 0 for o in out) == 2


def test_mvue_keeps_sparse_blocks_exactly():
    for block in ([0.0, 5.0, 0.0, -2.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]):
        for method in ("mvue", "approx-mvue"):
            for u in (0.0, 0.5, 0.999):
                us = [u] if method == "mvue" else [u, (u + 0.37) % 1.0]
                assert draw(block, method, "2:4", us) == block


def test_water_fill_general_n_m():
    # 3:8 with two large elements: both saturate, lam from the remaining mass
    mag = torch.tensor([[10.0, 9.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    p = water_fill(mag, 3)
    assert p[0].tolist() == pytest.approx([1.0, 1.0, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0])
    assert p.sum().item() == pytest.approx(3.0)


def test_approx_mvue_inclusion_probability_formula():
    a = [1.0, 2.0, 3.0, 4.0]
    s = sum(a)
    t = [x / s for x in a]
    expect = [t[i] + a[i] * sum(t[j] / (s - a[j]) for j in range(4) if j != i) for i in range(4)]
    p, v = law(a, "approx-mvue", "2:4")
    assert p == pytest.approx(expect) and sum(p) == pytest.approx(2.0)
    assert v == pytest.approx([a[i] / expect[i] for i in range(4)])


def test_approx_mvue_n1_equals_mvue():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pa, va = marginals(x, "approx-mvue", "1:8")
    pm, vm = marginals(x, "mvue", "1:8")
    torch.testing.assert_close(pa, pm)
    torch.testing.assert_close(va, vm)


def test_mvue12_is_mvue_1_2_on_pairs():
    p, v = law([1.0, 3.0, -2.0, 2.0], "mvue12", "2:4")
    assert p == pytest.approx([0.25, 0.75, 0.5, 0.5]) and v == pytest.approx([4.0, 4.0, -4.0, 4.0])
    assert draw([1.0, 3.0, -2.0, 2.0], "mvue12", "2:4", [0.1, 0.7]) == pytest.approx([4.0, 0.0, 0.0, 4.0])


@pytest.mark.parametrize("method", ALL)
def test_zero_blocks_give_zeros_never_nan(method):
    x = torch.zeros(3, 8)
    x[1, :4] = torch.tensor([0.0, 1e-30, 0.0, 0.0])
    out = prune(x, method, "2:4", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    p, v = marginals(x, method, "2:4")
    assert torch.isfinite(p).all() and torch.isfinite(v).all()


# --- tier 2: the N:M invariant over many patterns, dims, dtypes, odd shapes -------------------

PATTERNS = ["1:2", "2:4", "1:4", "3:4", "2:8", "4:8", "3:8", "1:16", "8:16", "5:16"]


@pytest.mark.parametrize("method, pattern", [(m, p) for m in ALL for p in PATTERNS if is_defined(m, p)])
def test_n_m_invariant_many_patterns(method, pattern, gen):
    pat = parse_pattern(pattern)
    x = torch.randn(7, 3 * pat.m + 1, generator=gen)  # odd length: last block padded
    x[0, : pat.m] = 0.0  # a zero block
    x[1, :2] = 0.0  # a block with ties at zero
    out = prune(x, method, pattern, generator=gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(out, (0, (-out.shape[1]) % pat.m))
    nnz = (padded.reshape(7, -1, pat.m) != 0).sum(-1)
    assert nnz.max().item() <= pat.n
    # unbiased methods put x/p on kept elements; greedy keeps them unchanged
    p, v = marginals(x, method, pattern)
    kept = out != 0
    torch.testing.assert_close(out[kept], v[kept].to(out.dtype))
    assert (p[kept] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("method", ALL)
def test_invariant_dims_dtypes_odd_shapes(method, dim, dtype, gen):
    x = (torch.randn(6, 5, 9, generator=gen) * 3).to(dtype)
    out = prune(x, method, "2:4", dim=dim, generator=gen)
    assert out.shape == x.shape and out.dtype == dtype
    moved = out.movedim(dim, -1)
    moved = torch.nn.functional.pad(moved.float(), (0, (-moved.shape[-1]) % 4))
    assert ((moved.reshape(-1, 4) != 0).sum(-1) <= 2).all()
    # the same draw on float32 input gives the same result rounded to dtype (computed in float32)
    u_gen = torch.Generator().manual_seed(7)
    a = prune(x, method, "2:4", dim=dim, generator=u_gen)
    u_gen.manual_seed(7)
    b = prune(x.to(torch.float64 if dtype == torch.float64 else torch.float32), method, "2:4", dim=dim, generator=u_gen)
    torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)


def test_generator_makes_draws_reproducible(gen):
    x = torch.randn(64, 64, generator=gen)
    a = prune(x, "mvue", "2:4", generator=torch.Generator().manual_seed(3))
    b = prune(x, "mvue", "2:4", generator=torch.Generator().manual_seed(3))
    c = prune(x, "mvue", "2:4", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "spec, fragment",
    [("2-4", "malformed"), ("3:2", "1 <= N < M"), ("4:4", "1 <= N < M"), ("0:4", "1 <= N < M"), ("2:", "malformed"),
     ("2:128", "at most"), ("a:b", "malformed")],
)
def test_bad_patterns_say_what_a_valid_one_is(spec, fragment):
    with pytest.raises(PatternError, match=fragment) as info:
        prune(torch.ones(8), "mvue", spec)
    assert "2:4" in str(info.value)


def test_undefined_patterns_and_unknown_method():
    with pytest.raises(PatternError, match="N = 1 or 2"):
        prune(torch.ones(8), "approx-mvue", "3:8")
    with pytest.raises(PatternError, match="M = 2N"):
        prune(torch.ones(8), "mvue12", "2:8")
    with pytest.raises(MethodError, match="choose one of greedy, random, mvue"):
        prune(torch.ones(8), "topk", "2:4")


# --- tier 3: exact laws by quadrature over the uniforms --------------------------------------
# A draw is a deterministic function of its uniforms, so E over u is an integral: on a midpoint
# grid of G points every keep-indicator (a union of <= 2 intervals in u) has its measure right
# to within 2/G. This checks the sampler against the stated marginals with no randomness at all.

HARD_BLOCKS = [
    [1.0, -2.0, 3.0, 4.0],  # balanced
    [1.0, -1.0, 2.0, 10.0],  # one element dominates
    [3.0, 3.0, 3.0, 3.0],  # ties
    [0.0, 0.0, 1.0, -1.0],  # zeros, exactly N non-zeros
    [0.0, 2.0, 0.0, 0.0],  # fewer than N non-zeros
    [-5.0, 1.0, 2.0, 2.0],  # dominant at the boundary |a4| = R
    [1e-6, 1.0, 1e3, 2.0],  # wide dynamic range, dominant
    [0.5, 0.0, 0.25, 0.25],  # boundary again with a zero
]


@pytest.mark.parametrize("block", HARD_BLOCKS)
@pytest.mark.parametrize("method", ["mvue", "mvue12"])
def test_one_uniform_methods_sample_their_marginals_exactly(method, block):
    g = 20000
    grid = (torch.arange(g, dtype=torch.float64) + 0.5) / g
    n_u = METHODS[method].n_uniforms(parse_pattern("2:4"))
    x = torch.tensor([block], dtype=torch.float64).expand(g, 4)
    if n_u == 1:
        u = grid[:, None]
    else:  # mvue12: the two pairs use independent uniforms; a shifted grid covers both
        u = torch.stack([grid, (grid * 7919) % 1.0], -1)
    out = prune(x, method, "2:4", uniforms=u)
    p, v = law(block, method, "2:4")
    freq = (out != 0).double().mean(0)
    for i in range(4):
        assert abs(freq[i].item() - p[i]) <= 4.0 / g + 1e-12 * (p[i] == 0)
    assert out.mean(0).tolist() == pytest.approx(block, abs=4.0 / g * max(map(abs, v)) + 1e-12)
    assert ((out != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("block", HARD_BLOCKS)
def test_approx_mvue_samples_its_marginals_exactly(block):
    g = 600
    grid = (torch.arange(g, dtype=torch.float64) + 0.5) / g
    u = torch.cartesian_prod(grid, grid)
    x = torch.tensor([block], dtype=torch.float64).expand(len(u), 4)
    out = prune(x, "approx-mvue", "2:4", uniforms=u)
    p, v = law(block, "approx-mvue", "2:4")
    freq = (out != 0).double().mean(0)
    for i in range(4):
        assert abs(freq[i].item() - p[i]) <= 8.0 / g
    assert out.mean(0).tolist() == pytest.approx(block, abs=8.0 / g * max(map(abs, v)) + 1e-12)


# --- tier 4: statistics with fixed seeds and bounds from the known variance ------------------


def closed_form_variance(block: list[float], method: str) -> float:
    """docs/methods.md's closed forms for one 2:4 (or 1:2) block."""
    a = sorted(abs(x) for x in block)
    if method == "random":
        return sum(x * x for x in block) * (4 / 2 - 1)
    if method == "mvue12":
        return 2 * abs(block[0]) * abs(block[1]) + 2 * abs(block[2]) * abs(block[3])
    if method == "mvue":
        if sum(x > 0 for x in a) <= 2:
            return 0.0
        s, r = sum(a), a[0] + a[1] + a[2]
        if a[3] <= r:
            return s * s / 2 - sum(x * x for x in a)
        return 2 * (a[0] * a[1] + a[0] * a[2] + a[1] * a[2])
    raise ValueError(method)


@pytest.mark.parametrize("method", ["mvue", "random", "mvue12"])
def test_exact_variance_matches_closed_forms(method, gen):
    blocks = [*HARD_BLOCKS, *torch.randn(40, 4, generator=gen).tolist(),
              *(torch.randn(20, 4, generator=gen) * torch.tensor([0.1, 0.1, 0.1, 5.0])).tolist()]
    for block in blocks:
        p, v = law(block, method, "2:4")
        var = sum(pi * vi * vi - (pi * vi) ** 2 for pi, vi in zip(p, v))
        assert var == pytest.approx(closed_form_variance(block, method), rel=1e-9, abs=1e-12), block


def test_mvue_1_2_variance_closed_form(gen):
    for a1, a2 in torch.randn(30, 2, generator=gen).tolist():
        p, v = law([a1, a2], "mvue", "1:2")
        var = sum(pi * vi * vi - (pi * vi) ** 2 for pi, vi in zip(p, v))
        assert var == pytest.approx(2 * abs(a1) * abs(a2), rel=1e-9)


def test_variance_ordering_mvue_le_approx_le_random(gen):
    """MVUE is the minimum among unbiased keep-2 estimators, block by block."""
    x = torch.randn(2000, 4, generator=gen, dtype=torch.float64) * torch.rand(2000, 4, generator=gen) ** 4
    var = {}
    for method in ("mvue", "approx-mvue", "mvue12", "random"):
        p, v = marginals(x, method, "2:4")
        var[method] = (p * v * v - (p * v) ** 2).sum(-1)
    eps = 1e-12
    assert (var["mvue"] <= var["approx-mvue"] + eps).all()
    assert (var["mvue"] <= var["mvue12"] + eps).all()
    assert (var["approx-mvue"] <= var["random"] + eps).all()
    ratio = (var["approx-mvue"].sum() / var["mvue"].sum()).item()
    assert 1.0 < ratio < 2.0  # docs/methods.md: a few % to 2x


def gradient_like(gen, rows=64, cols=64):
    """Heavy-tailed values like neural gradients, with zeros and dominant elements."""
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * torch.rand(rows, cols, generator=gen) ** 3
    x[::7, ::4] *= 50.0  # dominant elements
    x[::5, 8:12] = 0.0  # zero blocks
    x[3, 1] = 0.0
    return x


@pytest.mark.parametrize(
    "method, pattern", [(m, p) for m in UNBIASED for p in ("2:4", "1:2", "3:8") if is_defined(m, p)]
)
def test_unbiased_by_monte_carlo(method, pattern):
    """sum_i z_i^2 over elements, z_i = (mean_i - a_i)/sqrt(Var_i/S), is ~chi2(d): within 5 sd."""
    gen = torch.Generator().manual_seed(99)
    x = gradient_like(gen, 32, 48)
    samples = 400
    total = torch.zeros_like(x)
    for _ in range(samples):
        total += prune(x, method, pattern, generator=gen)
    mean = total / samples
    p, v = marginals(x, method, pattern, dtype=torch.float64)
    var = p * v * v - (p * v) ** 2
    random_elems = var > 0
    torch.testing.assert_close(mean[~random_elems], x[~random_elems])  # kept exactly or zero
    z2 = ((mean - x)[random_elems] ** 2 / (var[random_elems] / samples)).sum().item()
    d = int(random_elems.sum())
    assert abs(z2 - d) < 5 * math.sqrt(2 * d) + 0.05 * d, (z2, d)


def test_greedy_fails_the_unbiasedness_test():
    """The same statistic rejects a biased method (the test can fail)."""
    gen = torch.Generator().manual_seed(99)
    x = gradient_like(gen, 32, 48)
    p, v = marginals(x, "mvue", "2:4", dtype=torch.float64)
    var = p * v * v - (p * v) ** 2
    random_elems = var > 1e-12
    greedy = prune(x, "greedy", "2:4")
    z2 = ((greedy - x)[random_elems] ** 2 / (var[random_elems] / 400)).sum().item()
    d = int(random_elems.sum())
    assert z2 > d + 50 * math.sqrt(2 * d)


@pytest.mark.parametrize("method", ALL)
def test_monte_carlo_metrics_agree_with_exact(method):
    from nmgrad_cli.metrics import evaluate_tensor, monte_carlo

    gen = torch.Generator().manual_seed(5)
    x = gradient_like(gen, 48, 64).float()
    exact = evaluate_tensor(x, method, "2:4", samples=0)
    p, v = marginals(x, method, "2:4", dtype=torch.float64)
    mu = p * v
    samples = 300
    err, dev = [], []  # per draw: ||g^ - g||^2 and ||g^ - E g^||^2, relative to ||g||^2
    for _ in range(samples):
        est = prune(x, method, "2:4", generator=gen).double()
        err.append(((est - x.double()) ** 2).sum().item() / exact.norm2)
        dev.append(((est - mu) ** 2).sum().item() / exact.norm2)
    err_t, dev_t = torch.tensor(err, dtype=torch.float64), torch.tensor(dev, dtype=torch.float64)
    se_err = err_t.std().item() / math.sqrt(samples)
    se_dev = dev_t.std().item() / math.sqrt(samples)
    assert abs(err_t.mean().item() - exact.mse) <= 5 * se_err + 1e-9
    assert abs(dev_t.mean().item() - exact.variance) <= 5 * se_dev + 1e-9
    mc = monte_carlo(x, method, "2:4", samples=samples, generator=gen, moments=True)
    # MC mse is a mean of err: 5 se. MC variance = S/(S-1) (mean dev - ||mean - mu||^2), the second
    # term being >= 0 with mean V/S; MC bias = ||mean - g||^2 has mean bias + V/S.
    var_s = exact.variance / samples
    assert abs(mc["mse"] - exact.mse) <= 5 * se_err + 1e-9
    assert abs(mc["variance"] - exact.variance) <= 5 * se_dev + 5 * var_s + 1e-9
    assert abs(mc["bias"] - exact.bias - var_s) <= 5 * var_s + 1e-9
    assert exact.mse == pytest.approx(exact.bias + exact.variance)
    if METHODS[method].unbiased:
        assert exact.bias < 1e-12
    else:
        assert exact.bias > 0 and exact.variance == 0


@pytest.mark.parametrize("method", UNBIASED)
def test_blocks_with_at_most_n_nonzeros_have_zero_variance(method):
    """A block with <= N non-zeros is kept exactly by mvue and approx-mvue: variance exactly 0."""
    x = torch.tensor([[0.0, 0.3, 0.0, -1.7], [2.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    p, v = marginals(x, method, "2:4")
    var = p * v * v - (p * v) ** 2
    if method == "random":  # keeps by position, not by value: these blocks keep some variance
        assert var.sum() > 0
    else:  # mvue12 too: each pair has at most one non-zero here
        assert (var == 0).all() and torch.equal(p * v, x)
