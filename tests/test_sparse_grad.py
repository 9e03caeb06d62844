"""Sparse-gradient layers: exactly dense when nothing is pruned, N:M along the right axes, the same
function of the generator draws as prune + dense GEMM, unbiased dX and dW, independent draws."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmgrad_cli import METHODS, marginals, prune
from nmgrad_cli.errors import MethodError, NmgradError, PatternError
from nmgrad_cli.methods import is_defined
from nmgrad_cli.patterns import parse_pattern, to_blocks
from nmgrad_cli.train import (
    SparseGradConfig,
    SparseGradConv2d,
    SparseGradLinear,
    refresh_weight_masks_,
    sparse_grad_conv2d,
    sparse_grad_linear,
    sparsify_gradients_,
)

UNBIASED = [m for m in METHODS if METHODS[m].unbiased]




CASES = [(m, p) for m in METHODS for p in ("1:2", "2:4", "1:4", "3:8") if is_defined(m, p)]
UNBIASED_CASES = [(m, p) for m, p in CASES if m in UNBIASED and p in ("1:2", "2:4")]


def nm_ok(t: torch.Tensor, pattern: str, dim: int) -> bool:
    """At most N non-zeros in every block of M along ``dim`` (zero-padded at the end)."""
    pat = parse_pattern(pattern)
    blocks, _ = to_blocks(t, pat.m, dim)
    return bool(((blocks != 0).sum(-1) <= pat.n).all())


def linear_grads(x, w, b, dy, cfg, gen=None, mask=None):
    """(dX, dW, db) of the sparse-gradient linear for the upstream gradient dy."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = sparse_grad_linear(x, w, b, cfg, gen, mask)
    (y * dy).sum().backward()
    return x.grad, w.grad, None if b is None else b.grad


def conv_grads(x, w, b, dy, cfg, gen=None, **conv):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = sparse_grad_conv2d(x, w, b, cfg, gen, **conv)
    (y * dy).sum().backward()
    return x.grad, w.grad, None if b is None else b.grad


