"""Run a capture: train a task for ``warmup + steps`` optimizer steps and stream the recorded dY to HDF5.

What the output file holds when the run ends
--------------------------------------------
The dump is written to ``<out>.partial`` and renamed to ``<out>`` when the run ends in one of these
ways. The background writer flushes the file after writing each completed recorded step.

- finished: ``complete=True``.
- ``--max-bytes`` reached: stops *before* the step that would exceed the budget; ``complete=True``,
  ``run.stopped = "max-bytes"``.
- SIGINT (Ctrl-C) or SIGTERM: the current step is finished, then the file is closed with
  ``interrupted=True``, ``interrupt_reason="SIGTERM"`` (or SIGINT) and every completed step. A
  second signal abandons the current step at once (some of its records may be in the file;
  ``steps_completed`` and ``last_step`` count whole steps only). After the last step, while the
  writer writes the queue out, a first signal changes nothing and a repeated one drops the queue.
  A signal during the setup stops the run before its first step (a second one stops the setup at
  once); nothing is written. The handlers stay installed until
  the file is renamed (:class:`~.stream.CaptureFile`), so no signal kills the process mid-close.
- an exception (the model's forward raising): ``interrupted=True`` with the exception's name;
  ``<out>`` is removed again when no step was completed.
- a full disk or file-size limit: checked before every record; ``interrupted=True``,
  ``DiskFullError``, every completed step kept (:meth:`DumpWriter.abort` cuts a failed write back).
- a second capture to the same ``<out>`` is refused (``<out>.partial`` is locked).

After ``kill -9`` (or a power cut) nothing runs: ``<out>`` is never created, so an ``<out>`` that exists
is always a closed, readable dump. ``<out>.partial`` is left behind. HDF5 without SWMR gives no
guarantee for a file whose writer died: when the writer thread was idle at the kill (its last
step written and flushed; the common case when writing is faster than training) it is readable and
holds the ``steps_completed`` steps; when it was writing it may be unreadable (``nmgrad inspect``
then says it is corrupt). Rename it to use it.

Distributed (``torchrun``): every rank trains its own data shard under DDP (gloo on CPU, nccl on
GPUs) and records its own dY into ``<stem>.rank<r><suffix>`` (``g.h5`` -> ``g.rank0.h5``,
``g.rank1.h5``); ``run.rank`` and ``run.world_size`` say which. Ranks agree after every step on
whether to stop (a signal or the byte budget on any rank stops all of them at the same step).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import Interrupted, NmgradError, RankLostError
from ..models import build_task
from ..outputs import check_output
from ..progress import ProgressLike, resolve_progress
from ..sites import ParamIndex, SiteMode, site_report
from ..train.distributed import (
    DistInfo,
    agree_any,
    dist_info,
    process_group,
    rank_seed,
    resolve_device,
    wrap_ddp,
)
from ..train.loop import StepCallbacks, run_steps
from ..train.step import autocast
from .config import CaptureConfig
from .hooks import StepRecords
from .stream import CaptureFile


@dataclass(frozen=True)
class CaptureProgress:
    """Sent to the ``progress`` callback after every optimizer step."""

    step: int
    """Optimizer steps done, warm-up included."""
    total_steps: int
    recorded: int
    """Recorded steps handed to the writer."""
    total_recorded: int
    bytes_recorded: int
    """Uncompressed bytes of the recorded tensors handed to the writer."""
    bytes_written: int
    """Of those, the bytes the writer thread has stored."""
    draining: bool = False
    """Sent once more after the last step: the writer still has ``bytes_recorded - bytes_written``
    to store; a repeated Ctrl-C/SIGTERM now drops them (see the module docstring)."""


@dataclass
class CaptureResult:
    path: Path
    steps_run: int
    steps_recorded: int
    bytes_recorded: int
    file_bytes: int
    layers: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    """Selected layers that received no gradient in any recorded step."""
    stopped: str = "done"
    """done, max-bytes, or the interrupt reason (SIGINT, SIGTERM, an exception name)."""
    rank: int = 0
    world_size: int = 1
    seconds: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.stopped not in ("done", "max-bytes")


def output_path(out: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """``out`` for one process; ``<stem>.rank<r><suffix>`` for rank r of several."""
    p = Path(out)
    return p if world_size <= 1 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


@dataclass
class _State:
    """What the step callbacks of one capture share."""

    record: bool = False
    report: object = None
    stopped: str = "done"
    steps_run: int = 0
    recorded: int = 0
    bytes_recorded: int = 0


def _optimizer(config: CaptureConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NmgradError("the model has no trainable parameters: capture needs a model that trains")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=config.lr)


def run_capture(
    config: CaptureConfig,
    on_step: Callable[[CaptureProgress], None] | None = None,
    handle_signals: bool = True,
    *,
    progress: ProgressLike = None,
) -> CaptureResult:
    """Train ``config``'s task and write the recorded dY (and X, W) to ``config.out``.

    ``on_step`` gets a :class:`CaptureProgress` after every step (and once more while the writer
    drains); ``progress`` shows the steps (:mod:`nmgrad_cli.progress`: None silent, True tqdm or
    plain lines, or a renderer such as the CLI's rich bar), started at the first step.

    ``handle_signals``: stop cleanly on SIGINT/SIGTERM (main thread only; handlers restored after).
    Raises :class:`NmgradError` for bad input; see the module docstring for what the file holds.
    """
    info = dist_info()
    device = resolve_device(config.device, info)
    with process_group(info, device), resolve_progress(progress, unit="steps") as bar:
        def show(p: CaptureProgress) -> None:
            if on_step is not None:
                on_step(p)
            if p.step == 1 and not p.draining:  # started here, so setup errors print one line
                bar.start(p.total_steps, "capture")
            bar.update(p.step, _progress_info(p))

        return _run(config, show, handle_signals, info, device)


def _progress_info(p: CaptureProgress) -> str:
    """What the progress line shows: recorded steps and MB, or what is left to write at the end."""
    if p.draining and p.bytes_recorded > p.bytes_written:
        return f"writing the last {(p.bytes_recorded - p.bytes_written) / 1e6:.1f} MB (a repeated Ctrl-C drops them)"
    return (f"recorded {p.recorded}/{p.total_recorded}, {p.bytes_recorded / 1e6:.1f} MB "
            f"({p.bytes_written / 1e6:.1f} written)")


def _run(config, progress, handle_signals, info: DistInfo, device: torch.device) -> CaptureResult:
    t0 = time.perf_counter()
    rank, world = info.rank, info.world_size
    path = check_output(output_path(config.out, rank, world), config.force)
    # signal handlers first, then <out>.partial (a second capture to --out is refused here)
    with CaptureFile(path, handle_signals) as cap:
        data_seed = rank_seed(config.seed, info)
        task = build_task(
            config.model, config.data, config.loss, config.seed, config.batch_size, config.data_dir,
            data_seed=data_seed, rank=rank, world_size=world, hf_task=config.hf_task,
        )
        model = task.model.to(device).train()
        step_model = wrap_ddp(model, device, info)
        opt = _optimizer(config, model)
        torch.manual_seed(config.seed + rank)  # dropout and other randomness in the steps
        amp = autocast(device, config.amp)
        run_meta = config.to_dict() | {
            "rank": rank, "world_size": world, "data_seed": data_seed, "device": str(device), "task_kind": task.kind,
            "task": task.spec, "torch_threads": torch.get_num_threads(),
            "backend": None,  # dense training: nothing is pruned (train --capture records its backend)
        }
        queue_bytes = int(config.queue_mb * 2**20)
        records = StepRecords(config.layers, config.module_types, config.with_inputs)
        recorder = records.recorder
        index = ParamIndex(model)
        mode = SiteMode(index, recorder, watch=True)
        total = config.warmup + config.steps
        cap.open(run_meta, config.compression, queue_bytes)
        stream, signals = cap.stream, cap.requested
        st = _State()

        def before(s: int) -> bool:
            if s == 0 and agree_any(bool(signals), device, info):  # a signal during the setup
                st.stopped = signals[0] if signals else "stopped by another rank"
                return True
            st.record = s >= config.warmup and (s - config.warmup) % config.every == 0
            return False

        def start(_s: int) -> None:
            if st.record:
                recorder.start_step()

        def after_backward(_s: int) -> None:
            if st.report is None:  # after the first backward: what is selected, what no site covers
                st.report = site_report(
                    index, mode, list(recorder.selected.values()), config.layers, config.strict,
                    what="/".join(config.module_types) + " GEMM site",
                )
                mode.watch = False
                stream.set_run(**st.report.to_dict())

        def after(s: int) -> bool:
            st.steps_run += 1
            if st.record:
                step_bytes = records.bytes
                over = config.max_bytes is not None and st.bytes_recorded + step_bytes > config.max_bytes
                if agree_any(over, device, info):
                    records.drop()
                    st.stopped = "max-bytes"
                    return True
                records.write(stream, s)
                st.recorded += 1
                st.bytes_recorded += step_bytes
            if progress is not None:
                progress(CaptureProgress(
                    st.steps_run, total, st.recorded, config.recorded_steps, st.bytes_recorded, stream.bytes_written
                ))
            if agree_any(bool(signals), device, info):
                st.stopped = signals[0] if signals else "stopped by another rank"
                return True
            return False

        callbacks = StepCallbacks(before=before, start=start, stop=lambda _s: recorder.stop_step(),
                                  after_backward=after_backward, after=after)
        lost = None
        try:
            run_steps(step_model, task.train_batches, task.loss_fn, opt, mode, device, total, callbacks, amp)
        except KeyboardInterrupt:  # a second signal: the current step is abandoned
            st.stopped = signals[0] if signals else "SIGINT"
        except RankLostError as exc:  # no more collectives: this rank keeps what it completed, alone
            st.stopped, lost = "RankLostError", exc
        finally:
            records.drop()
        stopped, recorded, steps_run, bytes_recorded, report = (
            st.stopped, st.recorded, st.steps_run, st.bytes_recorded, st.report
        )
        if recorded == 0 and stopped == "max-bytes":
            cap.finish("max-bytes")
            raise NmgradError(
                f"--max-bytes {config.max_bytes} is smaller than one recorded step: raise it or select fewer --layers"
            )
        silent = records.silent()
        stream.set_run(stopped=stopped, steps_run=steps_run, layers_without_gradients=silent)

        def drain(queued: int) -> None:
            if progress is not None:
                progress(CaptureProgress(
                    steps_run, total, recorded, config.recorded_steps, bytes_recorded, bytes_recorded - queued, True
                ))

        cap.finish(None if stopped in ("done", "max-bytes") else stopped, on_drain=drain)
    if lost is not None:
        if handle_signals and threading.current_thread() is threading.main_thread():
            # torchrun SIGTERMs the ranks left once one dies: this one is ending anyway, and a SIGTERM
            # now would kill it before its error line is printed (torchrun's later SIGKILL still ends it)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kept = cap.stream.writer.steps_flushed
        what = f"the {kept} completed steps are kept in {path} (interrupted)" if kept else "nothing was kept"
        raise RankLostError(f"{lost}; {what}")
    if cap.stopped is not None and stopped in ("done", "max-bytes"):
        stopped = cap.stopped  # a repeated signal while the last steps were written dropped some
    recorded = cap.stream.writer.steps_flushed if cap.stopped is not None else recorded
    if not path.exists():
        raise Interrupted(
            f"interrupted ({stopped}) before a recorded step was completed: nothing was written to {path}"
        )
    return CaptureResult(
        path=path, steps_run=steps_run, steps_recorded=recorded, bytes_recorded=bytes_recorded,
        file_bytes=path.stat().st_size, layers=list(recorder.selected),
        skipped=report.not_intercepted if report else [], silent=silent, stopped=stopped, rank=rank, world_size=world,
        seconds=time.perf_counter() - t0,
    )
