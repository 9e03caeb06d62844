"""A GPT-2-small-sized run captured and evaluated, side by side in one run (not a test; issue 19).

Builds the GPT-2-small config locally (transformers' ``GPT2Config()``: 12 layers, 768 wide, vocab
50257, 124.4M parameters, random init seed 0, ``save_pretrained``; no download), then runs each
phase as its own process (so that each has its own peak RSS, read with ``os.wait4``):

- ``plain``: ``--steps`` training steps without any capture machinery (the same loop as capture,
  no GEMM-site interception), after one warm-up step: the baseline step, run before and again after
  the captures (their mean: the load of a shared machine drifts);
- ``capture``, ``capture+inputs``: ``nmgrad capture`` of the same run at ``--every 1`` (one warm-up
  step first, not recorded), without and with ``--with-inputs``; the time per step is the recorded
  phase's wall time *including draining the writer and closing the file*, over the steps;
- ``write``: the capture+inputs dump's records written again, step by step, by the dump writer
  (``DumpWriter``: what the capture's writer thread runs) and, interleaved, by a plain sequential
  ``write()`` of the same bytes to a file in the same folder (best of 2 each);
- ``evaluate``: ``nmgrad evaluate`` of the capture dump (``--pattern``, ``--samples``), and its R
  as benchmarks/evaluate_bench.py defines it (:func:`evaluate_bench.r_value`).

Peak RSS of every phase is shown against the largest record of the dump it writes or reads.
Everything it writes goes to ``--scratch`` (a new temporary folder by default) and is deleted at the
end unless ``--keep``.

    nice -n 10 python benchmarks/scale_bench.py                      # 2 steps, CPU
    python benchmarks/scale_bench.py --steps 4 --scratch /data/tmp --keep
    python benchmarks/scale_bench.py --model-dir /work/data/gpt2s    # reuse a saved config
    python benchmarks/scale_bench.py --device cuda                   # plain and capture on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_bench import TREE, abs_seconds_per_float, r_value, selected_floats  # noqa: E402

DATA = TREE / "sample_data" / "pydoc_topics.txt"


def build_model(folder: Path) -> Path:
    """GPT-2-small from its config, random init seed 0, saved to ``folder`` (``save_pretrained``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    return folder


# -- the phases, each in its own process ------------------------------------------------------------


def phase_plain(args) -> dict:
    import torch

    from nmgrad_cli.models import build_task
    from nmgrad_cli.train.distributed import DistInfo, resolve_device
    from nmgrad_cli.train.loop import StepCallbacks, run_steps

    device = resolve_device(args.device, DistInfo())
    task = build_task(f"hf:{args.model_dir}", f"text:{DATA}", None, 0, args.batch_size)
    model = task.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stamps: list[float] = []

    def after(_s: int) -> bool:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return False

    run_steps(model, task.train_batches, task.loss_fn, opt, contextlib.nullcontext(), device, 1 + args.steps,
              StepCallbacks(after=after))
    return {"step_s": (stamps[-1] - stamps[0]) / args.steps}


def phase_capture(args) -> dict:
    from nmgrad_cli.capture import CaptureConfig, run_capture

    stamps: list[float] = []
    cfg = CaptureConfig(model=f"hf:{args.model_dir}", data=f"text:{DATA}", batch_size=args.batch_size,
                        warmup=1, steps=args.steps, every=1, with_inputs=args.with_inputs, out=args.out,
                        device=args.device, force=True)
    r = run_capture(cfg, on_step=lambda p: p.draining or stamps.append(time.perf_counter()), handle_signals=False)
    end = time.perf_counter()
    return {"step_s": (end - stamps[0]) / args.steps, "bytes": r.bytes_recorded, "file_bytes": r.file_bytes,
            "steps": r.steps_recorded, "stopped": r.stopped}


def phase_write(args) -> dict:
    """Seconds to write the dump's records with DumpWriter vs plain ``write()``, best of 2 each."""
    from nmgrad_cli.dump import DumpReader, DumpWriter

    folder = Path(args.out).parent
    best = {"dump": float("inf"), "plain": float("inf")}
    nbytes = 0
    with DumpReader(args.dump) as d:
        all_recs = [rec for kind in ("input", "weight", "grad") for rec in d.records(kind)]
        steps = sorted({rec.step for rec in all_recs})
        for order in (("dump", "plain"), ("plain", "dump")):
            times = dict.fromkeys(best, 0.0)
            dump_path, plain_path = folder / "replay.h5", folder / "replay.bin"
            w = DumpWriter(dump_path, run={}, compression="none", force=True)
            with open(plain_path, "wb", buffering=0) as fh:
                nbytes = 0
                for step in steps:
                    recs = [(rec.layer, rec.kind, rec, rec.load()) for rec in all_recs if rec.step == step]
                    nbytes += sum(t.numel() * t.element_size() for *_, t in recs)
                    for how in order:
                        t0 = time.perf_counter()
                        if how == "dump":
                            for li, kind, rec, t in recs:
                                w.add_layer(li.name, li.module_type, li.feature_axis, li.token_axes)
                                w.write(li.name, kind, rec.step, rec.call, t)
                            w.step_done(step)
                        else:
                            for *_, t in recs:
                                fh.write(memoryview(t.contiguous().numpy()).cast("B"))
                        times[how] += time.perf_counter() - t0
                    del recs
            t0 = time.perf_counter()
            w.close()
            times["dump"] += time.perf_counter() - t0
            for k in best:
                best[k] = min(best[k], times[k])
            dump_path.unlink()
            plain_path.unlink()
    return {"bytes": nbytes, "dump_s": best["dump"], "plain_s": best["plain"]}


PHASES = {"plain": phase_plain, "capture": phase_capture, "write": phase_write}


def run_phase(name: str, argv: list[str]) -> tuple[dict, float, int]:
    """(the phase's result, wall seconds, peak RSS bytes), the phase in a process of its own."""
    cmd = [sys.executable, __file__, "--phase", name, *argv]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=TREE, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"phase {name} failed ({p.returncode})")
    lines = out.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), wall, usage.ru_maxrss * 1024


