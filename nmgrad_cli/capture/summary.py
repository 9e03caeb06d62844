"""A JSON-ready summary of a dump (what ``nmgrad inspect`` shows)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..dump import DumpReader
from ..dump.schema import DTYPES, KINDS


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize if dtype in DTYPES else 0


def summarize(path: str | os.PathLike) -> dict:
    """File status, run metadata and per layer: dY shapes, F and T, dtypes, steps, calls, records, bytes.

    ``bytes`` are uncompressed tensor bytes (all kinds); ``file_bytes`` is the size on disk.
    Raises :class:`~nmgrad_cli.errors.DumpError` for a missing, foreign or corrupt file.
    """
    with DumpReader(path) as reader:
        attrs = reader.attrs
        layers = []
        for li in reader.layers.values():
            shapes: list[tuple[int, ...]] = []
            dtypes: list[str] = []
            steps: set[int] = set()
            calls = 0
            nbytes = 0
            for kind in KINDS:
                for rec in reader.records(kind, [li]):
                    nbytes += math.prod(rec.shape) * _itemsize(rec.dtype)
                    if kind != "grad":
                        continue
                    if rec.shape not in shapes:
                        shapes.append(rec.shape)
                    if rec.dtype not in dtypes:
                        dtypes.append(rec.dtype)
                    steps.add(rec.step)
                    calls = max(calls, rec.call + 1)
            shape = shapes[0] if shapes else ()
            features = shape[li.feature_axis] if shape else None
            tokens = math.prod(shape[a] for a in li.token_axes) if shape else None
            layers.append({
                "name": li.name,
                "module_type": li.module_type,
                "feature_axis": li.feature_axis,
                "token_axes": list(li.token_axes),
                "weight_shape": list(li.weight_shape) if li.weight_shape is not None else None,
                "grad_shapes": [list(s) for s in shapes],
                "features": features,
                "tokens": tokens,
                "dtypes": dtypes,
                "steps": sorted(steps),
                "calls_per_step": calls,
                "records": {kind: len(li.records.get(kind, [])) for kind in KINDS},
                "bytes": nbytes,
            })
    all_steps = sorted({s for li in layers for s in li["steps"]})
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "schema": attrs.get("schema"),
        "schema_version": attrs.get("schema_version"),
        "nmgrad_version": attrs.get("nmgrad_version"),
        "torch_version": attrs.get("torch_version"),
        "created": attrs.get("created"),
        "complete": bool(attrs.get("complete", False)),
        "interrupted": bool(attrs.get("interrupted", False)),
        "interrupt_reason": attrs.get("interrupt_reason"),
        "steps_completed": int(attrs.get("steps_completed", 0)),
        "steps": all_steps,
        "tensor_bytes": sum(li["bytes"] for li in layers),
        "run": attrs.get("run", {}),
        "layers": layers,
    }
