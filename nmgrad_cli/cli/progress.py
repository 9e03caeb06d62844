"""The CLI's renderer of :mod:`nmgrad_cli.progress`: a rich bar on a terminal, plain lines elsewhere.

Progress always goes to stderr, so stdout can carry ``--json -`` or ``--csv -``.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar

from ..progress import LineProgress, Progress
from .common import err_console


class RichProgress(Progress):
    """A transient rich bar (description, bar, done/total, ETA) on ``console``."""

    def __init__(self, console: Console):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.bar = RichBar(*columns, console=console, transient=True)
        self.task = None
        self.desc = ""

    def start(self, total: int | None, desc: str = "") -> None:
        self.desc = desc
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(escape(desc), total=total)
        else:
            self.bar.update(self.task, completed=0, total=total, description=escape(desc))

    def update(self, done: int, info: str = "") -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=done, description=escape(f"{self.desc} {info}".rstrip()))

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()
            self.task = None


def cli_progress(quiet: bool = False, unit: str = "records", console: Console | None = None) -> Progress:
    """What a command passes as ``progress=``: rich on a terminal, a line every 5 s when stderr is
    a pipe or a file (CI logs), nothing with ``quiet``."""
    con = console if console is not None else err_console
    if quiet:
        return Progress()
    if con.is_terminal:
        return RichProgress(con)
    return LineProgress(con.file, interval=5.0, unit=unit)
