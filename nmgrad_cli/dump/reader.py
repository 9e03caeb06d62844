"""Read a dump one dataset at a time, so memory stays bounded whatever the file size."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import DumpError
from . import validate
from .schema import DTYPES, SCHEMA_NAME, SCHEMA_VERSION


@dataclass(frozen=True)
class LayerInfo:
    """Metadata of one captured layer."""

    key: str
    name: str
    module_type: str
    feature_axis: int
    token_axes: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    records: dict[str, list[str]] = field(default_factory=dict, compare=False)
    """kind -> sorted record names present."""
    conv: dict | None = None
    """A convolution's stride/padding/dilation/groups (None for other layers, and in older dumps)."""
    needs_grad: dict | None = field(default=None, compare=False)
    """{"input": bool, "weight": bool}: whether the layer's input and weight needed a gradient, i.e. whether
    its backward dX and dW GEMMs run (None in older dumps)."""


@dataclass(frozen=True)
class Record:
    """One stored tensor; ``load()`` reads it (and only it) from disk."""

    reader: DumpReader
    layer: LayerInfo
    kind: str
    name: str
    step: int
    call: int
    shape: tuple[int, ...]
    dtype: str

    def load(self, index: tuple | None = None) -> torch.Tensor:
        """The tensor, or the part of it an h5py selection ``index`` (a tuple of slices) names."""
        return self.reader.load(self.layer.key, self.kind, self.name, index)


