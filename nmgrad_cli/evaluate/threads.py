"""How many threads evaluate a record: torch's intra-op threads (:func:`thread_policy`) and the
Python threads running a record's (axis, method) jobs at once (:func:`method_threads`)."""

from __future__ import annotations

import contextlib
import os

import torch


def thread_policy(numel: int, threads: int = 0, workers: int = 1) -> int:
    """torch threads for a record of ``numel`` elements: ``threads`` when given, else 1 below 2^22
    elements (on a 2-core machine with both cores busy torch's default threads stall in every small
    op: issue 9 measured 114.8 s vs 13.3 s with one thread on an mlp layer) and above it the cores
    shared among the ``workers`` processes."""
    if threads:
        return threads
    return 1 if numel < THREADS_MIN_NUMEL else max(1, (os.cpu_count() or 1) // max(1, workers))


THREADS_MIN_NUMEL = 1 << 22


def method_threads(numel: int, threads: int = 0, workers: int = 1, device=None, backend: str = "reference") -> int:
    """Python threads evaluating the (axis, method) pairs of a record at once, each on its own
    stream: with the auto policy and a record on one torch thread (:func:`thread_policy`), the
    cores shared among the ``workers`` processes. Independent streams of small ops have no barrier
    to wait on, unlike torch's intra-op threads on a busy machine. Else 1: ``--threads N`` is N
    torch threads and no more, a GPU runs one stream, and only the plain-torch reference draws
    (``backend``) run in threads (torch.compile's tracing is not thread-safe)."""
    if threads or thread_policy(numel, threads, workers) > 1 or torch.device(device or "cpu").type != "cpu":
        return 1
    if backend != "reference":
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
