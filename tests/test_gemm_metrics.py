"""Exact GEMM-level bias and variance (metrics.gemm_moments) and the second-order inclusion
probabilities they are built from (``joint_marginals`` of every registered method).

The bounds are a few Monte-Carlo standard errors, computed from the draws themselves: a method whose
joint probabilities ignored in-block correlations (e.g. pi_ij = p_i p_j) is off by tens of them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nmgrad_cli import METHODS, prune
from nmgrad_cli.methods import is_defined
from nmgrad_cli.metrics import gemm_moments
from nmgrad_cli.patterns import parse_pattern

PATTERNS = ["1:2", "2:4", "1:4", "2:8", "3:8"]


def defined_cases(patterns):
    """Every (registered method, pattern) the method is defined for: the registry decides."""
    return [(m, p) for p in patterns for m in METHODS if is_defined(m, p)]


def blocks(m: int, seed: int = 0) -> torch.Tensor:
    """Adversarial blocks: ordinary, one dominant element, exactly N non-zeros, a zero block, ties."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(8, m, generator=gen, dtype=torch.float64)
    a[1, 0] = 40.0
    a[2, : m // 2] = 0.0
    a[3] = 0.0
    a[4] = 1.0
    return a


@pytest.mark.parametrize(("method", "pattern"), defined_cases(PATTERNS))
def test_joint_marginals_match_the_co_inclusion_frequencies(method, pattern):
    meth, pat = METHODS[method], parse_pattern(pattern)
    a = blocks(pat.m)
    pi = meth.joint_marginals(a, pat.n)
    p, _ = meth.marginals(a, pat.n)
    assert pi.shape == (len(a), pat.m, pat.m)
    assert torch.allclose(pi, pi.transpose(-1, -2), atol=1e-12)
    assert torch.allclose(torch.diagonal(pi, dim1=-2, dim2=-1), p, atol=1e-12)
    assert bool((pi >= -1e-12).all() and (pi <= 1 + 1e-12).all())
    draws = 20000
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(draws * len(a), meth.n_uniforms(pat), generator=gen, dtype=torch.float64)
    kept = (meth.sample(a.repeat(draws, 1), pat.n, u) != 0).double().view(draws, len(a), pat.m)
    freq = torch.einsum("ski,skj->kij", kept, kept) / draws
    nz = (a != 0).double()
    seen = nz[:, :, None] * nz[:, None, :]  # a zero is never observed as kept
    se = torch.sqrt(pi * (1 - pi) / draws).clamp_min(1 / draws)
    z = ((freq - pi).abs() / se * seen).max().item()
    assert z < 5.5, z


def _mm(a, b):
    """a @ b; a 3-D b (G, L, I) is a grouped GEMM: row group j of a times b[j] (gemm_moments' rule)."""
    if b.dim() == 2:
        return a @ b
    rows = a.shape[0] // b.shape[0]
    return torch.cat([a[j * rows : (j + 1) * rows] @ b[j] for j in range(b.shape[0])])


def _mc_gemm(a, b, method, pattern, draws, seed=2):
    """Monte-Carlo E||(a^ - a) b||^2 and E||(a^ - E a^) b||^2 (with the exact E a^), with their se."""
    from nmgrad_cli.prune import marginals

    p, v = marginals(a, method, pattern, -1, dtype=torch.float64)
    mean = p * v
    gen = torch.Generator().manual_seed(seed)
    err, var = [], []
    for _ in range(draws):
        est = prune(a, method, pattern, -1, gen, backend="reference").double()
        err.append(float(_mm(est - a, b).pow(2).sum()))
        var.append(float(_mm(est - mean, b).pow(2).sum()))
    e, w = torch.tensor(err, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)
    return e.mean().item(), e.std().item() / math.sqrt(draws), w.mean().item(), w.std().item() / math.sqrt(draws)


def _check(a, b, method, pattern, draws=600):
    exact = gemm_moments(a, b, method, pattern)
    mse, mse_se, var, var_se = _mc_gemm(a, b, method, pattern, draws)
    assert exact.norm2 == pytest.approx(float(_mm(a, b).pow(2).sum()), rel=1e-12)
    if METHODS[method].unbiased:
        assert exact.bias_abs <= 1e-20 * exact.norm2 + 1e-300
        assert abs(var - exact.var_abs) <= 4 * var_se + 1e-12 * exact.var_abs, (method, pattern, var, exact)
        assert var_se < 0.1 * exact.var_abs  # the bound is tight enough to catch a wrong covariance
    else:  # greedy: deterministic, all error is bias
        assert exact.var_abs == pytest.approx(0.0, abs=1e-12 * exact.norm2)
        assert exact.bias_abs == pytest.approx(mse, rel=1e-9)
    assert abs(mse - exact.mse_abs) <= 4 * mse_se + 1e-9 * exact.mse_abs


@pytest.mark.parametrize(("method", "pattern"), defined_cases(["2:4", "1:4", "3:8", "1:2"]))
def test_linear_exact_gemm_errors_agree_with_monte_carlo(method, pattern):
    """A real Linear's backward GEMMs: dX = dY W and dW = dY^T X; same-sign dY makes the in-block
    covariances large, so pi_ij = p_i p_j would fail by many standard errors."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 10).double()
    x = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    dy = (torch.rand_like(y) + 0.2) * torch.where(torch.arange(10) % 3 == 0, -1.0, 1.0).double()
    y.backward(dy)
    # the GEMMs the pruned dY feeds are the ones autograd ran
    assert torch.allclose(dy @ lin.weight.detach(), x.grad) and torch.allclose(dy.T @ x.detach(), lin.weight.grad)
    _check(dy, lin.weight.detach(), method, pattern)  # dX: blocks along F
    _check(dy.T.contiguous(), x.detach(), method, pattern)  # dW: blocks along T (T = 13: padding)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_conv2d_exact_dx_gemm_errors_agree_with_monte_carlo(method, groups, tmp_path):
    """A real Conv2d: dY (B, F, H, W) as (T, F) times the weight matrix evaluate builds, whose GEMM
    folded by col2im is exactly torch's conv2d input gradient (so it is the conv's real GEMM)."""
    from nmgrad_cli.dump import DumpReader, DumpWriter
    from nmgrad_cli.evaluate.gemm import _conv_weight_matrix

    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    dy = torch.randn(2, 8, 5, 5, dtype=torch.float64).abs()
    path = tmp_path / "c.h5"
    with DumpWriter(path) as w:
        w.add_layer("c", "Conv2d", 1, [0, 2, 3], tuple(conv.weight.shape))
        w.write("c", "grad", 0, 0, dy)
        w.write("c", "input", 0, 0, x)
        w.write("c", "weight", 0, 0, conv.weight.detach())
    with DumpReader(path) as r:
        (rec,) = list(r.records("grad"))
        wm = _conv_weight_matrix(r.load("c", "weight", rec.name), 8, r, rec)
    assert wm.shape == (8, 4 * 9)
    g2 = dy.permute(0, 2, 3, 1).reshape(-1, 8)  # (T = B*H*W, F)
    cols = (g2 @ wm).reshape(2, 25, -1).transpose(1, 2)  # (B, C_in*kh*kw, L)
    dx = nn.functional.fold(cols, (5, 5), 3, padding=1)
    want = torch.nn.grad.conv2d_input(x.shape, conv.weight.detach(), dy, padding=1, groups=groups)
    assert torch.allclose(dx, want, atol=1e-10)
    _check(g2, wm, method, "2:4", draws=400)


def test_huge_values_do_not_overflow():
    a = torch.tensor([[3e200, 1e200, 0.0, 2e199]], dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, 1.0], [0.25, -2.0]], dtype=torch.float64) * 1e150
    rel = gemm_moments(a, b, "mvue", "2:4").relative()
    small = gemm_moments(a / 1e200, b / 1e150, "mvue", "2:4").relative()
    for k in ("mse", "bias", "variance"):
        assert math.isfinite(rel[k]) and rel[k] == pytest.approx(small[k], rel=1e-9, abs=1e-15)
    assert rel["variance"] > 0.01


@pytest.mark.parametrize(
    "conv",
    [
        {"stride": 1, "padding": 1, "dilation": 1, "groups": 1},
        {"stride": [2, 1], "padding": [0, 2], "dilation": [1, 2], "groups": 1},
        {"stride": 1, "padding": "same", "dilation": 2, "groups": 1},
        {"stride": 2, "padding": "valid", "dilation": 1, "groups": 1},
    ],
)
def test_conv2d_dw_operands_are_torchs_weight_gradient(conv):
    """dY^T (F, T) @ the unfolded input evaluate builds (T, C_in*kh*kw) is exactly torch's conv2d
    weight gradient, for strides, paddings (ints, pairs, 'same', 'valid') and dilations."""
    from nmgrad_cli.evaluate.gemm import conv_input_matrix

    torch.manual_seed(4)
    layer = nn.Conv2d(3, 5, (3, 2), stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"])
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    y = layer.double()(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    xu = conv_input_matrix(x, conv, tuple(layer.weight.shape), dy.shape)
    g2 = dy.permute(0, 2, 3, 1).reshape(-1, 5)  # dY as (T, F): evaluate's as_matrix
    assert torch.allclose((g2.T @ xu).reshape(layer.weight.shape), layer.weight.grad, atol=1e-10)


def test_conv2d_dw_operands_refuse_what_they_cannot_build():
    from nmgrad_cli.evaluate.gemm import conv_input_matrix

    x, dy = torch.randn(2, 4, 6, 6), torch.Size((2, 8, 6, 6))
    assert "recapture" in conv_input_matrix(x, None, (8, 4, 3, 3), dy)
    grouped = {"stride": 1, "padding": 1, "dilation": 1, "groups": 2}
    assert "groups=2 does not fit an input with 4 channels" in conv_input_matrix(x, grouped, (8, 4, 3, 3), dy)
    plain = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    assert "does not match" in conv_input_matrix(x, plain, (8, 4, 3, 3), dy)  # 4x4 outputs, not 6x6


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_conv2d_exact_dw_gemm_errors_agree_with_monte_carlo(method, groups):
    """dW of a Conv2d, grouped too: the exact moments (summed over the groups) against Monte Carlo
    of the whole dW, tight enough to catch a group's missing or doubled term."""
    torch.manual_seed(5)
    from nmgrad_cli.evaluate.gemm import conv_input_matrix

    conv = {"stride": 1, "padding": 1, "dilation": 1, "groups": groups}
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    dy = torch.randn(2, 6, 4, 4, dtype=torch.float64).abs()
    xu = conv_input_matrix(x, conv, (6, 4 // groups, 3, 3), dy.shape)
    g2 = dy.permute(0, 2, 3, 1).reshape(-1, 6)
    _check(g2.T.contiguous(), xu, method, "2:4", draws=400)  # blocks along the 32 tokens


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv2d_dw_operands_are_torchs_weight_gradient(groups):
    """Feature group j of dY^T times group j of the unfolded input (the 3-D operand), stacked, is
    exactly torch's weight gradient of a grouped conv (depthwise included: groups = C_in = 4)."""
    from nmgrad_cli.evaluate.gemm import GemmError, conv_input_matrix

    torch.manual_seed(6)
    conv = {"stride": [1, 2], "padding": 1, "dilation": 1, "groups": groups}
    layer = nn.Conv2d(4, 8, 3, stride=(1, 2), padding=1, groups=groups).double()
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    xu = conv_input_matrix(x, conv, tuple(layer.weight.shape), dy.shape)
    assert xu.shape == (groups, 2 * y.shape[2] * y.shape[3], 4 // groups * 9)
    g2 = dy.permute(0, 2, 3, 1).reshape(-1, 8)
    got = GemmError(g2, xu, "tokens")._gemm(g2)  # what the Monte-Carlo cross-check multiplies
    assert torch.allclose(got.reshape(layer.weight.shape), layer.weight.grad, atol=1e-10)
    rows = 8 // groups  # and gemm_moments' split: row group j of dY^T times xu[j]
    parts = torch.cat([g2.T[j * rows : (j + 1) * rows] @ xu[j] for j in range(groups)])
    assert torch.allclose(parts, got, atol=1e-12)
