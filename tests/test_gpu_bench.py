"""benchmarks/gpu_bench.py on the CPU: its timing helpers against a fake clock, its time budget, and
the no-GPU run (interpreter checks, tables and JSON written, exit 0) as the GPU machines invoke it."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)


class FakeClock:
    """A GPU stand-in: time moves only when the timed code says so; marks read the time."""

    def __init__(self):
        self.now = 0.0
        self.marks = 0
        self.syncs = 0

    def advance(self, ms: float) -> None:
        self.now += ms

    def mark(self):
        self.marks += 1
        return self.now

    def sync(self) -> None:
        self.syncs += 1

    def elapsed_ms(self, start, end) -> float:
        return end - start


def test_time_calls_is_one_mark_pair_around_many_calls():
    clock = FakeClock()
    costs = iter(range(1, 100))  # call i takes i ms
    calls = []

    def fn():
        c = next(costs)
        calls.append(c)
        clock.advance(c)

    got = gpu_bench.time_calls(fn, clock, calls=4, repeats=3, warmup=2)
    # warmup: calls 1, 2; then repeats (3..6), (7..10), (11..14): means 4.5, 8.5, 12.5
    assert got == statistics.median([4.5, 8.5, 12.5]) == 8.5
    assert len(calls) == 2 + 4 * 3
    assert clock.marks == 2 * 3  # not one pair per call


def test_measure_reports_kernel_and_call_time():
    """Eager calls cost 1.0 ms of GPU work + 0.5 ms of host work the GPU waits for; a CUDA graph of
    n calls replays the GPU work only: kernel 1.0 ms, call 1.5 ms."""
    clock = FakeClock()
    batches = []

    def fn():
        clock.advance(1.5)

    def batch(f, n):
        batches.append(n)
        return lambda: clock.advance(1.0 * n)

    t = gpu_bench.measure(fn, clock, batch=batch)
    assert t["call_ms"] == pytest.approx(1.5)
    assert t["kernel_ms"] == pytest.approx(1.0)
    assert t["calls"] == gpu_bench.calls_for(1.5) == 13 and batches == [13]
    assert gpu_bench.ms(t) == t["kernel_ms"]
    assert gpu_bench.fmt(t) == ["1.000", "1.500"]


def test_measure_without_capture_keeps_the_call_time():
    clock = FakeClock()

    def fail(f, n):
        raise RuntimeError("operation not permitted when stream is capturing")

    t = gpu_bench.measure(lambda: clock.advance(2.0), clock, batch=fail)
    assert t["kernel_ms"] is None and "not permitted" in t["kernel_note"]
    assert t["call_ms"] == pytest.approx(2.0) and gpu_bench.ms(t) == t["call_ms"]
    assert gpu_bench.fmt(t)[0] == "n/a"


def test_calls_for_bounds():
    assert gpu_bench.calls_for(0.1) == 100  # capped
    assert gpu_bench.calls_for(500.0) == 1
    assert gpu_bench.calls_for(0.0) == 100


def test_budget_skips_once_with_a_note(capsys):
    now = [0.0]
    gpu_bench.REPORT["skipped"].clear()
    budget = gpu_bench.Budget(100.0, clock=lambda: now[0])
    assert budget.allows("section a", need_s=50)
    now[0] = 60.0
    assert not budget.allows("section b", need_s=50)
    assert not budget.allows("section b", need_s=50)
    assert budget.allows("row c", need_s=10)
    assert gpu_bench.REPORT["skipped"] == ["section b"]
    assert capsys.readouterr().out.count("[budget] skipped section b") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this command runs the whole benchmark")
def test_cpu_run_writes_tables_and_json(tmp_path):
    """The command of docs/gpu.md, from the repository root, without a GPU: exit 0, files in $OUT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "No CUDA GPU" in proc.stdout
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["versions"]["gpu"] == "none" and report["failed"] == []
    assert "gpu_bench.md" in os.listdir(tmp_path)
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    kernels = report["tables"][0]
    assert kernels["header"][-1] == "check" and len(kernels["rows"]) >= 20
    assert all(row[-1] == "ok" for t in report["tables"] for row in t["rows"])
    assert kernels["title"] in (tmp_path / "gpu_bench.md").read_text()


def test_site_mode_is_the_interception_train_runs():
    """The benchmark's sparse rows go through the GEMM sites (not the module swap): on a stock
    nn.Linear the site is seen, selected, and its weight gradient is the pruned one (not dense)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(32, 16)
    mode = gpu_bench.site_mode(lin, "mvue")
    with mode:
        out = lin(x)
    dy = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, (lin.weight,), dy)
    assert list(mode.sites) == ["weight"] and list(mode.handler.selected) == ["weight"]
    dense = dy.t() @ x
    assert not torch.allclose(gw, dense)  # pruned dY^T X
    assert type(mode.handler).__name__ == "SparseGradSites" and "sparsify_gradients_" not in gpu_bench.__dict__
