"""The root app: wires one module per command."""

from __future__ import annotations

import typer

from .. import __version__
from . import capture, compare, evaluate, inspect, methods, plot, train

app = typer.Typer(
    name="nmgrad",
    help="N:M sparsity for neural gradients: capture them, evaluate pruning methods, train with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("methods")(methods.methods)
app.command("evaluate")(evaluate.evaluate)
app.command("train")(train.train)
app.command("capture")(capture.capture)
app.command("inspect")(inspect.inspect)
app.command("compare")(compare.compare)
app.command("plot")(plot.plot)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nmgrad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """nmgrad command line."""


def main() -> None:
    app()
