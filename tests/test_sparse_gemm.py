"""The backward GEMMs on pruned dY: backend choice, dense fallbacks, and (on a GPU) the 2:4 sparse
tensor-core path against a dense GEMM on the same pruned tensor."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import requires_cuda

from nmgrad_cli import backend as backend_module
from nmgrad_cli import prune, sparse_backward
from nmgrad_cli.errors import NmgradError, PatternError
from nmgrad_cli.kernels import sparse_gemm
from nmgrad_cli.methods import METHODS
from nmgrad_cli.patterns import parse_pattern


def uniforms_for(method: str, pattern: str, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    pat = parse_pattern(pattern)
    k = rows * -(-length // pat.m)
    return torch.rand(k, METHODS[method].n_uniforms(pat), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "capability, cusparselt, backend, reason",
    [
        (None, True, "dense", "no CUDA"),
        ((7, 5), True, "dense", "sm75 has no sparse tensor cores"),
        ((8, 0), False, "cutlass", None),
        ((8, 9), True, "cutlass", None),
        ((9, 0), True, "cusparselt", None),
        ((9, 0), False, "dense", "CUTLASS sparse runs only on sm8x"),
        ((10, 0), True, "cusparselt", None),
    ],
)
def test_pick_backend(capability, cusparselt, backend, reason):
    got, why = backend_module.pick_backend(capability, cusparselt)
    assert got == backend
    assert (why is None) if reason is None else (reason in why)


@pytest.mark.parametrize(
    "m, k, n, dtype, backend, pattern, expect",
    [
        (4096, 4096, 4096, torch.bfloat16, "cusparselt", "2:4", None),
        (4096, 4096, 4096, torch.float16, "cutlass", "1:2", None),
        (4096, 4096, 4096, torch.float32, "cusparselt", "2:4", "float16/bfloat16"),
        (4096, 4096, 4096, torch.bfloat16, "cusparselt", "4:8", "not 2:4-compatible"),
        (4104, 4096, 4096, torch.bfloat16, "cusparselt", "2:4", "multiple of 64"),
        (4096, 4080, 4096, torch.bfloat16, "cusparselt", "2:4", "K of 32"),  # the fused layout: K % 32
        (4096, 4096, 4100, torch.bfloat16, "cusparselt", "2:4", "columns of 8"),
        (4096, 4080, 4096, torch.bfloat16, "cutlass", "2:4", "K of 64"),
        (4096, 4064, 4096, torch.bfloat16, "cusparselt", "2:4", None),  # 4064 = 32 * 127
        (256, 256, 256, torch.bfloat16, "cusparselt", "2:4", "MIN_SPARSE_MNK"),
        (4096, 4096, 4096, torch.bfloat16, "dense", "2:4", "backend 'dense'"),
    ],
)
def test_dense_reason(m, k, n, dtype, backend, pattern, expect):
    why = backend_module.dense_reason(m, k, n, dtype, backend, pattern)
    assert (why is None) if expect is None else (expect in why)


BIG = (4096, 4096, 4096)  # aligned for both backends, above MIN_SPARSE_MNK
H100, A100, T4 = (9, 0), (8, 0), (7, 5)


@pytest.mark.parametrize(
    "capability, cusparselt, dtype, pattern, shape, asked, expect, reason",
    [
        # an explicit backend that cannot run falls back to auto's choice, saying why
        (H100, True, torch.bfloat16, "2:4", BIG, "cutlass", "cusparselt", "run only on sm8x, this GPU is sm90"),
        (H100, False, torch.bfloat16, "2:4", BIG, "cutlass", "dense", "run only on sm8x"),
        (A100, False, torch.bfloat16, "2:4", BIG, "cusparselt", "cutlass", "no cuSPARSELt"),
        (H100, False, torch.float16, "2:4", BIG, "cusparselt", "dense", "no cuSPARSELt"),
        (T4, True, torch.float16, "2:4", BIG, "cusparselt", "dense", "sm75 has no sparse tensor cores"),
        # an explicit backend that can run, runs
        (A100, True, torch.bfloat16, "2:4", BIG, "cusparselt", "cusparselt", None),
        (A100, True, torch.bfloat16, "2:4", BIG, "cutlass", "cutlass", None),
        # auto on cuSPARSELt: sparse only where measured faster (plan.measured; backend.GEMM_ROUTES decides)
        (H100, True, torch.bfloat16, "2:4", BIG, "auto", "cusparselt", None),
        (A100, True, torch.float16, "2:4", BIG, "auto", "cutlass", None),
        (A100, True, torch.float16, "1:2", BIG, "auto", "cusparselt", None),  # the CUTLASS compressor is 2:4-only
        (A100, False, torch.float16, "1:2", BIG, "auto", "cutlass", None),
        # after a fallback, the operand's own reasons still apply (and both are said)
        (H100, True, torch.bfloat16, "2:4", (4096, 4064, 4096), "cutlass", "cusparselt", "run only on sm8x"),
        (H100, True, torch.float32, "2:4", BIG, "cutlass", "dense", "float16/bfloat16"),
        (H100, True, torch.bfloat16, "2:4", (256, 256, 256), "auto", "dense", "MIN_SPARSE_MNK"),
        (H100, True, torch.bfloat16, "4:8", BIG, "cusparselt", "dense", "not 2:4-compatible"),
        (None, True, torch.bfloat16, "2:4", BIG, "cusparselt", "dense", "not a CUDA tensor"),
        (H100, True, torch.bfloat16, "2:4", BIG, "dense", "dense", "backend 'dense'"),
    ],
)
def test_plan_gemm(capability, cusparselt, dtype, pattern, shape, asked, expect, reason):
    plan = backend_module.plan_gemm(capability, cusparselt, dtype, pattern, *shape, backend=asked)
    assert plan.backend == expect
    assert plan.measured == (asked == "auto" and expect == "cusparselt")
    assert (plan.reason is None) if reason is None else (reason in plan.reason), plan.reason


def test_plan_gemm_fallback_says_both_reasons():
    plan = backend_module.plan_gemm(H100, True, torch.float32, "2:4", *BIG, backend="cutlass")
    assert "backend 'cutlass' cannot run here" in plan.reason and "float16/bfloat16" in plan.reason


def test_plan_gemm_unknown_backend_is_an_error():
    with pytest.raises(NmgradError, match="auto, cusparselt, cutlass or dense"):
        backend_module.plan_gemm(H100, True, torch.bfloat16, "2:4", *BIG, backend="cublas")


@pytest.mark.parametrize("method, pattern", [("mvue", "2:4"), ("approx-mvue", "2:4"), ("mvue", "1:2"), ("mvue", "4:8")])
def test_cpu_fallback_is_the_reference_function(method, pattern):
    """Off CUDA: reference pruning + dense GEMM, exactly the plain-torch reference (odd shapes)."""
    gen = torch.Generator().manual_seed(0)
    dy, x, w = torch.randn(37, 22, generator=gen), torch.randn(37, 9, generator=gen), torch.randn(22, 9, generator=gen)
    u_f = uniforms_for(method, pattern, 37, 22, seed=1)
    u_t = uniforms_for(method, pattern, 22, 37, seed=2)
    dx = sparse_backward.grad_input(dy, w, method, pattern, uniforms=u_f)
    dw = sparse_backward.grad_weight(dy, x, method, pattern, uniforms=u_t)
    assert torch.equal(dx, sparse_backward.grad_input_reference(dy, w, method, pattern, u_f))
    assert torch.equal(dw, sparse_backward.grad_weight_reference(dy, x, method, pattern, u_t))
    # and the references are what they say: prune along F for dX, along T (transposed) for dW
    assert torch.equal(dx, prune(dy, method, pattern, dim=1, uniforms=u_f) @ w)
    assert torch.equal(dw, prune(dy, method, pattern, dim=0, uniforms=u_t).t() @ x)


def test_generator_draws_match_prune():
    """With a generator, the draws are prune()'s: dX then dW from one generator equals prune twice."""
    dy, x, w = torch.randn(16, 12), torch.randn(16, 5), torch.randn(12, 5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    dx = sparse_backward.grad_input(dy, w, "mvue", "2:4", generator=g1)
    dw = sparse_backward.grad_weight(dy, x, "mvue", "2:4", generator=g1)
    assert torch.equal(dx, prune(dy, "mvue", "2:4", dim=1, generator=g2, backend="reference") @ w)
    assert torch.equal(dw, prune(dy, "mvue", "2:4", dim=0, generator=g2, backend="reference").t() @ x)


def test_fallback_reason_logged_once(caplog):
    sparse_gemm.log_once.cache_clear()
    dy, w = torch.randn(8, 8), torch.randn(8, 4)
    with caplog.at_level(logging.INFO, logger="nmgrad_cli.kernels.sparse_gemm"):
        for _ in range(3):
            sparse_backward.grad_input(dy, w, "mvue", "2:4")
    records = [r for r in caplog.records if "not a CUDA tensor" in r.getMessage()]
    assert len(records) == 1


def test_undefined_pattern_is_an_error():
    with pytest.raises(PatternError):
        sparse_backward.grad_input(torch.randn(8, 8), torch.randn(8, 4), "approx-mvue", "3:8")


# ---- on a GPU ---------------------------------------------------------------------------------------


def _sparse_backend_or_skip() -> str:
    chosen, why = backend_module.pick_backend(torch.cuda.get_device_capability(), sparse_gemm.cusparselt_available())
    if why is not None:
        pytest.skip(why)
    return chosen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["mvue", "approx-mvue", "greedy"])
