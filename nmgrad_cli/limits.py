"""Sane upper bounds on the counts a user types (steps, batch sizes, intervals): a typo such as
``--steps 10000000000000`` is refused with one line instead of running "for 3479832756242326 hours".
The bounds are far above any real run on one machine; every command checks its counts here."""

from __future__ import annotations

from .errors import NmgradError

MAX_STEPS = 10_000_000
"""Optimizer steps (and warm-up, intervals in steps): 10 million."""
MAX_BATCH = 1 << 20
"""Samples in one batch."""


def check_count(option: str, value: int | None, low: int, high: int, hint: str = "", meaning: str = "") -> None:
    """Raise a one-line :class:`NmgradError` unless ``low <= value <= high`` (None: not given, fine):
    ``--steps must be >= 1, got 0`` below (``meaning``, e.g. "0: all", in parentheses after the
    bound), ``... must be between 1 and 10,000,000, got ...`` above (then ``hint``)."""
    if value is None:
        return
    if value < low:
        raise NmgradError(f"{option} must be >= {low}" + (f" ({meaning})" if meaning else "") + f", got {value}")
    if value > high:
        raise NmgradError(f"{option} must be between {low} and {high:,}, got {value:,}" + (f": {hint}" if hint else ""))
