"""Sane upper bounds on the counts a user types (steps, batch sizes, intervals): a typo such as
``--steps 10000000000000`` is refused with one line instead of running "for 3479832756242326 hours".
The bounds are far above any real run on one machine; every command checks its counts here."""

from __future__ import annotations

from .errors import NmgradError

MAX_STEPS = 10_000_000
"""Optimizer steps (and warm-up, intervals in steps): 10 million."""
MAX_BATCH = 1 << 20
"""Samples in one batch."""


def check_count(option: str, value: int | None, low: int, high: int, hint: str = "") -> None:
    """Raise a one-line :class:`NmgradError` unless ``low <= value <= high`` (None: not given, fine)."""
    if value is None:
        return
    if not low <= value <= high:
        raise NmgradError(f"{option} must be between {low} and {high:,}, got {value:,}" + (f": {hint}" if hint else ""))
