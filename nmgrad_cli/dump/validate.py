"""What a reader refuses: a dump whose attributes or layout are not what docs/dump-format.md says,
and HDF5 features that would make a reader touch other files.

Every check raises :class:`DumpError` with ``<path> is corrupt: <what is wrong>``. The reader calls
them as it goes: root and layer checks when the file is opened, record checks when a record is
listed or loaded, so opening a large dump stays cheap.

Security: HDF5 can store a dataset's bytes in *external* raw files, link to objects in other files
(external links) and assemble *virtual* datasets from other files. A crafted dump could use them to
make ``nmgrad evaluate`` read (and report statistics of) any local file, so all three are refused,
as are soft links, which nmgrad never writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import DumpError
from .schema import DTYPES, KINDS

_FLOATS = {"float16", "float32", "float64"}


CORRUPT_TAIL = "; re-run the capture (or fix the file)"


def corrupt(path: Path, what: str) -> DumpError:
    return DumpError(f"{path} is corrupt: {what}{CORRUPT_TAIL}")


def _show(v) -> str:
    """``repr`` of an attribute value, numpy scalars as plain Python ones (1.7, not np.float64(1.7))."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    return repr(v)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_)) or (_is_int(v) and int(v) in (0, 1))


def _text(v) -> str | None:
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) else None


def _json(path: Path, where: str, v):
    text = _text(v)
    if text is None:
        raise corrupt(path, f"{where} is not a JSON string")
    try:
        return json.loads(text)
    except ValueError:
        raise corrupt(path, f"{where} is not valid JSON ({text[:40]!r})") from None


def schema_version(path: Path, attrs) -> int:
    """The root ``schema_version``: an integer (1.7, "1" and True are not)."""
    v = attrs.get("schema_version")
    if not _is_int(v):
        raise DumpError(
            f"{path} has no valid schema_version attribute (an integer; found {_show(v)}): it was not written by "
            "nmgrad, re-run the capture"
        )
    return int(v)


def check_root(path: Path, attrs) -> dict:
    """The root attributes other than the schema ones; returns ``run`` decoded."""
    run = _json(path, "root attribute 'run'", attrs.get("run", "{}"))
    if not isinstance(run, dict):
        raise corrupt(path, f"root attribute 'run' is a JSON {type(run).__name__}, not an object")
    for name in ("steps_completed", "last_step"):
        if name in attrs and not _is_int(attrs[name]):
            raise corrupt(path, f"root attribute '{name}' is {_show(attrs[name])}, not an integer")
    for name in ("complete", "interrupted"):
        if name in attrs and not _is_bool(attrs[name]):
            raise corrupt(path, f"root attribute '{name}' is {_show(attrs[name])}, not a boolean")
    return run


def check_links(path: Path, group: h5py.Group, where: str) -> list[str]:
    """The names in ``group``, refusing external and soft links (see the module docstring)."""
    names = list(group.keys())
    for name in names:
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise corrupt(path, f"{where}/{name} is an external link to {link.filename}: dumps never link to other "
                                "files, refusing to follow it")
        if not isinstance(link, h5py.HardLink):
            raise corrupt(path, f"{where}/{name} is a {type(link).__name__}: dumps hold plain groups and datasets")
    return names


def check_layer(path: Path, key: str, g, records: bool = True) -> dict:
    """A layer group's attributes, parsed: name, module_type, feature_axis, token_axes,
    weight_shape, index; and its kinds' record names (``records``; skipped, left empty, when
    ``records`` is False)."""
    where = f"layer '{key}'"
    if not isinstance(g, h5py.Group):
        raise corrupt(path, f"/layers/{key} is a {type(g).__name__}, not a group")
    a = g.attrs
    out = {"name": _text(a.get("name", key)), "module_type": _text(a.get("module_type", ""))}
    for k in ("name", "module_type"):
        if out[k] is None:
            raise corrupt(path, f"{where}: attribute '{k}' is not a string")
    fa = a.get("feature_axis", -1)
    if not _is_int(fa):
        raise corrupt(path, f"{where}: feature_axis is {_show(fa)}, not an integer")
    out["feature_axis"] = int(fa)
    ta = _json(path, f"{where}: token_axes", a.get("token_axes", "[]"))
    if not isinstance(ta, list) or not all(_is_int(x) for x in ta):
        raise corrupt(path, f"{where}: token_axes is {ta!r}, not a list of integers")
    out["token_axes"] = tuple(ta)
    ws = _json(path, f"{where}: weight_shape", a.get("weight_shape", "null"))
    if ws is not None and (not isinstance(ws, list) or not all(_is_int(x) and x >= 0 for x in ws)):
        raise corrupt(path, f"{where}: weight_shape is {ws!r}, not a list of sizes or null")
    out["weight_shape"] = tuple(ws) if ws is not None else None
    if "conv" in a:
        out["conv"] = _conv_attr(path, where, a["conv"])
    if "needs_grad" in a:
        ng = _json(path, f"{where}: needs_grad", a["needs_grad"])
        if not isinstance(ng, dict) or not all(isinstance(ng.get(k), bool) for k in ("input", "weight")):
            raise corrupt(path, f"{where}: needs_grad is {ng!r}, not {{'input': bool, 'weight': bool}}")
        out["needs_grad"] = {"input": ng["input"], "weight": ng["weight"]}
    index = a.get("index", 0)
    if not _is_int(index):
        raise corrupt(path, f"{where}: index is {_show(index)}, not an integer")
    out["index"] = int(index)
    out["records"] = {}
    if not records:
        return out
    records = out["records"]
    for kind in check_links(path, g, f"/layers/{key}"):
        if kind not in KINDS:
            continue  # a writer may add groups readers do not know
        sub = g[kind]
        if not isinstance(sub, h5py.Group):
            raise corrupt(path, f"/layers/{key}/{kind} is a dataset, not a group of records")
        records[kind] = sorted(check_links(path, sub, f"/layers/{key}/{kind}"))
    return out


