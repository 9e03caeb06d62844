"""`nmgrad methods`: list the registered pruning methods."""

from __future__ import annotations

from rich.table import Table

from ..methods import METHODS
from .common import console


def methods() -> None:
    """List the pruning methods (the registry evaluate and train draw from)."""
    table = Table(title="pruning methods")
    table.add_column("method", style="bold")
    table.add_column("unbiased")
    table.add_column("what it does")
    for name, meth in METHODS.items():
        table.add_row(name, "yes" if meth.unbiased else "no", meth.summary)
    console.print(table)