# --- exactly dense for a dense setting ------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SparseGradConfig("dense"), SparseGradConfig("mvue", "2:4", grad_gemms=())])
def test_dense_settings_give_the_dense_gradients(cfg, gen):
    lin = nn.Linear(12, 10)
    x = torch.randn(3, 5, 12, generator=gen, requires_grad=True)
    dy = torch.randn(3, 5, 10, generator=gen)
    (lin(x) * dy).sum().backward()
    dx, dw, db = linear_grads(x.detach(), lin.weight.detach(), lin.bias.detach(), dy, cfg)
    torch.testing.assert_close(dx, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, lin.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(db, lin.bias.grad, rtol=1e-6, atol=1e-6)

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    xc = torch.randn(2, 4, 7, 7, generator=gen, requires_grad=True)
    dyc = torch.randn(2, 6, 4, 4, generator=gen)
    (conv(xc) * dyc).sum().backward()
    dx, dw, db = conv_grads(xc.detach(), conv.weight.detach(), conv.bias.detach(), dyc, cfg, stride=2, padding=1)
    torch.testing.assert_close(dx, xc.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, conv.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, conv.bias.grad, rtol=1e-5, atol=1e-5)


def test_forward_is_the_dense_forward(gen):
    lin = nn.Linear(9, 7)
    x = torch.randn(4, 9, generator=gen)
    y = sparse_grad_linear(x, lin.weight, lin.bias, SparseGradConfig("mvue", "2:4"))
    torch.testing.assert_close(y, lin(x))


# --- pruned along the right axes -------------------------------------------------------------------


@pytest.mark.parametrize("method,pattern", CASES)
def test_linear_prunes_features_for_dx_and_tokens_for_dw(method, pattern, gen):
    # W = I and X = I make the GEMM outputs the pruned dY itself: dX = prune_F(dY), dW^T = prune_T(dY)
    t, f = 10, 10  # not multiples of 4 or 8: padded blocks
    dy = torch.randn(t, f, generator=gen)
    cfg = SparseGradConfig(method, pattern)
    dx, dw, db = linear_grads(torch.eye(t, f), torch.eye(f), torch.zeros(f), dy, cfg, gen)
    assert nm_ok(dx, pattern, dim=1) and not nm_ok(dy, pattern, dim=1)
    assert nm_ok(dw.t(), pattern, dim=0)
    assert (dx != 0).sum() < dy.numel() and (dw != 0).sum() < dy.numel()
    torch.testing.assert_close(db, dy.sum(0))  # the bias gradient is the dense reduction


@pytest.mark.parametrize("gemms", [("dx",), ("dw",)])
def test_grad_gemms_selects_which_gemm_is_pruned(gemms, gen):
    dy = torch.randn(8, 8, generator=gen)
    cfg = SparseGradConfig("mvue", "2:4", grad_gemms=gemms)
    dx, dw, _ = linear_grads(torch.eye(8), torch.eye(8), None, dy, cfg, gen)
    pruned, dense = (dx, dw.t()) if gemms == ("dx",) else (dw.t(), dx)
    assert (pruned != 0).sum() <= dy.numel() // 2
    torch.testing.assert_close(dense, dy)


@pytest.mark.parametrize("method,pattern", [("mvue", "2:4"), ("greedy", "1:2"), ("approx-mvue", "2:4")])
def test_conv_prunes_channels_for_dx_and_tokens_for_dw(method, pattern, gen):
    b, c, h, w = 2, 6, 3, 3
    tokens = b * h * w
    dy = torch.randn(b, c, h, w, generator=gen)
    cfg = SparseGradConfig(method, pattern)
    # 1x1 identity conv: dX = prune_C(dY)
    eye = torch.eye(c).reshape(c, c, 1, 1)
    dx, _, _ = conv_grads(torch.zeros(b, c, h, w), eye, None, dy, cfg, gen)
    assert nm_ok(dx, pattern, dim=1) and not nm_ok(dy, pattern, dim=1)
    # one-hot input, channel i = token i in (b, h, w) order: dW[c, i] = prune_T(dY)[token i, c]
    onehot = torch.eye(tokens).reshape(tokens, b, h, w).permute(1, 0, 2, 3)  # (B, T, H, W)
    _, dw, _ = conv_grads(onehot, torch.zeros(c, tokens, 1, 1), None, dy, cfg, gen)
    dw = dw.reshape(c, tokens)  # (C, T)
    assert nm_ok(dw, pattern, dim=1)
    assert not nm_ok(dy.permute(1, 0, 2, 3).reshape(c, tokens), pattern, dim=1)


# --- the same function of the draws as prune + dense GEMM ----------------------------------------


def test_linear_is_prune_then_dense_gemm_on_a_recorded_draw(gen):
    x, w = torch.randn(2, 6, 12, generator=gen), torch.randn(10, 12, generator=gen)
    dy = torch.randn(2, 6, 10, generator=gen)
    cfg = SparseGradConfig("mvue", "2:4")
    dx, dw, _ = linear_grads(x, w, None, dy, cfg, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)  # draws in the documented order: dX, then dW
    dy2d = dy.reshape(-1, 10)
    pf = prune(dy2d, "mvue", "2:4", dim=1, generator=replay)
    pt = prune(dy2d, "mvue", "2:4", dim=0, generator=replay)
    torch.testing.assert_close(dx, (pf @ w).reshape(x.shape))
    torch.testing.assert_close(dw, pt.t() @ x.reshape(-1, 12))


def test_conv_is_prune_then_dense_conv_grads_on_a_recorded_draw(gen):
    x, w = torch.randn(2, 3, 9, 9, generator=gen), torch.randn(8, 3, 3, 3, generator=gen)
    conv = {"stride": 2, "padding": 1, "dilation": 1, "groups": 1}
    dy = torch.randn(2, 8, 5, 5, generator=gen)
    cfg = SparseGradConfig("approx-mvue", "2:4")
    dx, dw, _ = conv_grads(x, w, None, dy, cfg, torch.Generator().manual_seed(3), **conv)
    replay = torch.Generator().manual_seed(3)
    pc = prune(dy, "approx-mvue", "2:4", dim=1, generator=replay)
    pt = prune(dy.permute(1, 0, 2, 3).reshape(8, -1), "approx-mvue", "2:4", dim=1, generator=replay)
    pt = pt.reshape(8, 2, 5, 5).permute(1, 0, 2, 3)
    torch.testing.assert_close(dx, torch.nn.grad.conv2d_input(x.shape, w, pc, **conv))
    torch.testing.assert_close(dw, torch.nn.grad.conv2d_weight(x, w.shape, pt, **conv))


# --- unbiased: mean of S draws within a few standard errors of the dense gradient -----------------

S = 3000
Z = 5.0  # with <= a few hundred elements, P(max |z| > 5) < 1e-3 for an unbiased method


def z_scores(mean: torch.Tensor, exact: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """|mean - exact| / SE; an element with zero variance must be exact (else z = inf)."""
    err = (mean - exact).abs()
    se = (var / S).sqrt()
    return torch.where(var > 0, err / se.clamp_min(1e-30), torch.where(err > 1e-4, torch.inf, 0.0))


def dx_dw_identity_draws(method, pattern, dy):
    """S independent draws of prune_F(dY) (via dX) and prune_T(dY) (via dW), in one backward each."""
    t, f = dy.shape
    gen = torch.Generator().manual_seed(11)
    cfg_x = SparseGradConfig(method, pattern, grad_gemms=("dx",))
    dx, _, _ = linear_grads(torch.zeros(S * t, f), torch.eye(f), None, dy.repeat(S, 1), cfg_x, gen)
    cfg_w = SparseGradConfig(method, pattern, grad_gemms=("dw",))
    _, dw, _ = linear_grads(torch.eye(t), torch.zeros(S * f, t), None, dy.repeat(1, S), cfg_w, gen)
    return dx.reshape(S, t, f), dw.reshape(S, f, t).transpose(1, 2)


def exact_var(dy, method, pattern, dim):
    p, v = marginals(dy.double(), method, pattern, dim=dim)
    return (p * v**2 - (p * v) ** 2).clamp_min(0).float()


@pytest.mark.parametrize("method,pattern", UNBIASED_CASES)
def test_pruned_dy_of_both_gemms_is_unbiased_with_the_exact_variance(method, pattern):
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(8, 12, generator=gen) * torch.rand(8, 12, generator=gen)  # varied magnitudes
    dy[0, :4] = torch.tensor([10.0, 0.1, 0.0, 0.2])  # one dominant element, a zero
    dx, dwt = dx_dw_identity_draws(method, pattern, dy)
    for draws, dim in ((dx, 1), (dwt, 0)):
        var = exact_var(dy, method, pattern, dim)
        z = z_scores(draws.mean(0), dy, var)
        assert z.max() < Z
        # and the spread is the exact variance: sample variance / exact within 25 %
        ok = var > 1e-3
        ratio = draws.var(0)[ok] / var[ok]
        assert 0.8 < ratio.mean() < 1.2


def test_the_unbiasedness_check_rejects_greedy():
    dy = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    dx, dwt = dx_dw_identity_draws("greedy", "2:4", dy)
    assert z_scores(dx.mean(0), dy, exact_var(dy, "greedy", "2:4", 1)).max() > Z
    assert z_scores(dwt.mean(0), dy, exact_var(dy, "greedy", "2:4", 0)).max() > Z


def gemm_draws(method, pattern, dy, x, w):
    """S draws of dX = prune_F(dY) W and of dW = prune_T(dY)^T X for general X, W."""
    t, f = dy.shape
    gen = torch.Generator().manual_seed(13)
    cfg_x = SparseGradConfig(method, pattern, grad_gemms=("dx",))
    dx, _, _ = linear_grads(x.repeat(S, 1), w, None, dy.repeat(S, 1), cfg_x, gen)
    cfg_w = SparseGradConfig(method, pattern, grad_gemms=("dw",))
    _, dw, _ = linear_grads(x, w.repeat(S, 1), None, dy.repeat(1, S), cfg_w, gen)
    return dx.reshape(S, t, -1), dw.reshape(S, f, -1)


def var_bound(sd: torch.Tensor, coef: torch.Tensor, m: int) -> torch.Tensor:
    """Upper bound of Var(sum_k g^_k coef_k) from per-element sds: blocks of m along k are independent,
    and inside a block |Cov| <= sd_i sd_j, so Var <= sum_blocks (sum_{i in block} sd_i |coef_i|)^2.

    sd (R, K), coef (K, C) -> (R, C)."""
    r, k = sd.shape
    inner = torch.einsum("rbm,bmc->rbc", sd.reshape(r, k // m, m), coef.abs().reshape(k // m, m, -1))
    return (inner**2).sum(1)


@pytest.mark.parametrize("method,pattern", [c for c in UNBIASED_CASES if c[1] == "2:4"] + [("mvue", "1:2")])
def test_dx_and_dw_are_unbiased_for_general_weights_and_inputs(method, pattern):
    m = parse_pattern(pattern).m
    gen = torch.Generator().manual_seed(17)
    t, f, i = 8, 12, 6
    dy, x, w = (torch.randn(*s, generator=gen) for s in ((t, f), (t, i), (f, i)))
    dx, dw = gemm_draws(method, pattern, dy, x, w)
    sd_f = exact_var(dy, method, pattern, 1).sqrt()  # (T, F)
    sd_t = exact_var(dy, method, pattern, 0).sqrt()
    assert z_scores(dx.mean(0), dy @ w, var_bound(sd_f, w, m)).max() < Z
    assert z_scores(dw.mean(0), dy.t() @ x, var_bound(sd_t.t(), x, m)).max() < Z
    # the same check catches greedy's bias
    gx, gw = gemm_draws("greedy", pattern, dy, x, w)
    assert z_scores(gx.mean(0), dy @ w, var_bound(sd_f, w, m)).max() > Z
    assert z_scores(gw.mean(0), dy.t() @ x, var_bound(sd_t.t(), x, m)).max() > Z


def test_conv_dx_and_dw_are_unbiased():
    b, c, h, w = 1, 8, 2, 2
    tokens = b * h * w
    gen = torch.Generator().manual_seed(19)
    dy = torch.randn(b, c, h, w, generator=gen)
    cfg_x = SparseGradConfig("mvue", "2:4", grad_gemms=("dx",))
    eye = torch.eye(c).reshape(c, c, 1, 1)
    dx, _, _ = conv_grads(torch.zeros(S * b, c, h, w), eye, None, dy.repeat(S, 1, 1, 1), cfg_x, gen)
    dx = dx.reshape(S, b, c, h, w)
    z = z_scores(dx.mean(0), dy, exact_var(dy, "mvue", "2:4", 1))
    assert z.max() < Z
    cfg_w = SparseGradConfig("mvue", "2:4", grad_gemms=("dw",))
    onehot = torch.eye(tokens).reshape(tokens, b, h, w).permute(1, 0, 2, 3)
    _, dw, _ = conv_grads(onehot, torch.zeros(S * c, tokens, 1, 1), None, dy.repeat(1, S, 1, 1), cfg_w, gen)
    dwt = dw.reshape(S, c, tokens)  # (S, C, T): draws of prune_T(dY)^T
    dy_ct = dy.permute(1, 0, 2, 3).reshape(c, tokens)
    assert z_scores(dwt.mean(0), dy_ct, exact_var(dy_ct, "mvue", "2:4", 1)).max() < Z


# --- independent draws ----------------------------------------------------------------------------


def test_dx_and_dw_prunings_are_independent_draws():
    # |dY| constant and 1:2: every element kept with p = 1/2 in both prunings. Reusing one draw
    # for both GEMMs makes some keep-indicators perfectly correlated; independent draws give ~0.
    n_draws = 400
    dy = torch.ones(4, 4)
    layer = SparseGradLinear(nn.Linear(4, 4, bias=False), SparseGradConfig("mvue", "1:2", seed=3), "l")
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
    kx, kw = [], []
    for _ in range(n_draws):
        x = torch.eye(4, requires_grad=True)
        layer.weight.grad = None
        (layer(x) * dy).sum().backward()
        kx.append(x.grad != 0)
        kw.append(layer.weight.grad.t() != 0)
    kx, kw = torch.stack(kx).float(), torch.stack(kw).float()
    assert 0.4 < kx.mean() < 0.6 and 0.4 < kw.mean() < 0.6
    cov = ((kx - kx.mean(0)) * (kw - kw.mean(0))).mean(0)
    corr = cov / (kx.std(0) * kw.std(0))
    assert corr.abs().max() < 5 / n_draws**0.5


def test_layers_are_reproducible_from_the_seed_and_differ_between_layers(gen):
    def grads(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        sparsify_gradients_(model, "mvue", "2:4", seed=seed)
        model(torch.ones(4, 8)).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    a, b, c = grads(1), grads(1), grads(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    sparsify_gradients_(model, "mvue", "2:4")
    assert model[0].seed != model[1].seed


# --- the model edit --------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.conv(x).mean((2, 3))))


def test_sparsify_swaps_matching_layers_and_keeps_parameters():
    net = Net()
    keys, params = list(net.state_dict()), {n: p for n, p in net.named_parameters()}
    names = sparsify_gradients_(net, "mvue", "2:4", layers="body.*,conv")
    assert names == ["conv", "body.0", "body.2"]
    assert isinstance(net.conv, SparseGradConv2d) and isinstance(net.body[0], SparseGradLinear)
    assert isinstance(net.head, nn.Linear) and not isinstance(net.head, SparseGradLinear)
    assert list(net.state_dict()) == keys
    assert all(p is params[n] for n, p in net.named_parameters())
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_sparsify_errors_say_what_to_do():
    with pytest.raises(NmgradError, match="no Linear or Conv2d layer matches --layers 'nothing'.*body.0"):
        sparsify_gradients_(Net(), "mvue", "2:4", layers="nothing")
    with pytest.raises(MethodError, match="unknown method 'mvu'"):
        sparsify_gradients_(Net(), "mvu", "2:4")
    with pytest.raises(PatternError, match="approx-mvue"):
        sparsify_gradients_(Net(), "approx-mvue", "3:8")
    with pytest.raises(NmgradError, match="dx, dw"):
        SparseGradConfig("mvue", "2:4", grad_gemms="dx,dy")


def test_weight_pattern_masks_the_forward_and_passes_dw_straight_through(gen):
    lin = nn.Linear(10, 6)  # 10 in-features: the last block is padded
    model = nn.Sequential(lin)
    sparsify_gradients_(model, "dense", weight_pattern="2:4", weight_every=5)
    layer = model[0]
    mask = layer.weight_mask
    assert nm_ok(lin.weight.detach() * mask, "2:4", dim=1)
    assert mask.sum() == 6 * (2 + 2 + 2)
    kept = (lin.weight.detach() * mask).abs().reshape(6, -1)
    assert kept.count_nonzero() == mask.sum()
    x = torch.randn(3, 10, generator=gen, requires_grad=True)
    y = model(x)
    torch.testing.assert_close(y, nn.functional.linear(x, lin.weight * mask, lin.bias))
    y.sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(3, 6).t() @ x.detach())  # dense, unmasked
    torch.testing.assert_close(x.grad, torch.ones(3, 6) @ (lin.weight * mask).detach())
    with torch.no_grad():
        lin.weight.mul_(1 - mask)  # the kept weights become the small ones
        lin.weight.add_(1e-3 * mask)
    assert refresh_weight_masks_(model) == 1
    assert not torch.equal(layer.weight_mask, mask)


@pytest.mark.parametrize(
    "kw", [{"padding": "same", "dilation": 2}, {"groups": 2, "stride": 2, "padding": 1}, {"padding": "valid"}]
)
def test_conv_variants_match_the_dense_conv_when_nothing_is_pruned(kw, gen):
    conv = nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(2, 4, 9, 9, generator=gen, requires_grad=True)
    y = conv(x)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()
    model = nn.Sequential(conv)
    sparsify_gradients_(model, "mvue", "2:4", grad_gemms=())
    x2 = x.detach().clone().requires_grad_(True)
    w_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    y2 = model(x2)
    torch.testing.assert_close(y2, y)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, w_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"kernel_size": 4, "padding": "same"}, {"kernel_size": 3, "padding": 1,
                                                                    "padding_mode": "reflect"}])
def test_swapped_convs_that_pad_asymmetrically_or_by_reflection_are_sparse(kw, gen):
    """The module swap is the site path: an even-kernel 'same' conv and a reflect-padded one run the
    sparse backward (greedy 1:4 keeps a quarter of dY: dX differs from dense) with dense's forward."""
    conv = nn.Conv2d(4, 4, **kw)
    x = torch.randn(2, 4, 7, 7, generator=gen, requires_grad=True)
    y = conv(x)
    y.square().sum().backward()
    model = nn.Sequential(conv)
    assert sparsify_gradients_(model, "greedy", "1:4") == ["0"]
    x2 = x.detach().clone().requires_grad_(True)
    y2 = model(x2)
    torch.testing.assert_close(y2, y)
    y2.square().sum().backward()
    assert not torch.allclose(x2.grad, x.grad)


def test_fused_backend_is_a_preference_that_falls_back(gen):
    from nmgrad_cli.backend import FUSED_TRAIN_MIN_NUMEL, resolve_backend
    from nmgrad_cli.kernels.cpu_fused import compile_available

    def chosen(pattern, numel, dtype=torch.float32):
        return resolve_backend("mvue", pattern, dtype, "cpu", numel, "fused", training=True).name

    big = FUSED_TRAIN_MIN_NUMEL
    assert chosen("3:8", big) == "reference"  # no 3:8 kernel
    assert chosen("2:4", 32) == "reference"  # too small to pay
    assert chosen("2:4", big) == ("fused" if compile_available() else "reference")
    assert chosen("2:4", big, torch.float64) == "reference"
    dy = torch.randn(6, 16, generator=gen)
    cfg = SparseGradConfig("mvue", "3:8", backend="fused")
    dx, _, _ = linear_grads(torch.zeros(6, 16), torch.eye(16), None, dy, cfg)
    assert nm_ok(dx, "3:8", dim=1)