def _conv_attr(path: Path, where: str, v) -> dict:
    """The layer attribute ``conv``: {stride, padding, dilation, groups}, ints or lists of ints
    (padding may also be 'same' or 'valid'), groups a positive int."""
    conv = _json(path, f"{where}: conv", v)

    def ints(x) -> bool:
        return (_is_int(x) and x >= 0) or (isinstance(x, list) and all(_is_int(i) and i >= 0 for i in x))

    ok = (
        isinstance(conv, dict) and set(conv) == {"stride", "padding", "dilation", "groups"}
        and ints(conv["stride"]) and ints(conv["dilation"]) and _is_int(conv["groups"]) and conv["groups"] >= 1
        and (ints(conv["padding"]) or conv["padding"] in ("same", "valid"))
    )
    if not ok:
        raise corrupt(path, f"{where}: conv is {conv!r}, not {{stride, padding, dilation, groups}}")
    return conv


def check_record(path: Path, ds, kind: str, layer: dict) -> tuple[int, int, str]:
    """(step, call, dtype name) of a ``kind`` record dataset of ``layer`` (the parsed layer
    attributes, :func:`check_layer`), refusing anything a reader could not use.

    The layer's feature_axis and token_axes index dY's dims, so they are checked on grad records
    and on input records (X has dY's rank: Linear's (..., I) beside dY (..., F), a conv's
    (B, C_in, *spatial)); a weight record is W in the site's canonical layout, of the layer's
    ``weight_shape`` when it has one."""
    where = ds.name
    if not isinstance(ds, h5py.Dataset):
        raise corrupt(path, f"{where} is a group, not a record dataset")
    a = ds.attrs
    step, call = a.get("step", 0), a.get("call", 0)
    for name, v in (("step", step), ("call", call)):
        if not _is_int(v) or v < 0:
            raise corrupt(path, f"{where}: attribute '{name}' is {_show(v)}, not a non-negative integer")
    dtype = _text(a.get("dtype", str(ds.dtype)))
    if dtype not in DTYPES:
        raise corrupt(path, f"{where}: dtype {_show(a.get('dtype', str(ds.dtype)))} is not one of {', '.join(DTYPES)}")
    check_layout(path, where, kind, layer, tuple(ds.shape), dtype, ds.dtype)
    return int(step), int(call), dtype


def check_layout(path: Path, where: str, kind: str, layer: dict, shape: tuple[int, ...], dtype: str, stored) -> None:
    """A record's shape and storage against its layer (see :func:`check_record`)."""
    if (dtype == "bfloat16" and stored not in (np.uint16, np.int16)) or (dtype in _FLOATS and stored != dtype):
        raise corrupt(path, f"{where}: data stored as {stored}, which does not hold {dtype}")
    nd = len(shape)
    if kind == "weight":
        ws = layer.get("weight_shape")
        if ws is not None and shape != tuple(ws):
            raise corrupt(path, f"{where}: a weight of shape {shape}, not the layer's weight_shape {tuple(ws)}")
        return
    feature_axis, token_axes = layer["feature_axis"], layer["token_axes"]
    if nd and not -nd <= feature_axis < nd:
        raise corrupt(path, f"{where}: feature_axis {feature_axis} is out of range for shape {shape}")
    if any(not -nd <= t < nd for t in token_axes):
        raise corrupt(path, f"{where}: token_axes {list(token_axes)} are out of range for shape {shape}")


def check_written(path: Path, f: h5py.File, layouts: dict[tuple[str, str], dict[tuple, str]]) -> None:
    """What a reader checks, run by the writer on the file it is about to close: the root and
    every layer's attributes as read back from the file, and each distinct record layout the
    writer stored (``layouts``: (layer key, kind) -> {(shape, dtype name, stored dtype): the first
    record's name}) against its layer. Metadata only, one check per layout rather than per
    record, so a capture never calls a file complete that its own reader refuses, cheaply."""
    check_root(path, f.attrs)
    if "layers" not in f:
        return
    group = f["layers"]
    layers = {key: check_layer(path, key, group[key], records=False) for key in check_links(path, group, "/layers")}
    for (key, kind), seen in layouts.items():
        for (shape, dtype, stored), where in seen.items():
            check_layout(path, where, kind, layers[key], shape, dtype, np.dtype(stored))

def check_storage(path: Path, ds: h5py.Dataset) -> None:
    """Refuse a dataset whose bytes live in other files (external storage, virtual dataset)."""
    if ds.is_virtual:
        raise corrupt(path, f"{ds.name} is a virtual dataset (its data comes from other files): refusing to read it")
    if ds.id.get_create_plist().get_external_count() > 0:
        raise corrupt(path, f"{ds.name} keeps its data in external files: refusing to read it")
