"""Write a dump: one HDF5 dataset per (layer, kind, step, call), chunked and compressed."""

from __future__ import annotations

import datetime as _dt
import json
import os

import h5py
import numpy as np
import torch

from ..errors import DumpError
from ..outputs import check_output
from .schema import KINDS, SCHEMA_NAME, SCHEMA_VERSION, dtype_name, layer_key, record_name

COMPRESSIONS = ("lzf", "gzip", "none")

__all__ = ["COMPRESSIONS", "DumpWriter", "check_output", "to_numpy"]


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """(array to store, dtype name); bf16 becomes its uint16 bit pattern."""
    t = t.detach().cpu().contiguous()
    name = dtype_name(t.dtype)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), name
    return t.numpy(), name


_CHUNK_BYTES = 2**20


def _chunks(arr: np.ndarray) -> tuple[int, ...] | bool:
    """Chunks of about 1 MiB (the whole array when it is smaller), split along axis 0: they compress
    2-4x faster than h5py's automatic ~32 KiB ones, and readers load whole records anyway."""
    if arr.nbytes <= _CHUNK_BYTES:
        return arr.shape
    row = arr.nbytes // arr.shape[0]
    if row > 2 * _CHUNK_BYTES:
        return True
    return (max(1, _CHUNK_BYTES // row), *arr.shape[1:])


class DumpWriter:
    """Create a dump file and add layers and tensors to it.

    ``with DumpWriter(path, run={...}) as w: w.add_layer(...); w.write(layer, "grad", step, call, t)``.
    On a clean close the file is marked ``complete``; :meth:`mark_interrupted` records an interrupted
    run. Every ``write`` is a self-contained dataset, so a file closed at any point between writes is
    valid and holds every record written so far.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        run: dict | None = None,
        compression: str = "lzf",
        force: bool = False,
    ):
        if compression not in COMPRESSIONS:
            raise DumpError(f"compression '{compression}' is unknown: choose one of {', '.join(COMPRESSIONS)}")
        self.path = check_output(path, force)
        self.compression = None if compression == "none" else compression
        self.bytes_written = 0
        self._f = h5py.File(self.path, "w")
        self._f.attrs["schema"] = SCHEMA_NAME
        self._f.attrs["schema_version"] = SCHEMA_VERSION
        from .. import __version__

        self._f.attrs["nmgrad_version"] = __version__
        self._f.attrs["torch_version"] = str(torch.__version__)
        self._f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._f.attrs["run"] = json.dumps(run or {}, sort_keys=True, default=str)
        self._f.attrs["complete"] = False
        self._f.attrs["interrupted"] = False
        self._f.attrs["steps_completed"] = 0
        self._layers = self._f.create_group("layers")
        self._f.flush()

    def add_layer(
        self,
        name: str,
        module_type: str,
        feature_axis: int,
        token_axes: list[int] | tuple[int, ...],
        weight_shape: tuple[int, ...] | None = None,
        **extra,
    ) -> str:
        """Declare a layer; returns its key. ``feature_axis`` indexes dY's dims (e.g. -1 for Linear,
        1 for Conv2d's [B, C, H, W]); ``token_axes`` are the dims flattened into tokens."""
        key = layer_key(name)
        if key in self._layers:
            return key
        grp = self._layers.create_group(key)
        grp.attrs["name"] = name
        grp.attrs["module_type"] = module_type
        grp.attrs["feature_axis"] = int(feature_axis)
        grp.attrs["token_axes"] = json.dumps([int(a) for a in token_axes])
        grp.attrs["weight_shape"] = json.dumps(list(weight_shape) if weight_shape is not None else None)
        grp.attrs["index"] = len(self._layers) - 1
        for k, v in extra.items():
            grp.attrs[k] = json.dumps(v) if isinstance(v, (list, dict, tuple)) else v
        return key

    def write(self, layer: str, kind: str, step: int, call: int, tensor: torch.Tensor) -> int:
        """Store one tensor; returns the bytes it takes uncompressed."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        arr, name = to_numpy(tensor)
        grp = self._layers[layer_key(layer)].require_group(kind)
        chunks = _chunks(arr) if arr.ndim and arr.size > 0 else None
        ds = grp.create_dataset(
            record_name(step, call),
            data=arr,
            compression=self.compression if chunks else None,
            chunks=chunks,
        )
        ds.attrs["step"] = int(step)
        ds.attrs["call"] = int(call)
        ds.attrs["dtype"] = name
        self.bytes_written += arr.nbytes
        return arr.nbytes

    def step_done(self, step: int) -> None:
        """Record that every tensor of ``step`` is written, and flush to disk."""
        self._f.attrs["steps_completed"] = int(self._f.attrs["steps_completed"]) + 1
        self._f.attrs["last_step"] = int(step)
        self._f.flush()

    def set_run(self, **updates) -> None:
        run = json.loads(self._f.attrs["run"])
        run.update(updates)
        self._f.attrs["run"] = json.dumps(run, sort_keys=True, default=str)

    def mark_interrupted(self, reason: str = "interrupted") -> None:
        self._f.attrs["interrupted"] = True
        self._f.attrs["interrupt_reason"] = reason

    def close(self, complete: bool = True) -> None:
        if self._f.id.valid:
            self._f.attrs["complete"] = bool(complete and not self._f.attrs["interrupted"])
            self._f.close()

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._f.id.valid:
            self.mark_interrupted(exc_type.__name__)
        self.close(complete=exc_type is None)
