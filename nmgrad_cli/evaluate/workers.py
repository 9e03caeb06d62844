"""Where the records are evaluated: sharded over a torchrun process group's ranks, over
``--workers`` spawned processes, or in this process by the device's pipeline (:mod:`.pipeline` on
the CPU, :mod:`.gpu` on CUDA). Each record is a job whose streams depend only on its own name, so
every way gives the report of one process."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..dump import DumpReader
from . import gpu, pipeline
from .allocator import keep_freed_memory
from .config import EvalConfig
from .events import Event
from .record import record_events


def record_results(
    opened, chosen, methods: list[str], config: EvalConfig, device: torch.device | None
) -> Iterator[list[Event]]:
    """The events of every selected record, in order: here, sharded over the ranks of a torchrun
    process group, or over ``config.workers`` spawned processes. Each record is a job whose streams
    depend only on its own name, and the results come back in record order, so the report is
    identical to one process's."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:  # torchrun: rank r evaluates records r, r + world, ...; every rank gets them all
        rank = dist.get_rank()
        pairs = [(reader, rec) for (reader, _), records in zip(opened, chosen) for rec in records]
        mine = [
            record_events(reader, rec, str(reader.path), methods, config, device) for reader, rec in pairs[rank::world]
        ]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        for i in range(len(pairs)):
            yield gathered[i % world][i // world]
        return
    if config.workers <= 1:
        pairs = [(reader, rec) for (reader, _), records in zip(opened, chosen) for rec in records]
        device = device or torch.device("cpu")
        run = gpu.gpu_events if device.type == "cuda" else pipeline.cpu_events
        yield from run(pairs, methods, config, device)
        return
    import torch.multiprocessing as mp

    jobs = [
        (str(reader.path), rec.layer.key, rec.name, methods, config, str(device))
        for (reader, _), records in zip(opened, chosen) for rec in records
    ]
    pool = concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=mp.get_context("spawn"))
    try:
        yield from pool.map(_worker_job, jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_job(job) -> list[Event]:
    """One record in a worker process: opens the dump itself (h5py handles do not cross processes)."""
    path, layer_key, name, methods, config, device = job
    if device == "cpu":
        keep_freed_memory()
    with DumpReader(path) as reader:
        (rec,) = [r for r in reader.records("grad", [reader.layers[layer_key]]) if r.name == name]
        return record_events(reader, rec, str(reader.path), methods, config, torch.device(device))
