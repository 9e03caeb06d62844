"""`nmgrad evaluate`: every pruning method on the neural gradients of one or more dumps.

Exit codes: 0 all good; 1 some record could not be evaluated (NaN/Inf) or a --fail-if threshold
fired (the tables are still printed and the outputs written); 2 bad input (one-line message).
"""

from __future__ import annotations

import csv
import enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .. import evaluate as lib
from ..errors import NmgradError
from ..evaluate import EvalConfig, EvalReport
from ..outputs import atomic_open, check_distinct
from .common import check_new_file, console, err_console, user_errors, write_json


class Axis(str, enum.Enum):
    features = "features"
    tokens = "tokens"
    both = "both"


CSV_FIELDS = (
    "level", "file", "layer", "module_type", "axis", "method", "records", "norm2",
    "mse", "bias", "variance", "angle", "angle_se", "gemm", "gemm_err", "gemm_err_se",
)


def evaluate(
    dumps: list[Path] = typer.Argument(..., help="Dump files written by `nmgrad capture` (.h5).", show_default=False),
    pattern: str = typer.Option("2:4", "--pattern", "-p", help="N:M pattern, e.g. 2:4, 1:2, 2:8."),
    methods: str = typer.Option(
        None, "--methods", "-m",
        help="Comma-separated methods (default: every registered method defined for --pattern).",
    ),
    axis: Axis = typer.Option(
        Axis.features, "--axis", help="Block axis: features (for dX = dY W), tokens (for dW = dY^T X), or both."
    ),
    layers: str = typer.Option(None, "--layers", help="Glob on layer names, e.g. 'blocks.*.mlp.*'."),
    samples: int = typer.Option(
        16, "--samples", "-s", help="Monte-Carlo draws for the angle and GEMM errors (0: none)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the Monte-Carlo draws."),
    json_out: Path = typer.Option(None, "--json", help="Write the full results as JSON to FILE, or '-' for stdout."),
    csv_out: Path = typer.Option(None, "--csv", help="Write per-layer and summary rows as CSV to FILE, or '-'."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json/--csv files."),
    mc_check: bool = typer.Option(False, "--mc-check", help="Also Monte-Carlo mse/bias/variance (cross-check)."),
    fail_if: list[str] = typer.Option(
        None, "--fail-if", help="Exit 1 when a summary value satisfies METHOD.METRIC OP NUMBER, e.g. 'mvue.bias>1e-6', "
        "'*.angle>=30' (repeatable; METRIC: mse|bias|variance|angle; OP: > >= < <=)."
    ),
) -> None:
    """Evaluate pruning methods on captured neural gradients: exact mse/bias/variance, MC angle.

    Exit status: 0 ok; 1 a record had NaN/Inf values (reported, the rest evaluated) or a --fail-if
    threshold fired; 2 bad input.
    """
    with user_errors():
        names = None
        if methods is not None:
            names = tuple(m.strip() for m in methods.split(",") if m.strip())
        config = EvalConfig(
            pattern=pattern, methods=names, axis=axis.value, layers=layers, samples=samples, seed=seed,
            mc_check=mc_check,
        )
        thresholds = [lib.parse_threshold(expr) for expr in fail_if or []]
        for t in thresholds:
            lib.check_threshold_applies(t, config)
        to_stdout = [p for p in (json_out, csv_out) if p is not None and str(p) == "-"]
        if len(to_stdout) > 1:
            raise NmgradError("--json - and --csv - both ask for stdout: send one of them to a file")
        check_distinct({"--json": json_out, "--csv": csv_out}, inputs=dumps)  # even with --force
        check_new_file(json_out, force)
        check_new_file(csv_out, force)
        # with --json - or --csv - stdout carries only that output: tables and notes go to stderr
        out = err_console if to_stdout else console
        report = _run(dumps, config)
        render(report, out)
        write_json(json_out, report.to_dict())
        if csv_out is not None:
            write_csv(csv_out, report)
        fired = lib.violations(report, thresholds)
    code = 0
    for entry in report.errors:
        err_console.print(f"[bold red]error:[/] {escape(entry.message)}", highlight=False, soft_wrap=True)
        code = 1
    for line in fired:
        err_console.print(f"[bold red]fail-if:[/] {escape(line)}", highlight=False, soft_wrap=True)
        code = 1
    if code:
        raise typer.Exit(code)


def _run(dumps: list[Path], config: EvalConfig) -> EvalReport:
    """Run the library evaluation with a rich progress bar on stderr (shown on terminals only)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=escape(f"evaluating {label}".rstrip()))

        return lib.evaluate(dumps, config, progress)


def _num(x, fmt: str = ".2e") -> str:
    return "-" if x is None else format(x, fmt)


def _angle(row: dict) -> str:
    if row["angle"] is None:
        return "-"
    se = row["angle_se"]
    return f"{row['angle']:.2f}" + (f"±{se:.2f}" if se is not None else "")


def _gemm(row: dict) -> str:
    g = row.get("gemm")
    if not g:
        return "-"
    return f"{g['err']:.2e}" + (f"±{g['err_se']:.1e}" if g["err_se"] is not None else "")


def _table(title: str, rows: list[dict], label_cols: list[str], show_axis: bool) -> Table:
    present = {r["gemm"]["target"] for r in rows if r.get("gemm")}
    gemm_targets = [t for t in ("dX", "dW") if t in present]
    table = Table(title=title, title_justify="left")
    for col in label_cols:
        table.add_column(col, style="bold" if col == "layer" else None)
    if show_axis:
        table.add_column("axis")
    table.add_column("method")
    for col in ("mse", "bias", "variance"):
        table.add_column(col, justify="right")
    table.add_column("angle (deg)", justify="right")
    mc = any(r.get("mc_mse") is not None for r in rows)
    if mc:
        table.add_column("MC mse", justify="right")
    if gemm_targets:
        table.add_column(f"{'|'.join(gemm_targets)} err", justify="right")
    table.add_column("n", justify="right")
    prev = None
    for r in rows:
        labels = [str(r[c]) for c in label_cols]
        if prev is not None and labels != prev:
            table.add_section()
        shown = labels if labels != prev else [""] * len(labels)
        prev = labels
        cells = [*shown, *([r["axis"]] if show_axis else []), r["method"]]
        cells += [_num(r["mse"]), _num(r["bias"]), _num(r["variance"]), _angle(r)]
        if mc:
            cells.append(_num(r.get("mc_mse")))
        if gemm_targets:
            cells.append(_gemm(r))
        cells.append(str(r["records"]))
        table.add_row(*map(Text, cells))  # Text: a '[' in a layer or file name is not markup
    return table


def _print(out: Console, table: Table) -> None:
    """On a terminal fit the table to it; elsewhere (pipes, CI logs) print it at its natural width
    rather than rich's default 80 columns, which would truncate the numbers."""
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update_width(1000), table).maximum
    Console(file=out.file, width=max(natural, 80), color_system=None, highlight=False).print(table)


