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

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import Interrupted, NmgradError
from ..models import build_task, split_batch, to_device
from ..models.spec import one_line
from ..outputs import check_output
from .config import CaptureConfig
from .hooks import GradRecorder, Target, dy_axes, select_layers
from .stream import CaptureFile, StreamWriter


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


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise NmgradError(f"--device '{device}' is not a torch device: use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NmgradError(f"--device {device} but CUDA is not available here: use --device cpu")
    return dev


@contextlib.contextmanager
def _distributed(device: str) -> Iterator[tuple[int, int, int]]:
    """(rank, world_size, local_rank); initialises the process group under torchrun if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        yield 0, 1, 0
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    try:
        yield dist.get_rank(), dist.get_world_size(), local_rank
    finally:
        if created:
            dist.destroy_process_group()


def _agree(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if world_size <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _optimizer(config: CaptureConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NmgradError("the model has no trainable parameters: capture needs a model that trains")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=config.lr)


def run_capture(
    config: CaptureConfig,
    progress: Callable[[CaptureProgress], None] | None = None,
    handle_signals: bool = True,
) -> CaptureResult:
    """Train ``config``'s task and write the recorded dY (and X, W) to ``config.out``.

    ``handle_signals``: stop cleanly on SIGINT/SIGTERM (main thread only; handlers restored after).
    Raises :class:`NmgradError` for bad input; see the module docstring for what the file holds.
    """
    with _distributed(config.device) as (rank, world, local_rank):
        return _run(config, progress, handle_signals, rank, world, local_rank)


def _run(config, progress, handle_signals, rank, world, local_rank) -> CaptureResult:
    t0 = time.perf_counter()
    path = check_output(output_path(config.out, rank, world), config.force)
    # signal handlers first, then <out>.partial (a second capture to --out is refused here)
    with CaptureFile(path, handle_signals) as cap:
        device = resolve_device(config.device, local_rank)
        data_seed = config.seed + 1_000_003 * rank
        task = build_task(
            config.model, config.data, config.loss, config.seed, config.batch_size, config.data_dir,
            data_seed=data_seed, rank=rank, world_size=world,
        )
        model = task.model.to(device).train()
        targets, skipped = select_layers(model, config.layers, config.module_types)
        step_model: nn.Module = model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            step_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        opt = _optimizer(config, model)
        torch.manual_seed(config.seed + rank)  # dropout and other randomness in the steps
        amp = (
            torch.autocast(device.type, dtype=torch.bfloat16) if config.amp == "bf16" else contextlib.nullcontext()
        )
        run_meta = config.to_dict() | {
            "rank": rank, "world_size": world, "data_seed": data_seed, "device": str(device), "task_kind": task.kind,
            "task": task.spec, "layers_skipped": [f"{n}: {why}" for n, why in skipped],
            "torch_threads": torch.get_num_threads(),
        }
        queue_bytes = int(config.queue_mb * 2**20)
        buffer: list[tuple[int, str, int, torch.Tensor]] = []
        recorder = GradRecorder(targets, lambda i, kind, call, t: buffer.append((i, kind, call, t)), config.with_inputs)
        declared: set[int] = set()
        seen: set[int] = set()
        total = config.warmup + config.steps
        steps_run = recorded = bytes_recorded = 0
        stopped = "done"
        cap.open(run_meta, config.compression, queue_bytes)
        stream, signals = cap.stream, cap.requested
        try:
            with recorder:
                for s in range(total):
                    if s == 0 and _agree(bool(signals), world, device):  # a signal during the setup
                        stopped = signals[0] if signals else "stopped by another rank"
                        break
                    record = s >= config.warmup and (s - config.warmup) % config.every == 0
                    x, y = split_batch(next(task.train_batches))
                    x, y = to_device(x, device), to_device(y, device)
                    if record:
                        recorder.start_step()
                    try:
                        with amp:
                            out = step_model(x)
                            loss = task.loss_fn(out, y)
                        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                            raise NmgradError(
                                f"the loss returned {type(loss).__name__}"
                                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                                + ": --loss must return a scalar tensor"
                            )
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    except NmgradError:
                        raise
                    except Exception as exc:
                        raise NmgradError(
                            f"training step {s} failed: {one_line(exc)}; check that --data yields batches "
                            f"the --model accepts and --loss fits its output"
                        ) from None
                    finally:
                        recorder.stop_step()
                    opt.step()
                    steps_run += 1
                    if record:
                        step_bytes = sum(t.numel() * t.element_size() for *_, t in buffer)
                        over = config.max_bytes is not None and bytes_recorded + step_bytes > config.max_bytes
                        if _agree(over, world, device):
                            buffer.clear()
                            stopped = "max-bytes"
                            break
                        _write_step(stream, targets, buffer, declared, s)
                        seen.update(i for i, kind, *_ in buffer if kind == "grad")
                        buffer.clear()
                        recorded += 1
                        bytes_recorded += step_bytes
                    if progress is not None:
                        progress(CaptureProgress(
                            steps_run, total, recorded, config.recorded_steps, bytes_recorded, stream.bytes_written
                        ))
                    if _agree(bool(signals), world, device):
                        stopped = signals[0] if signals else "stopped by another rank"
                        break
        except KeyboardInterrupt:  # a second signal: the current step is abandoned
            stopped = signals[0] if signals else "SIGINT"
        finally:
            buffer.clear()
        if recorded == 0 and stopped == "max-bytes":
            cap.finish("max-bytes")
            raise NmgradError(
                f"--max-bytes {config.max_bytes} is smaller than one recorded step: raise it or select fewer --layers"
            )
        silent = [t.name for i, t in enumerate(targets) if i not in seen] if recorded else []
        stream.set_run(stopped=stopped, steps_run=steps_run, layers_without_gradients=silent)

        def drain(queued: int) -> None:
            if progress is not None:
                progress(CaptureProgress(
                    steps_run, total, recorded, config.recorded_steps, bytes_recorded, bytes_recorded - queued, True
                ))

        cap.finish(None if stopped in ("done", "max-bytes") else stopped, on_drain=drain)
    if cap.stopped is not None and stopped in ("done", "max-bytes"):
        stopped = cap.stopped  # a repeated signal while the last steps were written dropped some
    recorded = cap.stream.writer.steps_flushed if cap.stopped is not None else recorded
    if not path.exists():
        raise Interrupted(
            f"interrupted ({stopped}) before a recorded step was completed: nothing was written to {path}"
        )
    return CaptureResult(
        path=path, steps_run=steps_run, steps_recorded=recorded, bytes_recorded=bytes_recorded,
        file_bytes=path.stat().st_size, layers=[t.name for t in targets],
        skipped=skipped, silent=silent, stopped=stopped, rank=rank, world_size=world,
        seconds=time.perf_counter() - t0,
    )


def _write_step(stream: StreamWriter, targets: list[Target], buffer: list, declared: set[int], step: int) -> None:
    """Declare new layers (in model order) and queue the step's records in a fixed order."""
    order = {"input": 0, "weight": 1, "grad": 2}
    buffer.sort(key=lambda r: (r[0], order[r[1]], r[2]))
    for i in sorted({i for i, kind, *_ in buffer if kind == "grad"} - declared):
        t = targets[i]
        g = next(r[3] for r in buffer if r[0] == i and r[1] == "grad")
        feature_axis, token_axes = dy_axes(t.kind, g.dim())
        stream.add_layer(
            name=t.name, module_type=t.kind, feature_axis=feature_axis, token_axes=token_axes,
            weight_shape=tuple(t.weight.shape) if t.weight is not None else None,
            module_class=t.module_class, has_input=not t.via_mha,
        )
        declared.add(i)
    for i, kind, call, tensor in buffer:
        if i in declared:
            stream.write(targets[i].name, kind, step, call, tensor)
    stream.step_done(step)
