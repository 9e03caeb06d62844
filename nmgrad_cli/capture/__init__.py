"""Capture the neural gradients dL/dY of a model's layers during real training, streamed to HDF5.

Library use (no CLI needed)::

    from nmgrad_cli.capture import CaptureConfig, run_capture
    result = run_capture(CaptureConfig(model="gpt", steps=20, out="g.h5"))

Hooking semantics: :mod:`.hooks`; what the file holds after an interrupt and under torchrun:
:mod:`.run`; the file layout: docs/dump-format.md.
"""

from .config import MODULE_TYPES, CaptureConfig, parse_module_types
from .hooks import SiteRecorder, dy_axes
from .run import CaptureProgress, CaptureResult, output_path, run_capture
from .stream import CaptureFile, StreamWriter, partial_path

__all__ = [
    "MODULE_TYPES",
    "CaptureConfig",
    "CaptureFile",
    "CaptureProgress",
    "CaptureResult",
    "StreamWriter",
    "dy_axes",
    "output_path",
    "parse_module_types",
    "partial_path",
    "run_capture",
    "SiteRecorder",
]
