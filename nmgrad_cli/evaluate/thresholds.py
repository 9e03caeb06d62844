"""``--fail-if 'mvue.bias>1e-6'``: thresholds on the summary for CI."""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import NmgradError
from ..methods import METHODS
from .config import METRICS, EvalConfig
from .report import EvalReport

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_THRESHOLD_RE = re.compile(
    r"^\s*(?P<method>[A-Za-z0-9_*-]+)\.(?P<metric>[a-z]+)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$"
)
THRESHOLD_EXAMPLE = "e.g. --fail-if 'mvue.bias>1e-6' or --fail-if '*.angle>=30'"


@dataclass(frozen=True)
class Threshold:
    """``METHOD.METRIC OP NUMBER`` on the summary: the run fails when the comparison holds."""

    method: str
    """A method name, or ``*`` for every evaluated method."""
    metric: str
    """mse, bias, variance or angle."""
    op: str
    """One of > >= < <=."""
    value: float

    def __str__(self) -> str:
        return f"{self.method}.{self.metric}{self.op}{self.value:g}"


def parse_threshold(expr: str) -> Threshold:
    """Parse ``'mvue.bias>1e-6'``; a malformed expression raises :class:`NmgradError`."""
    match = _THRESHOLD_RE.match(expr)
    if not match:
        raise NmgradError(
            f"--fail-if '{expr}' is malformed: write METHOD.METRIC OP NUMBER with OP one of > >= < <=, "
            f"{THRESHOLD_EXAMPLE}"
        )
    method, metric = match["method"], match["metric"]
    if metric not in METRICS:
        raise NmgradError(f"--fail-if '{expr}': metric '{metric}' is unknown: choose one of {', '.join(METRICS)}")
    if method != "*" and method not in METHODS:
        raise NmgradError(f"--fail-if '{expr}': unknown method '{method}': choose one of {', '.join(METHODS)} or *")
    return Threshold(method, metric, match["op"], float(match["value"]))


def check_threshold_applies(t: Threshold, config: EvalConfig) -> None:
    """Raise :class:`NmgradError` when ``t`` names a method that is not evaluated or the angle with
    ``samples == 0``: such a threshold could never fire, which would make a CI check vacuous."""
    methods, _ = config.resolve_methods()
    if t.method != "*" and t.method not in methods:
        raise NmgradError(
            f"--fail-if '{t}': method '{t.method}' is not evaluated (evaluated: {', '.join(methods)}); "
            "add it to --methods or drop the threshold"
        )
    if t.metric == "angle" and config.samples == 0:
        raise NmgradError(f"--fail-if '{t}': the angle is not computed with --samples 0; use --samples 16")


def violations(report: EvalReport, thresholds: Sequence[Threshold]) -> list[str]:
    """One line per (threshold, axis, method) whose summary value makes the comparison true."""
    out = []
    for t in thresholds:
        for row in report.summary:
            if t.method not in ("*", row["method"]) or row[t.metric] is None:
                continue
            if _OPS[t.op](row[t.metric], t.value):
                out.append(
                    f"{t} violated: {row['method']}.{t.metric} = {row[t.metric]:.6g} ({row['axis']} axis)"
                )
    return out
