"""The GEMM dispatch's decisions, on the CPU: auto's measured route per shape (backend.GEMM_ROUTES),
the alg_id search checked against a dense GEMM, W's column-major copy once per version, and the
dense fallbacks with their recorded reasons. The GPU halves are in test_sparse_gemm.py."""

from __future__ import annotations

import pytest
import torch

from nmgrad_cli import backend, sparse_backward
from nmgrad_cli.kernels import sparse_gemm

KEY = (16384, 8192, 8192, torch.bfloat16, "cuda:0")


def test_auto_measures_once_per_shape_and_takes_sparse_only_where_faster():
    table = backend.RouteTable()
    calls = []

    def measure(sparse_ms, dense_ms):
        def run():
            calls.append(1)
            return sparse_ms, dense_ms

        return run

    got = table.decide(KEY, measure(1.0, 2.0))
    assert (got.route, got.sparse_ms, got.dense_ms) == ("sparse", 1.0, 2.0) and "faster" in got.reason
    assert table.decide(KEY, measure(9.0, 1.0)).route == "sparse" and len(calls) == 1  # cached: not re-measured
    other = (4096, 4096, 4096, torch.bfloat16, "cuda:0")
    slow = table.decide(other, measure(3.0, 2.0))
    assert slow.route == "dense" and "slower" in slow.reason and len(calls) == 2
    tie = table.decide((64, 64, 64, torch.float16, "cuda:0"), measure(2.0, 2.0))
    assert tie.route == "dense"  # not faster: dense
    rows = table.decisions()
    assert [r["shape"] for r in rows] == [[16384, 8192, 8192], [4096, 4096, 4096], [64, 64, 64]]
    assert rows[0] == {"shape": [16384, 8192, 8192], "dtype": "bfloat16", "route": "sparse", "reason": got.reason,
                       "sparse_ms": 1.0, "dense_ms": 2.0}


def test_a_failed_check_or_no_measurement_is_dense():
    table = backend.RouteTable()
    failed = table.decide(KEY, lambda: "no cuSPARSELt alg_id reproduced the dense GEMM")
    assert failed.route == "dense" and "failed its check" in failed.reason and failed.sparse_ms is None
    other = (128, 128, 128, torch.bfloat16, "cuda:0")
    unmeasured = table.decide(other, None)  # e.g. inside CUDA-graph capture
    assert unmeasured.route == "dense" and table.get(other) is None  # not cached: measured on a later call


def test_fastest_alg_rejects_wrong_products_even_when_fastest():
    times = {0: 2.7, 1: 1.0, 2: 2.5, 3: 2.1}
    state = {}

    def run(alg):
        if alg > 3:
            raise RuntimeError("no such algorithm")
        state["alg"] = alg
        return torch.full((2,), 5.0 if alg == 1 else 1.0)  # alg 1 is fastest and wrong

    time_ms = lambda fn: (fn(), times[state["alg"]])[1]  # noqa: E731
    ok = lambda out: bool(torch.equal(out, torch.ones(2)))  # noqa: E731
    assert sparse_gemm.fastest_alg(run, time_ms) == 1  # unchecked, the wrong one would win
    assert sparse_gemm.fastest_alg(run, time_ms, check=ok) == 3
    assert sparse_gemm.fastest_alg(run, time_ms, check=lambda out: False) is None


def test_alg_table_checks_against_the_dense_product_and_refuses_when_none_match():
    table = sparse_gemm.AlgTable()
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    want = a @ b

    def run(alg):
        if alg > 2:
            raise RuntimeError("no such algorithm")
        return want * (1.0 if alg == 2 else 1.5)  # only alg 2 is right

    assert table.alg(("shape",), run, lambda: want, time_ms=lambda fn: 1.0) == 2
    assert table.alg(("shape",), lambda alg: 1 / 0, lambda: 1 / 0) == 2  # cached: neither run nor checked again
    with pytest.raises(sparse_gemm.SparseCheckFailed, match="reproduced the dense GEMM"):
        table.alg(("bad layout",), lambda alg: want.flip(0) if alg < 3 else run(alg), lambda: want, lambda fn: 1.0)


def test_weight_column_major_copy_is_made_once_per_version():
    cache = sparse_gemm.ColumnMajorCache()
    w = torch.randn(64, 32)
    c1 = cache.get(w)
    assert c1.t().is_contiguous() and torch.equal(c1, w)
    assert cache.get(w) is c1  # same step: no second copy
    with torch.no_grad():
        w.add_(1.0)  # the optimizer step moves the version counter
    c2 = cache.get(w)
    assert c2 is not c1 and torch.equal(c2, w)
    c3 = cache.get(w, torch.bfloat16)  # fp32 weight, bf16 GEMM: the cast is cached too
    assert c3.dtype == torch.bfloat16 and c3.t().is_contiguous() and cache.get(w, torch.bfloat16) is c3
    other = torch.randn(64, 32)
    assert torch.equal(cache.get(other), other) and len(cache) == 2
    del other
    assert len(cache) == 1  # a freed tensor's copy goes with it (never served to a tensor at its address)


def test_dense_operand_copies_activations_per_call_and_keeps_column_major_ones():
    x = torch.randn(32, 16)
    got = sparse_gemm.dense_operand(x, weight=False)
    assert got.t().is_contiguous() and torch.equal(got, x)
    col = x.t().contiguous().t()
    assert sparse_gemm.dense_operand(col, weight=False) is col


@pytest.mark.parametrize(
    "dtype, shape, reason",
    [(torch.float32, (64, 32, 16), "not a CUDA tensor"), (torch.bfloat16, (60, 32, 16), "not a CUDA tensor")],
)
def test_cpu_fallback_is_recorded_with_its_reason(dtype, shape, reason, monkeypatch):
    table = backend.RouteTable()
    monkeypatch.setattr(sparse_backward, "GEMM_ROUTES", table)
    t, f, i = shape
    dy, w = torch.randn(t, f).to(dtype), torch.randn(f, i).to(dtype)
    u = torch.rand(t * f // 4, 1)
    dx = sparse_backward.grad_input(dy, w, "mvue", "2:4", uniforms=u)
    assert torch.equal(dx, sparse_backward.grad_input_reference(dy, w, "mvue", "2:4", u))
    (row,) = table.decisions()
    assert row["route"] == "dense" and reason in row["reason"] and row["shape"] == [t, f, i]


def test_gemm_route_decisions_is_the_process_table():
    assert backend.gemm_route_decisions() == backend.GEMM_ROUTES.decisions()
    assert all({"shape", "dtype", "route", "reason", "sparse_ms", "dense_ms"} <= set(r) for r in
               backend.gemm_route_decisions())
