"""GPU benchmark of the prune kernels and the 2:4 sparse backward GEMMs (not a test).

    PYTHONPATH=. python benchmarks/gpu_bench.py [--quick] [--no-train] [--no-sweep] [--budget S] [--out DIR]

One call on one CUDA GPU (under 8 minutes on an H100: a time budget, 400 s by default, skips what
is left with a printed note) prints, and writes as ``gpu_bench.md`` + ``gpu_bench.json`` into
``$OUT`` (when set; else ``--out``, else a new folder under ``runs/`` that it prints):
1. correctness on the GPU: each Triton kernel (method x pattern x axis) against the torch reference
   on the same uniforms, the compressed operand, and the sparse GEMMs against a dense GEMM on the
   same pruned tensor;
2. prune(+compress) throughput on dY [16384, 8192] bf16 next to a device-to-device copy (clone) of
   the same tensor; "GB/s" = 2 x bytes(dY) / kernel time for every row (read dY + write a dY-sized
   output, as a copy does), so the ratio column is copy time / kernel time (target >= 0.60);
3. Linear backward (dX and dW) in bf16 at T = 16384, in = out = 4096 and 8192: dense GEMMs vs
   prune + compress + 2:4 sparse GEMMs, pruning included (target >= 1.3x at 8192); the GEMMs alone
   with the dense operand B row-major and column-major; on cuSPARSELt, every (alg_id, split_k);
4. one training step (forward, backward, AdamW) of the built-in ``gpt`` model and of a wider GPT,
   dense vs sparse-gradient (mvue 2:4);
5. a sweep of the prune kernel's tile and warps (to choose ``triton_prune._DEFAULT_TILE``).
Timing (``measure``): "kernel ms" is one CUDA-graph replay of many back-to-back calls divided by
their number (GPU time, no host work); "call ms" is many back-to-back eager calls between one pair
of CUDA events divided by their number (what a Python loop gets, host launch work included when it
is the bottleneck). Medians of 5 repeats, after warmup; all rows of a table measured in one run.
Uses only torch 2.11's API (the GPU machines: torch 2.11.0+cu130, Triton 3.6.0, cuSPARSELt cu13).
Without a GPU it says so, runs small Triton-interpreter correctness checks on the CPU, writes the
same files and exits 0 (1 if a check fails).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import nmgrad_cli  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmgrad_cli import backend, prune, sparse_backward  # noqa: E402
from nmgrad_cli.kernels import cslt_layout, sparse_gemm, triton_prune  # noqa: E402
from nmgrad_cli.methods import METHODS  # noqa: E402
from nmgrad_cli.patterns import parse_pattern  # noqa: E402

KERNELS = [(m, p) for m in METHODS for p in ("1:2", "2:4") if triton_prune.supports(m, *map(int, p.split(":")))]
AXES = ("features", "tokens")
FAILED: list[str] = []
REPORT: dict = {"tables": [], "notes": [], "skipped": []}  # what gets written as JSON


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    REPORT["tables"].append({"title": title, "header": header, "rows": cells})


def note(text: str) -> None:
    print(text)
    REPORT["notes"].append(text.strip())


def check(ok: bool, what: str) -> str:
    if not ok:
        FAILED.append(what)
    return "ok" if ok else "FAIL"


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    cslt = None
    with contextlib.suppress(AttributeError, RuntimeError):
        cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    cuda = torch.cuda.is_available()
    v = {
        "gpu": torch.cuda.get_device_name() if cuda else "none",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": tv,
        "cusparselt": cslt,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    cap = v["capability"]
    print(f"GPU: {v['gpu']}" + (f" (sm{cap[0]}{cap[1]})" if cap else ""))
    print(f"torch {v['torch']} (CUDA {v['cuda']}), triton {tv}, cuSPARSELt {cslt}")
    print(f"python {v['python']}, {v['platform']}")
    return v


# ---- timing -----------------------------------------------------------------------------------------


class CudaClock:
    """Marks are CUDA events recorded on the current stream; elapsed time is GPU time between them."""

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        torch.cuda.synchronize()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)


def time_calls(fn, clock, calls: int, repeats: int = 5, warmup: int = 2) -> float:
    """Milliseconds per call: the median over ``repeats`` of (time between ONE pair of marks around
    ``calls`` back-to-back calls of ``fn``) / ``calls``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    clock.sync()
    per_call = []
    for _ in range(repeats):
        start = clock.mark()
        for _ in range(calls):
            fn()
        end = clock.mark()
        clock.sync()
        per_call.append(clock.elapsed_ms(start, end) / calls)
    return statistics.median(per_call)


def calls_for(ms_per_call: float, target_ms: float = 20.0, most: int = 100) -> int:
    """Back-to-back calls per timed repeat: enough for ~``target_ms`` between the two marks."""
    return max(1, min(most, int(target_ms / max(ms_per_call, 1e-6))))