def test_sparse_gemms_equal_dense_on_pruned(method, dtype, caplog):
    """The sparse tensor-core GEMMs equal the dense GEMM on the same pruned tensor (bf16 tolerance)."""
    backend = _sparse_backend_or_skip()  # named: auto takes the dense GEMM where only cuSPARSELt runs
    t, f, i = 512, 256, 384
    gen = torch.Generator().manual_seed(3)
    dy, x, w = (torch.randn(s, generator=gen).to(dtype) for s in ((t, f), (t, i), (f, i)))
    u_f, u_t = uniforms_for(method, "2:4", t, f, 4), uniforms_for(method, "2:4", f, t, 5)
    # the reference prunes the same (rounded) inputs in float64 and multiplies in float64
    ref_dx = sparse_backward.grad_input_reference(dy.double(), w.double(), method, "2:4", u_f.double())
    ref_dw = sparse_backward.grad_weight_reference(dy.double(), x.double(), method, "2:4", u_t.double())
    dev = torch.device("cuda")
    sparse_gemm.log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="nmgrad_cli.kernels.sparse_gemm"):
        kw = dict(min_mnk=0, backend=backend)
        dx = sparse_backward.grad_input(dy.to(dev), w.to(dev), method, uniforms=u_f.to(dev), **kw)
        dw = sparse_backward.grad_weight(dy.to(dev), x.to(dev), method, uniforms=u_t.to(dev), **kw)
    assert not [r for r in caplog.records if "dense GEMM" in r.getMessage()], "took the dense fallback"
    assert dx.dtype == dtype and dx.shape == (t, i) and dw.shape == (f, i)
    # same decisions; kept values and products rounded to dtype: ~1e-3 relative
    assert rel_err(dx.cpu().double(), ref_dx) < 2e-2
    assert rel_err(dw.cpu().double(), ref_dw) < 2e-2


