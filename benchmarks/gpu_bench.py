"""GPU benchmark of the prune kernels and the 2:4 sparse backward GEMMs (not a test).

    python benchmarks/gpu_bench.py [--quick] [--no-train] [--no-sweep]

On one CUDA GPU (< 10 minutes on an H100), prints:
1. correctness on the GPU: each Triton kernel (method x pattern x axis) against the torch reference
   on the same uniforms, the compressed operand, and the sparse GEMMs against a dense GEMM on the
   same pruned tensor;
2. prune(+compress) throughput on dY [16384, 8192] bf16 next to a device-to-device copy (clone) of
   the same tensor; "GB/s" = 2 x bytes(dY) / time for every row (read dY + write dY-sized output,
   as a copy does), so the ratio column is copy time / kernel time (target >= 0.60);
3. Linear backward (dX and dW) in bf16 at T = 16384, in = out = 4096 and 8192: dense GEMMs vs
   prune + compress + 2:4 sparse GEMMs, pruning included (target >= 1.3x at 8192);
4. one training step (forward, backward, AdamW) of the built-in ``gpt`` model and of a wider GPT,
   dense vs sparse-gradient (mvue 2:4);
5. a sweep of the prune kernel's tile and warps (to choose ``triton_prune._DEFAULT_TILE``).
Times are medians of CUDA-event timings after warmup, all rows of a table measured in one run.
Without a GPU it says so, runs small Triton-interpreter correctness checks on the CPU and exits 0
(1 if a check fails).
"""

from __future__ import annotations

import argparse
import contextlib
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

from nmgrad_cli import prune  # noqa: E402
from nmgrad_cli.kernels import sparse_gemm, triton_prune  # noqa: E402
from nmgrad_cli.methods import METHODS  # noqa: E402
from nmgrad_cli.patterns import parse_pattern  # noqa: E402

KERNELS = [(m, p) for m in METHODS for p in ("1:2", "2:4") if triton_prune.supports(m, *map(int, p.split(":")))]
AXES = ("features", "tokens")
FAILED: list[str] = []


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def check(ok: bool, what: str) -> str:
    if not ok:
        FAILED.append(what)
    return "ok" if ok else "FAIL"


def versions() -> None:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    cslt = None
    with contextlib.suppress(AttributeError):
        cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    print(f"GPU: {gpu}" + (f" (sm{cap[0]}{cap[1]})" if cap else ""))
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, cuSPARSELt {cslt}")
    print(f"python {platform.python_version()}, {platform.platform()}")


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
    print(f"\ninterpreter checks took {time.perf_counter() - t0:.1f} s")


# ---- on a GPU --------------------------------------------------------------------------------------


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() over ``iters`` CUDA-event timings after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    table("Triton kernels vs reference on the GPU (same uniforms)",
          ["method", "pattern", "axis", "dtype", "mask flips", "max rel err", "<= N per M", "check"], rows)

    backend, why = sparse_gemm.pick_backend(torch.cuda.get_device_capability(), sparse_gemm._cusparselt_available())
    rows = []
    if why is not None:
        print(f"\nsparse GEMMs unavailable here: {why}")
        return
    if backend == "cutlass":
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
        dx = sparse_gemm.grad_input(dy, w, "mvue", uniforms=u_f, min_mnk=0)
        dw = sparse_gemm.grad_weight(dy, x, "mvue", uniforms=u_t, min_mnk=0)
        for name, out, ref in (("dX = dY^ W", dx, ref_dx), ("dW = dY^^T X", dw, ref_dw)):
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append([f"{name} ({backend})", str(dtype).removeprefix("torch."), f"{err:.1e}",
                         check(err < 1e-2, f"{name} {dtype}")])
    table("2:4 sparse GEMMs vs dense GEMM on the same pruned dY (relative Frobenius error)",
          ["what", "axis/dtype", "rel err", "check"], rows)


