"""Evaluate at scale: batched draws, record selection, threads, huge values."""

from __future__ import annotations

import math

import pytest
import torch
from _cli import invoke
from _dumps import make_mlp_dump
from conftest import requires_cuda

from nmgrad_cli import METHODS
from nmgrad_cli.dump import DumpWriter
from nmgrad_cli.evaluate import EvalConfig, evaluate, thread_policy
from nmgrad_cli.metrics import monte_carlo


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return make_mlp_dump(tmp_path_factory.mktemp("scale") / "mlp.h5", steps=6)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dim", [-1, 0])
def test_batched_draws_are_the_unbatched_draws_on_the_reference_backend(method, dim):
    """Small tensors run the reference backend: the uniforms are drawn in the same order, so the
    batched draws are bit for bit the sequential ones (the streams are unchanged)."""
    g = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    seen = {False: [], True: []}
    out = {}
    for batch in (False, True):
        gen = torch.Generator().manual_seed(7)
        out[batch] = monte_carlo(g, method, "2:4", dim, 9, gen, True, seen[batch].append, batch=batch)
    assert all(torch.equal(a, b) for a, b in zip(seen[False], seen[True], strict=True))
    for k in ("angle", "angle_se", "mse", "bias", "variance"):
        assert out[True][k] == pytest.approx(out[False][k], rel=1e-12, abs=1e-12)


def test_batched_draws_in_chunks_have_the_same_law(monkeypatch):
    """Chunked batches (2 draws per call) against one draw per call, on independent streams:
    the angle means agree within their standard errors and the exact variance is matched."""
    from nmgrad_cli import metrics

    g = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)).abs()
    monkeypatch.setattr(metrics, "DRAW_CHUNK", 2 * g.numel())
    a = monte_carlo(g, "mvue", "2:4", -1, 400, torch.Generator().manual_seed(1), True, batch=True)
    b = monte_carlo(g, "mvue", "2:4", -1, 400, torch.Generator().manual_seed(2), True, batch=False)
    se = math.hypot(a["angle_se"], b["angle_se"])
    assert abs(a["angle"] - b["angle"]) < 4 * se
    exact = metrics.evaluate_tensor(g, "mvue", "2:4", samples=0).variance
    assert a["variance"] == pytest.approx(exact, rel=0.15) and b["variance"] == pytest.approx(exact, rel=0.15)


def test_steps_every_max_records_and_comma_layers(dump):
    base = dict(methods=("greedy",), samples=0)
    steps = lambda rep: sorted({(r.layer, r.step) for r in rep.records})  # noqa: E731
    assert steps(evaluate([dump], EvalConfig(**base))) == [(la, s) for la in "02" for s in range(6)]
    assert steps(evaluate([dump], EvalConfig(**base, steps="2:5"))) == [(la, s) for la in "02" for s in (2, 3, 4)]
    assert steps(evaluate([dump], EvalConfig(**base, steps="4:"))) == [(la, s) for la in "02" for s in (4, 5)]
    assert steps(evaluate([dump], EvalConfig(**base, steps="3"))) == [("0", 3), ("2", 3)]
    assert steps(evaluate([dump], EvalConfig(**base, every=2))) == [(la, s) for la in "02" for s in (0, 2, 4)]
    assert steps(evaluate([dump], EvalConfig(**base, steps="1:", every=2, max_records=2))) == [
        (la, s) for la in "02" for s in (1, 3)
    ]
    assert steps(evaluate([dump], EvalConfig(**base, layers="2,nothing*", max_records=1))) == [("2", 0)]
    assert steps(evaluate([dump], EvalConfig(**base, layers="0,2", steps=":1"))) == [("0", 0), ("2", 0)]
    # the selection never changes a record's stream: same numbers as the full run
    full = {(r.layer, r.record): r.metrics for r in evaluate([dump], EvalConfig(methods=("mvue",), samples=3)).records}
    part = evaluate([dump], EvalConfig(methods=("mvue",), samples=3, steps="2:4", layers="2"))
    assert part.records and all(r.metrics == full[(r.layer, r.record)] for r in part.records)


