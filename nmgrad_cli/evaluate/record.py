"""One grad record's evaluation: load it, check it, run its (axis, method) jobs, give its events.

For every grad record dY of a layer, dY is viewed as a 2-D matrix g: (T, F) (the layer's
``feature_axis`` moved last, every other dim flattened into tokens). The block axis is named by the
backward GEMM that consumes the pruned dY (docs/methods.md):

- ``features``: blocks along F (dim -1), for the input gradient  dX = dY W    (T, F) @ (F, I)
- ``tokens``:   blocks along T (dim 0),  for the weight gradient dW = dY^T X  (F, T) @ (T, I)

A record with NaN/Inf values is reported as an error event and skipped; the rest is evaluated. A
record whose working set exceeds ``--memory-budget`` is evaluated in pieces (:mod:`.chunked`).
The pipelines that order records (:mod:`.pipeline` on the CPU, :mod:`.gpu` on CUDA) call
:func:`start_record` and :func:`record_events`.
"""

from __future__ import annotations

import concurrent.futures
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ..backend import draw_backend
from ..dump import DumpReader, LayerInfo, Record
from ..errors import DumpError
from ..metrics import evaluate_tensor, gemm_moments
from . import chunked, threads
from .config import AXIS_DIM, GEMM_OF_AXIS, EvalConfig
from .events import ErrorEntry, Event, Note, RecordResult
from .gemm import GemmError, gemm_operands


