"""Running an evaluation: open the dumps, stream their grad records, yield typed events.

For every grad record dY of a layer, dY is viewed as a 2-D matrix g: (T, F) (the layer's
``feature_axis`` moved last, every other dim flattened into tokens). The block axis is named by the
backward GEMM that consumes the pruned dY (docs/methods.md):

- ``features``: blocks along F (dim -1), for the input gradient  dX = dY W    (T, F) @ (F, I)
- ``tokens``:   blocks along T (dim 0),  for the weight gradient dW = dY^T X  (F, T) @ (T, I)

A record with NaN/Inf values is reported as an error event and skipped; the rest is evaluated.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..dump import DumpReader, LayerInfo, Record
from ..errors import DumpError, NmgradError
from ..metrics import evaluate_tensor
from ..progress import ProgressLike, resolve_progress
from ..prune import prune
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
        return a @ self.other if self.axis == "features" else a.T @ self.other

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
    g: torch.Tensor, other: torch.Tensor, method: str, pattern: str, axis: str, samples: int, generator=None
) -> dict:
    """:class:`GemmError` of ``samples`` draws of ``method`` on g (T, F) along ``axis``."""
    acc = GemmError(g, other, axis)
    for _ in range(samples):
        acc.add(prune(g, method, pattern, AXIS_DIM[axis], generator))
    return acc.result()


def _gemm_operands(
    reader: DumpReader, rec: Record, g: torch.Tensor, axes: tuple[str, ...]
) -> tuple[dict, str | None]:
    """{"features": W (F, I), "tokens": X (T, I)} for the axes whose operand the dump holds, else a note.

    Only Linear-like layers: dY's feature axis last, W of shape (F, I), X of shape (*token dims, I);
    a Conv2d's GEMMs act on the unfolded input, which is not computed here."""
    layer = rec.layer
    kinds = {"features": "weight", "tokens": "input"}
    present = [a for a in axes if rec.name in layer.records.get(kinds[a], [])]
    if not present:
        return {}, None
    if layer.feature_axis not in (-1, g.dim() - 1):
        return {}, (
            f"layer {layer.name} ({layer.module_type}): GEMM-level errors skipped, they are computed for "
            "Linear-like layers only (feature axis last, 2-D weight)"
        )
    f = g.shape[-1]
    out = {}
    for axis in present:
        v = reader.load(layer.key, kinds[axis], rec.name)
        if axis == "features":
            if v.dim() != 2 or v.shape[0] != f:
                return {}, f"layer {layer.name}: weight of shape {tuple(v.shape)} is not (F={f}, I); GEMM skipped"
            out[axis] = v
        else:
            if v.dim() != g.dim() or v.shape[:-1] != g.shape[:-1]:
                return {}, (
                    f"layer {layer.name}: input of shape {tuple(v.shape)} does not have dY's token dims "
                    f"{tuple(g.shape[:-1])}; GEMM skipped"
                )
            out[axis] = v.reshape(-1, v.shape[-1])
        if not bool(torch.isfinite(v).all()):
            return {}, f"layer {layer.name}: the stored {kinds[axis]} has NaN/Inf values; GEMM skipped"
    return out, None


def _open_all(paths: Sequence[str | Path], config: EvalConfig) -> list[tuple[DumpReader, list[LayerInfo]]]:
    """Open and check every dump before evaluating anything, so a bad path fails fast."""
    opened: list[tuple[DumpReader, list[LayerInfo]]] = []
    try:
        for path in paths:
            reader = DumpReader(path)
            opened.append((reader, []))
            if not reader.layers:
                raise DumpError(f"{reader.path} is an empty dump (no layers): capture at least one step")
            if reader.n_records("grad") == 0:
                raise DumpError(f"{reader.path} holds no gradient records: capture at least one step")
            opened[-1] = (reader, reader.select(config.layers))
        if config.layers is not None and not any(sel for _, sel in opened):
            names = sorted({li.name for reader, _ in opened for li in reader.layers.values()})
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise NmgradError(f"no layer matches --layers '{config.layers}': the dump has {shown}")
    except BaseException:
        for reader, _ in opened:
            reader.close()
        raise
    return opened


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
    opened = _open_all(unique, config)
    bar = resolve_progress(progress, unit="records")
    try:
        total = sum(len(li.records.get("grad", [])) for _, sel in opened for li in sel)
        done = 0
        bar.start(total, "evaluate")
        for reader, selected in opened:
            info = _file_info(reader, selected)
            yield FileStarted(info)
            if not info["complete"]:
                yield Note(
                    f"{info['path']} is incomplete (interrupted or still being written): "
                    "evaluating the records it holds"
                )
            gemm_notes: set[str] = set()
            for rec in reader.records("grad", selected):
                yield from _evaluate_record(reader, rec, info["path"], methods, config, gemm_notes)
                done += 1
                bar.update(done, rec.layer.name)
    finally:
        bar.close()
        for reader, _ in opened:
            reader.close()


def _evaluate_record(
    reader: DumpReader, rec: Record, file: str, methods: list[str], config: EvalConfig, gemm_notes: set[str]
) -> Iterator[Event]:
    g = rec.load()
    layer = rec.layer
    bad = int((~torch.isfinite(g)).sum())
    if bad:
        yield ErrorEntry(
            file, layer.name, rec.name,
            f"{file}: layer {layer.name} record {rec.name}: {bad} of {g.numel()} gradient values are NaN/Inf;"
            " record skipped, the rest evaluated",
        )
        return
    try:
        g2 = as_matrix(g, layer)
    except DumpError as exc:
        yield ErrorEntry(file, layer.name, rec.name, str(exc))
        return
    if g2.numel() == 0:
        yield ErrorEntry(file, layer.name, rec.name, f"layer {layer.name} record {rec.name}: empty gradient")
        return
    zero = not bool(g2.any())
    operands, gemm_note = ({}, None) if config.samples == 0 else _gemm_operands(reader, rec, g, config.axes)
    if gemm_note and gemm_note not in gemm_notes:
        gemm_notes.add(gemm_note)
        yield Note(gemm_note)
    for axis in config.axes:
        for method in methods:
            parts = (Path(file).name, layer.key, rec.name, axis, method)  # not the path: ./a.h5 == a.h5
            gen = torch.Generator().manual_seed(stream_seed(config.seed, *parts))
            # the GEMM errors reuse the draws of the angle: half the pruning work
            acc = GemmError(g2, operands[axis], axis) if axis in operands else None
            m = evaluate_tensor(
                g2, method, config.pattern, AXIS_DIM[axis], config.samples, gen, config.mc_check,
                on_sample=acc.add if acc is not None else None,
            )
            gemm = acc.result() if acc is not None else None
            yield RecordResult(
                file, layer.name, rec.name, rec.step, axis, method, tuple(g2.shape), m.to_dict(), gemm,
                "all-zero gradient" if zero else None,
            )


def evaluate(paths: Sequence[str | Path], config: EvalConfig, progress: ProgressLike = None) -> EvalReport:
    """Evaluate ``config`` on the dumps at ``paths``; raises :class:`NmgradError` on bad input.
    ``progress=True`` shows progress (tqdm, or plain lines off a terminal); see :mod:`nmgrad_cli.progress`."""
    if not paths:
        raise NmgradError("no dump given: pass at least one .h5 file written by `nmgrad capture`")
    methods, _ = config.resolve_methods()
    builder = ReportBuilder(config, methods)
    for event in iter_evaluate(paths, config, progress):
        builder.add(event)
    return builder.report()