@requires_cuda
def test_fp32_bf16_cast_and_dense_fallback(caplog):
    _sparse_backend_or_skip()
    dev = torch.device("cuda")
    dy, w = torch.randn(512, 256, device=dev), torch.randn(256, 128, device=dev)
    u = uniforms_for("mvue", "2:4", 512, 256).to(dev)
    dense = sparse_backward.grad_input(dy, w, "mvue", uniforms=u, min_mnk=0)  # fp32: dense, logged
    cast = sparse_backward.grad_input(dy, w, "mvue", uniforms=u, min_mnk=0, fp32="bf16")
    assert dense.dtype == cast.dtype == torch.float32
    assert rel_err(cast, dense) < 2e-2  # same decisions (pruned in float32), GEMM in bf16


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "fused"])  # nmgrad train's default maps auto to "fused"
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_seam_on_cuda_is_prune_of_the_same_draws(dtype, backend, monkeypatch):
    """train.gemm.grad_gemms on CUDA (sparse_gemm) = prune() + dense GEMM on the same generator draws."""
    from nmgrad_cli.train.config import SparseGradConfig
    from nmgrad_cli.train.gemm import grad_gemms

    calls = []
    monkeypatch.setattr(sparse_backward, "_pruned_times", _recording(sparse_backward._pruned_times, calls))
    dev = torch.device("cuda")
    cfg = SparseGradConfig(method="mvue", pattern="2:4", backend=backend)
    gen = torch.Generator().manual_seed(0)
    dy, x, w = (torch.randn(s, generator=gen).to(dev, dtype) for s in ((256, 128), (256, 64), (128, 64)))
    dx, dw = grad_gemms(dy, x, w, cfg, torch.Generator(dev).manual_seed(5))
    g = torch.Generator(dev).manual_seed(5)
    ref_dx = prune(dy, "mvue", "2:4", dim=-1, generator=g) @ w
    ref_dw = prune(dy, "mvue", "2:4", dim=0, generator=g).t() @ x
    assert rel_err(dx, ref_dx) < (1e-6 if dtype == torch.float32 else 2e-2)
    assert rel_err(dw, ref_dw) < (1e-6 if dtype == torch.float32 else 2e-2)
    assert [c[4] for c in calls] == ["features", "tokens"]  # both GEMMs went through sparse_gemm


