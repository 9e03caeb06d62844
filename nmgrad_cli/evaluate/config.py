"""What to evaluate: :class:`EvalConfig`, written into every JSON output."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ..backend import BACKENDS
from ..dump.reader import parse_steps
from ..errors import NmgradError, PatternError
from ..layers import parse_layers
from ..methods import METHODS, get_method
from ..patterns import parse_pattern

AXES = ("features", "tokens")
AXIS_DIM = {"features": -1, "tokens": 0}
"""Block axis -> dim of the (T, F) matrix the N:M blocks run along."""
GEMM_OF_AXIS = {"features": "dX", "tokens": "dW"}
METRICS = ("mse", "bias", "variance", "angle")
MAX_SAMPLES = 100_000
"""--samples above this is refused: it would run for days and gain nothing."""


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
    """torch threads while evaluating; 0 = auto (:func:`nmgrad_cli.evaluate.run.thread_policy`:
    1 for records under 2^22 elements, where extra threads only stall on a busy machine)."""

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
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
        parse_steps(self.steps)
        parse_layers(self.layers)
        if self.methods is not None:
            if not self.methods:
                raise NmgradError("no method given: name at least one, e.g. --methods mvue,greedy")
            for name in self.methods:
                get_method(name).check(parse_pattern(self.pattern))

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES if self.axis == "both" else (self.axis,)

    def resolve_methods(self) -> tuple[list[str], list[str]]:
        """(methods to run, notes on the registered ones skipped because undefined for the pattern)."""
        if self.methods is not None:
            return list(dict.fromkeys(self.methods)), []
        pat = parse_pattern(self.pattern)
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