def test_progress_counts_only_the_selected_records(dump):
    calls = []
    evaluate([dump], EvalConfig(methods=("greedy",), samples=0, every=3), progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 4, "") and calls[-1][:2] == (4, 4)


def test_thread_policy_and_threads_restored(dump, monkeypatch):
    assert thread_policy(1000) == 1 and thread_policy(1000, 3) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert thread_policy(1 << 23) == 8
    seen = []
    before = torch.get_num_threads()
    from nmgrad_cli.evaluate import record

    real = record.start_record

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(record, "start_record", spy)
    evaluate([dump], EvalConfig(methods=("greedy",), samples=0, max_records=1))
    evaluate([dump], EvalConfig(methods=("greedy",), samples=0, max_records=1, threads=2))
    assert seen == [1, 1, 2, 2] and torch.get_num_threads() == before


def test_huge_float64_gradients(tmp_path):
    """|g| ~ 1e120: ||g||^2 fits float64 only after scaling, the metrics are those of g / 1e120;
    |g| ~ 1e160: ||g||^2 overflows, one error entry, the other record still evaluated."""
    g = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "huge.h5"
    with DumpWriter(path) as w:
        w.add_layer("a", "Linear", -1, [0])
        w.write("a", "grad", 0, 0, g * 1e120)
        w.write("a", "grad", 1, 0, g)
        w.write("a", "grad", 2, 0, g * 1e160)
        w.write("a", "weight", 0, 0, torch.randn(8, 3, dtype=torch.float64))
    rep = evaluate([path], EvalConfig(methods=("mvue", "greedy"), samples=4))
    (err,) = rep.errors
    assert err.record == "s0000002c000" and "overflows float64" in err.message
    by = {(r.record[:8], r.method): r.metrics for r in rep.records}
    for m in ("mvue", "greedy"):
        for k in ("mse", "bias", "variance"):
            assert by[("s0000000", m)][k] == pytest.approx(by[("s0000001", m)][k], rel=1e-9, abs=1e-15)
    assert math.isfinite(rep.summary[0]["angle"])
    r = invoke("evaluate", path, "--samples", "2")
    assert r.exit_code == 1 and "overflows float64" in r.stderr and "Traceback" not in r.output


def test_two_workers_give_the_report_of_one_process(dump, tmp_path):
    """Records sharded over 2 worker processes: every number, note and row is the same."""
    import dataclasses
    import shutil

    other = tmp_path / "copy.h5"
    shutil.copy(dump, other)
    cfg = EvalConfig(methods=("mvue", "greedy"), samples=3, axis="both", steps="0:3", seed=4)
    one = evaluate([dump, other], cfg).to_dict()
    two = evaluate([dump, other], dataclasses.replace(cfg, workers=2)).to_dict()
    assert two["config"].pop("workers") == 2 and one["config"].pop("workers") == 1
    assert two == one
    assert len(one["records"]) == 2 * 2 * 3 * 2 * 2  # files x layers x steps x axes x methods


