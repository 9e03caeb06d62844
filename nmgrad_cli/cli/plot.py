"""`nmgrad plot RESULTS.json -o errors.png`: pictures of an evaluation."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from .. import plot as lib
from .common import check_new_file, console, user_errors


def plot(
    results: Path = typer.Argument(..., help="JSON written by `nmgrad evaluate --json`.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the path written (errors still printed)."),
) -> None:
    """Per-layer bias + variance bars per method, the angle per layer, and the error over steps."""
    with user_errors():
        check_new_file(out, force)
        lib.plot_file(results, out)
    if not quiet:
        console.print(f"wrote {escape(str(out))}", highlight=False)
