"""The CPU record pipeline: records in order, the next one's (axis, method) jobs queued in the
method-thread pool behind the current one's (:data:`PIPELINE`). Its sibling on CUDA is :mod:`.gpu`."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import torch

from ..backend import draw_backend
from . import record
from .config import EvalConfig
from .events import Event

PIPELINE = True
"""In one process, consecutive records evaluated in method threads (:func:`.threads.method_threads`) share
one thread pool, and the next record's (axis, method) jobs are queued behind the current one's, so
no core idles while a record's longest job (approx-mvue's) finishes. At most two records are in
memory. False: one pool per record, each record finished before the next is loaded (kept to test
and time the two side by side)."""


def cpu_events(pairs, methods: list[str], config: EvalConfig, device) -> Iterator[list[Event]]:
    """:func:`.record.record_events` of every (reader, record) in ``pairs``, in order, one record ahead
    (:data:`PIPELINE`): a record that runs in method threads starts its jobs in the pool shared
    with the records around it before the previous record's events are collected."""
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    size = 0  # the pool's threads
    pending: list[record.StartedRecord] = []
    before = torch.get_num_threads()
    device = device or torch.device("cpu")
    backend = draw_backend(config.backend, device)
    try:
        for reader, rec in pairs:
            n = record.record_method_threads(rec, config, 1, device, backend) if PIPELINE else 1
            if n != size or n <= 1:  # another policy: finish the records under way first
                while pending:
                    yield list(pending.pop(0).events())
            if n <= 1:
                yield record.record_events(reader, rec, str(reader.path), methods, config, device)
                continue
            if n != size:
                if pool is not None:
                    pool.shutdown(wait=True)
                pool, size = concurrent.futures.ThreadPoolExecutor(n), n
            torch.set_num_threads(1)  # method threads run where thread_policy gives one torch thread
            pending.append(record.start_record(reader, rec, str(reader.path), methods, config, device, pool))
            if len(pending) > 1:
                yield list(pending.pop(0).events())
        while pending:
            yield list(pending.pop(0).events())
    finally:
        for started in pending:
            started.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
