"""What every command shares: the consoles, and turning user errors into one line + exit code."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.measure import Measurement

from ..errors import NmgradError
from ..outputs import check_output, write_text

console = Console()
err_console = Console(stderr=True)


def print_table(out: Console, renderable: RenderableType) -> None:
    """On a terminal fit ``renderable`` to it; elsewhere (pipes, files, CI logs) print it at its
    natural width rather than rich's default 80 columns, which would cut or drop columns."""
    if out.is_terminal:
        out.print(renderable, highlight=False)
        return
    natural = Measurement.get(out, out.options.update_width(1000), renderable).maximum
    Console(file=out.file, width=max(natural, 80), color_system=None, highlight=False).print(renderable)


QUIET_HELP = "No progress bar and no tables (errors and warnings are still printed)."


def num(x, fmt: str = ".2e") -> str:
    """A table cell: ``x`` formatted with ``fmt``, or ``-`` when there is no value."""
    return "-" if x is None else format(x, fmt)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """Turn :class:`NmgradError` into a one-line message and exit code; Ctrl-C into exit 130."""
    try:
        yield
    except NmgradError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None


def check_new_file(path: Path | None, force: bool) -> None:
    """Refuse an existing output file unless ``force``; ``-`` (stdout) and None pass."""
    if path is None or str(path) == "-":
        return
    check_output(path, force)


def write_json(path: Path | None, payload) -> None:
    """Write ``payload`` as JSON to ``path`` (``-``: stdout), atomically (temporary file, then rename)."""
    if path is None:
        return
    write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
