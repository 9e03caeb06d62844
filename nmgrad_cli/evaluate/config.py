"""What to evaluate: :class:`EvalConfig`, written into every JSON output."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import NmgradError, PatternError
from ..methods import METHODS, get_method
from ..patterns import parse_pattern

AXES = ("features", "tokens")
AXIS_DIM = {"features": -1, "tokens": 0}
"""Block axis -> dim of the (T, F) matrix the N:M blocks run along."""
GEMM_OF_AXIS = {"features": "dX", "tokens": "dW"}
METRICS = ("mse", "bias", "variance", "angle")


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
    """Glob on layer names (fnmatch, case-sensitive), e.g. ``"blocks.*.mlp.*"``; None = all layers."""
    samples: int = 16
    """Monte-Carlo draws per (record, method, axis) for the angle and the GEMM errors; 0 = neither."""
    seed: int = 0
    """Seed of the Monte-Carlo draws; each (file name, layer, record, axis, method) gets its own stream
    derived from it, so a result does not depend on which other layers or methods are evaluated."""
    mc_check: bool = False
    """Also estimate mse/bias/variance by Monte Carlo, as a cross-check of the exact values."""

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.axis not in ("features", "tokens", "both"):
            raise NmgradError(f"axis '{self.axis}' is unknown: choose features, tokens or both")
        if self.samples < 0:
            raise NmgradError(f"--samples {self.samples} is invalid: give 0 (no angle) or more, e.g. 16")
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