def cuda_graph_batch(fn, calls: int):
    """A CUDA graph of ``calls`` back-to-back calls of ``fn``; returns its replay (no host work)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graphs asks
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def measure(fn, clock, batch=cuda_graph_batch, repeats: int = 5, warmup: int = 2) -> dict:
    """{"call_ms", "kernel_ms", "calls"}: end-to-end time per eager call and GPU time per call.

    call: ``calls`` back-to-back eager calls between one pair of marks. kernel: one mark pair around
    one run of ``batch(fn, calls)`` (a CUDA graph of the same calls), / calls; None when ``batch``
    is None or fails (e.g. the calls cannot be captured), with the reason in "kernel_note"."""
    for _ in range(warmup):
        fn()
    calls = calls_for(time_calls(fn, clock, calls=1, repeats=1, warmup=0))
    out = {"calls": calls, "call_ms": time_calls(fn, clock, calls, repeats, warmup=0), "kernel_ms": None}
    if batch is not None:
        try:
            run = batch(fn, calls)
            out["kernel_ms"] = time_calls(run, clock, 1, repeats, warmup=1) / calls
        except Exception as exc:  # capture is best effort: report the call time alone
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            out["kernel_note"] = f"CUDA graph capture failed ({type(exc).__name__}: {first}): kernel ms n/a"
            if out["kernel_note"] not in REPORT["notes"]:
                REPORT["notes"].append(out["kernel_note"])
    return out


def ms(t: dict) -> float:
    """The time a row's ratios use: GPU time when it was measured, else the call time."""
    return t["kernel_ms"] if t["kernel_ms"] is not None else t["call_ms"]


def fmt(t: dict) -> list[str]:
    kernel = f"{t['kernel_ms']:.3f}" if t["kernel_ms"] is not None else "n/a"
    return [kernel, f"{t['call_ms']:.3f}"]


class Budget:
    """Seconds left of the run's time budget; a section or row that would start past it is skipped."""

    def __init__(self, seconds: float, clock=time.perf_counter):
        self.clock = clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def allows(self, what: str, need_s: float = 0.0) -> bool:
        if self.left() > need_s:
            return True
        msg = f"\n[budget] skipped {what}: {max(self.left(), 0.0):.0f} s left (needs ~{need_s:.0f} s)"
        if what not in REPORT["skipped"]:
            REPORT["skipped"].append(what)
            print(msg)
        return False


