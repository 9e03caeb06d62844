"""`nmgrad compare A.json B.json`: the per-layer differences of two evaluations."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import results as lib
from .common import console, num, user_errors
from .evaluate import _print as print_table  # natural width off a terminal

SHOWN = {"variance": "variance", "bias": "bias", "angle": "angle", "gemm_mse": "dX|dW mse"}


def compare(
    a: Path = typer.Argument(..., help="An evaluation: JSON written by `nmgrad evaluate --json`.", show_default=False),
    b: Path = typer.Argument(..., help="The evaluation to compare it with (B - A is shown).", show_default=False),
    metrics: str = typer.Option(
        "variance,bias,angle,gemm_mse", "--metrics",
        help=f"Comma-separated metrics to show: {', '.join(lib.COMPARED)}.",
    ),
) -> None:
    """Per-layer differences of two evaluations (two checkpoints, two models): A, B and B - A."""
    with user_errors():
        names = [m.strip() for m in metrics.split(",") if m.strip()]
        bad = [m for m in names if m not in lib.COMPARED]
        if bad or not names:
            raise lib.ResultsError(
                f"unknown metric '{bad[0] if bad else metrics}': choose from {', '.join(lib.COMPARED)}"
            )
        ra, rb = lib.load(a), lib.load(b)
        rows, notes = lib.compare(ra, rb)
    table = Table(title=f"nmgrad compare: A = {a.name}, B = {b.name} (diff = B - A)", title_justify="left")
    for col in ("layer", "axis", "method"):
        table.add_column(col, style="bold" if col == "layer" else None)
    for m in names:
        label = SHOWN.get(m, m)
        for suffix in ("A", "B", "diff"):
            table.add_column(f"{label} {suffix}", justify="right")
    prev = None
    for r in rows:
        if prev is not None and r["layer"] != prev:
            table.add_section()
        cells = ["" if r["layer"] == prev else r["layer"], r["axis"], r["method"]]
        prev = r["layer"]
        for m in names:
            fmt = ".2f" if m == "angle" else ".2e"
            cells += [num(r[f"{m}_a"], fmt), num(r[f"{m}_b"], fmt), num(r[f"{m}_diff"], "+" + fmt)]
        table.add_row(*map(Text, cells))
    print_table(console, table)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


