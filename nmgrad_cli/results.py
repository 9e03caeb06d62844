"""Evaluation results as data: rows for a notebook, and the per-layer difference of two evaluations.

``load(path)`` reads the JSON that ``nmgrad evaluate --json`` writes and returns :class:`Results`:
flat rows (one dict per record, per layer, per summary line; the nested GEMM error becomes
``gemm_target``, ``gemm_mse``, ``gemm_bias``, ``gemm_variance``, ``gemm_norm2``), and
:meth:`Results.frame` gives them as a pandas DataFrame when pandas is installed::

    from nmgrad_cli import results
    r = results.load("eval.json")
    r.layers[0]["variance"], r.frame("layers").groupby("method").angle.mean()

:func:`compare` lines two evaluations up by (layer, axis, method) for ``nmgrad compare``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NmgradError

LEVELS = ("records", "layers", "summary")
KEY = ("layer", "axis", "method")
"""A layer row is identified by these (and its file, which compare ignores: two evaluations of two
checkpoints have two file names)."""
COMPARED = ("mse", "bias", "variance", "angle", "gemm_mse", "gemm_bias", "gemm_variance")
"""The metrics ``nmgrad compare`` lines up (relative to ||g||^2 or ||dX||^2 / ||dW||^2; angle in degrees)."""
_GEMM_FIELDS = ("target", "mse", "bias", "variance", "norm2")


class ResultsError(NmgradError):
    """A file that is not an evaluation written by ``nmgrad evaluate --json``."""


@dataclass
class Results:
    """One evaluation: its config and flat rows (see the module docstring)."""

    path: str
    config: dict
    methods: list[str]
    files: list[dict]
    records: list[dict] = field(default_factory=list)
    """One row per (file, layer, record, axis, method): step, shape (T, F) and the record's metrics."""
    layers: list[dict] = field(default_factory=list)
    """One row per (file, layer, axis, method), weighted over the layer's records."""
    summary: list[dict] = field(default_factory=list)
    """One row per (axis, method) over every layer."""

    @property
    def pattern(self) -> str:
        return str(self.config.get("pattern"))

    def frame(self, level: str = "layers"):
        """The rows of ``level`` (records, layers or summary) as a pandas DataFrame."""
        if level not in LEVELS:
            raise NmgradError(f"level '{level}' is unknown: choose one of {', '.join(LEVELS)}")
        try:
            import pandas as pd
        except ImportError:
            raise NmgradError("pandas is not installed: pip install pandas (or use the list of dicts)") from None
        return pd.DataFrame(getattr(self, level))


def flat_row(row: dict) -> dict:
    """A row with its nested ``gemm`` dict spread into ``gemm_*`` columns (None when absent)."""
    out = {k: v for k, v in row.items() if k not in ("gemm", "metrics")}
    out.update(row.get("metrics") or {})
    g = row.get("gemm") or {}
    out.update({f"gemm_{k}": g.get(k) for k in _GEMM_FIELDS})
    return out


def parse(payload, source: str = "<dict>") -> Results:
    """:class:`Results` from an already-read evaluate JSON payload."""
    needed = ("config", "layers", "records", "summary")
    if not isinstance(payload, dict) or any(k not in payload for k in needed) or \
            not isinstance(payload.get("config"), dict) or "pattern" not in payload["config"]:
        raise ResultsError(
            f"{source} is not an evaluation: expected the JSON of `nmgrad evaluate --json FILE` "
            "(with config, layers, records, summary)"
        )
    try:
        return Results(
            path=source,
            config=payload["config"],
            methods=list(payload.get("methods") or []),
            files=list(payload.get("files") or []),
            records=[flat_row(r) for r in payload["records"]],
            layers=[flat_row(r) for r in payload["layers"]],
            summary=[flat_row(r) for r in payload["summary"]],
        )
    except (TypeError, AttributeError):
        raise ResultsError(f"{source} is not an evaluation: its rows are not the objects evaluate writes") from None


def load(path: str | os.PathLike) -> Results:
    """Read ``nmgrad evaluate --json`` output; a missing file, non-JSON or other JSON is one ResultsError."""
    p = Path(path)
    if not p.is_file():
        raise ResultsError(f"{p}: no such file (give the JSON written by `nmgrad evaluate --json FILE`)")
    try:
        payload = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ResultsError(f"{p} is not an evaluation: not a JSON file (give `nmgrad evaluate --json` output)") \
            from None
    return parse(payload, str(p))


def pooled_layers(res: Results) -> dict[tuple[str, str, str], dict]:
    """Per (layer, axis, method) over every file: relative metrics weighted by ||g||^2 (GEMM ones by
    ||dX||^2, ||dW||^2), the angle weighted by records."""
    acc: dict[tuple[str, str, str], list[dict]] = {}
    for row in res.layers:
        acc.setdefault(tuple(row[k] for k in KEY), []).append(row)
    out = {}
    for key, rows in acc.items():
        out[key] = _pool(rows)
    return out


def _wmean(rows: list[dict], value: str, weight: str) -> float | None:
    pairs = [(r[value], r[weight]) for r in rows if r.get(value) is not None and r.get(weight) is not None]
    total = sum(w for _, w in pairs)
    if not pairs:
        return None
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def _pool(rows: list[dict]) -> dict:
    if len(rows) == 1:
        return dict(rows[0])
    out = {k: rows[0].get(k) for k in ("layer", "module_type", "axis", "method", "gemm_target")}
    out["records"] = sum(r["records"] for r in rows)
    out["norm2"] = sum(r["norm2"] for r in rows)
    for k in ("mse", "bias", "variance"):
        out[k] = _wmean(rows, k, "norm2")
        out[f"gemm_{k}"] = _wmean(rows, f"gemm_{k}", "gemm_norm2")
    out["gemm_norm2"] = sum(r["gemm_norm2"] or 0.0 for r in rows) if rows[0].get("gemm_target") else None
    out["angle"] = _wmean(rows, "angle", "records")
    return out


def compare(a: Results, b: Results) -> tuple[list[dict], list[str]]:
    """Rows ``{layer, axis, method, <metric>_a, <metric>_b, <metric>_diff}`` for every (layer, axis,
    method) in both evaluations (diff = b - a; None where either lacks the metric), in A's order, and
    notes on what could not be lined up (layers or methods in one only, other patterns)."""
    pa, pb = pooled_layers(a), pooled_layers(b)
    notes = []
    if a.pattern != b.pattern:
        notes.append(f"the evaluations use different patterns: {a.pattern} (A) vs {b.pattern} (B)")
    only_a = sorted({k[0] for k in pa} - {k[0] for k in pb})
    only_b = sorted({k[0] for k in pb} - {k[0] for k in pa})
    if only_a:
        notes.append(f"layers only in A: {', '.join(only_a)}")
    if only_b:
        notes.append(f"layers only in B: {', '.join(only_b)}")
    rows = []
    for key, ra in pa.items():
        rb = pb.get(key)
        if rb is None:
            continue
        row = dict(zip(KEY, key))
        for m in COMPARED:
            va, vb = ra.get(m), rb.get(m)
            row[f"{m}_a"], row[f"{m}_b"] = va, vb
            row[f"{m}_diff"] = None if va is None or vb is None else vb - va
        rows.append(row)
    if not rows:
        raise ResultsError(
            f"{a.path} and {b.path} have no (layer, axis, method) in common: evaluate the same layers and methods"
        )
    return rows, notes


def relative_change(a: float | None, b: float | None) -> float | None:
    """(b - a) / |a|, None where undefined."""
    if a is None or b is None or a == 0 or not math.isfinite(a):
        return None
    return (b - a) / abs(a)