def uniforms(method: str, pattern: str, rows: int, length: int, device, seed: int = 0) -> torch.Tensor:
    pat = parse_pattern(pattern)
    k = rows * -(-length // pat.m)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(k, METHODS[method].n_uniforms(pat), generator=gen).to(device)


def compare_kernel(dy: torch.Tensor, method: str, pattern: str, axis: str, seed: int) -> list:
    """Kernel vs reference prune (same uniforms, same device): mask mismatches and max rel. error."""
    t, f = dy.shape
    rows, length = (f, t) if axis == "tokens" else (t, f)
    u = uniforms(method, pattern, rows, length, dy.device, seed)
    ref = prune(dy, method, pattern, dim=1 if axis == "features" else 0, uniforms=u, backend="reference")
    out = triton_prune.prune_2d(dy, method, pattern, axis, uniforms=u)
    out = out.t() if axis == "tokens" else out
    flips = int(((out != 0) != (ref != 0)).sum())
    both = (out != 0) & (ref != 0)
    rel = ((out[both].float() - ref[both].float()).abs() / ref[both].float().abs()).max().item() if both.any() else 0.0
    pat = parse_pattern(pattern)
    blocks = torch.nn.functional.pad(out.movedim(1 if axis == "features" else 0, -1), (0, (-length) % pat.m))
    nm_ok = bool(((blocks.reshape(-1, pat.m) != 0).sum(-1) <= pat.n).all())
    # float32 rounding may move a sampling boundary by ~1e-7: allow 1e-6 of blocks, report the count
    ok = nm_ok and flips <= max(1, int(1e-6 * out.numel())) and rel < (1e-5 if dy.dtype == torch.float32 else 1e-2)
    return [method, pattern, axis, str(dy.dtype).removeprefix("torch."), flips, f"{rel:.1e}", nm_ok,
            check(ok, f"kernel {method} {pattern} {axis} {dy.dtype}")]


# ---- without a GPU: the interpreter checks --------------------------------------------------------


def interpreter_checks() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # triton_prune picks the interpreter per call
    gen = torch.Generator().manual_seed(0)
    rows = []
    t0 = time.perf_counter()
    for method, pattern in KERNELS:
        for axis in AXES:
            dy = torch.randn(19, 42, generator=gen)
            rows.append(compare_kernel(dy, method, pattern, axis, seed=1))
    for dtype in (torch.float16, torch.bfloat16):
        rows.append(compare_kernel(torch.randn(19, 42, generator=gen).to(dtype), "mvue", "2:4", "tokens", 2))
    table("Triton kernels vs reference under TRITON_INTERPRET=1 (CPU, same uniforms)",
          ["method", "pattern", "axis", "dtype", "mask flips", "max rel err", "<= N per M", "check"], rows)
    conv = torch.sparse._semi_structured_conversions
    rows = []
    for axis in AXES:
        dy = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
        c = triton_prune.prune_compress_2d(dy, "mvue", "2:4", axis, seed=3)
        packed, meta = conv.sparse_semi_structured_from_dense_cutlass(c.pruned)
        same = torch.equal(packed, c.packed) and torch.equal(meta, c.meta)
        rows.append(["mvue 2:4", axis, check(same, f"compressed {axis}")])
    table("In-kernel CUTLASS compression vs torch's converter (CPU)", ["kernel", "axis", "check"], rows)
    rows = []
    for axis in AXES:
        dy = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
        buf = triton_prune.prune_pack_2d(dy, "mvue", axis, seed=3)
        pruned = triton_prune.prune_2d(dy, "mvue", "2:4", axis, seed=3)
        same = torch.equal(buf.view(torch.int16), cslt_layout.pack(pruned).view(torch.int16))
        rows.append(["mvue 2:4", axis, check(same, f"fused prune+pack {axis}")])
    table("Fused prune + cuSPARSELt pack vs cslt_layout.pack of the pruned operand (CPU; the layout model "
          "itself is checked on a GPU by gpu_session.sh)", ["kernel", "axis", "check"], rows)
    print(f"\ninterpreter checks took {time.perf_counter() - t0:.1f} s")


# ---- on a GPU --------------------------------------------------------------------------------------


def gpu_correctness(dev) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for method, pattern in KERNELS:
        for axis in AXES:
            rows.append(compare_kernel(torch.randn(1000, 1030, generator=gen).to(dev), method, pattern, axis, 1))
    for dtype in (torch.float16, torch.bfloat16):
        for axis in AXES:
            dy = torch.randn(1000, 1030, generator=gen).to(dev, dtype)
            rows.append(compare_kernel(dy, "approx-mvue", "2:4", axis, 2))
    # the Philox (seeded) path: reproducible and N:M
    dy = torch.randn(1000, 1024, generator=gen).to(dev)
    a, b = (triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=5) for _ in range(2))
    nm_ok = bool(((a != 0).view(a.shape[0], -1, 4).sum(-1) <= 2).all())
    rows.append(["mvue", "2:4", "features", "float32, Philox x2", "-", "-", nm_ok,
                 check(torch.equal(a, b) and nm_ok, "philox reproducible")])
    # a tokens-axis launch with more block tiles than a grid's axis 1 allows (65,535): T > 4.2M
    tall = torch.randn((1 << 22) + (1 << 16), 64, device=dev)
    out = triton_prune.prune_2d(tall, "greedy", "2:4", "tokens").t()
    same = torch.equal(out, prune(tall, "greedy", "2:4", dim=0, backend="reference"))
    rows.append(["greedy", "2:4", "tokens", f"float32, T={tall.shape[0]}", "-", "-", "-", check(same, "tall grid")])
    del tall, out
    table("Triton kernels vs reference on the GPU (same uniforms)",
          ["method", "pattern", "axis", "dtype", "mask flips", "max rel err", "<= N per M", "check"], rows)

    gemm, why = backend.pick_backend(torch.cuda.get_device_capability(), sparse_gemm.cusparselt_available())
    rows = []
    if why is not None:
        note(f"\nsparse GEMMs unavailable here: {why}")
        return
    if gemm == "cusparselt":  # the fused prune+pack buffer: the model's bytes, and what cuSPARSELt makes of them
        for axis in AXES:
            dy = torch.randn(1024, 2048, generator=gen).to(dev, torch.bfloat16)
            buf = triton_prune.prune_pack_2d(dy, "mvue", axis, seed=3)
            pruned = triton_prune.prune_2d(dy, "mvue", "2:4", axis, seed=3)
            b = torch.randn(pruned.shape[1], 256, device=dev, dtype=torch.bfloat16)
            same = torch.equal(cslt_layout.unpack(buf, tuple(pruned.shape)), pruned)
            rows.append(["fused prune+pack = pack(prune)", axis, "-", check(same, f"fused buffer {axis}")])
            try:
                err = sparse_gemm.rel_err(torch._cslt_sparse_mm(buf, b), pruned.float() @ b.float())
                rows.append(["_cslt_sparse_mm(fused buffer) vs dense", axis, f"{err:.1e}",
                             check(err < 1e-2, f"cuSPARSELt on the fused buffer {axis}")])
            except RuntimeError as exc:
                rows.append(["_cslt_sparse_mm(fused buffer) vs dense", axis, str(exc).splitlines()[0][:40],
                             check(False, f"cuSPARSELt on the fused buffer {axis}")])
    if gemm == "cutlass":
        conv = torch.sparse._semi_structured_conversions
        for axis in AXES:
            dy = torch.randn(1024, 2048, generator=gen).to(dev, torch.bfloat16)
            c = triton_prune.prune_compress_2d(dy, "mvue", "2:4", axis, seed=3)
            packed, meta = conv.sparse_semi_structured_from_dense_cutlass(c.pruned)
            same = torch.equal(packed, c.packed) and torch.equal(meta, c.meta)
            rows.append(["compressed operand (CUTLASS)", axis, "-", check(same, f"compressed {axis}")])
    t, f, i = 2048, 1024, 768
    for dtype in (torch.bfloat16, torch.float16):
        dy, x, w = (torch.randn(s, generator=gen).to(dev, dtype) for s in ((t, f), (t, i), (f, i)))
        u_f, u_t = uniforms("mvue", "2:4", t, f, dev, 4), uniforms("mvue", "2:4", f, t, dev, 5)
        # the dense GEMM (float32) on the very tensors the sparse GEMMs get
        ref_dx = triton_prune.prune_2d(dy, "mvue", "2:4", "features", uniforms=u_f).float() @ w.float()
        ref_dw = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", uniforms=u_t).float() @ x.float()
        for bk in ("auto", "cutlass", "cusparselt"):  # explicit backends fall back where they cannot run
            plan = backend.plan_gemm(torch.cuda.get_device_capability(), sparse_gemm.cusparselt_available(),
                                         dtype, "2:4", t, f, i, bk, min_mnk=0)
            dx = sparse_backward.grad_input(dy, w, "mvue", uniforms=u_f, min_mnk=0, backend=bk)
            dw = sparse_backward.grad_weight(dy, x, "mvue", uniforms=u_t, min_mnk=0, backend=bk)
            for name, out, ref in (("dX = dY^ W", dx, ref_dx), ("dW = dY^^T X", dw, ref_dw)):
                err = ((out.float() - ref).norm() / ref.norm()).item()
                rows.append([f"{name} (backend={bk} -> {plan.backend})", str(dtype).removeprefix("torch."),
                             f"{err:.1e}", check(err < 1e-2, f"{name} {dtype} {bk}")])
    table("2:4 sparse GEMMs vs dense GEMM on the same pruned dY (relative Frobenius error)",
          ["what", "axis/dtype", "rel err", "check"], rows)


