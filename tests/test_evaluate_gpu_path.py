"""The CUDA record pipeline (nmgrad_cli.evaluate.gpu) run on the CPU: its structure without a GPU. The same
events as the CPU pipeline, in order; every record read by the reader thread, the next one read while the
current one is evaluated; a record the budget cuts into pieces is read piece by piece, not prefetched."""

from __future__ import annotations

import concurrent.futures
import threading

import torch

from nmgrad_cli.dump import DumpReader, DumpWriter
from nmgrad_cli.evaluate import EvalConfig, gpu, pipeline, record
from nmgrad_cli.evaluate.run import selected_records


def _dump(path):
    gen = torch.Generator().manual_seed(2)
    with DumpWriter(path) as w:
        w.add_layer("a", "Linear", -1, [0])
        for step, rows in enumerate([16, 8, 24, 12]):
            g = torch.randn(rows, 12, generator=gen)
            if step == 1:
                g[0, 0] = float("nan")
            w.write("a", "grad", step, 0, g)
    return path


def test_gpu_pipeline_on_the_cpu_gives_the_cpu_pipelines_events(tmp_path, monkeypatch):
    path = _dump(tmp_path / "d.h5")
    cfg = EvalConfig(pattern="2:4", axis="both", samples=3, seed=1, memory_budget="none")
    log: list[tuple[str, str]] = []
    real_read, real_start = gpu._read, record.start_record

    def read(rec, pin):
        log.append(("read", rec.name, threading.current_thread().name))
        assert pin is False  # pinning is for a CUDA target
        return real_read(rec, pin)

    def start(reader, rec, *a, **k):
        log.append(("start", rec.name, k.get("g") is not None))
        return real_start(reader, rec, *a, **k)

    class Pool(concurrent.futures.ThreadPoolExecutor):  # logs when a read is asked for (not when it runs)
        def submit(self, fn, *args, **kwargs):
            if fn is read:
                log.append(("asked", args[0].name))
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(gpu, "_read", read)
    monkeypatch.setattr(gpu.concurrent.futures, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(record, "start_record", start)
    with DumpReader(path) as reader:
        pairs = [(reader, rec) for rec in selected_records(reader, list(reader.layers.values()), cfg)]
        methods, _ = cfg.resolve_methods()
        want = list(pipeline.cpu_events(pairs, methods, cfg, torch.device("cpu")))
        log.clear()
        got = []
        for events in gpu.gpu_events(pairs, methods, cfg, torch.device("cpu")):
            got.append(events)
            log.append(("events", len(got)))
    assert got == want and sum(len(e) for e in got) == 3 * 2 * len(methods) + 1  # one NaN record: one error
    reads = [e for e in log if e[0] == "read"]
    assert len(reads) == 4 and all(e[2].startswith("nmgrad-read") for e in reads)
    assert all(e[2] for e in log if e[0] == "start")  # every record handed over already read
    # record i + 1 is asked for before record i's events are out: reading overlaps the evaluation
    # (the read itself runs on the reader thread whenever it is scheduled: only the asking is ordered)
    order = [e[:2] for e in log if e[0] in ("asked", "events")]
    for i in range(3):
        assert order.index(("asked", pairs[i + 1][1].name)) < order.index(("events", i + 1))


def test_a_record_in_pieces_is_not_prefetched(tmp_path, monkeypatch):
    path = _dump(tmp_path / "d.h5")
    cfg = EvalConfig(pattern="2:4", samples=2, seed=1, memory_budget="20000")  # 24 x 12 = 288 floats: pieces
    reads = []
    monkeypatch.setattr(gpu, "_read", lambda rec, pin: reads.append(rec.name) or rec.load())
    with DumpReader(path) as reader:
        recs = selected_records(reader, list(reader.layers.values()), cfg)
        pairs = [(reader, rec) for rec in recs]
        methods, _ = cfg.resolve_methods()
        events = list(gpu.gpu_events(pairs, methods, cfg, torch.device("cpu")))
    assert len(events) == 4
    cut = [rec.name for rec in recs if record.needs_chunks(rec, cfg, "cpu")]
    assert cut and set(reads) == {rec.name for rec in recs} - set(cut)
