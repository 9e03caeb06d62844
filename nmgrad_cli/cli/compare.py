"""`nmgrad compare A.json B.json`: the per-layer differences of two evaluations."""

from __future__ import annotations

import csv
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import results as lib
from ..errors import NmgradError
from ..outputs import atomic_open, check_distinct
from .common import QUIET_HELP, check_new_file, console, err_console, num, print_table, user_errors, write_json

SHOWN = {"variance": "variance", "bias": "bias", "angle": "angle", "gemm_mse": "dX|dW mse"}


def compare(
    a: Path = typer.Argument(..., help="An evaluation: JSON written by `nmgrad evaluate --json`.", show_default=False),
    b: Path = typer.Argument(..., help="The evaluation to compare it with (B - A is shown).", show_default=False),
    metrics: str = typer.Option(
        "variance,bias,angle,gemm_mse", "--metrics",
        help=f"Comma-separated metrics to show: {', '.join(lib.COMPARED)}.",
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the rows (A, B, B - A of every metric) as JSON to FILE, "
                                  "or '-' for stdout."),
    csv_out: Path = typer.Option(None, "--csv", help="Write the rows as CSV to FILE, or '-' for stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json/--csv files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Per-layer differences of two evaluations (two checkpoints, two models): A, B and B - A."""
    with user_errors():
        names = [m.strip() for m in metrics.split(",") if m.strip()]
        bad = [m for m in names if m not in lib.COMPARED]
        if bad or not names:
            raise lib.ResultsError(
                f"unknown metric '{bad[0] if bad else metrics}': choose from {', '.join(lib.COMPARED)}"
            )
        outputs = {"--json": json_out, "--csv": csv_out}
        if str(json_out) == str(csv_out) == "-":
            raise NmgradError("--json - and --csv - both ask for stdout: send one of them to a file")
        check_distinct(outputs, inputs=[a, b])
        check_new_file(json_out, force)
        check_new_file(csv_out, force)
        ra, rb = lib.load(a), lib.load(b)
        rows, notes = lib.compare(ra, rb)
        columns = ["layer", "axis", "method"] + [f"{m}_{s}" for m in names for s in ("a", "b", "diff")]
        write_json(json_out, {"a": str(a), "b": str(b), "metrics": names, "notes": notes,
                              "rows": [{k: r[k] for k in columns} for r in rows]})
        if csv_out is not None:
            with atomic_open(csv_out, newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
    if quiet:
        return
    # with --json - or --csv - stdout carries only that output: the table and notes go to stderr
    shown = err_console if "-" in (str(json_out), str(csv_out)) else console
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
    print_table(shown, table)
    for note in notes:
        shown.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