def _recording(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return wrapper


def test_fastest_alg_picks_the_quickest_and_stops_at_the_first_missing_id():
    ran = []

    def run(alg):
        ran.append(alg)
        if alg >= 5:
            raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")  # past the last algorithm

    times = {0: 2.7, 1: 2.9, 2: 2.5, 3: 2.1, 4: 2.4}
    assert sparse_gemm.fastest_alg(run, lambda fn: (fn(), times[ran[-1]])[1]) == 3
    assert 5 in ran and 6 not in ran  # stopped at the first id that does not exist


def test_fastest_alg_keeps_the_default_when_only_it_runs():
    def run(alg):
        if alg:
            raise RuntimeError("no such algorithm")

    assert sparse_gemm.fastest_alg(run, lambda fn: 1.0) == 0


@requires_cuda
def test_fused_buffer_feeds_cslt_sparse_mm():
    """The fused prune+pack buffer is a correct cuSPARSELt operand: _cslt_sparse_mm on it equals the
    dense GEMM of the pruned operand (fails while the layout model in kernels/cslt_layout.py is wrong)."""
    if not sparse_gemm.cusparselt_available():
        pytest.skip("this torch has no cuSPARSELt")
    from nmgrad_cli.kernels import cslt_layout, triton_prune

    dev = torch.device("cuda")
    dy = torch.randn(256, 512, device=dev, dtype=torch.bfloat16)
    b = torch.randn(512, 128, device=dev, dtype=torch.bfloat16)
    buf = triton_prune.prune_pack_2d(dy, "mvue", "features", seed=3)
    pruned = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=3)
    assert torch.equal(cslt_layout.unpack(buf, (256, 512)), pruned)
    assert rel_err(torch._cslt_sparse_mm(buf, b), pruned @ b) < 1e-2


@requires_cuda
def test_auto_records_a_measured_route(monkeypatch):
    """backend='auto' on cuSPARSELt measures the shape once and records route, reason and timings;
    whichever route it takes, the product is right."""
    _sparse_backend_or_skip()
    table = backend_module.RouteTable()
    monkeypatch.setattr(sparse_backward, "GEMM_ROUTES", table)
    dev = torch.device("cuda")
    bf = dict(device=dev, dtype=torch.bfloat16)
    dy, w = torch.randn(1024, 512, **bf), torch.randn(512, 256, **bf)
    u = uniforms_for("mvue", "2:4", 1024, 512).to(dev)
    dx = sparse_backward.grad_input(dy, w, "mvue", uniforms=u, min_mnk=0)
    ref = sparse_backward.grad_input_reference(dy.double(), w.double(), "mvue", "2:4", u.double())
    assert rel_err(dx.double(), ref) < 2e-2
    (row,) = table.decisions()
    assert row["shape"] == [1024, 512, 256] and row["route"] in ("sparse", "dense") and row["reason"]
    if torch.cuda.get_device_capability()[0] >= 9:
        assert row["sparse_ms"] is not None or "check" in row["reason"]
