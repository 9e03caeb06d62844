"""Names and version of the dump schema; the layout is documented in docs/dump-format.md.

Layout (version 1)::

    /                       attrs: schema, schema_version, nmgrad_version, torch_version,
                                   created, run (JSON: model, data, seed, config...),
                                   complete (bool), interrupted (bool), steps_completed
    /layers/<name>/         attrs: name, module_type, feature_axis, token_axes (JSON),
                                   weight_shape (JSON), index
    /layers/<name>/<kind>/<record>   dataset, kind in {grad, input, weight},
                                   record = "s{step:07d}c{call:03d}", attrs: step, call, dtype
"""

from __future__ import annotations

import torch

SCHEMA_NAME = "nmgrad-dump"
SCHEMA_VERSION = 1
KINDS = ("grad", "input", "weight")

# h5py has no bfloat16: bf16 tensors are stored as their uint16 bit pattern with attr dtype.
_STORED = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
}
DTYPES = {v: k for k, v in _STORED.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _STORED[dtype]
    except KeyError:
        raise ValueError(f"cannot store dtype {dtype}: use a float tensor") from None


def record_name(step: int, call: int) -> str:
    return f"s{step:07d}c{call:03d}"


def layer_key(name: str) -> str:
    """HDF5 group name for a module path (``/`` is not allowed; the root module is ``<root>``)."""
    return name.replace("/", "|") if name else "<root>"
