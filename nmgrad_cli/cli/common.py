"""What every command shares: the consoles, and turning user errors into one line + exit code."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import NmgradError
from ..outputs import check_output, write_text

console = Console()
err_console = Console(stderr=True)


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
