"""Evaluate pruning methods on the neural gradients stored in dumps (the library behind `nmgrad evaluate`).

For every grad record dY of a layer, dY is viewed as a 2-D matrix g: (T, F) (the layer's
``feature_axis`` moved last, every other dim flattened into tokens). The block axis is named by the
backward GEMM that consumes the pruned dY (MATH.md):

- ``features``: blocks along F (dim -1), for the input gradient  dX = dY W    (T, F) @ (F, I)
- ``tokens``:   blocks along T (dim 0),  for the weight gradient dW = dY^T X  (F, T) @ (T, I)

For each method :func:`nmgrad_cli.metrics.evaluate_tensor` gives exact mse/bias/variance and the
Monte-Carlo angle. When the dump also holds the layer's input X and weight W (Linear-like layers), the
relative GEMM errors E||dX^ - dX||^2 / ||dX||^2 (features) and E||dW^ - dW||^2 / ||dW||^2 (tokens)
are estimated from ``samples`` draws.

Aggregates: a layer's mse/bias/variance are sum of absolute errors over its records / sum of
||g||^2 (a ||g||^2-weighted mean of the per-record values), likewise the summary over all layers;
GEMM errors are weighted by ||dX||^2 (||dW||^2). A layer's angle is the plain mean over its non-zero
records, with standard error sqrt(sum se_r^2) / n; the summary angle is the ||g||^2-weighted mean of
the layer angles, with standard error sqrt(sum w_l^2 se_l^2).

A record with NaN/Inf values is reported as an error entry and skipped; the rest is evaluated.
This module imports neither typer nor rich: progress is reported through a callback.
"""

from __future__ import annotations

import math
import operator
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import __version__
from .dump import DumpReader, LayerInfo, Record
from .errors import DumpError, NmgradError, PatternError
from .methods import METHODS, get_method
from .metrics import evaluate_tensor
from .patterns import parse_pattern
from .prune import prune

AXES = ("features", "tokens")
AXIS_DIM = {"features": -1, "tokens": 0}
"""Block axis -> dim of the (T, F) matrix the N:M blocks run along."""
GEMM_OF_AXIS = {"features": "dX", "tokens": "dW"}
METRICS = ("mse", "bias", "variance", "angle")

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: called before the first and after every grad record."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; written into every JSON output so results are reproducible."""

    pattern: str = "2:4"
    """N:M pattern, e.g. ``"2:4"``."""
    methods: tuple[str, ...] | None = None
    """Registered method names; None = every registered method defined for the pattern (the others
    are skipped with a note). A method named here that is undefined for the pattern is an error."""
    axis: Literal["features", "tokens", "both"] = "features"
    """Block axis: ``features`` (for dX = dY W), ``tokens`` (for dW = dY^T X) or ``both``."""
    layers: str | None = None
    """Glob on layer names (fnmatch, case-sensitive), e.g. ``"blocks.*.mlp.*"``; None = all layers."""
    samples: int = 16
    """Monte-Carlo draws per (record, method, axis) for the angle and the GEMM errors; 0 = neither."""
    seed: int = 0
    """Seed of the Monte-Carlo draws; each (file name, layer, record, axis, method) gets its own stream
    derived from it, so a result does not depend on which other layers or methods are evaluated."""
    mc_check: bool = False
    """Also estimate mse/bias/variance by Monte Carlo, as a cross-check of the exact values."""

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.axis not in ("features", "tokens", "both"):
            raise NmgradError(f"axis '{self.axis}' is unknown: choose features, tokens or both")
        if self.samples < 0:
            raise NmgradError(f"--samples {self.samples} is invalid: give 0 (no angle) or more, e.g. 16")
        if self.methods is not None:
            if not self.methods:
                raise NmgradError("no method given: name at least one, e.g. --methods mvue,greedy")
            for name in self.methods:
                get_method(name).check(parse_pattern(self.pattern))

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES if self.axis == "both" else (self.axis,)

    def resolve_methods(self) -> tuple[list[str], list[str]]:
        """(methods to run, notes on the registered ones skipped because undefined for the pattern)."""
        if self.methods is not None:
            return list(dict.fromkeys(self.methods)), []
        pat = parse_pattern(self.pattern)
        names, notes = [], []
        for name, meth in METHODS.items():
            try:
                meth.check(pat)
            except PatternError as exc:
                notes.append(f"{name} skipped: {exc}")
                continue
            names.append(name)
        return names, notes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["methods"] = list(self.methods) if self.methods is not None else None
        return out


