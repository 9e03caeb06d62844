"""Aggregation: per-record results -> per-layer rows and the summary over layers.

A layer's mse/bias/variance are sum of absolute errors over its records / sum of ||g||^2 (a
||g||^2-weighted mean of the per-record values), likewise the summary over all layers; GEMM errors
are weighted by ||dX||^2 (||dW||^2). A layer's angle is the plain mean over its non-zero records,
with standard error sqrt(sum se_r^2) / n; the summary angle is the ||g||^2-weighted mean of the
layer angles, with standard error sqrt(sum w_l^2 se_l^2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..backend import draw_backend
from ..errors import NmgradError
from ..metrics import mc_backends
from .config import EvalConfig
from .events import ErrorEntry, Event, FileStarted, Note, RecordResult


@dataclass
class _Acc:
    """Running sums for one (scope, axis, method)."""

    records: int = 0
    norm2: float = 0.0
    bias_abs: float = 0.0
    var_abs: float = 0.0
    angles: list[tuple[float, float]] = field(default_factory=list)
    gemm_target: str | None = None
    gemm_bias_abs: float = 0.0
    gemm_var_abs: float = 0.0
    gemm_norm2: float = 0.0
    gemm_records: int = 0
    gemm_mc: list[tuple[float, float | None]] = field(default_factory=list)
    """(mc_mse_abs, its se) per record, with --mc-check."""
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
            g = r.gemm
            self.gemm_target = g["target"]
            self.gemm_bias_abs += g["bias_abs"]
            self.gemm_var_abs += g["var_abs"]
            self.gemm_norm2 += g["norm2"]
            self.gemm_records += 1
            if g.get("mc_mse") is not None:
                se = None if g["mc_mse_se"] is None else g["mc_mse_se"] * g["norm2"]
                self.gemm_mc.append((g["mc_mse"] * g["norm2"], se))

    def merge(self, other: _Acc) -> None:
        """Add ``other``'s sums (a layer's) into these (a file's)."""
        for name in ("records", "norm2", "bias_abs", "var_abs", "gemm_bias_abs", "gemm_var_abs", "gemm_norm2",
                     "gemm_records"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.angles += other.angles
        self.mc += other.mc
        self.gemm_mc += other.gemm_mc
        self.gemm_target = self.gemm_target or other.gemm_target

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
            grel = (lambda x: x / g) if g > 0 else (lambda x: 0.0)
            out["gemm"] = {
                "target": self.gemm_target,
                "records": self.gemm_records,
                "mse": grel(self.gemm_bias_abs + self.gemm_var_abs),
                "bias": grel(self.gemm_bias_abs),
                "variance": grel(self.gemm_var_abs),
                "norm2": g,
            }
            if self.gemm_mc:
                out["gemm"]["mc_mse"] = grel(sum(x for x, _ in self.gemm_mc))
                ses = [s for _, s in self.gemm_mc]
                out["gemm"]["mc_mse_se"] = None if None in ses else grel(math.sqrt(sum(s * s for s in ses)))
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
    file_summary: list[dict] = field(default_factory=list)
    """With several files: one row per (file, axis, method), the summary of that file alone."""
    runtime: dict = field(default_factory=dict)
    """What ran: {"device", "draw_backend"} (the resolved ``auto`` choices)."""

    def mc_backend_record(self) -> dict:
        """What prunes the Monte-Carlo draws, per method (float32 records on the evaluated device)."""
        try:
            from ..train.distributed import dist_info, resolve_device

            device = resolve_device(self.config.device, dist_info())
        except NmgradError:  # e.g. --device cuda on a machine without one: the report is still written
            device = torch.device("cpu")
        drawn_by = draw_backend(self.config.backend, device)
        return mc_backends(self.config.pattern, self.methods, torch.float32, device, drawn_by)

    def to_dict(self) -> dict:
        return {
            "nmgrad_version": __version__,
            "config": self.config.to_dict(),
            "runtime": self.runtime,
            "methods": self.methods,
            "backend": self.mc_backend_record(),
            "files": self.files,
            "notes": self.notes,
            "errors": [asdict(e) for e in self.errors],
            "summary": self.summary,
            "file_summary": self.file_summary,
            "layers": self.layers,
            "records": [asdict(r) for r in self.records],
        }


class ReportBuilder:
    """Folds the event stream of :func:`nmgrad_cli.evaluate.iter_evaluate` into an :class:`EvalReport`."""

    def __init__(self, config: EvalConfig, methods: list[str], runtime: dict | None = None):
        self.config, self.methods, self.runtime = config, methods, runtime or {}
        self.files: list[dict] = []
        self.notes: list[str] = []
        self.errors: list[ErrorEntry] = []
        self.records: list[RecordResult] = []
        self.layer_acc: dict[tuple[str, str, str, str], _Acc] = {}
        self.summary_acc: dict[tuple[str, str], _Acc] = {(a, m): _Acc() for a in config.axes for m in methods}
        self.zero_layers: set[tuple[str, str]] = set()

    def add(self, event: Event) -> None:
        match event:
            case Note(text):
                self.notes.append(text)
            case FileStarted(info):
                self.files.append(info)
            case ErrorEntry():
                self.errors.append(event)
            case RecordResult():
                self._add_record(event)
            case _:
                raise TypeError(f"unknown evaluate event {event!r}")

    def _add_record(self, r: RecordResult) -> None:
        self.records.append(r)
        self.layer_acc.setdefault((r.file, r.layer, r.axis, r.method), _Acc()).add(r)
        self.summary_acc[(r.axis, r.method)].add(r)
        if r.zero:
            self.zero_layers.add((r.file, r.layer))

    def report(self) -> EvalReport:
        module_types = {(f["path"], name): t for f in self.files for name, t in f["layers"].items()}
        notes = list(self.notes)
        for file, layer in sorted(self.zero_layers):
            notes.append(f"layer {layer} of {file} has all-zero gradient records (metrics 0)")
        layers = [
            {"file": k[0], "layer": k[1], "module_type": module_types.get((k[0], k[1]), ""), "axis": k[2],
             "method": k[3], **acc.row()}
            for k, acc in self.layer_acc.items()
        ]
        summary = _summaries(self.summary_acc, layers)
        file_summary = []
        if len(self.files) > 1:
            for f in self.files:
                acc: dict[tuple[str, str], _Acc] = {k: _Acc() for k in self.summary_acc}
                for (file, _, axis, method), la in self.layer_acc.items():
                    if file == f["path"]:
                        acc[(axis, method)].merge(la)
                mine = [r for r in layers if r["file"] == f["path"]]
                file_summary += [{"file": f["path"], **row} for row in _summaries(acc, mine)]
        return EvalReport(
            self.config, self.methods, self.files, notes, self.errors, self.records, layers, summary, file_summary,
            self.runtime,
        )


def _summaries(accs: dict[tuple[str, str], _Acc], layers: list[dict]) -> list[dict]:
    """One row per (axis, method) with records: the sums, and the layers' ||g||^2-weighted angle."""
    out = []
    for (a, m), acc in accs.items():
        if acc.records:
            angle, angle_se = weighted_angle([r for r in layers if r["axis"] == a and r["method"] == m])
            out.append({"axis": a, "method": m, **acc.row(), "angle": angle, "angle_se": angle_se})
    return out


def weighted_angle(layer_rows: list[dict]) -> tuple[float | None, float | None]:
    """||g||^2-weighted mean of the layers' angles, se = sqrt(sum w^2 se^2) / sum w."""
    rows = [r for r in layer_rows if r["angle"] is not None and r["norm2"] > 0]
    total = sum(r["norm2"] for r in rows)
    if not rows:
        return None, None
    mean = sum(r["norm2"] * r["angle"] for r in rows) / total
    if any(r["angle_se"] is None for r in rows):
        return mean, None
    return mean, math.sqrt(sum((r["norm2"] / total * r["angle_se"]) ** 2 for r in rows))  # w/total: no overflow