def _decode(ds: h5py.Dataset, index: tuple | None = None) -> torch.Tensor:
    arr = ds[()] if index is None else ds[index]
    dtype = ds.attrs.get("dtype", str(arr.dtype))
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    if dtype not in DTYPES:
        raise DumpError(f"{ds.file.filename}: dataset {ds.name} has unsupported dtype {dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _meta(li: LayerInfo) -> dict:
    """The layer attributes :func:`validate.check_record` checks a record against."""
    return {"feature_axis": li.feature_axis, "token_axes": li.token_axes, "weight_shape": li.weight_shape}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class DumpReader:
    """Open and validate a dump; list layers; stream records one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DumpError(f"{self.path}: no such file; check the path (make one with `nmgrad capture`)")
        if self.path.is_dir():
            raise DumpError(f"{self.path} is a directory: give the path of a .h5 dump file")
        if not h5py.is_hdf5(self.path):
            raise DumpError(f"{self.path} is not an HDF5 file: give a dump written by `nmgrad capture`")
        try:
            self._f = h5py.File(self.path, "r")
        except BlockingIOError:  # HDF5 file locking: a writer (e.g. a running capture) holds it
            raise DumpError(
                f"{self.path} is open for writing by another process (a capture still running?): wait for it "
                "to finish, or set HDF5_USE_FILE_LOCKING=FALSE to read the steps flushed so far"
            ) from None
        except OSError as exc:
            raise DumpError(
                f"{self.path} is truncated or corrupt ({exc.__class__.__name__}): re-run the capture"
            ) from None
        try:
            self._validate()
            self.layers = self._scan()
        except DumpError:
            self._f.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:  # damaged bytes
            self._f.close()
            raise DumpError(
                f"{self.path} is truncated or corrupt ({_first_line(exc)}): re-run the capture"
            ) from None
        except Exception:
            self._f.close()
            raise

    def _validate(self) -> None:
        attrs = self._f.attrs
        if attrs.get("schema") != SCHEMA_NAME:
            self._f.close()
            raise DumpError(f"{self.path} is an HDF5 file but not an nmgrad dump (no '{SCHEMA_NAME}' schema attribute)")
        version = validate.schema_version(self.path, attrs)
        if version > SCHEMA_VERSION:
            raise DumpError(
                f"{self.path} uses dump schema version {version}, newer than this nmgrad reads "
                f"({SCHEMA_VERSION}): upgrade nmgrad (pip install -U nmgrad)"
            )
        if version < 1:
            raise DumpError(
                f"{self.path} has no valid schema_version attribute: it was not written by nmgrad, re-run the capture"
            )
        run = validate.check_root(self.path, attrs)
        # read once here, where a damaged attribute becomes a one-line error
        self._attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()} | {"run": run}

    def _scan(self) -> dict[str, LayerInfo]:
        layers = {}
        if "layers" not in self._f:
            return layers
        validate.check_links(self.path, self._f, "")
        group = self._f["layers"]
        if not isinstance(group, h5py.Group):
            raise validate.corrupt(self.path, "/layers is a dataset, not a group")
        index = {}
        for key in validate.check_links(self.path, group, "/layers"):
            meta = validate.check_layer(self.path, key, group[key])
            index[key] = meta.pop("index")
            layers[key] = LayerInfo(key=key, **meta)
        return dict(sorted(layers.items(), key=lambda kv: index[kv[0]]))

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    def select(self, pattern: str | None = None) -> list[LayerInfo]:
        """Layers whose name matches the glob ``pattern`` (all when None)."""
        return [li for li in self.layers.values() if pattern is None or fnmatch.fnmatchcase(li.name, pattern)]

    def records(self, kind: str = "grad", layers: list[LayerInfo] | None = None) -> Iterator[Record]:
        """Every record of ``kind`` of the given layers, in layer then step order (nothing loaded)."""
        for li in layers if layers is not None else self.layers.values():
            for name in li.records.get(kind, []):
                try:
                    ds = self._f["layers"][li.key][kind][name]
                    step, call, dtype = validate.check_record(self.path, ds, kind, _meta(li))
                    shape = tuple(ds.shape)
                except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:  # damaged bytes
                    raise self._corrupt(exc, f"{li.key}/{kind}/{name}") from None
                yield Record(self, li, kind, name, step, call, shape, dtype)

    def find(self, layer: str, kind: str, record: str) -> bool:
        return record in self.layers[layer].records.get(kind, [])

    def load(self, layer: str, kind: str, record: str, index: tuple | None = None) -> torch.Tensor:
        try:
            ds = self._f["layers"][layer][kind][record]
            li = self.layers[layer]
            validate.check_record(self.path, ds, kind, _meta(li))
            validate.check_storage(self.path, ds)
            return _decode(ds, index)
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise DumpError(
                f"{self.path}: cannot read {layer}/{kind}/{record} ({_first_line(exc)}); the file is truncated or "
                "corrupt, re-run the capture"
            ) from None

    def _corrupt(self, exc: BaseException, where: str) -> DumpError:
        return validate.corrupt(self.path, f"cannot read {where} ({_first_line(exc)})")

    def n_records(self, kind: str = "grad") -> int:
        return sum(len(li.records.get(kind, [])) for li in self.layers.values())

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> DumpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- record selection (evaluate's --steps, --every, --max-records) ---------------------------------


def parse_steps(spec: str | None) -> tuple[int | None, int | None] | None:
    """``"A:B"`` -> (A, B), the steps A <= step < B; either end may be left out (``"10:"``, ``":5"``);
    ``"N"`` is the one step N. None selects every step. A malformed spec raises
    :class:`nmgrad_cli.errors.NmgradError` with an example."""
    from ..errors import NmgradError

    if spec is None:
        return None
    text = spec.strip()
    try:
        if ":" not in text:
            n = int(text)
            return n, n + 1
        lo, hi = text.split(":")
        start = int(lo) if lo.strip() else None
        stop = int(hi) if hi.strip() else None
    except ValueError:
        raise NmgradError(
            f"--steps '{spec}' is malformed: give A:B (steps A <= step < B), A:, :B or N, e.g. 0:10"
        ) from None
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise NmgradError(f"--steps '{spec}': steps are >= 0, e.g. 0:10")
    if start is not None and stop is not None and stop <= start:
        raise NmgradError(f"--steps '{spec}' selects no step: B must be > A, e.g. {start}:{start + 1}")
    return start, stop


def select_records(
    records: list[Record], steps: tuple[int | None, int | None] | None = None, every: int = 1,
    max_records: int | None = None,
) -> list[Record]:
    """The records of one layer kept by a selection, in their order: those with a step in
    ``steps`` = [A, B), then every ``every``-th of the distinct steps left (the first, the
    (K+1)-th, ...), then at most ``max_records`` of them (the first)."""
    if steps is not None:
        lo, hi = steps
        records = [r for r in records if (lo is None or r.step >= lo) and (hi is None or r.step < hi)]
    if every > 1:
        kept = set(sorted({r.step for r in records})[::every])
        records = [r for r in records if r.step in kept]
    if max_records is not None:
        records = records[:max_records]
    return records
