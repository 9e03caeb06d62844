"""GEMM sites: the one interception shared by capture and train, for every site kind.

Kinds: nn.Linear, a custom module's F.linear, x @ W, addmm as in HF's Conv1D (W (I, F)), the q/k/v
row blocks of MultiheadAttention's packed in_proj_weight and its out_proj, Conv1d/2d/3d. For each:
capture's dY (with X and W) reproduces autograd's weight gradient exactly; train's greedy gradients
equal the reference pruning of that dY, GEMM by GEMM; mvue's are unbiased (mean of many draws
within a few standard errors of the dense gradient); greedy changes the gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmgrad_cli.capture import SiteRecorder
from nmgrad_cli.prune import prune
from nmgrad_cli.sites import ParamIndex, SiteMode, site_report
from nmgrad_cli.train.config import SparseGradConfig
from nmgrad_cli.train.sparse_grad import SparseGradSites

TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class CustomLinear(nn.Module):
    """A module nobody hooks: its own weight through F.linear, then x @ W with W (I, F)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6) / 3)  # (F, I)
        self.v = nn.Parameter(torch.randn(8, 4) / 3)  # (I, F)

    def forward(self, x):  # (T, 6)
        return torch.tanh(F.linear(x, self.w)) @ self.v  # (T, 4)


class AddmmConv1D(nn.Module):
    """HF's Conv1D as its docs define it: y = x @ W + b with W (I, F), through torch.addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf) / 10)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):  # (B, L, E)
        return self.attn(x, x, x, need_weights=False)[0]


def _kinds():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    hf = nn.Sequential(AddmmConv1D(6, 8), nn.Tanh(), AddmmConv1D(8, 4))
    return {
        # name: (model, input, the sites of interest)
        "linear": (mlp, torch.randn(8, 6), ["0", "2"]),
        "custom": (CustomLinear(), torch.randn(8, 6), ["w", "v"]),
        "conv1D": (hf, torch.randn(2, 4, 6), ["0", "2"]),
        "mha": (Attention(), torch.randn(2, 4, 8), [f"attn.in_proj.{p}" for p in "qkv"] + ["attn.out_proj"]),
        "conv1d": (nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Conv1d(4, 4, 3, padding=1)),
                   torch.randn(2, 3, 10), ["0", "2"]),
        "conv2d": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding="same")),
                   torch.randn(2, 3, 4, 4), ["0", "2"]),
        "conv3d": (nn.Sequential(nn.Conv3d(2, 4, 3), nn.Tanh(), nn.Conv3d(4, 4, 1)),
                   torch.randn(2, 2, 4, 4, 3), ["0", "2"]),
    }


KINDS = _kinds()


def run(model, x, handler=None):
    """(parameter grads, input grad, report) of one backward of sum(R * model(x)) through the sites."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    index = ParamIndex(model)
    with SiteMode(index, handler) as mode:
        out = model(x)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a fixed, uneven loss weighting
    (out * weights).sum().backward()
    selected = list(handler.selected.values()) if handler is not None else list(mode.sites.values())
    report = site_report(index, mode, selected, None)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad.clone(), report


def record(model, x):
    got = {}
    rec = SiteRecorder(None, TYPES, lambda site, kind, call, t: got.__setitem__((site.name, kind), t), True)
    rec.start_step()
    grads, _, report = run(model, x, rec)
    return got, grads, {s.name: s for s in report.selected}


def site_grad(site, grads):
    """The site's weight gradient in its canonical layout ((F, I) for linear-like sites)."""
    g = grads[site.param]
    return g if site.is_conv else site.weight_fi(g)


