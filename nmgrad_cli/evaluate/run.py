"""Running an evaluation: open the dumps, stream their grad records, yield typed events.

For every grad record dY of a layer, dY is viewed as a 2-D matrix g: (T, F) (the layer's
``feature_axis`` moved last, every other dim flattened into tokens). The block axis is named by the
backward GEMM that consumes the pruned dY (docs/methods.md):

- ``features``: blocks along F (dim -1), for the input gradient  dX = dY W    (T, F) @ (F, I)
- ``tokens``:   blocks along T (dim 0),  for the weight gradient dW = dY^T X  (F, T) @ (T, I)

A record with NaN/Inf values is reported as an error event and skipped; the rest is evaluated.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..backend import draw_backend
from ..dump import DumpReader, LayerInfo, Record
from ..dump.reader import select_records
from ..errors import DumpError, NmgradError
from ..layers import LayerSelectionError, layer_matches, no_match_message, parse_layers
from ..metrics import evaluate_tensor, gemm_moments
from ..patterns import Pattern
from ..progress import ProgressLike, resolve_progress
from ..prune import prune
from ..train.distributed import dist_info, process_group, resolve_device
from .config import AXIS_DIM, GEMM_OF_AXIS, EvalConfig
from .events import ErrorEntry, Event, FileStarted, Note, RecordResult
from .report import EvalReport, ReportBuilder


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


class GemmError:
    """Monte-Carlo relative error of the backward GEMM fed with pruned g (docs/methods.md):

    - axis ``features``: dX = g @ W with ``other`` = W (F, I), blocks along F;
    - axis ``tokens``:   dW = g^T @ X with ``other`` = X (T, I), blocks along T.

    :meth:`add` takes one draw g^ (T, F); :meth:`result` gives err = mean_s ||G^_s - G||^2 / ||G||^2
    with its standard error (and the absolute values). Computed in float32 (float64 for float64 input)
    as (g^ - g) @ W, one GEMM per draw.
    """

    def __init__(self, g: torch.Tensor, other: torch.Tensor, axis: str):
        self.axis = axis
        self.cdt = torch.float64 if torch.float64 in (g.dtype, other.dtype) else torch.float32
        self.g, self.other = g.to(self.cdt), other.to(self.cdt)
        self.norm2 = float(torch.sum(self._gemm(self.g).double() ** 2))
        self.errs: list[float] = []

    def _gemm(self, a: torch.Tensor) -> torch.Tensor:
        if self.axis == "features":
            return a @ self.other
        if self.other.dim() == 3:  # grouped (a grouped conv's dW): feature group j times other[j]
            groups = self.other.shape[0]
            return (a.T.reshape(groups, -1, a.shape[0]) @ self.other).reshape(a.shape[1], -1)
        return a.T @ self.other

    def add(self, draw: torch.Tensor) -> None:
        self.errs.append(float(torch.sum(self._gemm(draw.to(self.cdt) - self.g).double() ** 2)))

    def result(self) -> dict:
        n = len(self.errs)
        e = torch.tensor(self.errs, dtype=torch.float64)
        err_abs = e.mean().item() if n else 0.0  # no draws: g is all zero, so is the error
        err_abs_se = e.std(unbiased=True).item() / math.sqrt(n) if n > 1 else (0.0 if n == 0 else None)
        rel = (lambda x: x / self.norm2) if self.norm2 > 0 else (lambda x: 0.0)
        return {
            "target": GEMM_OF_AXIS[self.axis],
            "err": rel(err_abs),
            "err_se": None if err_abs_se is None else rel(err_abs_se),
            "err_abs": err_abs,
            "err_abs_se": err_abs_se,
            "norm2": self.norm2,
        }


def gemm_error(
    g: torch.Tensor, other: torch.Tensor, method: str, pattern: Pattern, axis: str, samples: int, generator=None
) -> dict:
    """:class:`GemmError` of ``samples`` draws of ``method`` on g (T, F) along ``axis``."""
    acc = GemmError(g, other, axis)
    for _ in range(samples):
        acc.add(prune(g, method, pattern, AXIS_DIM[axis], generator, stream="generator"))
    return acc.result()


def _gemm_operands(
    reader: DumpReader, rec: Record, g: torch.Tensor, g2: torch.Tensor, axes: tuple[str, ...]
) -> tuple[dict, str | None]:
    """{axis: (a, b)} with the backward GEMM a @ b whose left operand a is pruned along its last dim,
    for the axes whose operand the dump holds; else a note on why not.

    - Linear-like (feature axis last): features a = dY (T, F), b = W (F, I); tokens a = dY^T (F, T),
      b = X (T, I).
    - Linear-like on N-D activations (ConvNeXt's pointwise Linears on (B, H, W, C)): the same, with
      every dim but the last flattened into T.
    - Conv1d/2d/3d (dY (B, F, *spatial)): features a = dY as (T = B*prod(spatial), F), b = W as
      (F, C_in*prod(kernel)) (block-diagonal over groups), the implicit GEMM whose output col2im
      folds into dX; tokens a = dY^T (F, T), b = X unfolded with the conv's stride/padding/dilation
      (T, C_in*prod(kernel)), or with G groups (G, T, C_in/G*prod(kernel)), feature group j times
      b[j] (:func:`conv_input_matrix`, from the layer's ``conv`` attribute).
    """
    layer = rec.layer
    kinds = {"features": "weight", "tokens": "input"}
    present = [a for a in axes if rec.name in layer.records.get(kinds[a], [])]
    if not present:
        return {}, None
    last = layer.feature_axis in (-1, g.dim() - 1)
    conv = not last and g.dim() >= 3 and layer.feature_axis == 1 and layer.module_type.startswith("Conv")
    if not last and not conv:
        return {}, (
            f"layer {layer.name} ({layer.module_type}): GEMM-level errors skipped, they are computed for "
            "Linear-like layers (feature axis last) and Conv1d/2d/3d (features on dim 1)"
        )
    f = g2.shape[1]
    out = {}
    conv_note = None
    loaded = {kind: reader.load(layer.key, kind, rec.name) for kind in {kinds[a] for a in present}}
    for kind, v in loaded.items():
        if not bool(torch.isfinite(v).all()):
            return {}, f"layer {layer.name}: the stored {kind} has NaN/Inf values; GEMM skipped"
    for axis in present:
        v = loaded[kinds[axis]]
        if conv:
            if axis == "tokens":
                xu = conv_input_matrix(v, layer.conv, layer.weight_shape, g.shape)
                if isinstance(xu, str):
                    conv_note = (
                        f"layer {layer.name} ({layer.module_type}): dW errors skipped, {xu}; dX errors are computed"
                    )
                else:
                    out[axis] = (g2.T, xu)
                continue
            w = _conv_weight_matrix(v, f, reader, rec)
            if isinstance(w, str):
                return {}, f"layer {layer.name} ({layer.module_type}): {w}; GEMM skipped"
            out[axis] = (g2, w)
        elif axis == "features":
            if v.dim() != 2 or v.shape[0] != f:
                return {}, f"layer {layer.name}: weight of shape {tuple(v.shape)} is not (F={f}, I); GEMM skipped"
            out[axis] = (g2, v)
        else:
            if v.dim() != g.dim() or v.shape[:-1] != g.shape[:-1]:
                return {}, (
                    f"layer {layer.name}: input of shape {tuple(v.shape)} does not have dY's token dims "
                    f"{tuple(g.shape[:-1])}; GEMM skipped"
                )
            out[axis] = (g2.T, v.reshape(-1, v.shape[-1]))
    return out, conv_note


def conv_input_matrix(
    x: torch.Tensor, conv: dict | None, weight_shape: tuple[int, ...] | None, dy_shape: torch.Size
) -> torch.Tensor | str:
    """The input x (B, C_in, *spatial) of a Conv1d/2d/3d unfolded as the (T = B*prod(out), C_in*prod(k))
    operand of dW = dY^T X_unf, rows in dY's token order (b, *out), columns (channel, *kernel) as
    ``F.unfold`` orders them; or why it cannot be built. With G > 1 groups, (G, T, C_in/G*prod(k)):
    group j's channels, whose GEMM with feature group j of dY^T gives those features' rows of dW.

    ``conv`` is the dump's layer attribute (stride, padding, dilation, groups); padding 'same' pads
    dilation*(k-1) per dim, the extra one after, as torch does."""
    if conv is None:
        return "the dump holds no conv parameters (stride, padding): recapture it with this version"
    nd = x.dim() - 2
    if weight_shape is None or len(weight_shape) != x.dim() or nd < 1 or len(dy_shape) != x.dim():
        return f"input {tuple(x.shape)} / weight {weight_shape} are not a convolution's"
    groups = int(conv["groups"])
    if groups < 1 or weight_shape[1] * groups != x.shape[1] or weight_shape[0] % groups:
        return f"weight {tuple(weight_shape)} with groups={groups} does not fit an input with {x.shape[1]} channels"
    k = tuple(weight_shape[2:])

    def per_dim(v) -> tuple[int, ...]:
        return (int(v),) * nd if isinstance(v, int) else tuple(int(i) for i in v) * (nd if len(v) == 1 else 1)

    stride, dilation = per_dim(conv["stride"]), per_dim(conv["dilation"])
    padding = conv["padding"]
    if padding == "valid":
        padding = 0
    if padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in per_dim(padding)]
    cols = unfold_nd(x, k, stride, pads, dilation)  # (B, C*prod(k), L)
    b, _, length = cols.shape
    if b != dy_shape[0] or length != math.prod(dy_shape[2:]):
        return f"the unfolded input ({b} x {length} positions) does not match dY {tuple(dy_shape)}"
    if groups == 1:
        return cols.transpose(1, 2).reshape(b * length, -1)
    # rows are (channel, *kernel) with the channel slowest: group j is a contiguous slice
    return cols.view(b, groups, -1, length).permute(1, 0, 3, 2).reshape(groups, b * length, -1)


def unfold_nd(
    x: torch.Tensor, k: tuple[int, ...], stride: tuple[int, ...], pads: list[tuple[int, int]],
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """``F.unfold`` for any number of spatial dims: x (B, C, *S) -> (B, C*prod(k), prod(out)), the
    patch of output position o at input o*stride + j*dilation (after padding), columns (c, *j)."""
    nd = len(k)
    flat = [p for before, after in reversed(pads) for p in (before, after)]
    x = torch.nn.functional.pad(x, flat) if any(flat) else x
    for i in range(nd):  # each unfold appends a window dim; the spatial dims keep their places
        x = x.unfold(2 + i, dilation[i] * (k[i] - 1) + 1, stride[i])[..., :: dilation[i]]
    b, c, out = x.shape[0], x.shape[1], x.shape[2 : 2 + nd]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))  # (B, C, *k, *out)
    return x.reshape(b, c * math.prod(k), math.prod(out))


def _conv_weight_matrix(w: torch.Tensor, f: int, reader: DumpReader, rec: Record) -> torch.Tensor | str:
    """A convolution weight (F, C_in/groups, *kernel) as the (F, C_in*prod(kernel)) matrix of the dX
    GEMM, block-diagonal over the groups (groups = C_in / w.shape[1], C_in from the stored input)."""
    if w.dim() < 3 or w.shape[0] != f:
        return f"weight of shape {tuple(w.shape)} is not (F={f}, C_in/groups, *kernel)"
    layer = rec.layer
    if rec.name not in layer.records.get("input", []):
        return "the input is needed to know the conv's groups and the dump does not hold it"
    c_in = reader.load(layer.key, "input", rec.name).shape[1]
    per = w.shape[1]
    if c_in % per or f % (c_in // per):
        return f"weight {tuple(w.shape)} does not fit an input with {c_in} channels"
    groups = c_in // per
    if groups == 1:
        return w.reshape(f, -1)
    fo, cols = f // groups, w[0].numel()
    full = torch.zeros(f, groups * cols, dtype=w.dtype)
    for j in range(groups):
        full[j * fo : (j + 1) * fo, j * cols : (j + 1) * cols] = w[j * fo : (j + 1) * fo].reshape(fo, cols)
    return full


def _open_all(paths: Sequence[str | Path], config: EvalConfig) -> list[tuple[DumpReader, list[LayerInfo]]]:
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
        if not any(sel for _, sel in opened):
            names = list(dict.fromkeys(li.name for reader, _ in opened for li in reader.layers.values()))
            raise LayerSelectionError(no_match_message(names, config.layers, "dump layer"))
    except BaseException:
        for reader, _ in opened:
            reader.close()
        raise
    return opened


def _selected_records(reader: DumpReader, selected: list[LayerInfo], config: EvalConfig) -> list[Record]:
    """The grad records of the selected layers that --steps, --every and --max-records keep."""
    out: list[Record] = []
    for li in selected:
        out += select_records(list(reader.records("grad", [li])), config.step_range, config.every, config.max_records)
    return out


def thread_policy(numel: int, threads: int = 0, workers: int = 1) -> int:
    """torch threads for a record of ``numel`` elements: ``threads`` when given, else 1 below 2^22
    elements (on a 2-core machine with both cores busy torch's default threads stall in every small
    op: issue 9 measured 114.8 s vs 13.3 s with one thread on an mlp layer) and above it the cores
    shared among the ``workers`` processes."""
    if threads:
        return threads
    return 1 if numel < THREADS_MIN_NUMEL else max(1, (os.cpu_count() or 1) // max(1, workers))


THREADS_MIN_NUMEL = 1 << 22


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process, on glibc: serve blocks up to 32 MiB from the heap (M_MMAP_THRESHOLD) and
    keep up to 256 MiB of freed heap (M_TRIM_THRESHOLD) instead of giving it back to the kernel.
    Evaluate allocates and frees record-sized temporaries thousands of times; a block mapped afresh
    costs a page fault and a zeroing per 4 KiB page (BENCHMARKS.md: 10% of an evaluate on one
    thread). 32 MiB is the most glibc's own dynamic threshold rises to; the heap stays bounded by
    evaluate's peak (one or two records and their draws). True when set; a no-op elsewhere.

    A process-wide setting, so the library never makes it for its caller: ``nmgrad evaluate`` calls
    it, and so do the ``--workers`` processes evaluate starts itself; a Python user may call it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
    opened = _open_all(unique, config)
    bar = resolve_progress(progress, unit="records")
    results = None
    try:
        chosen = [_selected_records(reader, selected, config) for reader, selected in opened]
        total = sum(len(recs) for recs in chosen)
        if total == 0:
            raise NmgradError(
                f"no grad record is left after --steps {config.steps} --every {config.every}: "
                "widen the selection (`nmgrad inspect` lists the steps)"
            )
        done = 0
        bar.start(total, "evaluate")
        results = _record_results(opened, chosen, methods, config, device)
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


def _record_results(opened, chosen, methods: list[str], config: EvalConfig, device) -> Iterator[list[Event]]:
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
        yield from _pipelined_events(
            [(reader, rec) for (reader, _), records in zip(opened, chosen) for rec in records], methods, config, device
        )
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


PIPELINE = True
"""In one process, consecutive records evaluated in method threads (:func:`method_threads`) share
one thread pool, and the next record's (axis, method) jobs are queued behind the current one's, so
no core idles while a record's longest job (approx-mvue's) finishes. At most two records are in
memory. False: one pool per record, each record finished before the next is loaded (kept to test
and time the two side by side)."""


def _pipelined_events(pairs, methods: list[str], config: EvalConfig, device) -> Iterator[list[Event]]:
    """:func:`record_events` of every (reader, record) in ``pairs``, in order, one record ahead
    (:data:`PIPELINE`): a record that runs in method threads starts its jobs in the pool shared
    with the records around it before the previous record's events are collected."""
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    size = 0  # the pool's threads
    pending: list[_StartedRecord] = []
    before = torch.get_num_threads()
    device = device or torch.device("cpu")
    backend = draw_backend(config.backend, device)
    try:
        for reader, rec in pairs:
            n = method_threads(math.prod(rec.shape), config.threads, 1, device, backend) if PIPELINE else 1
            if n != size or n <= 1:  # another policy: finish the records under way first
                while pending:
                    yield list(pending.pop(0).events())
            if n <= 1:
                yield record_events(reader, rec, str(reader.path), methods, config, device)
                continue
            if n != size:
                if pool is not None:
                    pool.shutdown(wait=True)
                pool, size = concurrent.futures.ThreadPoolExecutor(n), n
            torch.set_num_threads(1)  # method threads run where thread_policy gives one torch thread
            pending.append(_start_record(reader, rec, str(reader.path), methods, config, device, pool))
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


def _worker_job(job) -> list[Event]:
    """One record in a worker process: opens the dump itself (h5py handles do not cross processes)."""
    path, layer_key, name, methods, config, device = job
    if device == "cpu":
        keep_freed_memory()
    with DumpReader(path) as reader:
        (rec,) = [r for r in reader.records("grad", [reader.layers[layer_key]]) if r.name == name]
        return record_events(reader, rec, str(reader.path), methods, config, torch.device(device))


def record_events(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device=None
) -> list[Event]:
    """Every event of one grad record on ``device`` (default CPU), with the thread policy applied."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    workers = max(config.workers, world)  # processes sharing this machine's cores
    threads = thread_policy(math.prod(rec.shape), config.threads, workers)
    with _torch_threads(threads):
        return list(_evaluate_record(reader, rec, file, methods, config, device or torch.device("cpu"), workers))


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


def _evaluate_record(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device: torch.device,
    workers: int = 1,
) -> Iterator[Event]:
    """The events of one record, its (axis, method) jobs in :func:`method_threads` threads of a
    pool of its own (or in turn)."""
    numel = math.prod(rec.shape)
    n = method_threads(numel, config.threads, workers, device, draw_backend(config.backend, device))
    n = min(n, len(config.axes) * len(methods))
    pool = concurrent.futures.ThreadPoolExecutor(n) if n > 1 else None
    try:
        yield from _start_record(reader, rec, file, methods, config, device, pool).events()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _StartedRecord:
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


def _start_record(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, device: torch.device,
    pool: concurrent.futures.Executor | None = None,
) -> _StartedRecord:
    """Load one record, check it, and start its (axis, method) jobs in ``pool`` (in turn, here,
    when None). A record that cannot be evaluated gives its error event and no job."""
    g = rec.load().to(device)
    layer = rec.layer
    bad = int((~torch.isfinite(g)).sum())
    if bad:
        return _StartedRecord([ErrorEntry(
            file, layer.name, rec.name,
            f"{file}: layer {layer.name} record {rec.name}: {bad} of {g.numel()} gradient values are NaN/Inf;"
            " record skipped, the rest evaluated",
        )], [], None)
    try:
        g2 = as_matrix(g, layer)
    except DumpError as exc:
        return _StartedRecord([ErrorEntry(file, layer.name, rec.name, str(exc))], [], None)
    if g2.numel() == 0:
        return _StartedRecord(
            [ErrorEntry(file, layer.name, rec.name, f"layer {layer.name} record {rec.name}: empty gradient")], [], None
        )
    zero = not bool(g2.any())
    operands, gemm_note = _gemm_operands(reader, rec, g, g2, config.axes)
    head: list[Event] = [Note(gemm_note)] if gemm_note else []

    def one(job: tuple[str, str]) -> tuple:
        """Exact and Monte-Carlo metrics of one (axis, method): its own stream, so jobs run in any order."""
        axis, method = job
        parts = (Path(file).name, layer.key, rec.name, axis, method)  # not the path: ./a.h5 == a.h5
        gen = torch.Generator(device=device).manual_seed(stream_seed(config.seed, *parts))
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

    def finish(results: list[tuple]) -> Iterator[Event]:
        for axis, method, m, gemm in results:
            if not math.isfinite(m.norm2):
                top = float(g2.abs().max())
                yield ErrorEntry(
                    file, layer.name, rec.name,
                    f"{file}: layer {layer.name} record {rec.name}: ||dY||^2 overflows float64 (max |dY| = {top:.3g}),"
                    " so it cannot be weighted against the other records; record skipped, the rest evaluated",
                )
                return
            if gemm is not None and not math.isfinite(gemm["norm2"]):
                gemm = None  # the product overflows float64: no weight for it in the layer's GEMM error
            yield RecordResult(
                file, layer.name, rec.name, rec.step, axis, method, tuple(g2.shape), m.to_dict(), gemm,
                "all-zero gradient" if zero else None,
            )

    jobs = [(axis, method) for axis in config.axes for method in methods]
    results = [pool.submit(one, job) for job in jobs] if pool is not None else [one(job) for job in jobs]
    return _StartedRecord(head, results, finish)


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
