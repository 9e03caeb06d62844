"""Time of each pruning method divided by the time of x.abs() on the same tensor, and the fraction
of a copy's bandwidth it reaches (copy time / its time; x.clone() reads and writes the same bytes
as a prune) (not a test).

    python benchmarks/prune_bench.py [--log2-numel 24] [--pattern 2:4] [--repeats 7] [--device cuda]

Every repeat times x.abs(), x.clone() and then each method back to back, so the ratios are taken
side by side under the same machine load; the table shows the median over repeats of each
per-repeat ratio. Targets (issue 2, 2^24 float32 on a CPU): mvue 2:4 <= 4x, greedy <= 3x; on a GPU
(issue 18, the Triton kernels, bf16 16384x8192 in gpu_bench): mvue 2:4 >= 0.6 of a copy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nmgrad_cli import METHODS, prune
from nmgrad_cli.methods import is_defined
from nmgrad_cli.patterns import parse_pattern


def timed(fn, *args, sync=lambda: None, **kwargs) -> float:
    sync()
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2-numel", type=int, default=24)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", default="auto,reference", help="comma list of prune backends")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (auto then runs the Triton kernels)")
    args = ap.parse_args()

    pat = parse_pattern(args.pattern)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(1 << args.log2_numel, generator=torch.Generator().manual_seed(0)).to(dev)
    gen = torch.Generator(dev).manual_seed(1)
    backends = args.backends.split(",")
    cases = []
    for name in METHODS:
        if not is_defined(name, pat):
            continue
        for backend in backends:
            try:
                prune(x[:4096], name, pat, generator=gen, backend=backend)
            except Exception as exc:  # e.g. no fused kernel for this pattern
                print(f"skip {name} {backend}: {exc}")
                continue
            cases.append((name, backend))
    # warm up (compiles the fused kernels for this shape family)
    x.abs()
    for name, backend in cases:
        prune(x, name, pat, generator=gen, backend=backend)

    ratios: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    vs_copy: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    abs_times = []
    for _ in range(args.repeats):
        t_abs = timed(x.abs, sync=sync)
        t_copy = timed(x.clone, sync=sync)
        abs_times.append(t_abs)
        for name, backend in cases:
            t = timed(prune, x, name, pat, generator=gen, backend=backend, sync=sync)
            ratios[(name, backend)].append(t / t_abs)
            vs_copy[(name, backend)].append(t_copy / t)

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"\nprune {args.pattern} on 2^{args.log2_numel} float32 elements; {dev.type}: {where}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"x.abs(): median {statistics.median(abs_times) * 1e3:.1f} ms over {args.repeats} repeats\n")
    print(f"| {'method':<12} | {'backend':<10} | {'time / abs (median)':>20} | {'min':>6} | {'max':>6} | "
          f"{'vs copy':>7} |")
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 22}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    for (name, backend), r in ratios.items():
        print(f"| {name:<12} | {backend:<10} | {statistics.median(r):>19.2f}x | {min(r):>5.2f}x | {max(r):>5.2f}x | "
              f"{statistics.median(vs_copy[(name, backend)]):>7.2f} |")


if __name__ == "__main__":
    main()