def conv_of(model, site):
    m = model.get_submodule(site.param.rpartition(".")[0])
    pad = m.padding if not isinstance(m.padding, str) else tuple(k // 2 for k in m.kernel_size)
    return {"stride": m.stride, "padding": pad, "dilation": m.dilation, "groups": m.groups}


_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def weight_gemm(site, model, dy, x, method=None):
    """dW = prune_T(dY)^T X by hand (reference pruning along tokens; None: dense)."""
    if not site.is_conv:
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        if method:
            dy2 = prune(dy2, method, "1:2", dim=0, backend="reference")
        return dy2.t() @ x2
    nd = dy.dim() - 2
    if method:
        swap = (1, 0, *range(2, dy.dim()))
        t = prune(dy.permute(swap).reshape(dy.shape[1], -1), method, "1:2", dim=1, backend="reference")
        dy = t.reshape(dy.shape[1], dy.shape[0], *dy.shape[2:]).permute(swap)
    w = site_grad(site, {site.param: model.get_parameter(site.param)})
    return _WEIGHT[nd](x, w.shape, dy, **conv_of(model, site))


@pytest.mark.parametrize("kind", list(KINDS))
def test_capture_records_every_site_exactly(kind):
    model, x, names = KINDS[kind]
    got, grads, sites = record(model, x)
    assert list(sites) == names
    for name in names:
        site = sites[name]
        dy, xin, w = got[(name, "grad")], got[(name, "input")], got[(name, "weight")]
        assert torch.equal(w, site_grad(site, dict(model.named_parameters())).detach())
        # the recorded (dY, X) give autograd's weight gradient: dW = dY^T X in the site's layout
        torch.testing.assert_close(weight_gemm(site, model, dy, xin), site_grad(site, grads), rtol=1e-5, atol=1e-6)


def test_capture_dy_of_a_conv1D_is_autograd_s():
    model, x, _ = KINDS["conv1D"]
    got, _, _ = record(model, x)
    outs = []
    h = model[0].register_forward_hook(lambda _m, _i, y: outs.append(y))
    y = model(x)
    h.remove()
    (ref,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum(), outs)
    assert torch.equal(got[("0", "grad")], ref.reshape(-1, ref.shape[-1]))  # Conv1D's GEMM is on (T, I)


def sparse(method: str, layers="*", seed=0):
    return SparseGradSites(SparseGradConfig(method, "1:2", seed=seed, backend="reference"), layers)


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_greedy_is_the_reference_pruning_of_each_site(kind):
    model, x, names = KINDS[kind]
    got, dense, sites = record(model, x)
    for name in names:  # one site pruned at a time: its dY is the dense one
        grads, _, _ = run(model, x, sparse("greedy", name))
        want = weight_gemm(sites[name], model, got[(name, "grad")], got[(name, "input")], "greedy")
        torch.testing.assert_close(site_grad(sites[name], grads), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(site_grad(sites[name], grads), site_grad(sites[name], dense))  # greedy changes it
    # dX of the first site: prune_F(dY) W, the gradient reaching the model's input
    first = sites[names[0]]
    if kind in ("linear", "custom", "conv1D"):
        _, dx, _ = run(model, x, sparse("greedy", first.name))
        dy = got[(first.name, "grad")]
        w = got[(first.name, "weight")]
        want = prune(dy.reshape(-1, dy.shape[-1]), "greedy", "1:2", dim=-1, backend="reference") @ w
        torch.testing.assert_close(dx, want.reshape(x.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_mvue_is_unbiased_for_each_site(kind):
    model, x, names = KINDS[kind]
    dense, dx_dense, _ = run(model, x)
    handler = sparse("mvue", seed=1)
    draws = 300
    sums = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in (dense | {"x": dx_dense}).items()}
    squares = {n: torch.zeros_like(g) for n, g in sums.items()}
    for _ in range(draws):
        grads, dx, report = run(model, x, handler)
        for n, g in (grads | {"x": dx}).items():
            sums[n] += g
            squares[n] += g * g
    assert [s.name for s in report.selected] == names
    for n, ref in (dense | {"x": dx_dense}).items():
        mean = sums[n] / draws
        se = (squares[n] / draws - mean**2).clamp_min(0).sqrt() / math.sqrt(draws)
        # 5 standard errors per element (the bound a biased estimator fails), plus float rounding
        ok = (mean - ref).abs() <= 5 * se + 1e-5 * (1 + ref.abs())
        assert ok.all(), (kind, n, ((mean - ref).abs() / (se + 1e-12)).max())
    some = {s.param for s in report.selected}
    assert any(not torch.equal(sums[p] / draws, dense[p]) for p in some)  # mvue did prune


def test_mha_matches_torch_function_with_masks_and_cross_attention():
    torch.manual_seed(3)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.tensor([[0, 0, 0, 1, 1]] * 3).bool()
    cases = [
        (nn.MultiheadAttention(8, 2), dict(attn_mask=causal, is_causal=True)),
        (nn.MultiheadAttention(8, 2, batch_first=True), dict(key_padding_mask=padding)),
        (nn.MultiheadAttention(8, 4, kdim=6, vdim=5), dict(need_weights=True, average_attn_weights=False)),
    ]
    for mha, kw in cases:
        cross = mha.kdim != mha.embed_dim
        shape = (3, 5, 8) if mha.batch_first else (5, 3, 8)
        q = torch.randn(shape)
        k = torch.randn(5, 3, 6) if cross else q
        v = torch.randn(5, 3, 5) if cross else q
        out = []
        for use_sites in (False, True):
            mha.zero_grad()
            index = ParamIndex(mha)
            with SiteMode(index) if use_sites else torch.enable_grad() as mode:
                y, w = mha(q, k, v, **kw)
            y.square().sum().backward()
            out.append((y, w, {n: p.grad.clone() for n, p in mha.named_parameters()}, mode))
        (y0, w0, g0, _), (y1, w1, g1, mode) = out
        torch.testing.assert_close(y1, y0)
        assert (w0 is None) == (w1 is None) and (w0 is None or torch.allclose(w1, w0, atol=1e-6))
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
        want = [f"{p}_proj" for p in "qkv"] if cross else [f"in_proj.{p}" for p in "qkv"]
        assert list(mode.sites) == [*want, "out_proj"]


def test_unbatched_and_bias_k_attention():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2)
    q = torch.randn(5, 8)
    y0 = mha(q, q, q)[0]
    with SiteMode(ParamIndex(mha)) as mode:
        y1 = mha(q, q, q)[0]
    torch.testing.assert_close(y1, y0)
    assert "out_proj" in mode.sites
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)  # runs as torch's function: reported
    index = ParamIndex(mha)
    with SiteMode(index) as mode:
        y = mha(q, q, q)[0]
    y.sum().backward()
    assert mode.sites == {}
    with pytest.raises(Exception, match="made no linear or convolution GEMM"):
        site_report(index, mode, [], None)
    assert "bias_k" in mode.not_intercepted["in_proj_weight"]


def test_tied_weight_is_named_by_its_gemm_module():
    emb = nn.Embedding(11, 8)
    head = nn.Linear(8, 11, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"wte": emb, "lm_head": head})
    index = ParamIndex(model)
    assert index.name(emb.weight) == "lm_head.weight" and list(index.unique()) == ["lm_head.weight"]


