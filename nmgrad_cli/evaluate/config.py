"""What to evaluate: :class:`EvalConfig`, written into every JSON output."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..backend import BACKENDS
from ..dump.reader import parse_steps
from ..errors import NmgradError, PatternError
from ..layers import parse_layers
from ..methods import METHODS, get_method
from ..patterns import Pattern, parse_pattern

AXES = ("features", "tokens")
AXIS_DIM = {"features": -1, "tokens": 0}
"""Block axis -> dim of the (T, F) matrix the N:M blocks run along."""
GEMM_OF_AXIS = {"features": "dX", "tokens": "dW"}
METRICS = ("mse", "bias", "variance", "angle")
MAX_SAMPLES = 100_000
"""--samples above this is refused: it would run for days and gain nothing."""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


DEFAULT_MEMORY_BUDGET = "auto"
CPU_MEMORY_BUDGET = 256 << 20
"""``auto`` on the CPU: records up to ~2.4 M floats (a job's working set is ~112 bytes per float) are
evaluated whole, bigger ones in pieces, so evaluate's peak memory does not grow with the record
(BENCHMARKS.md). On CUDA ``auto`` is no bound: the GPU's memory holds whole records, and a record in
pieces would cost a pass of random numbers more."""


def parse_bytes(value: str | int | None) -> int | None:
    """``"2GB"`` (powers of 10), ``"512MiB"`` (powers of 2) or a byte count, as bytes; None or
    ``"none"``: no bound."""
    if value is None or str(value).strip().lower() in ("none", "auto"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise NmgradError(f"--memory-budget '{value}' is invalid: give a size such as 2GB, 512MiB or 1000000000")
    return int(float(m.group(1)) * _UNITS[unit])


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
    """Comma-separated globs on layer names (fnmatch, case-sensitive), e.g. ``"fc1,blocks.*.mlp.*"``;
    None = all layers (:mod:`nmgrad_cli.layers`)."""
    steps: str | None = None
    """Steps to evaluate: ``"A:B"`` (A <= step < B), ``"A:"``, ``":B"`` or ``"N"``; None = all."""
    every: int = 1
    """Evaluate every K-th of the selected steps (the first, the (K+1)-th, ...)."""
    max_records: int | None = None
    """At most this many grad records per layer and file (the first after --steps/--every); None = all."""
    samples: int = 16
    """Monte-Carlo draws per (record, method, axis) for the angle (and --mc-check); 0 = no angle.
    At most :data:`MAX_SAMPLES`."""
    seed: int = 0
    """Seed of the Monte-Carlo draws; each (file name, layer, record, axis, method) gets its own stream
    derived from it, so a result does not depend on which other layers or methods are evaluated."""
    mc_check: bool = False
    """Also estimate mse/bias/variance by Monte Carlo, as a cross-check of the exact values."""
    device: str = "auto"
    """Where to evaluate: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    On CUDA the draws run the Triton kernels (same law, other random numbers than the CPU's)."""
    backend: str = "auto"
    """The draws' pruning backend (:func:`nmgrad_cli.prune.prune`): reference, fused, triton, or auto
    (:func:`nmgrad_cli.backend.draw_backend`: Triton on CUDA, the reference on the CPU)."""
    workers: int = 1
    """Processes evaluating records in parallel (records are sharded; the report is identical)."""
    threads: int = 0
    """torch threads while evaluating; 0 = auto (:func:`nmgrad_cli.evaluate.threads.thread_policy`:
    1 for records under 2^22 elements, where extra threads only stall on a busy machine)."""
    memory_budget: str | int | None = DEFAULT_MEMORY_BUDGET
    """The most memory one (axis, method) job on a record may take, e.g. ``"2GB"``, ``"512MiB"`` or
    a byte count; None (or ``"none"``) = no bound; ``"auto"``: :data:`CPU_MEMORY_BUDGET` on the
    CPU, none on CUDA. A record whose working set would exceed it is read and evaluated in pieces of
    rows (columns for ``tokens``) with the whole record's results, to float64 rounding
    (:mod:`nmgrad_cli.evaluate.chunked`); a budget too small for one row (and the GEMM operands) is
    refused before anything runs."""

    @functools.cached_property
    def parsed_pattern(self) -> Pattern:
        """``pattern`` parsed once (the string stays the field, for the JSON outputs)."""
        return parse_pattern(self.pattern)

    def __post_init__(self) -> None:
        self.parsed_pattern  # noqa: B018 (validates, and caches the Pattern every record uses)
        if self.axis not in ("features", "tokens", "both"):
            raise NmgradError(f"axis '{self.axis}' is unknown: choose features, tokens or both")
        if self.samples < 0:
            raise NmgradError(f"--samples {self.samples} is invalid: give 0 (no angle) or more, e.g. 16")
        if self.samples > MAX_SAMPLES:
            raise NmgradError(
                f"--samples {self.samples} is too many: at most {MAX_SAMPLES} (the angle's standard error "
                "falls as 1/sqrt(samples); 16 to 1000 is plenty)"
            )
        if self.every < 1:
            raise NmgradError(f"--every {self.every} is invalid: give 1 (every step) or more, e.g. 10")
        if self.max_records is not None and self.max_records < 1:
            raise NmgradError(f"--max-records {self.max_records} is invalid: give 1 or more, or leave it out")
        if self.backend not in BACKENDS:
            raise NmgradError(f"--backend '{self.backend}' is unknown: choose one of {', '.join(BACKENDS)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise NmgradError(f"--device '{self.device}' is unknown: use auto, cpu, cuda or cuda:N")
        if self.workers < 1:
            raise NmgradError(f"--workers {self.workers} is invalid: give 1 (this process) or more, e.g. 2")
        if self.threads < 0:
            raise NmgradError(f"--threads {self.threads} is invalid: give 0 (auto) or a count, e.g. 1")
        self.budget_bytes  # noqa: B018 (validates)
        parse_steps(self.steps)
        parse_layers(self.layers)
        if self.methods is not None:
            if not self.methods:
                raise NmgradError("no method given: name at least one, e.g. --methods mvue,greedy")
            for name in self.methods:
                get_method(name).check(self.parsed_pattern)

    @functools.cached_property
    def budget_bytes(self) -> int | None:
        """``memory_budget`` in bytes (None: no bound, or ``auto``)."""
        return parse_bytes(self.memory_budget)

    def budget_for(self, device) -> int | None:
        """The budget in bytes on ``device`` (``auto``: :data:`CPU_MEMORY_BUDGET` on the CPU, none on CUDA)."""
        if str(self.memory_budget).strip().lower() == "auto":
            return CPU_MEMORY_BUDGET if torch.device(device or "cpu").type == "cpu" else None
        return self.budget_bytes

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES if self.axis == "both" else (self.axis,)

    def resolve_methods(self) -> tuple[list[str], list[str]]:
        """(methods to run, notes on the registered ones skipped because undefined for the pattern)."""
        if self.methods is not None:
            return list(dict.fromkeys(self.methods)), []
        pat = self.parsed_pattern
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

    @property
    def step_range(self) -> tuple[int | None, int | None] | None:
        return parse_steps(self.steps)