def throughput(dev, quick: bool, clock, budget: Budget) -> None:
    t, f = (8192, 8192) if quick else (16384, 8192)
    dy = torch.randn(t, f, device=dev, dtype=torch.bfloat16)
    nbytes = 2 * dy.numel() * dy.element_size()
    cap = torch.cuda.get_device_capability()
    gemm, why = backend.pick_backend(cap, sparse_gemm.cusparselt_available())
    copy = measure(lambda: dy.clone(), clock)
    rows = [["copy (clone)", "-", *fmt(copy), f"{nbytes / ms(copy) / 1e6:.0f}", "1.00"]]

    def row(name, axis, fn, batch=cuda_graph_batch):
        if not budget.allows("the rest of the throughput rows", 5):
            return
        tm = measure(fn, clock, batch=batch)
        rows.append([name, axis, *fmt(tm), f"{nbytes / ms(tm) / 1e6:.0f}", f"{ms(copy) / ms(tm):.2f}"])

    for method, pattern in KERNELS:
        for axis in AXES:
            row(f"prune {method} {pattern} (Philox)", axis,
                lambda m=method, p=pattern, a=axis: triton_prune.prune_2d(dy, m, p, a, seed=1))
    for axis in AXES:
        rows_, length = (f, t) if axis == "tokens" else (t, f)
        u = torch.rand(rows_ * length // 4, 1, device=dev)
        row("prune mvue 2:4 (supplied uniforms)", axis,
            lambda a=axis, u=u: triton_prune.prune_2d(dy, "mvue", "2:4", a, uniforms=u))
        if why is None and gemm == "cutlass":
            row("prune+compress mvue 2:4 (fused, CUTLASS)", axis,
                lambda a=axis: triton_prune.prune_compress_2d(dy, "mvue", "2:4", a, seed=1))
        if why is None and sparse_gemm.cusparselt_available():
            row("prune mvue 2:4 + _cslt_compress", axis,
                lambda a=axis: torch._cslt_compress(triton_prune.prune_2d(dy, "mvue", "2:4", a, seed=1)))
    # the fused prune + cuSPARSELt pack (writes 9/16 of dY's bytes; the ratio is still copy time / time)
    for method, pattern in KERNELS:
        if pattern == "2:4":
            for axis in AXES:
                row(f"prune+pack {method} 2:4 (fused, cuSPARSELt layout)", axis,
                    lambda m=method, a=axis: triton_prune.prune_pack_2d(dy, m, a, seed=1))
    row("reference prune mvue 2:4 (torch; call time only)", "features",
        lambda: prune(dy, "mvue", "2:4", dim=1, backend="reference"), batch=None)
    table(f"Prune throughput, dY {t}x{f} bf16 (GB/s = 2 x bytes(dY) / kernel time; target ratio >= 0.60)",
          ["kernel", "axis", "kernel ms", "call ms", "GB/s", "vs copy"], rows)


def tile_sweep(dev, quick: bool, clock, budget: Budget) -> None:
    """mvue 2:4 (Philox) on dY [16384, 8192] bf16 over tiles and warps: pick the defaults from this."""
    t, f = (8192, 8192) if quick else (16384, 8192)
    dy = torch.randn(t, f, device=dev, dtype=torch.bfloat16)
    nbytes = 2 * dy.numel() * dy.element_size()
    copy = measure(lambda: dy.clone(), clock)
    rows = []
    for axis in AXES:
        default = triton_prune._DEFAULT_TILE[axis]
        for tile in ((16, 64), (32, 32), (8, 128), (64, 16), (128, 8), (32, 64), (64, 32)):
            for warps in (4, 8):
                if not budget.allows("the rest of the tile sweep", 5):
                    break
                tm = measure(lambda a=axis, tl_=tile, w=warps: triton_prune.prune_2d(
                    dy, "mvue", "2:4", a, seed=1, tile=tl_, num_warps=w), clock)
                mark = " (default)" if tile == default and warps == triton_prune.DEFAULT_WARPS else ""
                rows.append([axis, f"{tile}{mark}", warps, *fmt(tm), f"{nbytes / ms(tm) / 1e6:.0f}",
                             f"{ms(copy) / ms(tm):.2f}"])
    table(f"Tile sweep, prune mvue 2:4 (Philox), dY {t}x{f} bf16 (copy {ms(copy):.3f} ms)",
          ["axis", "tile (rows, blocks)", "warps", "kernel ms", "call ms", "GB/s", "vs copy"], rows)


def _operands(dev, t: int, width: int):
    gen = torch.Generator(dev).manual_seed(width)
    dy = torch.randn(t, width, device=dev, dtype=torch.bfloat16, generator=gen)
    x = torch.randn(t, width, device=dev, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(width, width, device=dev, dtype=torch.bfloat16, generator=gen) * width**-0.5
    return dy, x, w


def _linear_case(dev, t: int, width: int, gemm: str, clock) -> list:
    """Times of dX + dW for dY (t, width), X (t, width), W (width, width) in bf16."""
    dy, x, w = _operands(dev, t, width)

    def dense():
        return dy @ w, dy.t() @ x

    def pruned_dense():
        a = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=1)
        b = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", seed=2)
        return a @ w, b @ x

    def sparse():
        return (
            sparse_backward.grad_input(dy, w, "mvue", seed=1, backend=gemm),
            sparse_backward.grad_weight(dy, x, "mvue", seed=2, backend=gemm),
        )

    d, p, s = measure(dense, clock), measure(pruned_dense, clock), measure(sparse, clock)
    return [f"{t}x{width}x{width}", *fmt(d), *fmt(p), *fmt(s), f"{ms(d) / ms(s):.2f}x"]


def _sparse_operator(a: torch.Tensor, gemm: str):
    """B -> A @ B on the sparse tensor cores for an already 2:4-pruned A (compressed once, here)."""
    if gemm == "cusparselt":
        ca = torch._cslt_compress(a)
        return lambda b: torch._cslt_sparse_mm(ca, b)
    conv = torch.sparse._semi_structured_conversions
    packed, meta = conv.sparse_semi_structured_from_dense_cutlass(a)
    return lambda b: torch._sparse_semi_structured_mm(packed, meta, b)


def gemm_layouts(dev, t: int, width: int, gemm: str, clock) -> list[list]:
    """The GEMMs alone, dense operand B row-major (as nmgrad passes W and X) vs column-major (as
    torch's sparse Linear passes ``dense.t()``): which one the sparse kernels prefer."""
    dy, x, w = _operands(dev, t, width)
    a_x = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=1)  # (T, F)
    a_w = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", seed=2)  # (F, T)
    rows = []
    for name, a, b in (("dX = dY^ W", a_x, w), ("dW = dY^^T X", a_w, x)):
        base = None
        for layout, bb in (("row-major", b), ("column-major", b.t().contiguous().t())):
            dense_t = measure(lambda a=a, bb=bb: a @ bb, clock)
            base = base or ms(dense_t)
            rows.append([f"{t}x{width}x{width}", name, "dense", layout, *fmt(dense_t), f"{base / ms(dense_t):.2f}x"])
            try:
                op = _sparse_operator(a, gemm)
                sp = measure(lambda op=op, bb=bb: op(bb), clock)
                rows.append([f"{t}x{width}x{width}", name, gemm, layout, *fmt(sp), f"{base / ms(sp):.2f}x"])
            except RuntimeError as exc:
                rows.append([f"{t}x{width}x{width}", name, gemm, layout, "error", str(exc)[:60], "-"])
    return rows