def throughput(dev, quick: bool) -> None:
    t, f = (8192, 8192) if quick else (16384, 8192)
    dy = torch.randn(t, f, device=dev, dtype=torch.bfloat16)
    t, f = dy.shape
    nbytes = 2 * dy.numel() * dy.element_size()
    cap = torch.cuda.get_device_capability()
    backend, why = sparse_gemm.pick_backend(cap, sparse_gemm._cusparselt_available())
    copy_ms = cuda_time(lambda: dy.clone())
    rows = [["copy (clone)", "-", f"{copy_ms:.3f}", f"{nbytes / copy_ms / 1e6:.0f}", "1.00"]]

    def row(name, axis, fn):
        ms = cuda_time(fn)
        rows.append([name, axis, f"{ms:.3f}", f"{nbytes / ms / 1e6:.0f}", f"{copy_ms / ms:.2f}"])

    for method, pattern in KERNELS:
        for axis in AXES:
            row(f"prune {method} {pattern} (Philox)", axis,
                lambda m=method, p=pattern, a=axis: triton_prune.prune_2d(dy, m, p, a, seed=1))
    for axis in AXES:
        rows_, length = (f, t) if axis == "tokens" else (t, f)
        u = torch.rand(rows_ * length // 4, 1, device=dev)
        row("prune mvue 2:4 (supplied uniforms)", axis,
            lambda a=axis, u=u: triton_prune.prune_2d(dy, "mvue", "2:4", a, uniforms=u))
        if why is None and backend == "cutlass":
            row("prune+compress mvue 2:4 (fused, CUTLASS)", axis,
                lambda a=axis: triton_prune.prune_compress_2d(dy, "mvue", "2:4", a, seed=1))
        if why is None and sparse_gemm._cusparselt_available():
            row("prune mvue 2:4 + _cslt_compress", axis,
                lambda a=axis: torch._cslt_compress(triton_prune.prune_2d(dy, "mvue", "2:4", a, seed=1)))
    row("reference prune mvue 2:4 (torch)", "features",
        lambda: prune(dy, "mvue", "2:4", dim=1, backend="reference"))
    table(f"Prune throughput, dY {t}x{f} bf16 (GB/s = 2 x bytes(dY) / time; target ratio >= 0.60)",
          ["kernel", "axis", "ms", "GB/s", "vs copy"], rows)


def tile_sweep(dev, quick: bool) -> None:
    """mvue 2:4 (Philox) on dY [16384, 8192] bf16 over tiles and warps: pick the defaults from this."""
    t, f = (8192, 8192) if quick else (16384, 8192)
    dy = torch.randn(t, f, device=dev, dtype=torch.bfloat16)
    nbytes = 2 * dy.numel() * dy.element_size()
    copy_ms = cuda_time(lambda: dy.clone())
    rows = []
    for axis in AXES:
        default = triton_prune._DEFAULT_TILE[axis]
        for tile in ((16, 64), (32, 32), (8, 128), (64, 16), (128, 8), (32, 64), (64, 32)):
            for warps in (4, 8):
                ms = cuda_time(lambda a=axis, tl_=tile, w=warps: triton_prune.prune_2d(
                    dy, "mvue", "2:4", a, seed=1, tile=tl_, num_warps=w))
                mark = " (default)" if tile == default and warps == 4 else ""
                gbs = f"{nbytes / ms / 1e6:.0f}"
                rows.append([axis, f"{tile}{mark}", warps, f"{ms:.3f}", gbs, f"{copy_ms / ms:.2f}"])
    table(f"Tile sweep, prune mvue 2:4 (Philox), dY {t}x{f} bf16 (copy {copy_ms:.3f} ms)",
          ["axis", "tile (rows, blocks)", "warps", "ms", "GB/s", "vs copy"], rows)


def _linear_case(dev, t: int, width: int, backend: str) -> list:
    """Times of dX + dW for dY (t, width), X (t, width), W (width, width) in bf16."""
    dy = torch.randn(t, width, device=dev, dtype=torch.bfloat16)
    x = torch.randn(t, width, device=dev, dtype=torch.bfloat16)
    w = torch.randn(width, width, device=dev, dtype=torch.bfloat16) * width**-0.5

    def dense():
        return dy @ w, dy.t() @ x

    def pruned_dense():
        a = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=1)
        b = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", seed=2)
        return a @ w, b @ x

    def sparse():
        return (
            sparse_gemm.grad_input(dy, w, "mvue", seed=1, backend=backend),
            sparse_gemm.grad_weight(dy, x, "mvue", seed=2, backend=backend),
        )

    d_ms, p_ms, s_ms = cuda_time(dense), cuda_time(pruned_dense), cuda_time(sparse)
    if backend == "cusparselt":
        _cslt_algorithms(dy, x, w, width)
    return [f"{t}x{width}x{width}", f"{d_ms:.3f}", f"{p_ms:.3f}", f"{s_ms:.3f}", f"{d_ms / s_ms:.2f}x"]