def as_matrix(g: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """dY as (T, F): ``feature_axis`` moved last, the other dims flattened into tokens."""
    if g.dim() == 0:
        raise DumpError(f"layer {layer.name}: gradient is a scalar, expected a tensor with a feature axis")
    if not -g.dim() <= layer.feature_axis < g.dim():
        raise DumpError(
            f"layer {layer.name}: feature_axis {layer.feature_axis} is out of range for a gradient of shape "
            f"{tuple(g.shape)}; the dump metadata is inconsistent, re-run the capture"
        )
    moved = g.movedim(layer.feature_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def stream_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed per (seed, parts): independent of the order things are evaluated in."""
    return (seed * 0x9E3779B1 + zlib.crc32("\x1f".join(parts).encode())) % (1 << 63)


def record_events(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device=None
) -> list[Event]:
    """Every event of one grad record on ``device`` (default CPU), with the thread policy applied."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    workers = max(config.workers, world)  # processes sharing this machine's cores
    numel = math.prod(rec.shape)
    if needs_chunks(rec, config, device):  # pieces: in method threads on one torch thread each, or all cores
        backend = draw_backend(config.backend, device or torch.device("cpu"))
        numel = 1 if record_method_threads(rec, config, workers, device, backend) > 1 else threads.THREADS_MIN_NUMEL
    n = threads.thread_policy(numel, config.threads, workers)
    with threads.torch_threads(n):
        return list(evaluate_record(reader, rec, file, methods, config, device or torch.device("cpu"), workers))


def evaluate_record(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device: torch.device,
    workers: int = 1,
) -> Iterator[Event]:
    """The events of one record, its (axis, method) jobs in :func:`method_threads` threads of a
    pool of its own (or in turn)."""
    n = record_method_threads(rec, config, workers, device, draw_backend(config.backend, device))
    n = min(n, len(config.axes) * len(methods))
    pool = concurrent.futures.ThreadPoolExecutor(n) if n > 1 else None
    try:
        yield from start_record(reader, rec, file, methods, config, device, pool).events()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class StartedRecord:
    """A record whose (axis, method) jobs are running (or done, without a pool): :meth:`events`
    waits for them and gives the record's events in job order."""

    def __init__(self, head: list[Event], results: list, finish):
        self.head, self.results, self.finish = head, results, finish

    def events(self) -> Iterator[Event]:
        yield from self.head
        if self.results:
            yield from self.finish(
                [r.result() if isinstance(r, concurrent.futures.Future) else r for r in self.results]
            )

    def cancel(self) -> None:
        for r in self.results:
            if isinstance(r, concurrent.futures.Future):
                r.cancel()


def chunk_floats(reader: DumpReader, rec: Record, config: EvalConfig, device, jobs: int = 1) -> int | None:
    """Floats per piece when ``--memory-budget`` has ``rec`` evaluated in pieces (:mod:`.chunked`) by
    ``jobs`` jobs at once, else None."""
    if config.budget_for(device) is None:
        return None
    return chunked.piece_floats(rec, config, chunked.operand_floats(reader, rec, config.axes), device, jobs)


def needs_chunks(rec: Record, config: EvalConfig, device) -> bool:
    """Whether ``rec`` is evaluated in pieces: one job's whole working set over ``--memory-budget``."""
    budget = config.budget_for(device)
    return budget is not None and math.prod(rec.shape) * chunked.WHOLE_BYTES_PER_FLOAT > budget


def record_method_threads(rec: Record, config: EvalConfig, workers: int, device, backend: str) -> int:
    """:func:`.threads.method_threads` for ``rec``; a record evaluated in pieces gets those of a small
    record (its pieces' ops are many and small: on a busy machine torch's threads would stall in
    each), its pieces cut to share the budget among the jobs running at once."""
    numel = 1 if needs_chunks(rec, config, device) else math.prod(rec.shape)
    return threads.method_threads(numel, config.threads, workers, device, backend)


def _error(file: str, rec: Record, text: str) -> StartedRecord:
    return StartedRecord([ErrorEntry(file, rec.layer.name, rec.name, text)], [], None)


def _nonfinite(file: str, rec: Record, bad: int, numel: int) -> StartedRecord:
    return _error(file, rec, f"{file}: layer {rec.layer.name} record {rec.name}: {bad} of {numel} gradient values are "
                  "NaN/Inf; record skipped, the rest evaluated")


def _empty(file: str, rec: Record) -> StartedRecord:
    return _error(file, rec, f"layer {rec.layer.name} record {rec.name}: empty gradient")


def _finisher(file: str, rec: Record, shape: tuple[int, int], zero: bool, top):
    """The record's events from its jobs' (axis, method, metrics, gemm) results; ``top()``: max |dY|."""
    layer = rec.layer

    def finish(results: list[tuple]) -> Iterator[Event]:
        for axis, method, m, gemm in results:
            if not math.isfinite(m.norm2):
                yield ErrorEntry(
                    file, layer.name, rec.name,
                    f"{file}: layer {layer.name} record {rec.name}: ||dY||^2 overflows float64 (max |dY| = "
                    f"{top():.3g}), so it cannot be weighted against the other records; record skipped, the rest "
                    "evaluated",
                )
                return
            if gemm is not None and not math.isfinite(gemm["norm2"]):
                gemm = None  # the product overflows float64: no weight for it in the layer's GEMM error
            yield RecordResult(
                file, layer.name, rec.name, rec.step, axis, method, shape, m.to_dict(), gemm,
                "all-zero gradient" if zero else None,
            )

    return finish


def _generator(file: str, rec: Record, axis: str, method: str, config: EvalConfig, device) -> torch.Generator:
    """The (file name, layer, record, axis, method) stream, so jobs run in any order."""
    parts = (Path(file).name, rec.layer.key, rec.name, axis, method)  # not the path: ./a.h5 == a.h5
    return torch.Generator(device=device).manual_seed(stream_seed(config.seed, *parts))


def start_record(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device: torch.device,
    pool: concurrent.futures.Executor | None = None, g: torch.Tensor | None = None,
) -> StartedRecord:
    """Load one record (``g``: already loaded, on ``device``), check it, and start its (axis,
    method) jobs in ``pool`` (in turn, here, when None). A record that cannot be evaluated gives its
    error event and no job. Under ``--memory-budget`` a record too big for it runs :mod:`.chunked`."""
    jobs = 1 if pool is None else min(
        record_method_threads(rec, config, 1, device, draw_backend(config.backend, device)),
        len(config.axes) * len(methods),
    )
    floats = chunk_floats(reader, rec, config, device, jobs)
    if floats is not None:
        return _start_chunked(reader, rec, file, methods, config, device, floats, pool)
    g = rec.load().to(device) if g is None else g
    layer = rec.layer
    bad = int((~torch.isfinite(g)).sum())
    if bad:
        return _nonfinite(file, rec, bad, g.numel())
    try:
        g2 = as_matrix(g, layer)
    except DumpError as exc:
        return _error(file, rec, str(exc))
    if g2.numel() == 0:
        return _empty(file, rec)
    zero = not bool(g2.any())
    operands, gemm_note = gemm_operands(reader, rec, g, g2, config.axes)
    head: list[Event] = [Note(gemm_note)] if gemm_note else []

    def one(job: tuple[str, str]) -> tuple:
        """Exact and Monte-Carlo metrics of one (axis, method)."""
        axis, method = job
        gen = _generator(file, rec, axis, method, config, device)
        gemm, mc = None, None
        if axis in operands:
            a, b = operands[axis]
            b = b.to(device)
            gemm = {"target": GEMM_OF_AXIS[axis], **gemm_moments(a, b, method, config.parsed_pattern).relative()}
            if config.mc_check and config.samples > 0:  # the cross-check reuses the angle's draws
                mc = GemmError(g2, b, axis)
        m = evaluate_tensor(
            g2, method, config.parsed_pattern, AXIS_DIM[axis], config.samples, gen, config.mc_check,
            on_sample=mc.add if mc is not None else None, backend=draw_backend(config.backend, device),
        )
        if mc is not None:
            r = mc.result()
            gemm["mc_mse"], gemm["mc_mse_se"] = r["err"], r["err_se"]
        return axis, method, m, gemm

    jobs = [(axis, method) for axis in config.axes for method in methods]
    results = [pool.submit(one, job) for job in jobs] if pool is not None else [one(job) for job in jobs]
    return StartedRecord(head, results, _finisher(file, rec, tuple(g2.shape), zero, lambda: float(g2.abs().max())))


def _start_chunked(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device: torch.device,
    floats: int, pool: concurrent.futures.Executor | None = None,
) -> StartedRecord:
    """:func:`start_record` of a record read and evaluated in pieces of ``floats`` floats, its jobs
    in ``pool`` (or in turn)."""
    try:
        meta = torch.empty(rec.shape, device="meta")
        g2 = as_matrix(meta, rec.layer)
    except DumpError as exc:
        return _error(file, rec, str(exc))
    if g2.numel() == 0:
        return _empty(file, rec)
    seen = chunked.scan(rec, config.axes[0], floats, device)
    if seen["bad"]:
        return _nonfinite(file, rec, seen["bad"], seen["numel"])
    operands, gemm_note = gemm_operands(reader, rec, meta, g2, config.axes)
    head: list[Event] = [Note(gemm_note)] if gemm_note else []
    backend = draw_backend(config.backend, device)
    def one(job: tuple[str, str]) -> tuple:
        axis, method = job
        b = operands[axis][1].to(device) if axis in operands else None
        gen = _generator(file, rec, axis, method, config, device)
        m, gemm = chunked.evaluate_pieces(rec, axis, method, config, floats, b, gen, seen["top"], device, backend)
        return axis, method, m, gemm

    jobs = [(axis, method) for axis in config.axes for method in methods]
    results = [pool.submit(one, job) for job in jobs] if pool is not None else [one(job) for job in jobs]
    return StartedRecord(head, results, _finisher(file, rec, tuple(g2.shape), seen["zero"], lambda: seen["top"]))