def cslt_search(a: torch.Tensor, b: torch.Tensor, clock, budget: Budget, max_s: float = 15.0) -> dict:
    """Time ``_cslt_sparse_mm(A, B, alg_id=i, split_k=s)`` for every alg_id up to the maximum torch
    reports and split_k in 1, 2, 4, 8 (torch 2.11: ``torch._C._cusparselt.mm_search`` gives torch's
    own pick and the maximum id; the deprecated ``torch._cslt_sparse_mm_search`` is not used).
    At most ``max_s`` seconds per GEMM ("truncated" says whether it stopped early)."""
    ca = torch._cslt_compress(a)
    torch_pick, max_id = None, 15
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is not None:
        with contextlib.suppress(RuntimeError, TypeError):
            alg, split_k, split_k_mode, max_id = search(ca, b, None, None, None, False)
            torch_pick = {"alg_id": int(alg), "split_k": int(split_k), "split_k_mode": int(split_k_mode)}
    timings = []
    stop = time.perf_counter() + max_s
    truncated = False
    for alg in range(int(max_id) + 1):
        for split_k in (1, 2, 4, 8):
            truncated = time.perf_counter() > stop
            if truncated or not budget.allows("the rest of the cuSPARSELt algorithm search", 20):
                break
            try:
                tm = measure(lambda alg=alg, sk=split_k: torch._cslt_sparse_mm(ca, b, alg_id=alg, split_k=sk),
                             clock, batch=None, repeats=3)
            except (RuntimeError, TypeError):  # an id past the last, or a split_k this algorithm rejects
                if split_k == 1:
                    break
                continue
            timings.append({"alg_id": alg, "split_k": split_k, "ms": tm["call_ms"]})
        if truncated:
            break
    return {"torch_pick": torch_pick, "max_alg_id": int(max_id), "timings": timings, "truncated": truncated}