def run_evaluate(dump: Path, args) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``nmgrad evaluate`` of ``dump`` in its own process."""
    cmd = [sys.executable, "-m", "nmgrad_cli", "evaluate", str(dump), "--pattern", args.pattern,
           "--samples", str(args.samples), "--json", os.devnull, "--force"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=TREE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"evaluate failed: {err.strip()}")
    return wall, usage.ru_maxrss * 1024


def largest_record(dump: Path, kinds: tuple[str, ...] = ("grad", "input", "weight")) -> int:
    """Bytes of the largest record of ``kinds`` in ``dump``."""
    import math

    import numpy as np

    from nmgrad_cli.dump import DumpReader

    def itemsize(dtype: str) -> int:
        return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize

    with DumpReader(dump) as d:
        return max(math.prod(rec.shape) * itemsize(rec.dtype) for kind in kinds for rec in d.records(kind))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="recorded (and plain) steps per phase")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    ap.add_argument("--scratch", type=Path, default=None, help="folder for the model and dumps (default: a new temp)")
    ap.add_argument("--keep", action="store_true", help="keep what was written in --scratch")
    ap.add_argument("--model-dir", dest="model_dir", type=Path, default=None,
                    help="a saved GPT-2-small (default: build one from GPT2Config in --scratch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--with-inputs", dest="with_inputs", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    made = args.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="scale_bench_")) if made else args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        report(args, scratch, written)
    finally:
        if not args.keep:
            for p in written:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if made:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept in {scratch}: {', '.join(p.name for p in written)}")


def report(args, scratch: Path, written: list[Path]) -> None:
    from nmgrad_cli.evaluate import EvalConfig

    if args.model_dir is None:
        args.model_dir = scratch / "gpt2s"
        written.append(args.model_dir)
        build_model(args.model_dir)
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--model-dir", str(args.model_dir),
              "--device", args.device]
    print(f"code: {TREE}; GPT-2-small ({args.model_dir}), text:{DATA.name}, batch {args.batch_size}, "
          f"{args.steps} steps, device {args.device}, {os.cpu_count()} cores; uptime: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    plain, _, plain_rss = run_phase("plain", common)
    rows = []
    dumps = {}
    for label, extra in (("capture", []), ("capture+inputs", ["--with-inputs"])):
        out = scratch / f"{label.replace('+', '_')}.h5"
        written += [out, out.with_name(out.name + ".partial")]
        cap, wall, rss = run_phase("capture", [*common, "--out", str(out), *extra])
        dumps[label] = out
        rows.append((label, cap, rss, largest_record(out)))
    after, _, _ = run_phase("plain", common)  # again after the captures: the load of a shared machine drifts
    plain_runs = (plain["step_s"], after["step_s"])
    plain = {"step_s": sum(plain_runs) / 2}
    write, _, write_rss = run_phase("write", [*common, "--dump", str(dumps["capture+inputs"]),
                                              "--out", str(scratch / "replay.h5")])
    written += [scratch / "replay.h5", scratch / "replay.bin"]
    cfg = EvalConfig(pattern=args.pattern, samples=args.samples)
    methods, _ = cfg.resolve_methods()
    floats, n_records, _ = selected_floats(dumps["capture"], cfg)
    per_float = abs_seconds_per_float(floats)
    ev_wall, ev_rss = run_evaluate(dumps["capture"], args)
    r = r_value(ev_wall, floats, len(methods), args.samples, per_float)
    grad_max = largest_record(dumps["capture"], ("grad",))

    mb = 1e6
    print(f"{'phase':<16}{'s/step':>8}{'vs plain':>10}{'MB/step':>9}{'MB/s':>8}{'peak RSS MB':>13}"
          f"{'largest rec MB':>16}{'RSS/rec':>9}")
    print(f"{'plain step':<16}{plain['step_s']:>8.2f}{1:>9.2f}x{'':>9}{'':>8}{plain_rss / mb:>13.0f}{'':>16}{'':>9}"
          f"   (mean of {plain_runs[0]:.2f} before and {plain_runs[1]:.2f} after the captures)")
    for label, cap, rss, big in rows:
        per_step = cap["bytes"] / cap["steps"]
        print(f"{label:<16}{cap['step_s']:>8.2f}{cap['step_s'] / plain['step_s']:>9.2f}x{per_step / mb:>9.1f}"
              f"{per_step / cap['step_s'] / mb:>8.1f}{rss / mb:>13.0f}{big / mb:>16.1f}{rss / big:>8.1f}x")
    dump_rate, plain_rate = write["bytes"] / write["dump_s"], write["bytes"] / write["plain_s"]
    big = rows[1][3]
    print(f"write: {write['bytes'] / mb:.0f} MB of capture+inputs records: dump writer {dump_rate / mb:.0f} MB/s, "
          f"plain write() {plain_rate / mb:.0f} MB/s: {dump_rate / plain_rate:.2f}x (target >= 0.8x); "
          f"peak RSS {write_rss / mb:.0f} MB ({write_rss / big:.1f}x the largest record)")
    print(f"evaluate {dumps['capture'].name} --pattern {args.pattern} --samples {args.samples}: {n_records} records, "
          f"{floats / 1e6:.1f} M floats, {len(methods)} methods: {ev_wall:.1f} s, R {r:.1f} "
          f"(abs {per_float * 1e9:.3f} ns/float); peak RSS {ev_rss / mb:.0f} MB = {ev_rss / grad_max:.1f}x the "
          f"largest dY record ({grad_max / mb:.1f} MB)")
    print(f"target: capture <= 1.3x plain; uptime at the end: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
