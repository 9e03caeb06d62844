"""Write a dump: one HDF5 dataset per (layer, kind, step, call): contiguous, or chunked when compressed."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import resource

import h5py
import numpy as np
import torch

from ..errors import DumpError
from ..outputs import check_output
from .schema import KINDS, SCHEMA_NAME, SCHEMA_VERSION, dtype_name, layer_key, record_name
from .validate import CORRUPT_TAIL as _CORRUPT_TAIL
from .validate import check_written

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

SPACE_RESERVE = 256 * 2**10
"""Bytes kept free for the metadata the final flush and close write (attributes, B-tree nodes)."""
SPACE_PER_DATASET = 8 * 2**10
"""Bound on the metadata one dataset adds at the next flush (object header, attributes, links)."""


class DiskFullError(DumpError):
    """The next record would not fit in the space left (free disk space or the file-size limit)."""


def space_left(path: str | os.PathLike, fd: int) -> tuple[int, str]:
    """(bytes this file can still grow by, what limits it): the free disk space, or the
    file-size limit (``ulimit -f``, RLIMIT_FSIZE) when that is closer."""
    st = os.fstat(fd)
    vfs = os.statvfs(path)
    left, where = vfs.f_bavail * vfs.f_frsize, "free on the disk"
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and soft - st.st_size < left:
        left, where = max(0, soft - st.st_size), "under the file-size limit (ulimit -f)"
    return left, where


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

    When a write fails (a full disk, a file-size limit), :meth:`abort` cuts the file back to its
    state at the last :meth:`step_done` flush: a readable dump of the completed steps.
    ``locking=False`` turns HDF5's own file lock off (for a caller that holds its own, see
    ``nmgrad_cli.capture.stream.PartialFile``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        run: dict | None = None,
        compression: str = "lzf",
        force: bool = False,
        locking: bool = True,
    ):
        if compression not in COMPRESSIONS:
            raise DumpError(f"compression '{compression}' is unknown: choose one of {', '.join(COMPRESSIONS)}")
        self.path = check_output(path, force)
        self.compression = None if compression == "none" else compression
        self.bytes_written = 0
        self.steps_flushed = 0
        """Steps on disk as of the last successful flush (what :meth:`abort` keeps)."""
        self._flushed_size = 0
        self._aborted = False
        self._layouts: dict[tuple[str, str], dict[tuple, str]] = {}
        """(layer key, kind) -> each distinct (shape, dtype, stored dtype) written: checked at close."""
        self._unflushed: list[h5py.Dataset] = []
        """Datasets written since the last flush, kept open: closing one may write to the file, and
        after a failed write that would fail again where nobody can catch it."""
        try:
            self._f = h5py.File(self.path, "w", locking=locking)
        except OSError as exc:  # e.g. /proc/x.h5, a full disk, a read-only file system
            raise DumpError(f"cannot create {self.path}: {failure_reason(exc)}; choose another path") from None
        try:
            self._init_attrs(run)
        except DumpError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise DumpError(f"cannot write {self.path}: {failure_reason(exc)}") from None

    def _init_attrs(self, run: dict | None) -> None:
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
        self._flush()

    def _check_space(self, nbytes: int, datasets: int = 0, reserve: int = SPACE_RESERVE) -> None:
        """Refuse (before writing anything) what would leave less than the reserve the last flush and
        close need: a write that fails half-way through a flush leaves a file HDF5 cannot open."""
        left, where = space_left(self.path, self._f.id.get_vfd_handle())
        need = nbytes + SPACE_PER_DATASET * (len(self._unflushed) + datasets) + reserve
        if need > left:
            raise DiskFullError(
                f"{self.path}: no space for the next record: {need / 1e6:.2f} MB needed, {left / 1e6:.2f} MB {where}"
            )

    def _flush(self) -> None:
        self._check_space(0, reserve=SPACE_RESERVE // 4)
        self._f.flush()
        self._flushed_size = os.fstat(self._f.id.get_vfd_handle()).st_size
        self._unflushed.clear()  # closing a dataset after the flush writes nothing

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
        self._check_space(arr.nbytes + arr.nbytes // 8, 1)
        key = layer_key(layer)
        grp = self._layers[key].require_group(kind)
        # uncompressed: one contiguous extent, written in one piece (1 MiB chunks wrote at ~0.5x the
        # rate of a plain write(), benchmarks/scale_bench.py); chunks only where a filter needs them
        chunks = _chunks(arr) if self.compression and arr.ndim and arr.size > 0 else None
        ds = grp.create_dataset(
            record_name(step, call),
            data=arr,
            compression=self.compression if chunks else None,
            chunks=chunks,
        )
        ds.attrs["step"] = int(step)
        ds.attrs["call"] = int(call)
        ds.attrs["dtype"] = name
        self._layouts.setdefault((key, kind), {}).setdefault(
            (tuple(arr.shape), name, arr.dtype.str), ds.name)
        self._unflushed.append(ds)
        self.bytes_written += arr.nbytes
        return arr.nbytes

    def step_done(self, step: int) -> None:
        """Record that every tensor of ``step`` is written, and flush to disk."""
        self._f.attrs["steps_completed"] = int(self._f.attrs["steps_completed"]) + 1
        self._f.attrs["last_step"] = int(step)
        self._flush()
        self.steps_flushed = int(self._f.attrs["steps_completed"])

    def set_run(self, **updates) -> None:
        run = json.loads(self._f.attrs["run"])
        run.update(updates)
        self._f.attrs["run"] = json.dumps(run, sort_keys=True, default=str)

    def mark_interrupted(self, reason: str = "interrupted") -> None:
        self._f.attrs["interrupted"] = True
        self._f.attrs["interrupt_reason"] = reason

    def close(self, complete: bool = True) -> None:
        """Mark the file ``complete`` (unless interrupted) and close it. When that cannot be written
        (a full disk) the file is cut back to its last completed step (:meth:`abort`) and
        :class:`DumpError` is raised."""
        if not self._f.id.valid:
            return
        refused = self._refused()
        try:
            self._check_space(0, reserve=SPACE_RESERVE // 4)
            if refused is not None:
                self.mark_interrupted(f"nmgrad's reader refuses it: {refused}")
            self._f.attrs["complete"] = bool(complete and not self._f.attrs["interrupted"])
            self._f.close()
        except Exception as exc:  # noqa: BLE001 - whatever HDF5 raised, leave a readable file
            self.abort(type(exc).__name__)
            if isinstance(exc, DumpError):
                raise
            raise DumpError(f"writing {self.path} failed: {failure_reason(exc)}") from None
        self._unflushed.clear()
        if refused is not None:
            raise DumpError(
                f"{self.path} was written but nmgrad's own reader refuses it ({refused}): a bug in nmgrad, please "
                "report it with this message; the file is kept, marked interrupted"
            )

    def _refused(self) -> str | None:
        """Why the reader would refuse what was written (:func:`validate.check_written`, metadata
        only), or None. Never raises for I/O errors: close handles those."""
        try:
            check_written(self.path, self._f, self._layouts)
        except DumpError as exc:
            return str(exc).removeprefix(f"{self.path} is corrupt: ").removesuffix(_CORRUPT_TAIL)
        except Exception:  # noqa: BLE001 - a failed read of the file's own metadata: close reports it
            return None
        return None

    def abort(self, reason: str | None = None) -> None:
        """Close after a failed write without writing anything more, and cut the file back to the
        last :meth:`step_done` flush; then mark it interrupted with ``reason`` if that still fits.

        HDF5 would otherwise flush half-updated metadata on close (or at exit) and leave a file no
        reader can open. Its file descriptor is pointed at an in-memory file first, so whatever it
        still writes goes nowhere. Never raises for I/O errors; a second call does nothing.
        """
        if self._aborted:
            return
        self._aborted = True
        if self._f.id.valid:
            _discard_and_close(self._f)
        self._unflushed.clear()
        with contextlib.suppress(OSError):
            os.truncate(self.path, self._flushed_size)
        if reason is not None and self._flushed_size:
            mark_interrupted(self.path, reason)

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._f.id.valid:
            self.mark_interrupted(exc_type.__name__)
        if exc_type is not None and not isinstance(exc, Exception):  # KeyboardInterrupt: close what can be
            with contextlib.suppress(DumpError):
                self.close(complete=False)
            return
        self.close(complete=exc_type is None)


def _discard_and_close(f: h5py.File) -> None:
    """Close ``f`` so that nothing more reaches its file: its descriptor now points elsewhere."""
    with contextlib.suppress(Exception):
        fd = f.id.get_vfd_handle()
        sink = os.open(os.devnull, os.O_RDWR)  # not a regular file: no size limit applies to it
        os.dup2(sink, fd)
        os.close(sink)
    with contextlib.suppress(Exception):
        f.close()


def mark_interrupted(path: str | os.PathLike, reason: str) -> bool:
    """Set ``interrupted`` and ``interrupt_reason`` in a closed dump; False (file unchanged) when
    that cannot be written, e.g. on a full disk."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            if space_left(path, fh.fileno())[0] < SPACE_RESERVE // 8:
                return False
        f = h5py.File(path, "r+", locking=False)
    except OSError:
        return False
    try:
        f.attrs["interrupted"] = True
        f.attrs["interrupt_reason"] = reason
        f.close()
        return True
    except Exception:  # noqa: BLE001 - whatever HDF5 says, put the file back as it was
        _discard_and_close(f)
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        return False


def failure_reason(exc: BaseException) -> str:
    """The useful part of an I/O error from HDF5 (``File too large``) rather than its long trace."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    m = re.search(r"error message = '([^']+)'", str(exc))
    if m:
        return m.group(1)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