def _cslt_algorithms(dy, x, w, width: int) -> None:
    """The GEMMs alone: dense vs cuSPARSELt with its default and its searched algorithm."""
    a = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=1)
    b = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", seed=2)
    try:
        ca, cb = torch._cslt_compress(a), torch._cslt_compress(b)
        alg_a, alg_b = torch._cslt_sparse_mm_search(ca, w), torch._cslt_sparse_mm_search(cb, x)
        default = cuda_time(lambda: (torch._cslt_sparse_mm(ca, w), torch._cslt_sparse_mm(cb, x)))
        searched = cuda_time(
            lambda: (torch._cslt_sparse_mm(ca, w, alg_id=alg_a), torch._cslt_sparse_mm(cb, x, alg_id=alg_b))
        )
        dense = cuda_time(lambda: (a @ w, b @ x))
        print(
            f"  {width}: GEMMs only: dense {dense:.3f} ms, cuSPARSELt default alg {default:.3f} ms "
            f"({dense / default:.2f}x), searched alg ({alg_a}, {alg_b}) {searched:.3f} ms ({dense / searched:.2f}x)"
        )
    except RuntimeError as exc:
        print(f"  {width}: cuSPARSELt algorithm search failed: {exc}")


def linear_backward(dev, quick: bool) -> None:
    cap = torch.cuda.get_device_capability()
    backend, why = sparse_gemm.pick_backend(cap, sparse_gemm._cusparselt_available())
    if why is not None:
        print(f"\nLinear backward: sparse GEMMs unavailable ({why}); skipped")
        return
    rows = [_linear_case(dev, 16384, width, backend) for width in ((4096,) if quick else (4096, 8192))]
    table(
        f"Linear backward bf16 (dX + dW), ms; sparse = prune + compress + 2:4 GEMMs ({backend}); "
        "target >= 1.3x at 8192",
        ["T x in x out", "dense", "prune + dense", "sparse", "dense/sparse"],
        rows,
    )


def train_step(dev, quick: bool) -> None:
    try:
        from nmgrad_cli.models.gpt import GPT, GPTConfig
        from nmgrad_cli.train import sparsify_gradients_
    except ImportError as exc:
        print(f"\ntraining step skipped: {exc}")
        return
    import torch.nn.functional as F

    cases = [("gpt (built-in, fp32)", GPTConfig(), 32, torch.float32),
             ("gpt (built-in, bf16)", GPTConfig(), 32, torch.bfloat16)]
    if not quick:
        wide = GPTConfig(vocab_size=128, block_size=1024, n_layer=4, n_head=16, n_embd=1024)
        cases.append(("gpt 1024 wide x 4, T=16384 (bf16)", wide, 16, torch.bfloat16))
    rows = []
    for name, cfg, batch, dtype in cases:
        times = {}
        for mode in ("dense", "sparse"):
            torch.manual_seed(0)
            model = GPT(cfg).to(dev, dtype)
            if mode == "sparse":
                sparsify_gradients_(model, "mvue", "2:4")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)

            def step(model=model, opt=opt, idx=idx):
                logits = model(idx)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            times[mode] = cuda_time(step, warmup=3, iters=10)
            del model, opt
        ratio = times["dense"] / times["sparse"]
        rows.append([name, f"{times['dense']:.2f}", f"{times['sparse']:.2f}", f"{ratio:.2f}x"])
    table("One training step (forward + backward + AdamW), ms; sparse = mvue 2:4 on dX and dW of every Linear",
          ["model", "dense", "sparse", "dense/sparse"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step table")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile/warps sweep of the prune kernel")
    args = ap.parse_args()
    versions()
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        print("\nNo CUDA GPU: nothing to time. Running the small Triton-interpreter checks on the CPU instead.")
        try:
            import triton  # noqa: F401
        except ImportError:
            print("triton is not installed: no interpreter checks either (pip install triton)")
            return 0
        interpreter_checks()
    else:
        dev = torch.device("cuda")
        os.environ.pop("TRITON_INTERPRET", None)
        gpu_correctness(dev)
        throughput(dev, args.quick)
        if not args.no_sweep:
            tile_sweep(dev, args.quick)
        linear_backward(dev, args.quick)
        if not args.no_train:
            train_step(dev, args.quick)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; " + (f"FAILED: {FAILED}" if FAILED else "all checks ok"))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