def linear_backward(dev, quick: bool, clock, budget: Budget) -> None:
    cap = torch.cuda.get_device_capability()
    gemm, why = backend.pick_backend(cap, sparse_gemm.cusparselt_available())
    if why is not None:
        note(f"\nLinear backward: sparse GEMMs unavailable ({why}); skipped")
        return
    widths = (4096,) if quick else (4096, 8192)
    rows = []
    for width in widths:
        if budget.allows(f"Linear backward from width {width}", 30):
            rows.append(_linear_case(dev, 16384, width, gemm, clock))
    what = "fused prune+pack + 2:4 GEMMs" if gemm == "cusparselt" else "fused prune+compress + 2:4 GEMMs"
    table(
        f"Linear backward bf16 (dX + dW), ms; sparse = {what} (backend={gemm}, forced); "
        "target >= 1.3x at 8192",
        ["T x in x out", "dense kernel", "dense call", "prune+dense kernel", "prune+dense call",
         "sparse kernel", "sparse call", "dense/sparse"],
        rows,
    )
    rows = []
    for width in widths:
        if budget.allows(f"GEMM operand layouts from width {width}", 30):
            rows += gemm_layouts(dev, 16384, width, gemm, clock)
    table("GEMMs alone (pruned dY, bf16): dense operand B row-major vs column-major, ms",
          ["T x in x out", "GEMM", "backend", "B layout", "kernel ms", "call ms", "vs dense row-major"], rows)
    if not sparse_gemm.cusparselt_available():
        return
    rows = []
    REPORT["cslt_search"] = []
    for width in widths:
        dy, x, w = _operands(dev, 16384, width)
        a_x = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=1)
        a_w = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", seed=2)
        for name, a, b in (("dX = dY^ W", a_x, w), ("dW = dY^^T X", a_w, x)):
            if not budget.allows("the rest of the cuSPARSELt algorithm search", 30):
                continue
            res = cslt_search(a, b, clock, budget)
            REPORT["cslt_search"].append({"gemm": name, "width": width, **res})
            if not res["timings"]:
                rows.append([width, name, "no algorithm ran", "-", "-", "-"])
                continue
            default = next((r["ms"] for r in res["timings"] if (r["alg_id"], r["split_k"]) == (0, 1)), None)
            best = min(res["timings"], key=lambda r: r["ms"])
            pick = res["torch_pick"]
            rows.append([width, name, f"{default:.3f}" if default else "-",
                         f"{best['ms']:.3f} (alg {best['alg_id']}, split_k {best['split_k']})",
                         f"alg {pick['alg_id']}, split_k {pick['split_k']}" if pick else "n/a",
                         f"{len(res['timings'])} configs, max alg_id {res['max_alg_id']}"
                         + (" (truncated at 15 s)" if res["truncated"] else "")])
    table("cuSPARSELt algorithm search (call ms per GEMM; every alg_id x split_k timed)",
          ["width", "GEMM", "default (alg 0, split_k 1)", "best", "torch's mm_search pick", "searched"], rows)


