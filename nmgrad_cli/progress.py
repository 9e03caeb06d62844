"""One progress abstraction for every long-running library call (evaluate, capture, train).

A library function takes ``progress=`` and turns it into a :class:`Progress` with
:func:`resolve_progress`; it then calls ``start(total, desc)``, ``update(done, info)`` and
``close()`` and never prints by itself. What the user sees depends on who renders:

- ``None`` / ``False``: nothing (the default of the library functions);
- ``True`` / ``"auto"``: :func:`auto_progress`, i.e. ``tqdm.auto`` on a terminal or in a notebook
  (a widget there), plain lines every few seconds with the rate and an ETA otherwise (CI logs);
- a :class:`Progress` instance: used as is (the CLI passes its rich bar this way, so this module
  imports neither rich nor typer);
- a plain callable ``fn(done, total, info)``: called on every update.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Base renderer: silent. Subclasses override :meth:`start`, :meth:`update` and :meth:`close`."""

    def start(self, total: int | None, desc: str = "") -> None:
        """Begin a run of ``total`` units (None: unknown)."""

    def update(self, done: int, info: str = "") -> None:
        """``done`` units are finished (an absolute count, not an increment); ``info`` names the current item."""

    def close(self) -> None:
        """The run is over (normally or not)."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CallbackProgress(Progress):
    """Calls ``fn(done, total, info)`` on :meth:`start` (with done = 0) and on every :meth:`update`."""

    def __init__(self, fn: Callable[[int, int | None, str], None]):
        self.fn, self.total = fn, None

    def start(self, total: int | None, desc: str = "") -> None:
        self.total = total
        self.fn(0, total, "")

    def update(self, done: int, info: str = "") -> None:
        self.fn(done, self.total, info)


ETA_MAX_DAYS = 99
"""An ETA beyond this prints as ``> 99 days`` (a rate measured over the first records, or a count
typed with too many zeros, must not print millions of hours)."""


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``; ``Nd hh:mm:ss`` from two days; ``> 99 days`` beyond; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds >= ETA_MAX_DAYS * 86400:
        return f"> {ETA_MAX_DAYS} days"
    if seconds >= 2 * 86400:
        days, rest = divmod(int(round(seconds)), 86400)
        return f"{days}d {rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class LineProgress(Progress):
    """Plain lines on ``stream`` (default stderr) at most every ``interval`` seconds:
    ``evaluate: 120/480 (25%) 3.1 records/s ETA 1:56 blocks.3.mlp.fc1``. Runs shorter than one
    interval print nothing, so quick commands keep a clean log; one that printed gets a final line."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0, unit: str = "records",
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.interval, self.unit, self.clock = stream, interval, unit, clock
        self.total: int | None = None
        self.desc, self.done, self.printed = "", 0, False
        self.t0 = self.last = 0.0

    def start(self, total: int | None, desc: str = "") -> None:
        self.total, self.desc, self.done, self.printed = total, desc, 0, False
        self.t0 = self.last = self.clock()

    def line(self, info: str = "") -> str:
        """The status line for the current state."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.done / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = format_eta((self.total - self.done) / rate) if rate > 0 else "?"
            text = f"{head}{self.done}/{self.total} ({pct:.0f}%) {rate:.3g} {self.unit}/s ETA {eta}"
        else:
            text = f"{head}{self.done} {self.unit} {rate:.3g} {self.unit}/s"
        return f"{text} {info}".rstrip()

    def _write(self, text: str) -> None:
        out = self.stream if self.stream is not None else sys.stderr
        out.write(text + "\n")
        out.flush()
        self.printed = True

    def update(self, done: int, info: str = "") -> None:
        self.done = done
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(self.line(info))

    def close(self) -> None:
        if self.printed:
            self._write(self.line("done") + f" in {format_eta(self.clock() - self.t0)}")
            self.printed = False


class TqdmProgress(Progress):
    """``tqdm.auto``: a bar on a terminal, a widget in a Jupyter notebook."""

    def __init__(self, unit: str = "records", file: TextIO | None = None):
        self.unit, self.file, self.bar = unit, file, None

    def start(self, total: int | None, desc: str = "") -> None:
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=desc or None, unit=f" {self.unit}", file=self.file, leave=False)

    def update(self, done: int, info: str = "") -> None:
        if self.bar is None:
            return
        self.bar.update(done - self.bar.n)
        if info:
            self.bar.set_postfix_str(info, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def auto_progress(stream: TextIO | None = None, unit: str = "records", interval: float = 5.0) -> Progress:
    """tqdm.auto when ``stream`` (default stderr) is a terminal or we run in a notebook, else
    :class:`LineProgress` (a line every ``interval`` seconds)."""
    out = stream if stream is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if _in_notebook() or (isatty is not None and isatty()):
        return TqdmProgress(unit, file=stream)
    return LineProgress(stream, interval, unit)


ProgressLike = Progress | Callable[[int, int | None, str], None] | bool | str | None
"""What a library function's ``progress=`` accepts (see the module docstring)."""


def resolve_progress(progress: ProgressLike, unit: str = "records") -> Progress:
    """The :class:`Progress` for a ``progress=`` argument."""
    if progress is None or progress is False:
        return Progress()
    if progress is True or progress == "auto":
        return auto_progress(unit=unit)
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return CallbackProgress(progress)
    raise TypeError(f"progress must be None, True, 'auto', a Progress or a callable, got {progress!r}")
