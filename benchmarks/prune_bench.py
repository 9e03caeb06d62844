"""Time of each pruning method divided by the time of x.abs() on the same tensor (not a test).

    python benchmarks/prune_bench.py [--log2-numel 24] [--pattern 2:4] [--repeats 7]

Every repeat times x.abs() and then each method back to back, so the ratios are taken side by side
under the same machine load; the table shows the median over repeats of each per-repeat ratio.
Targets (issue 2, 2^24 float32 on a CPU): mvue 2:4 <= 4x, greedy <= 3x.
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


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2-numel", type=int, default=24)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", default="auto,reference", help="comma list of prune backends")
    args = ap.parse_args()

    pat = parse_pattern(args.pattern)
    x = torch.randn(1 << args.log2_numel, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
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
    abs_times = []
    for _ in range(args.repeats):
        t_abs = timed(x.abs)
        abs_times.append(t_abs)
        for name, backend in cases:
            t = timed(prune, x, name, pat, generator=gen, backend=backend)
            ratios[(name, backend)].append(t / t_abs)

    cpu = platform.processor() or platform.machine()
    print(f"\nprune {args.pattern} on 2^{args.log2_numel} float32 elements; CPU: {cpu}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"x.abs(): median {statistics.median(abs_times) * 1e3:.1f} ms over {args.repeats} repeats\n")
    print(f"| {'method':<12} | {'backend':<10} | {'time / abs (median)':>20} | {'min':>6} | {'max':>6} |")
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 22}|{'-' * 8}|{'-' * 8}|")
    for (name, backend), r in ratios.items():
        print(f"| {name:<12} | {backend:<10} | {statistics.median(r):>19.2f}x | {min(r):>5.2f}x | {max(r):>5.2f}x |")


if __name__ == "__main__":
    main()
