"""Step time with capture vs without, for the built-in models, side by side in one run (not a test).

Each model runs through :func:`run_capture`: the first N optimizer steps record nothing (hooks
attached but idle: the baseline), the next N record every step (``--every 1``) and stream it to HDF5
on the background writer. Per phase: the median wall time of a step and the median process CPU
time of a step (all threads, so the writer's compression is counted), the first ``--skip`` steps of
each phase dropped; with ``--rounds`` > 1 the minimum over rounds of each median (robust on a busy
machine). MB/s is the recorded bytes over the recording phase's wall time including the final
flush and close.

    python benchmarks/capture_bench.py                      # lzf, all three models
    python benchmarks/capture_bench.py --compression none --models gpt
    python benchmarks/capture_bench.py --threads 1          # steadier on a small shared machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nmgrad_cli.capture import CaptureConfig, CaptureProgress, run_capture

STEPS = {"mlp": 40, "cnn": 20, "gpt": 10}


def bench_once(model: str, steps: int, skip: int, compression: str, folder: Path) -> dict:
    stamps: list[tuple[float, float]] = []

    def progress(_p: CaptureProgress) -> None:
        stamps.append((time.perf_counter(), time.process_time()))

    cfg = CaptureConfig(model=model, warmup=steps, steps=steps, every=1, compression=compression,
                        out=str(folder / f"{model}.h5"), force=True, device="cpu")
    result = run_capture(cfg, progress=progress, handle_signals=False)
    t_end = time.perf_counter()

    def medians(a: int, b: int) -> tuple[float, float]:
        d = [(y[0] - x[0], y[1] - x[1]) for x, y in zip(stamps[a:b - 1], stamps[a + 1:b])]
        return statistics.median(w for w, _ in d), statistics.median(c for _, c in d)

    base, cap = medians(skip, steps), medians(steps + skip, 2 * steps)
    out = {
        "base_ms": 1e3 * base[0], "cap_ms": 1e3 * cap[0], "base_cpu": 1e3 * base[1], "cap_cpu": 1e3 * cap[1],
        "mb_step": result.bytes_recorded / result.steps_recorded / 1e6,
        "mb_s": result.bytes_recorded / (t_end - stamps[steps - 1][0]) / 1e6,
        "disk_mb": result.file_bytes / 1e6,
    }
    result.path.unlink()
    return out


def bench(model: str, steps: int, skip: int, compression: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [bench_once(model, steps, skip, compression, Path(tmp)) for _ in range(rounds)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    best["mb_s"] = max(r["mb_s"] for r in runs)
    return {"model": model, **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,gpt")
    ap.add_argument("--compression", default="lzf", choices=("lzf", "gzip", "none"))
    ap.add_argument("--skip", type=int, default=2, help="steps dropped at the start of each phase")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the default step counts")
    ap.add_argument("--rounds", type=int, default=1, help="repeat and keep the minimum of each median")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}, compression {args.compression}, every 1")
    rows = [
        bench(m, max(args.skip + 3, int(STEPS[m] * args.scale)), args.skip, args.compression, args.rounds)
        for m in args.models.split(",")
    ]
    print(f"{'model':<6}{'wall ms/step':>14}{'+capture':>10}{'ratio':>8}{'CPU ms/step':>13}{'+capture':>10}"
          f"{'ratio':>8}{'MB/step':>9}{'MB/s':>8}{'disk MB':>9}")
    for r in rows:
        print(f"{r['model']:<6}{r['base_ms']:>14.1f}{r['cap_ms']:>10.1f}{r['cap_ms'] / r['base_ms']:>7.2f}x"
              f"{r['base_cpu']:>13.1f}{r['cap_cpu']:>10.1f}{r['cap_cpu'] / r['base_cpu']:>7.2f}x"
              f"{r['mb_step']:>9.2f}{r['mb_s']:>8.1f}{r['disk_mb']:>9.1f}")


if __name__ == "__main__":
    main()
