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

``--interception`` first times one training step of each model three ways, interleaved: plain
(no capture machinery), with idle forward hooks on every ``nn.Linear``/``nn.Conv*`` (the old
module-hook capture), and inside the GEMM-site ``TorchFunctionMode`` with an idle recorder (what
capture and train use now); ``sites/plain`` and ``sites/hooks`` are the ratios of medians.

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

from nmgrad_cli.capture import MODULE_TYPES, CaptureConfig, CaptureProgress, SiteRecorder, run_capture
from nmgrad_cli.models import build_task, forward_loss
from nmgrad_cli.sites import ParamIndex, SiteMode

STEPS = {"mlp": 40, "cnn": 20, "gpt": 10}


def bench_once(model: str, steps: int, skip: int, compression: str, folder: Path) -> dict:
    stamps: list[float] = []

    def progress(_p: CaptureProgress) -> None:
        stamps.append(time.perf_counter())

    cfg = CaptureConfig(model=model, warmup=steps, steps=steps, every=1, compression=compression,
                        out=str(folder / f"{model}.h5"), force=True, device="cpu")
    result = run_capture(cfg, on_step=progress, handle_signals=False)
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


def interception(model: str, steps: int) -> dict:
    """Median step ms: plain, idle module hooks, idle site interception (interleaved round-robin)."""
    task = build_task(model, seed=0)
    net = task.model.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    mode = SiteMode(ParamIndex(net), SiteRecorder(None, MODULE_TYPES, lambda *a: None), watch=False)
    gemm_modules = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    idle = {"active": False}

    def hook(_m, _i, y):  # what the module-hook recorder did on a step it does not record
        if not idle["active"]:
            return

    def step(kind: str) -> float:
        handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, gemm_modules)] \
            if kind == "hooks" else []
        batch = next(task.train_batches)
        t0 = time.perf_counter()
        if kind == "sites":
            with mode:
                _, loss, _ = forward_loss(net, batch, task.loss_fn)
        else:
            _, loss, _ = forward_loss(net, batch, task.loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        for h in handles:
            h.remove()
        return dt

    kinds = ("plain", "hooks", "sites")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(steps + 2):
        for k in kinds[i % 3:] + kinds[:i % 3]:  # rotate the order: no kind always runs first
            dt = step(k)
            if i >= 2:
                times[k].append(dt)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"model": model, **med, "vs_plain": med["sites"] / med["plain"], "vs_hooks": med["sites"] / med["hooks"]}


def bench(model: str, steps: int, skip: int, compression: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [bench_once(model, steps, skip, compression, Path(tmp)) for _ in range(rounds)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    best["mb_s"] = max(r["mb_s"] for r in runs)
    return {"model": model, **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,gpt")
    ap.add_argument("--compression", default="none", choices=("lzf", "gzip", "none"))
    ap.add_argument("--skip", type=int, default=2, help="steps dropped at the start of each phase")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the default step counts")
    ap.add_argument("--rounds", type=int, default=1, help="repeat and keep the minimum of each median")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--interception", action="store_true", help="first time the step with and without interception")
    ap.add_argument("--no-capture", action="store_true", help="skip the capture runs (with --interception)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}, compression {args.compression}, every 1")
    if args.interception:
        print(f"{'model':<6}{'plain ms':>10}{'hooks ms':>10}{'sites ms':>10}{'sites/plain':>13}{'sites/hooks':>13}")
        for m in args.models.split(","):
            r = interception(m, max(5, int(STEPS[m] * args.scale)))
            print(f"{m:<6}{r['plain']:>10.1f}{r['hooks']:>10.1f}{r['sites']:>10.1f}{r['vs_plain']:>12.2f}x"
                  f"{r['vs_hooks']:>12.2f}x")
        if args.no_capture:
            return
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
