"""The typed events :func:`nmgrad_cli.evaluate.iter_evaluate` yields, one class per kind."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FileStarted:
    """A dump is about to be evaluated: its metadata (path, schema_version, complete, interrupted,
    run, layers {name: module_type} of the selected layers)."""

    info: dict


@dataclass(frozen=True)
class Note:
    """Something the user should know that is not an error (a skipped method, an incomplete file)."""

    text: str


@dataclass
class RecordResult:
    """Metrics of one method on one grad record along one block axis."""

    file: str
    layer: str
    record: str
    step: int
    axis: str
    method: str
    shape: tuple[int, int]
    """(T, F) of the 2-D view that was pruned."""
    metrics: dict
    """:class:`nmgrad_cli.metrics.Metrics` as a dict (mse, bias, variance relative to norm2 ...)."""
    gemm: dict | None = None
    """Exact error of the backward GEMM fed with the pruned dY, or None when the dump lacks its operand:
    {"target": "dX"|"dW", "mse", "bias", "variance" (relative to norm2 = ||dX||^2 or ||dW||^2),
    "norm2", "mse_abs", "bias_abs", "var_abs"}; with ``mc_check`` also "mc_mse", "mc_mse_se"."""
    note: str | None = None

    @property
    def zero(self) -> bool:
        """The gradient record is all zeros (every metric is 0)."""
        return self.metrics["norm2"] == 0


@dataclass
class ErrorEntry:
    """A record that could not be evaluated (e.g. NaN/Inf values); the others still were."""

    file: str
    layer: str
    record: str
    message: str


Event = FileStarted | Note | RecordResult | ErrorEntry
