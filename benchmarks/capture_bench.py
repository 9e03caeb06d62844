"""Step time with capture vs without, for the built-in models, side by side in one run (not a test).

Each model runs through :func:`run_capture`: the first N optimizer steps record nothing (hooks
attached but idle: the baseline), the next N record every step (``--every 1``) and stream it to HDF5
on the background writer. Reported per model:

- ``step ms`` / ``+capture``: median wall time of a training step without / with recording (the
  first ``--skip`` steps of each phase dropped): what the training loop feels while the writer's
  queue absorbs the data;
- ``sustained``: the recording phase's wall time *including draining the queue and closing the
  file*, per step: what a run costs when the writer has to keep up; ``ratio`` is it over the mean
  baseline step;
- ``MB/s``: recorded bytes over that same wall time.

With ``--rounds`` > 1 each number is the best over the rounds (robust on a busy machine).

    python benchmarks/capture_bench.py                      # lzf, all three models
    python benchmarks/capture_bench.py --compression none --models gpt
    python benchmarks/capture_bench.py --threads 1          # torch threads
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
    stamps: list[float] = []

    def progress(_p: CaptureProgress) -> None:
        stamps.append(time.perf_counter())

    cfg = CaptureConfig(model=model, warmup=steps, steps=steps, every=1, compression=compression,
                        out=str(folder / f"{model}.h5"), force=True, device="cpu")
    result = run_capture(cfg, progress=progress, handle_signals=False)
    t_end = time.perf_counter()
    d = [b - a for a, b in zip(stamps, stamps[1:])]  # d[i]: step i + 1
    base = d[skip:steps - 1]
    rec_wall = t_end - stamps[steps - 1]
    out = {
        "base_ms": 1e3 * statistics.median(base),
        "cap_ms": 1e3 * statistics.median(d[steps - 1 + skip:]),
        "sustained_ms": 1e3 * rec_wall / steps,
        "ratio": rec_wall / steps / statistics.mean(base),
        "mb_step": result.bytes_recorded / result.steps_recorded / 1e6,
        "mb_s": result.bytes_recorded / rec_wall / 1e6,
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
    print(f"{'model':<6}{'step ms':>9}{'+capture':>10}{'sustained':>11}{'ratio':>8}{'MB/step':>9}{'MB/s':>8}"
          f"{'disk MB':>9}")
    for r in rows:
        print(f"{r['model']:<6}{r['base_ms']:>9.1f}{r['cap_ms']:>10.1f}{r['sustained_ms']:>11.1f}{r['ratio']:>7.2f}x"
              f"{r['mb_step']:>9.2f}{r['mb_s']:>8.1f}{r['disk_mb']:>9.1f}")


if __name__ == "__main__":
    main()