def render(report: EvalReport, out: Console) -> None:
    """The per-layer table, the ||g||^2-weighted summary table, notes."""
    cfg = report.config
    show_axis = cfg.axis == "both"
    several = len(report.files) > 1
    rows = [{**r, "file": Path(r["file"]).name} for r in report.layers]
    label_cols = ["file", "layer"] if several else ["layer"]
    head = f"nmgrad evaluate: pattern {cfg.pattern}, axis {cfg.axis}, {cfg.samples} samples, seed {cfg.seed}"
    if rows:
        _print(out, _table(f"{head}: per layer", rows, label_cols, show_axis))
    if report.summary:
        _print(out, _table("summary over layers (weighted by ||g||^2)", report.summary, [], show_axis))
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def write_csv(path: Path, report: EvalReport) -> None:
    """One row per (file, layer, axis, method) and one per (axis, method) summary."""
    def flat(level: str, row: dict) -> dict:
        g = row.get("gemm") or {}
        return {
            **{k: row.get(k, "") for k in CSV_FIELDS if k not in ("level", "gemm", "gemm_err", "gemm_err_se")},
            "level": level, "gemm": g.get("target", ""), "gemm_err": g.get("err", ""),
            "gemm_err_se": g.get("err_se", ""),
        }

    with atomic_open(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in report.layers:
            w.writerow(flat("layer", row))
        for row in report.summary:
            w.writerow(flat("summary", row))

