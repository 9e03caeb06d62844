"""Evaluate pruning methods on the neural gradients stored in dumps (the library behind `nmgrad evaluate`).

- :mod:`.config`: :class:`EvalConfig`, what to evaluate (written into every output);
- :mod:`.run`: :func:`iter_evaluate` streams typed events (:mod:`.events`) record by record
  (the rooms below it: :mod:`.workers`, :mod:`.pipeline` / :mod:`.gpu`, :mod:`.record`,
  :mod:`.chunked`, :mod:`.gemm`, :mod:`.threads`, :mod:`.allocator`);
- :mod:`.report`: folds the events into per-layer rows and the summary (:class:`EvalReport`);
- :mod:`.thresholds`: ``--fail-if`` checks on the summary.

This package imports neither typer nor rich: progress goes through :mod:`nmgrad_cli.progress`.
"""

from .config import AXES, AXIS_DIM, DEFAULT_MEMORY_BUDGET, GEMM_OF_AXIS, MAX_SAMPLES, METRICS, EvalConfig
from .events import ErrorEntry, Event, FileStarted, Note, RecordResult
from .report import EvalReport, ReportBuilder, weighted_angle
from .run import GemmError, as_matrix, evaluate, gemm_error, iter_evaluate, stream_seed, thread_policy
from .thresholds import THRESHOLD_EXAMPLE, Threshold, check_threshold_applies, parse_threshold, violations

__all__ = [
    "AXES", "AXIS_DIM", "DEFAULT_MEMORY_BUDGET", "GEMM_OF_AXIS", "MAX_SAMPLES", "METRICS", "THRESHOLD_EXAMPLE",
    "ErrorEntry", "EvalConfig", "EvalReport", "Event", "FileStarted", "GemmError", "Note", "RecordResult",
    "ReportBuilder", "Threshold",
    "as_matrix", "check_threshold_applies", "evaluate", "gemm_error", "iter_evaluate", "parse_threshold",
    "stream_seed", "thread_policy", "violations", "weighted_angle",
]