def test_weight_pattern_masks_every_site_kind_in_the_forward():
    torch.manual_seed(5)
    model, x, names = nn.Sequential(AddmmConv1D(8, 8), nn.Tanh(), AddmmConv1D(8, 4)), torch.randn(2, 4, 8), ["0", "2"]
    handler = SparseGradSites(SparseGradConfig("mvue", "2:4", weight_pattern="2:4", backend="reference"), "*")
    grads, _, _ = run(model, x, handler)
    for name in names:
        site = handler.selected[name]
        w = site.weight_fi(model.get_parameter(site.param)).detach()
        mask = handler._masks[name]
        assert mask.shape == w.shape == (model.get_submodule(name).nf, w.shape[1])
        assert ((mask.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    with torch.no_grad(), SiteMode(ParamIndex(model), handler):  # evaluation uses the masked weights too
        y = model(x)
    w0, w2 = (model[i].weight.t() * handler._masks[str(i)] for i in (0, 2))
    ref = F.linear(torch.tanh(F.linear(x, w0, model[0].bias)), w2, model[2].bias)
    torch.testing.assert_close(y, ref)


def test_bf16_autocast_runs_the_site_gemms_in_bf16():
    """Under autocast a site's sparse-gradient GEMMs take bf16 operands, like autocast's own linear:
    dW of the last Conv1D is greedy's pruning of the bf16 dY times the bf16 X, cast back to float32."""
    model, x, _ = KINDS["conv1D"]
    got = {}
    rec = SiteRecorder("2", TYPES, lambda site, kind, call, t: got.__setitem__(kind, t), True)
    rec.start_step()
    with SiteMode(ParamIndex(model), rec), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()
    assert got["grad"].dtype == got["input"].dtype == torch.bfloat16
    model.zero_grad(set_to_none=True)
    with SiteMode(ParamIndex(model), sparse("greedy", "2")), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    want = prune(got["grad"], "greedy", "1:2", dim=0, backend="reference").t() @ got["input"]  # (F, I) in bf16
    assert model[2].weight.grad.dtype == torch.float32
    torch.testing.assert_close(model[2].weight.grad, want.float().t())
