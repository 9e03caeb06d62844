"""`nmgrad inspect`: what a dump holds (layers, shapes, steps, dtypes, sizes, run metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.tree import Tree

from ..capture.summary import summarize
from ..layers import select_layers
from .common import console, print_table, user_errors, write_json


def inspect(
    dump: Path = typer.Argument(..., help="A dump written by `nmgrad capture` (.h5).", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    layers: str = typer.Option(
        None, "--layers", help="Comma-separated globs on the dump's layer names, e.g. 'fc1,blocks.*.mlp.*'."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No tables; the exit code says whether the dump reads (--json still printed)."
    ),
) -> None:
    """Show a dump's layers, shapes, steps, dtypes, sizes and run metadata."""
    with user_errors():
        info = summarize(dump)
        if layers is not None:
            chosen = set(select_layers([li["name"] for li in info["layers"]], layers, "dump layer"))
            info["layers"] = [li for li in info["layers"] if li["name"] in chosen]
    if json_out:  # asked for: printed even with -q
        write_json(Path("-"), info)
        return
    if quiet:
        return
    head = Tree(f"[bold]{info['path']}[/]  {info['file_bytes'] / 1e6:.2f} MB on disk")
    status = "complete" if info["complete"] else ("interrupted" if info["interrupted"] else "not closed cleanly")
    if info.get("interrupt_reason"):
        status += f" ({info['interrupt_reason']})"
    head.add(f"status: {status}; steps completed: {info['steps_completed']}")
    head.add(f"schema {info['schema']} v{info['schema_version']}, nmgrad {info['nmgrad_version']}, "
             f"torch {info['torch_version']}, created {info['created']}")
    run = head.add("run")
    for k, v in info["run"].items():
        run.add(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}")
    print_table(console, head)
    table = Table(title=f"{len(info['layers'])} layers", title_justify="left")
    for col in ("layer", "type", "dY shape", "F", "T", "dtype", "steps", "calls", "records", "MB", "inputs"):
        table.add_column(col, justify="right" if col in ("F", "T", "steps", "calls", "records", "MB") else "left")
    for li in info["layers"]:
        table.add_row(
            li["name"], li["module_type"], " | ".join(str(tuple(s)) for s in li["grad_shapes"]),
            str(li["features"]), str(li["tokens"]), ",".join(li["dtypes"]), str(len(li["steps"])),
            str(li["calls_per_step"]), str(li["records"]["grad"]), f"{li['bytes'] / 1e6:.2f}",
            "X,W" if li["records"]["input"] and li["records"]["weight"] else ("W" if li["records"]["weight"] else "-"),
        )
    print_table(console, table)