def test_two_gloo_ranks_give_the_report_of_one_process(dump, tmp_path):
    """torchrun's setting: 2 CPU ranks (gloo), records sharded by rank and all-gathered; every rank
    ends with the very report of one process."""
    import json
    import socket

    import torch.multiprocessing as mp
    from _dist_eval import rank_main

    cfg = EvalConfig(methods=("mvue", "random"), samples=3, axis="both", steps="1:4", seed=9)
    one = json.loads(json.dumps(evaluate([dump], cfg).to_dict()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(rank_main, args=(2, port, [str(dump)], cfg, out), nprocs=2, join=True)
    for rank in (0, 1):
        with open(f"{out}.{rank}") as fh:
            assert json.load(fh) == one


def assert_same_row(a: dict, b: dict, rel: float) -> None:
    """The same keys; numbers equal within ``rel``, everything else (strings, None, nested dicts) equal
    as itself: pytest.approx (9.2 and later) refuses a string under a relative tolerance."""
    assert a.keys() == b.keys()
    for k, x in a.items():
        y = b[k]
        if isinstance(x, dict) and isinstance(y, dict):
            assert_same_row(x, y, rel)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and isinstance(y, (int, float)):
            assert x == pytest.approx(y, rel=rel), k
        else:
            assert x == y, k


def test_several_files_get_one_summary_each_and_the_pooled_one(dump, tmp_path):
    other = make_mlp_dump(tmp_path / "other.h5", steps=1)
    cfg = EvalConfig(methods=("mvue", "greedy"), samples=4, axis="both", seed=2)
    both = evaluate([dump, other], cfg)
    for path in (dump, other):
        alone = evaluate([path], cfg).summary
        mine = [{k: v for k, v in r.items() if k != "file"} for r in both.file_summary if r["file"] == str(path)]
        assert len(mine) == 4
        for a, b in zip(mine, alone, strict=True):
            assert_same_row(a, b, rel=1e-12)
    assert evaluate([dump], cfg).file_summary == []  # one file: the summary is its summary
    r = invoke("evaluate", dump, other, "--samples", "2", "--methods", "mvue")
    assert r.exit_code == 0 and "summary of each file" in r.stdout and "summary over layers of every file" in r.stdout


def test_triton_kernels_agree_with_the_cpu_within_monte_carlo_error(dump, monkeypatch):
    """What `--device cuda` runs (the Triton kernels), here under the Triton interpreter on CPU
    tensors: same exact metrics, and Monte-Carlo angles within a few standard errors of the CPU's
    (the kernels compute the reference's function of the same uniforms)."""
    pytest.importorskip("triton")
    from nmgrad_cli.kernels import triton_prune

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    methods = tuple(m for m in METHODS if triton_prune.supports(m, 2, 4))
    assert {"mvue", "greedy", "random"} <= set(methods)
    cfg = EvalConfig(methods=methods, samples=6, axis="both", max_records=1, device="cpu", seed=1)
    cpu = evaluate([dump], EvalConfig(**{**cfg.to_dict(), "methods": methods, "backend": "reference"}))
    tri = evaluate([dump], EvalConfig(**{**cfg.to_dict(), "methods": methods, "backend": "triton"}))
    assert len(cpu.records) == len(tri.records) == 2 * 2 * len(methods)
    for a, b in zip(cpu.records, tri.records, strict=True):
        for k in ("mse", "bias", "variance", "norm2"):
            assert a.metrics[k] == b.metrics[k]
        assert a.gemm == b.gemm
        se = math.hypot(a.metrics["angle_se"], b.metrics["angle_se"])
        assert abs(a.metrics["angle"] - b.metrics["angle"]) <= 4 * se + 1e-4, (a.layer, a.axis, a.method)


@requires_cuda
@pytest.mark.parametrize("method", ["mvue", "approx-mvue", "random", "greedy"])
def test_batched_draws_on_cuda_have_the_law_of_unbatched_ones(method):
    """On CUDA (Triton kernels, uniforms from the generator) the draws are batched up to
    GPU_DRAW_CHUNK elements. A CUDA generator's rand(c*k) is not c rand(k) calls in a row, so the
    draws differ: the angles agree within their standard errors (greedy's exactly)."""
    from nmgrad_cli import metrics

    g = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).abs().cuda()
    assert metrics.GPU_DRAW_CHUNK // g.numel() >= 64 > metrics.DRAW_CHUNK // g.numel()  # batched only on CUDA
    out = {}
    for batch in (False, True):
        gen = torch.Generator("cuda").manual_seed(7 + batch)
        out[batch] = monte_carlo(g, method, "2:4", -1, 64, gen, batch=batch)
    se = math.hypot(out[True]["angle_se"], out[False]["angle_se"])
    assert abs(out[True]["angle"] - out[False]["angle"]) <= 4 * se + 1e-9 * out[False]["angle"]
    if method != "greedy":
        assert se > 0


def test_keep_freed_memory_is_set_once_on_glibc():
    """evaluate's allocator setting (allocator.keep_freed_memory): glibc accepts both thresholds, once per process."""
    import platform

    from nmgrad_cli.evaluate import allocator as run

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert run.keep_freed_memory() is True and run.keep_freed_memory.cache_info().currsize == 1
