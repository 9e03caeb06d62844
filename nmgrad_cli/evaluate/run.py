"""Running an evaluation: open the dumps, select their grad records, stream typed events.

The rooms of this package, from the command down: this module opens and selects;
:mod:`.workers` decides where records run (torchrun ranks, worker processes, or this process's
pipeline: :mod:`.pipeline` on the CPU, :mod:`.gpu` on CUDA); :mod:`.record` evaluates one record
(:mod:`.chunked` in pieces under ``--memory-budget``), with :mod:`.gemm`'s operands and
:mod:`.threads`' policy; :mod:`.allocator` is the command's process-wide allocator setting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..backend import draw_backend
from ..dump import DumpReader, LayerInfo, Record
from ..dump.reader import select_records
from ..errors import DumpError, NmgradError
from ..layers import LayerSelectionError, layer_matches, no_match_message, parse_layers
from ..progress import ProgressLike, resolve_progress
from ..train.distributed import dist_info, process_group, resolve_device
from . import chunked
from .allocator import keep_freed_memory
from .config import EvalConfig
from .events import Event, FileStarted, Note
from .gemm import GemmError, conv_input_matrix, gemm_error
from .record import as_matrix, record_events, stream_seed
from .report import EvalReport, ReportBuilder
from .threads import method_threads, thread_policy
from .workers import record_results

__all__ = [
    "GemmError", "as_matrix", "conv_input_matrix", "evaluate", "gemm_error", "iter_evaluate", "keep_freed_memory",
    "method_threads", "record_events", "stream_seed", "thread_policy",
]


def open_all(paths: Sequence[str | Path], config: EvalConfig) -> list[tuple[DumpReader, list[LayerInfo]]]:
    """Open and check every dump before evaluating anything, so a bad path fails fast; select the
    layers (--layers, one error when no file has a match)."""
    opened: list[tuple[DumpReader, list[LayerInfo]]] = []
    globs = parse_layers(config.layers)
    try:
        for path in paths:
            reader = DumpReader(path)
            opened.append((reader, []))
            if not reader.layers:
                raise DumpError(f"{reader.path} is an empty dump (no layers): capture at least one step")
            if reader.n_records("grad") == 0:
                raise DumpError(f"{reader.path} holds no gradient records: capture at least one step")
            opened[-1] = (reader, [li for li in reader.layers.values() if layer_matches(li.name, globs)])
            for li in opened[-1][1]:  # F = 0: no block to prune, a bad dump rather than a bad record
                bad = next((r.shape for r in reader.records("grad", [li])
                            if -len(r.shape) <= li.feature_axis < len(r.shape) and r.shape[li.feature_axis] == 0), None)
                if bad is not None:
                    raise DumpError(f"{reader.path}: layer {li.name} has 0 features (a gradient of shape {bad}): "
                                    "nothing to prune; leave it out with --layers, or capture again")
        if not any(sel for _, sel in opened):
            names = list(dict.fromkeys(li.name for reader, _ in opened for li in reader.layers.values()))
            raise LayerSelectionError(no_match_message(names, config.layers, "dump layer"))
    except BaseException:
        for reader, _ in opened:
            reader.close()
        raise
    return opened


def selected_records(reader: DumpReader, selected: list[LayerInfo], config: EvalConfig) -> list[Record]:
    """The grad records of the selected layers that --steps, --every and --max-records keep."""
    out: list[Record] = []
    for li in selected:
        out += select_records(list(reader.records("grad", [li])), config.step_range, config.every, config.max_records)
    return out


def _file_info(reader: DumpReader, selected: list[LayerInfo]) -> dict:
    attrs = reader.attrs
    return {
        "path": str(reader.path),
        "schema_version": attrs.get("schema_version"),
        "complete": bool(attrs.get("complete", False)),
        "interrupted": bool(attrs.get("interrupted", False)),
        "run": attrs.get("run", {}),
        "layers": {li.name: li.module_type for li in selected},
    }


def iter_evaluate(
    paths: Sequence[str | Path], config: EvalConfig, progress: ProgressLike = None
) -> Iterator[Event]:
    """Stream the evaluation as typed events (:mod:`nmgrad_cli.evaluate.events`): a
    :class:`FileStarted` per file, then per grad record a :class:`RecordResult` per (axis, method)
    or an :class:`ErrorEntry`, and :class:`Note` events. Only one record (plus its input and
    weight) is in memory at a time. ``progress``: see :mod:`nmgrad_cli.progress` (unit: grad records)."""
    methods, notes = config.resolve_methods()
    for text in notes:
        yield Note(text)
    first: dict[Path, str | Path] = {}
    for p in paths:
        first.setdefault(Path(p).resolve(), p)
    unique = list(first.values())
    if len(unique) < len(paths):
        yield Note("a dump given more than once is evaluated once")
    device = resolve_device(config.device, dist_info())
    opened = open_all(unique, config)
    bar = resolve_progress(progress, unit="records")
    results = None
    try:
        chosen = [selected_records(reader, selected, config) for reader, selected in opened]
        total = sum(len(recs) for recs in chosen)
        if total == 0:
            raise NmgradError(
                f"no grad record is left after --steps {config.steps} --every {config.every}: "
                "widen the selection (`nmgrad inspect` lists the steps)"
            )
        done = 0
        chunked.check_budget(opened, chosen, config, device)  # before anything runs: one line, exit 2
        bar.start(total, "evaluate")
        results = record_results(opened, chosen, methods, config, device)
        for (reader, selected), records in zip(opened, chosen):
            info = _file_info(reader, selected)
            yield FileStarted(info)
            if not info["complete"]:
                yield Note(
                    f"{info['path']} is incomplete (interrupted or still being written): "
                    "evaluating the records it holds"
                )
            seen: set[str] = set()
            for rec in records:
                for event in next(results):
                    if isinstance(event, Note):  # e.g. "GEMM skipped" once per file, not per record
                        if event.text in seen:
                            continue
                        seen.add(event.text)
                    yield event
                done += 1
                bar.update(done, rec.layer.name)
    finally:
        if results is not None:
            results.close()  # stops the worker processes when the caller gives up early (Ctrl-C)
        bar.close()
        for reader, _ in opened:
            reader.close()


def evaluate(paths: Sequence[str | Path], config: EvalConfig, progress: ProgressLike = None) -> EvalReport:
    """Evaluate ``config`` on the dumps at ``paths``; raises :class:`NmgradError` on bad input.
    ``progress=True`` shows progress (tqdm, or plain lines off a terminal); see :mod:`nmgrad_cli.progress`."""
    if not paths:
        raise NmgradError("no dump given: pass at least one .h5 file written by `nmgrad capture`")
    methods, _ = config.resolve_methods()
    device = resolve_device(config.device, dist_info())
    runtime = {"device": str(device), "draw_backend": draw_backend(config.backend, device)}
    builder = ReportBuilder(config, methods, runtime)
    with process_group(dist_info(), torch.device("cpu")):  # under torchrun: records sharded over ranks
        for event in iter_evaluate(paths, config, progress):
            builder.add(event)
    return builder.report()