@dataclass
class RecordResult:
    """Metrics of one method on one grad record along one block axis."""

    file: str
    layer: str
    record: str
    step: int
    axis: str
    method: str
    shape: tuple[int, int]
    """(T, F) of the 2-D view that was pruned."""
    metrics: dict
    """:class:`nmgrad_cli.metrics.Metrics` as a dict (mse, bias, variance relative to norm2 ...)."""
    gemm: dict | None = None
    """{"target": "dX"|"dW", "err", "err_se" (relative), "err_abs", "err_abs_se", "norm2"} or None."""
    note: str | None = None


@dataclass
class ErrorEntry:
    """A record that could not be evaluated (e.g. NaN/Inf values); the others still were."""

    file: str
    layer: str
    record: str
    message: str


@dataclass
class _Acc:
    """Running sums for one (scope, axis, method)."""

    records: int = 0
    norm2: float = 0.0
    bias_abs: float = 0.0
    var_abs: float = 0.0
    angles: list[tuple[float, float]] = field(default_factory=list)
    gemm_target: str | None = None
    gemm_abs: float = 0.0
    gemm_abs_var: float = 0.0
    gemm_norm2: float = 0.0
    gemm_records: int = 0
    mc: list[tuple[float, float, float, float]] = field(default_factory=list)

    def add(self, r: RecordResult) -> None:
        m = r.metrics
        self.records += 1
        self.norm2 += m["norm2"]
        self.bias_abs += m["bias"] * m["norm2"]
        self.var_abs += m["variance"] * m["norm2"]
        if m["norm2"] > 0 and m["angle"] is not None:
            self.angles.append((m["angle"], m["angle_se"] if m["angle_se"] is not None else math.nan))
        if m.get("mc_mse") is not None:
            mc_var = m["mc_variance"] if m["mc_variance"] is not None else math.nan  # None with 1 sample
            self.mc.append((m["norm2"], m["mc_mse"], m["mc_bias"], mc_var))
        if r.gemm is not None:
            self.gemm_target = r.gemm["target"]
            self.gemm_abs += r.gemm["err_abs"]
            self.gemm_abs_var += (r.gemm["err_abs_se"] or 0.0) ** 2
            self.gemm_norm2 += r.gemm["norm2"]
            self.gemm_records += 1

    def angle(self) -> tuple[float | None, float | None]:
        if not self.angles:
            return None, None
        n = len(self.angles)
        mean = sum(a for a, _ in self.angles) / n
        se = math.sqrt(sum(s * s for _, s in self.angles)) / n
        return mean, (None if math.isnan(se) else se)

    def row(self) -> dict:
        rel = (lambda x: x / self.norm2) if self.norm2 > 0 else (lambda x: 0.0)
        angle, angle_se = self.angle()
        out = {
            "records": self.records,
            "norm2": self.norm2,
            "mse": rel(self.bias_abs + self.var_abs),
            "bias": rel(self.bias_abs),
            "variance": rel(self.var_abs),
            "mse_abs": self.bias_abs + self.var_abs,
            "angle": angle,
            "angle_se": angle_se,
        }
        if self.mc and self.norm2 > 0:
            out["mc_mse"] = sum(w * x for w, x, _, _ in self.mc) / self.norm2
            out["mc_bias"] = sum(w * x for w, _, x, _ in self.mc) / self.norm2
            mc_var = sum(w * x for w, _, _, x in self.mc) / self.norm2
            out["mc_variance"] = None if math.isnan(mc_var) else mc_var
        if self.gemm_records:
            g = self.gemm_norm2
            out["gemm"] = {
                "target": self.gemm_target,
                "records": self.gemm_records,
                "err": self.gemm_abs / g if g > 0 else 0.0,
                "err_se": math.sqrt(self.gemm_abs_var) / g if g > 0 else 0.0,
                "norm2": g,
            }
        return out


