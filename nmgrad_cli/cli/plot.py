"""`nmgrad plot RESULTS.json -o errors.png`: pictures of an evaluation; `nmgrad plot RUN_DIR`: a training run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from .. import plot as lib
from ..train.plot import plot_run
from .common import check_new_file, console, fail, user_errors


def plot(
    results: Path = typer.Argument(
        ..., help="JSON written by `nmgrad evaluate --json`, or a run folder of `nmgrad train`.", show_default=False
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="PNG file to write (a run folder: default RUN_DIR/loss.png).", show_default=False
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the path written (errors still printed)."),
) -> None:
    """Per-layer bias + variance bars per method, the angle per layer, and the error over steps; for a
    training run folder, its loss and accuracy curves."""
    with user_errors():
        if results.is_dir():  # a training run: its loss (and accuracy) curves
            out = out if out is not None else results / "loss.png"
            check_new_file(out, force)
            plot_run(results, out)
        else:
            if out is None:
                raise fail("give --out FILE.png for the picture of an evaluation")
            check_new_file(out, force)
            lib.plot_file(results, out)
    if not quiet:
        console.print(f"wrote {escape(str(out))}", highlight=False)
