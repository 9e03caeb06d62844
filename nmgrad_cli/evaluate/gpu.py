"""The CUDA record pipeline, the sibling of :mod:`.pipeline` (the CPU's): the file is read while the
GPU evaluates.

A reader thread loads record i + 1 from the dump into pinned host memory while the GPU evaluates
record i; the record goes to the device with a non-blocking copy. The main thread spends its time in
CUDA synchronisations (every metric is a ``.item()``), which release the GIL, so the thread's h5py
read and decompression run meanwhile. Each (axis, method) job draws all its samples in one batched
call (:data:`nmgrad_cli.metrics.GPU_DRAW_CHUNK`), so a record costs a few launches per method, not a
few per sample. Same events in the same order as the CPU pipeline; the draws are the Triton
kernels' (same law, other random numbers than the CPU's).

It runs on any device (``device='cpu'`` without pinning), which is how its ordering and its reader
thread are tested without a GPU.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import torch

from ..dump import Record
from . import record
from .config import EvalConfig
from .events import Event

PREFETCH = 1
"""Records read ahead of the one being evaluated (each is at most one record of host memory)."""


def _read(rec: Record, pin: bool) -> torch.Tensor:
    """The record's dY in host memory, pinned when it goes to a GPU (a non-blocking copy needs it)."""
    host = rec.load()
    return host.pin_memory() if pin else host


def gpu_events(pairs, methods: list[str], config: EvalConfig, device: torch.device) -> Iterator[list[Event]]:
    """:func:`.record.record_events`'s events of every (reader, record) in ``pairs``, in order, with
    the next :data:`PREFETCH` records read by a thread while this one is evaluated. A record that
    :mod:`.chunked` evaluates in pieces is read by it, piece by piece, not prefetched."""
    device = torch.device(device)
    pin = device.type == "cuda"
    reader_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nmgrad-read")
    ahead: list[concurrent.futures.Future | None] = []

    def submit(i: int) -> None:
        if i < len(pairs):
            reader, rec = pairs[i]
            chunked = record.needs_chunks(rec, config, device)
            ahead.append(None if chunked else reader_thread.submit(_read, rec, pin))

    try:
        for i in range(PREFETCH):
            submit(i)
        for i, (reader, rec) in enumerate(pairs):
            future = ahead.pop(0)
            submit(i + PREFETCH)  # read on while this one is evaluated
            g = None if future is None else future.result().to(device, non_blocking=True)
            started = record.start_record(reader, rec, str(reader.path), methods, config, device, None, g=g)
            del g  # the record's device copy lives in its jobs until they are done
            yield list(started.events())
    finally:
        for f in ahead:
            if f is not None:
                f.cancel()
        reader_thread.shutdown(wait=True, cancel_futures=True)