@dataclass
class EvalReport:
    """Everything an evaluation produced; :meth:`to_dict` is the JSON output."""

    config: EvalConfig
    methods: list[str]
    files: list[dict]
    notes: list[str]
    errors: list[ErrorEntry]
    records: list[RecordResult]
    layers: list[dict]
    """One row per (file, layer, axis, method): file, layer, module_type, axis, method + :meth:`_Acc.row`."""
    summary: list[dict]
    """One row per (axis, method) over every layer of every file, weighted by ||g||^2."""

    def to_dict(self) -> dict:
        return {
            "nmgrad_version": __version__,
            "config": self.config.to_dict(),
            "methods": self.methods,
            "files": self.files,
            "notes": self.notes,
            "errors": [asdict(e) for e in self.errors],
            "summary": self.summary,
            "layers": self.layers,
            "records": [asdict(r) for r in self.records],
        }


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


def _stream_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed per (seed, parts): independent of the order things are evaluated in."""
    return (seed * 0x9E3779B1 + zlib.crc32("\x1f".join(parts).encode())) % (1 << 63)


class GemmError:
    """Monte-Carlo relative error of the backward GEMM fed with pruned g (MATH.md):

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


def iter_evaluate(
    paths: Sequence[str | Path], config: EvalConfig, progress: Progress | None = None
) -> Iterator[RecordResult | ErrorEntry | str | dict]:
    """Stream the evaluation: yields a dict per file (its metadata), then per grad record a
    :class:`RecordResult` per (axis, method) or an :class:`ErrorEntry`; notes are yielded as str.
    Only one record (plus its input and weight) is in memory at a time."""
    methods, notes = config.resolve_methods()
    yield from notes
    first: dict[Path, str | Path] = {}
    for p in paths:
        first.setdefault(Path(p).resolve(), p)
    unique = list(first.values())
    if len(unique) < len(paths):
        yield "a dump given more than once is evaluated once"
    opened = _open_all(unique, config)
    try:
        total = sum(len(li.records.get("grad", [])) for _, sel in opened for li in sel)
        done = 0
        if progress:
            progress(done, total, "")
        for reader, selected in opened:
            attrs = reader.attrs
            file = str(reader.path)
            yield {
                "path": file,
                "schema_version": attrs.get("schema_version"),
                "complete": bool(attrs.get("complete", False)),
                "interrupted": bool(attrs.get("interrupted", False)),
                "run": attrs.get("run", {}),
                "layers": {li.name: li.module_type for li in selected},
            }
            if not attrs.get("complete", False):
                yield f"{file} is incomplete (interrupted or still being written): evaluating the records it holds"
            gemm_notes: set[str] = set()
            for rec in reader.records("grad", selected):
                yield from _evaluate_record(reader, rec, file, methods, config, gemm_notes)
                done += 1
                if progress:
                    progress(done, total, rec.layer.name)
    finally:
        for reader, _ in opened:
            reader.close()


def _evaluate_record(reader, rec: Record, file: str, methods, config: EvalConfig, gemm_notes: set[str]):
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
        yield gemm_note
    for axis in config.axes:
        for method in methods:
            parts = (Path(file).name, layer.key, rec.name, axis, method)  # not the path: ./a.h5 == a.h5
            gen = torch.Generator().manual_seed(_stream_seed(config.seed, *parts))
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


def evaluate(paths: Sequence[str | Path], config: EvalConfig, progress: Progress | None = None) -> EvalReport:
    """Evaluate ``config`` on the dumps at ``paths``; raises :class:`NmgradError` on bad input."""
    if not paths:
        raise NmgradError("no dump given: pass at least one .h5 file written by `nmgrad capture`")
    methods, _ = config.resolve_methods()
    files, notes, errors, records = [], [], [], []
    layer_acc: dict[tuple[str, str, str, str], _Acc] = {}
    summary_acc: dict[tuple[str, str], _Acc] = {(a, m): _Acc() for a in config.axes for m in methods}
    module_types: dict[tuple[str, str], str] = {}
    zero_layers: set[tuple[str, str]] = set()
    for item in iter_evaluate(paths, config, progress):
        if isinstance(item, str):
            notes.append(item)
        elif isinstance(item, dict):
            files.append(item)
        elif isinstance(item, ErrorEntry):
            errors.append(item)
        else:
            records.append(item)
            key = (item.file, item.layer, item.axis, item.method)
            layer_acc.setdefault(key, _Acc()).add(item)
            summary_acc[(item.axis, item.method)].add(item)
            if item.note == "all-zero gradient":
                zero_layers.add((item.file, item.layer))
    for f in files:
        for name, module_type in f["layers"].items():
            module_types[(f["path"], name)] = module_type
    for file, layer in sorted(zero_layers, key=lambda k: (k[0], k[1])):
        notes.append(f"layer {layer} of {file} has all-zero gradient records (metrics 0)")
    layers = [
        {"file": k[0], "layer": k[1], "module_type": module_types.get((k[0], k[1]), ""), "axis": k[2],
         "method": k[3], **acc.row()}
        for k, acc in layer_acc.items()
    ]
    summary = []
    for (a, m), acc in summary_acc.items():
        if acc.records:
            angle, angle_se = weighted_angle([r for r in layers if r["axis"] == a and r["method"] == m])
            summary.append({"axis": a, "method": m, **acc.row(), "angle": angle, "angle_se": angle_se})
    return EvalReport(config, methods, files, notes, errors, records, layers, summary)