SITE_METHODS = ("mvue", "mvue12")
"""The sparse-gradient methods timed through the GEMM-site path, at 2:4, beside dense."""


def site_mode(model: torch.nn.Module, method: str):
    """The interception ``nmgrad train`` runs: every GEMM site of ``model`` through the sparse-gradient
    handler (``method`` 2:4 on dX and dW, backend auto: Triton prune, GEMM route per
    ``backend.GEMM_ROUTES``)."""
    from nmgrad_cli.sites import ParamIndex, SiteMode
    from nmgrad_cli.train.config import SparseGradConfig
    from nmgrad_cli.train.sparse_grad import SparseGradSites

    return SiteMode(ParamIndex(model), SparseGradSites(SparseGradConfig(method=method, pattern="2:4"), "*"))


def site_linear_backward(dev, quick: bool, clock, budget: Budget) -> None:
    """dX + dW of one bf16 ``nn.Linear`` (T = 16384, in = out = width) through the GEMM-site path,
    dense (plain torch) vs mvue 2:4 vs mvue12 2:4 side by side: ``torch.autograd.grad`` of the
    forward's output with a fixed dY (graph kept), so each call is one backward."""
    rows = []
    for width in (4096,) if quick else (4096, 8192):
        if not budget.allows(f"site-path Linear backward from width {width}", 30):
            break
        torch.manual_seed(width)
        lin = torch.nn.Linear(width, width, bias=False).to(dev, torch.bfloat16)
        x = torch.randn(16384, width, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(16384, width, device=dev, dtype=torch.bfloat16)
        times = {}
        for method in ("dense", *SITE_METHODS):
            mode = contextlib.nullcontext() if method == "dense" else site_mode(lin, method)
            with mode:
                out = lin(x)  # (T, width)
            times[method] = measure(
                lambda out=out, x=x, w=lin.weight, dy=dy: torch.autograd.grad(out, (x, w), dy, retain_graph=True),
                clock)
            del out
        dense_ms = ms(times["dense"])
        rows.append([f"16384x{width}x{width}", *fmt(times["dense"]),
                     *(v for m in SITE_METHODS for v in (*fmt(times[m]), f"{dense_ms / ms(times[m]):.2f}x"))])
    table("Linear backward through the GEMM-site interception (what nmgrad train runs), bf16, ms; "
          "target dense/mvue >= 1.3x at 8192, >= 1.1x at 4096",
          ["T x in x out", "dense kernel", "dense call",
           *(c for m in SITE_METHODS for c in (f"{m} kernel", f"{m} call", f"dense/{m}"))], rows)


def train_step(dev, quick: bool, clock, budget: Budget) -> None:
    """One training step (forward, backward, AdamW) per model: dense (plain torch) vs mvue 2:4 vs
    mvue12 2:4 through the GEMM-site interception, side by side."""
    import torch.nn.functional as F

    from nmgrad_cli.models.gpt import GPT, GPTConfig

    cases = [("gpt (built-in, fp32)", GPTConfig(), 32, torch.float32),
             ("gpt (built-in, bf16)", GPTConfig(), 32, torch.bfloat16)]
    if not quick:
        wide = GPTConfig(vocab_size=128, block_size=1024, n_layer=4, n_head=16, n_embd=1024)
        cases.append(("gpt 1024 wide x 4, T=16384 (bf16)", wide, 16, torch.bfloat16))
    rows = []
    for name, cfg, batch, dtype in cases:
        if not budget.allows(f"training steps from '{name}'", 30):
            break
        times = {}
        try:
            for method in ("dense", *SITE_METHODS):
                torch.manual_seed(0)
                model = GPT(cfg).to(dev, dtype)
                mode = site_mode(model, method) if method != "dense" else contextlib.nullcontext()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)

                def step(model=model, opt=opt, idx=idx, mode=mode):
                    with mode:
                        logits = model(idx)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                times[method] = measure(step, clock, batch=None)  # host work is part of a step
                del model, opt
        except Exception as exc:  # report and go on: the other tables still count
            rows.append([name, "error", f"{type(exc).__name__}: {str(exc)[:80]}", *["-"] * (2 * len(SITE_METHODS) - 1)])
            FAILED.append(f"training step {name}")
            continue
        dense_ms = ms(times["dense"])
        rows.append([name, f"{dense_ms:.2f}",
                     *(v for m in SITE_METHODS for v in (f"{ms(times[m]):.2f}", f"{dense_ms / ms(times[m]):.2f}x"))])
    table("One training step (forward + backward + AdamW), call ms; sparse = 2:4 on dX and dW of every "
          "GEMM site (the interception nmgrad train runs); target dense/mvue >= 1.1x on the 1024-wide GPT",
          ["model", "dense", *(c for m in SITE_METHODS for c in (m, f"dense/{m}"))], rows)


