"""What `nmgrad evaluate` costs, side by side in one run (not a test).

R = evaluate wall time / (dY floats x methods x samples x time per float of one ``x.abs()`` pass),
the measure of issue 9: how many passes over memory one Monte-Carlo draw of one method costs.
Every evaluate runs as its own ``nmgrad evaluate`` process (what a user runs), on the same dump:

- ``warm``: torch.compile's cache (TORCHINDUCTOR_CACHE_DIR) filled by an earlier run;
- ``cold``: an empty cache, as on a fresh machine (compiling the fused CPU kernels);
- ``busy``: warm, beside two busy-loop processes (every core of a 2-core machine busy).

The abs pass is timed in this process right before each run, over as many floats as evaluate
reads; R uses the quickest of these (the machine at its least loaded; the column shows each one).
The targets are R <= 4 (issue 19), busy <= 3x warm, cold at most 10 s slower than warm.

    nmgrad capture --model gpt --steps 1 --out /tmp/g1.h5          # 39 MB, 25 layers
    python benchmarks/evaluate_bench.py /tmp/g1.h5 --layers 'blocks.0.*,blocks.1.*'
    python benchmarks/evaluate_bench.py /tmp/g.h5                    # the README's 2-step dump
    python benchmarks/evaluate_bench.py /tmp/g1.h5 --layers 'blocks.0.*' --also-backend fused
    python benchmarks/evaluate_bench.py /tmp/g1.h5 --device cuda     # on a GPU: GB/s vs the file-read rate
    python benchmarks/evaluate_bench.py /tmp/big.h5 --synthetic 4,16384,4096 --device cuda --no-cpu

Several dumps are benchmarked in turn in one run, then side by side (R per float, peak RSS of each
``nmgrad evaluate`` process against the largest record); ``--warm-only`` skips the cold and busy runs;
``--memory-budget`` is passed to evaluate:

    python benchmarks/evaluate_bench.py /work/data/gpt2s_2step.h5 /tmp/g2.h5 --warm-only

``--synthetic LAYERS,T,F`` first writes (uncompressed) a dump of that many Linear layers with one dY
record of (T, F) each, heavy-tailed like real gradients, to the dump path (refusing to overwrite one):
real-size records for ``--device cuda``, where the gpt dump's small records measure launch overhead.

``--device cuda`` measures instead, in this process: the rate of reading the selected dY records from the
HDF5 file (``Record.load``, best of 3), and evaluate's rate in GB/s of dY evaluated (after one run that
compiles the Triton kernels), beside the same evaluate on the CPU. The target: evaluate on the GPU bound
by reading the file (its rate near the read rate).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nmgrad_cli
from nmgrad_cli.dump import DumpReader
from nmgrad_cli.evaluate import EvalConfig
from nmgrad_cli.evaluate.run import open_all
from nmgrad_cli.evaluate.run import selected_records as _selected_records


@contextlib.contextmanager
def selected_records(dump: Path, cfg: EvalConfig):
    """The grad records evaluate will prune with ``cfg`` (their dumps open inside the block)."""
    opened = open_all([dump], cfg)
    try:
        yield [r for reader, sel in opened for r in _selected_records(reader, sel, cfg)]
    finally:
        for reader, _ in opened:
            reader.close()


def selected_floats(dump: Path, cfg: EvalConfig) -> tuple[int, int, int]:
    """(dY floats, records, largest record) that evaluate will prune with ``cfg``."""
    with selected_records(dump, cfg) as recs:
        sizes = [math.prod(r.shape) for r in recs]
    return sum(sizes), len(sizes), max(sizes)


def abs_seconds_per_float(numel: int, reps: int = 10) -> float:
    """Best-of time per float of one ``x.abs()`` pass over as many floats as evaluate reads (at most
    2^26), one thread (evaluate's auto policy): the cost of one pass over memory."""
    x = torch.randn(min(numel, 1 << 26))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        x.abs()
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(before)
    return best / x.numel()


def r_value(wall: float, floats: int, methods: int, samples: int, per_float: float) -> float:
    """R: evaluate's wall time over ``floats x methods x samples`` passes of one ``x.abs()`` per float."""
    return wall / (floats * methods * samples * per_float)


TREE = Path(nmgrad_cli.__file__).resolve().parents[1]
"""The checkout the evaluate processes run (PYTHONPATH=<tree>, or the installed one)."""


def run_evaluate(
    dump: Path, args: argparse.Namespace, cache: Path, backend: str | None = None
) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one ``nmgrad evaluate`` process."""
    cmd = [sys.executable, "-m", "nmgrad_cli", "evaluate", str(dump.resolve()), "--pattern", args.pattern,
           "--samples", str(args.samples), "--json", os.devnull, "--force"]
    if backend is not None:
        cmd += ["--backend", backend]
    for flag in ("layers", "steps", "max_records", "threads", "memory_budget"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    t = time.perf_counter()
    # run in the tree this script imported nmgrad_cli from: `python -m` puts the working directory
    # first on sys.path, so another checkout's cwd would evaluate with that checkout's code
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=TREE, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"evaluate failed ({proc.returncode}): {err.read().strip()}")
    return wall, usage.ru_maxrss * 1024  # Linux: kilobytes


def read_rate(dump: Path, cfg: EvalConfig, reps: int = 3) -> float:
    """GB/s of reading every selected dY record from the file (best of ``reps``; page cache as it is)."""
    best, nbytes = math.inf, 0
    with selected_records(dump, cfg) as recs:
        for _ in range(reps):
            t = time.perf_counter()
            nbytes = sum(r.load().nbytes for r in recs)
            best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def device_rates(dump: Path, args: argparse.Namespace, floats: int) -> None:
    """Evaluate's GB/s of dY on ``args.device`` and on the CPU, beside the file-read rate, in this process."""
    from nmgrad_cli.evaluate import evaluate

    rate = read_rate(dump, EvalConfig(pattern=args.pattern, layers=args.layers, steps=args.steps,
                                      max_records=args.max_records, samples=args.samples))
    print(f"file read (Record.load of the selected dY, best of 3): {rate:.2f} GB/s")
    rows, reports = [], []
    for device in dict.fromkeys([args.device, "cpu"] if args.cpu else [args.device]):
        cfg = EvalConfig(pattern=args.pattern, layers=args.layers, steps=args.steps, max_records=args.max_records,
                         samples=args.samples, device=device)
        t = time.perf_counter()
        first_report = evaluate([dump], cfg)  # compiles what it needs
        first = time.perf_counter() - t
        if device == "cpu":  # nothing to compile: one run (the CPU is the slow side of the agreement check)
            reports.append(first_report)
            rows.append((device, first, first, floats * 4 / first / 1e9))
            continue
        t = time.perf_counter()
        reports.append(evaluate([dump], cfg))
        wall = time.perf_counter() - t
        rows.append((device, first, wall, floats * 4 / wall / 1e9))
    print(f"{'device':<10} {'first s':>8} {'again s':>8} {'dY GB/s':>8} {'vs read':>8}")
    for device, first, wall, gbs in rows:
        print(f"{device:<10} {first:8.2f} {wall:8.2f} {gbs:8.3f} {gbs / rate:7.2f}x")
    if len(reports) == 2:
        agreement(*reports)


def agreement(a, b) -> None:
    """How far two evaluations lie apart (the GPU's vs the CPU's): the exact metrics, as a fraction of
    the row's mse (they must agree to rounding); the Monte-Carlo angles of random methods, in
    standard errors of the difference. Deterministic rows (greedy: every draw the same, se ~0) are
    compared like the exact metrics, since their se is rounding noise."""
    exact, z = 0.0, []
    rows_b = {(r["file"], r["layer"], r["axis"], r["method"]): r for r in b.layers}
    for ra in a.layers:
        rb = rows_b[(ra["file"], ra["layer"], ra["axis"], ra["method"])]
        if ra.get("mse") is None or rb.get("mse") is None:
            continue
        scale = max(abs(rb["mse"]), 1e-30)
        for key in ("mse", "bias", "variance"):
            exact = max(exact, abs(ra[key] - rb[key]) / scale)
        if ra.get("angle") is None or rb.get("angle") is None:
            continue
        se = math.hypot(ra.get("angle_se") or 0.0, rb.get("angle_se") or 0.0)
        if se > 1e-9 * max(abs(rb["angle"]), 1.0):
            z.append(abs(ra["angle"] - rb["angle"]) / se)
        else:
            exact = max(exact, abs(ra["angle"] - rb["angle"]) / max(abs(rb["angle"]), 1e-30))
    z.sort()
    line = f"agreement: exact metrics (and deterministic angles) max rel diff {exact:.1e}"
    print(line + (f"; random methods' angle |diff| / se over {len(z)} rows: median {z[len(z) // 2]:.2f}, "
                  f"max {z[-1]:.2f} (independent draws: expect a median ~0.7, a max ~3)" if z else ""))


def write_synthetic(path: Path, spec: str) -> None:
    """A dump of ``layers`` Linear layers, one (T, F) dY record each (randn x exp(randn): heavy tails)."""
    from nmgrad_cli.dump import DumpWriter

    layers, t, f = (int(v) for v in spec.split(","))
    if path.exists():
        raise SystemExit(f"{path} exists: --synthetic writes a new dump; remove it or pick another path")
    gen = torch.Generator().manual_seed(0)
    with DumpWriter(path, run={"model": "synthetic"}, compression="none") as w:
        for i in range(layers):
            w.add_layer(f"l{i}", "Linear", 1, [0], (f, f))
            w.write(f"l{i}", "grad", 0, 0, torch.randn(t, f, generator=gen) * torch.randn(t, f, generator=gen).exp())


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump", type=Path, nargs="+", help="one or more dumps, benchmarked in turn in one run")
    ap.add_argument("--warm-only", action="store_true", help="only the warm run of each dump (no cold, no busy)")
    ap.add_argument("--memory-budget", dest="memory_budget", default=None, help="passed to nmgrad evaluate")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--steps", default=None)
    ap.add_argument("--max-records", dest="max_records", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the 'busy' run")
    ap.add_argument("--also-backend", dest="also", default=None,
                    help="also time the draws on this backend (e.g. fused: the compiled CPU kernel), warm and busy")
    ap.add_argument("--synthetic", default=None, help="LAYERS,T,F: first write such a dump to the dump path")
    ap.add_argument("--no-cpu", dest="cpu", action="store_false", help="with --device: skip the CPU comparison")
    ap.add_argument("--device", default=None,
                    help="cuda: GB/s of dY evaluated on the GPU (and the CPU) vs the file-read rate, in-process")
    args = ap.parse_args()
    if args.synthetic:
        if len(args.dump) != 1:
            raise SystemExit("--synthetic writes one dump: give one path")
        write_synthetic(args.dump[0], args.synthetic)
    results = [bench_dump(dump, args) for dump in args.dump]
    if len(results) > 1:  # side by side: the same abs pass for every dump of the run
        per_float = min(p for rows, *_ in results for _, _, _, p in rows)
        print(f"\nside by side (abs pass {per_float * 1e9:.3f} ns/float, the run's quickest), warm runs; "
              f"load {os.getloadavg()[0]:.1f} at the end")
        print(f"{'dump':<28} {'M floats':>9} {'largest MB':>11} {'wall s':>7} {'R':>6} {'peak RSS MB':>12} "
              f"{'RSS/largest':>12}")
        for (rows, floats, largest, n_methods), dump in zip(results, args.dump):
            wall, rss = rows[0][1], rows[0][2]
            r = r_value(wall, floats, n_methods, args.samples, per_float)
            print(f"{dump.name:<28} {floats / 1e6:9.1f} {largest * 4 / 1e6:11.1f} {wall:7.1f} {r:6.2f} "
                  f"{rss / 1e6:12.0f} {rss / (largest * 4):11.1f}x")


def bench_dump(dump: Path, args: argparse.Namespace) -> tuple[list, int, int, int]:
    """The table of one dump: (rows (label, wall, rss, abs s/float), floats, largest record, methods)."""
    cfg = EvalConfig(pattern=args.pattern, layers=args.layers, steps=args.steps, max_records=args.max_records,
                     samples=args.samples)
    methods, _ = cfg.resolve_methods()
    floats, records, largest = selected_floats(dump, cfg)
    with DumpReader(dump) as r:
        size_mb = dump.stat().st_size / 1e6
        layers = len(r.layers)
    print(f"code: {TREE}")
    print(f"dump {dump} ({size_mb:.0f} MB, {layers} layers): {records} grad records selected, "
          f"{floats / 1e6:.1f} M floats (largest record {largest * 4 / 1e6:.1f} MB), {len(methods)} methods x "
          f"{args.samples} samples, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f} at start")
    if args.device is not None:
        if args.device.startswith("cuda"):
            print(f"GPU {torch.cuda.get_device_name()}")
        device_rates(dump, args, floats)
        return [], floats, largest, len(methods)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache = Path(tmp) / "warm"
        run_evaluate(dump, args, warm_cache)  # fills the warm cache
        runs = [("warm", warm_cache, 0, None)]
        if not args.warm_only:
            runs += [("cold", Path(tmp) / "cold", 0, None), (f"warm, {args.busy} busy", warm_cache, args.busy, None)]
        if args.also:
            other = Path(tmp) / "other"
            run_evaluate(dump, args, other, args.also)  # fills its cache
            runs += [(f"{args.also}, warm", other, 0, args.also), (f"{args.also}, {args.busy} busy", other, args.busy,
                                                                    args.also)]
        for label, cache, busy, backend in runs:
            per_float = abs_seconds_per_float(floats)
            procs = busy_loops(busy)
            try:
                wall, rss = run_evaluate(dump, args, cache, backend)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            rows.append((label, wall, rss, per_float))

    per_float = min(p for *_, p in rows)  # the quietest abs pass of the run: R comparable across rows
    warm = rows[0][1]
    print(f"{'run':<20} {'wall s':>8} {'abs ns/float':>13} {'R':>7} {'vs warm':>9} {'peak RSS MB':>12} "
          f"{'/ largest':>10}")
    for label, wall, rss, p in rows:
        r = r_value(wall, floats, len(methods), args.samples, per_float)
        print(f"{label:<20} {wall:8.1f} {p * 1e9:13.3f} {r:7.1f} {wall / warm:8.2f}x {rss / 1e6:12.0f} "
              f"{rss / (largest * 4):9.1f}x")
    if not args.warm_only:
        r_warm = r_value(warm, floats, len(methods), args.samples, per_float)
        print(f"cold - warm: {rows[1][1] - warm:+.1f} s (target <= 10 s); busy / warm: {rows[2][1] / warm:.2f}x "
              f"(target <= 3x); R warm: {r_warm:.1f} (target <= 4)")
    return rows, floats, largest, len(methods)

if __name__ == "__main__":
    main()