def weighted_angle(layer_rows: list[dict]) -> tuple[float | None, float | None]:
    """||g||^2-weighted mean of the layers' angles, se = sqrt(sum w^2 se^2) / sum w."""
    rows = [r for r in layer_rows if r["angle"] is not None and r["norm2"] > 0]
    total = sum(r["norm2"] for r in rows)
    if not rows:
        return None, None
    mean = sum(r["norm2"] * r["angle"] for r in rows) / total
    if any(r["angle_se"] is None for r in rows):
        return mean, None
    return mean, math.sqrt(sum((r["norm2"] * r["angle_se"]) ** 2 for r in rows)) / total


# --- thresholds for CI: --fail-if 'mvue.bias>1e-6' ---------------------------------------------

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_THRESHOLD_RE = re.compile(
    r"^\s*(?P<method>[A-Za-z0-9_*-]+)\.(?P<metric>[a-z]+)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$"
)
THRESHOLD_EXAMPLE = "e.g. --fail-if 'mvue.bias>1e-6' or --fail-if '*.angle>=30'"


@dataclass(frozen=True)
class Threshold:
    """``METHOD.METRIC OP NUMBER`` on the summary: the run fails when the comparison holds."""

    method: str
    """A method name, or ``*`` for every evaluated method."""
    metric: str
    """mse, bias, variance or angle."""
    op: str
    """One of > >= < <=."""
    value: float

    def __str__(self) -> str:
        return f"{self.method}.{self.metric}{self.op}{self.value:g}"


def parse_threshold(expr: str) -> Threshold:
    """Parse ``'mvue.bias>1e-6'``; a malformed expression raises :class:`NmgradError`."""
    match = _THRESHOLD_RE.match(expr)
    if not match:
        raise NmgradError(
            f"--fail-if '{expr}' is malformed: write METHOD.METRIC OP NUMBER with OP one of > >= < <=, "
            f"{THRESHOLD_EXAMPLE}"
        )
    method, metric = match["method"], match["metric"]
    if metric not in METRICS:
        raise NmgradError(f"--fail-if '{expr}': metric '{metric}' is unknown: choose one of {', '.join(METRICS)}")
    if method != "*" and method not in METHODS:
        raise NmgradError(f"--fail-if '{expr}': unknown method '{method}': choose one of {', '.join(METHODS)} or *")
    return Threshold(method, metric, match["op"], float(match["value"]))


def check_threshold_applies(t: Threshold, config: EvalConfig) -> None:
    """Raise :class:`NmgradError` when ``t`` names a method that is not evaluated or the angle with
    ``samples == 0``: such a threshold could never fire, which would make a CI check vacuous."""
    methods, _ = config.resolve_methods()
    if t.method != "*" and t.method not in methods:
        raise NmgradError(
            f"--fail-if '{t}': method '{t.method}' is not evaluated (evaluated: {', '.join(methods)}); "
            "add it to --methods or drop the threshold"
        )
    if t.metric == "angle" and config.samples == 0:
        raise NmgradError(f"--fail-if '{t}': the angle is not computed with --samples 0; use --samples 16")


def violations(report: EvalReport, thresholds: Sequence[Threshold]) -> list[str]:
    """One line per (threshold, axis, method) whose summary value makes the comparison true."""
    out = []
    for t in thresholds:
        for row in report.summary:
            if t.method not in ("*", row["method"]) or row[t.metric] is None:
                continue
            if _OPS[t.op](row[t.metric], t.value):
                out.append(
                    f"{t} violated: {row['method']}.{t.metric} = {row[t.metric]:.6g} ({row['axis']} axis)"
                )
    return out