def route_decisions() -> None:
    """What ``backend="auto"`` decided per GEMM shape in this run (route, reason, measured ms)."""
    rows = [[" x ".join(map(str, d["shape"])), d["dtype"], d["route"],
             "-" if d["sparse_ms"] is None else f"{d['sparse_ms']:.3f}",
             "-" if d["dense_ms"] is None else f"{d['dense_ms']:.3f}", d["reason"][:110]]
            for d in backend.gemm_route_decisions()]
    REPORT["gemm_routes"] = backend.gemm_route_decisions()
    table("GEMM routes decided in this run (backend.gemm_route_decisions(); A m x k @ B k x n)",
          ["m x k x n", "dtype", "route", "sparse ms", "prune+dense ms", "reason"], rows)


# ---- the run ---------------------------------------------------------------------------------------


def out_dir(arg: str | None) -> Path:
    """$OUT when set (the GPU machines' result folder), else --out, else a new folder under runs/."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if arg:
        return Path(arg)
    return Path(__file__).resolve().parents[1] / "runs" / time.strftime("gpu_bench-%Y%m%d-%H%M%S")


def write_outputs(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    v = info["versions"]
    cap = f" (sm{v['capability'][0]}{v['capability'][1]})" if v["capability"] else ""
    lines = [f"GPU: {v['gpu']}{cap}; torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, "
             f"cuSPARSELt {v['cusparselt']}; python {v['python']}, {v['platform']}", ""]
    for tab in REPORT["tables"]:
        widths = [max(len(h), *(len(r[i]) for r in tab["rows"])) if tab["rows"] else len(h)
                  for i, h in enumerate(tab["header"])]
        lines += [f"## {tab['title']}", "", "| " + " | ".join(tab["header"]) + " |",
                  "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in tab["rows"]]
        lines.append("")
    lines += [n for n in REPORT["notes"]] + [f"skipped (time budget): {s}" for s in REPORT["skipped"]]
    lines.append(info["summary"])
    (folder / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    (folder / "gpu_bench.json").write_text(json.dumps({**info, **REPORT}, indent=1, default=str) + "\n")
    print(f"\nwrote {folder / 'gpu_bench.md'} and {folder / 'gpu_bench.json'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step table")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile/warps sweep of the prune kernel")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; what would start later is skipped")
    ap.add_argument("--out", default=None, help="folder for gpu_bench.md/.json ($OUT wins when set)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    budget = Budget(args.budget)
    info = {"versions": versions(), "args": vars(args), "budget_s": args.budget}
    if not torch.cuda.is_available():
        note("\nNo CUDA GPU: nothing to time. Running the small Triton-interpreter checks on the CPU instead.")
        try:
            import triton  # noqa: F401
        except ImportError:
            note("triton is not installed: no interpreter checks either (pip install triton)")
        else:
            interpreter_checks()
    else:
        dev = torch.device("cuda")
        os.environ.pop("TRITON_INTERPRET", None)
        clock = CudaClock()
        sections = [("correctness", lambda: gpu_correctness(dev)),
                    ("throughput", lambda: throughput(dev, args.quick, clock, budget)),
                    ("Linear backward GEMMs", lambda: linear_backward(dev, args.quick, clock, budget)),
                    ("site-path Linear backward", lambda: site_linear_backward(dev, args.quick, clock, budget))]
        if not args.no_train:
            sections.append(("training step", lambda: train_step(dev, args.quick, clock, budget)))
        if not args.no_sweep:
            sections.append(("tile sweep", lambda: tile_sweep(dev, args.quick, clock, budget)))
        for name, run in sections:
            if budget.allows(f"section '{name}' and the rest", 10):
                run()
                torch.cuda.empty_cache()
        route_decisions()
    info["total_s"] = round(time.perf_counter() - t0, 1)
    info["failed"] = FAILED
    info["summary"] = f"total {info['total_s']:.0f} s; " + (f"FAILED: {FAILED}" if FAILED else "all checks ok")
    print(f"\n{info['summary']}")
    write_outputs(out_dir(args.out), info)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
