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
from rich.table import Table
from rich.text import Text

from .. import evaluate as lib
from ..errors import NmgradError
from ..evaluate import MAX_SAMPLES, EvalConfig, EvalReport
from ..outputs import atomic_open, check_distinct
from ..train.distributed import dist_info
from .common import QUIET_HELP, check_new_file, console, err_console, num, print_table, user_errors, write_json
from .progress import cli_progress


class Axis(str, enum.Enum):
    features = "features"
    tokens = "tokens"
    both = "both"


CSV_FIELDS = (
    "level", "file", "layer", "module_type", "axis", "method", "records", "norm2",
    "mse", "bias", "variance", "angle", "angle_se", "gemm", "gemm_mse", "gemm_bias", "gemm_variance",
    "gemm_norm2", "gemm_mc_mse", "gemm_mc_mse_se",
)
GEMM_CSV = {"gemm_mse": "mse", "gemm_bias": "bias", "gemm_variance": "variance", "gemm_norm2": "norm2",
            "gemm_mc_mse": "mc_mse", "gemm_mc_mse_se": "mc_mse_se"}


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
    layers: str = typer.Option(
        None, "--layers", help="Comma-separated globs on layer names, e.g. 'fc1,blocks.*.mlp.*'."
    ),
    steps: str = typer.Option(None, "--steps", help="Steps A:B (A <= step < B), A:, :B or N."),
    every: int = typer.Option(1, "--every", help="Every K-th of the selected steps."),
    max_records: int = typer.Option(
        None, "--max-records", help="At most N grad records per layer (the first selected)."
    ),
    samples: int = typer.Option(
        16, "--samples", "-s", help=f"Monte-Carlo draws for the angle (0: none; at most {MAX_SAMPLES})."
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N; CUDA runs the Triton kernels."
    ),
    backend: str = typer.Option(
        "auto", "--backend", help="Pruning backend of the draws: auto, reference, fused or triton."
    ),
    workers: int = typer.Option(
        1, "--workers", help="Processes evaluating records in parallel (same results as one)."
    ),
    threads: int = typer.Option(
        0, "--threads", help="torch threads (0: auto, 1 for records under 4M elements, all cores above)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the Monte-Carlo draws."),
    memory_budget: str = typer.Option(
        lib.DEFAULT_MEMORY_BUDGET, "--memory-budget",
        help="Most memory one method's job on a record may take (e.g. 2GB, none): bigger records go in pieces.",
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the full results as JSON to FILE, or '-' for stdout."),
    csv_out: Path = typer.Option(None, "--csv", help="Write per-layer and summary rows as CSV to FILE, or '-'."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json/--csv files."),
    mc_check: bool = typer.Option(False, "--mc-check", help="Also Monte-Carlo mse/bias/variance (cross-check)."),
    fail_if: list[str] = typer.Option(
        None, "--fail-if", help="Exit 1 when a summary value satisfies METHOD.METRIC OP NUMBER, e.g. 'mvue.bias>1e-6', "
        "'*.angle>=30' (repeatable; METRIC: mse|bias|variance|angle; OP: > >= < <=)."
    ),
    recommend: bool = typer.Option(
        False, "--recommend", help="Per layer and GEMM, the sparsest --candidates pattern within --budget (a plan)."
    ),
    candidates: str = typer.Option("1:2,2:4,2:8,1:4", "--candidates", help="With --recommend: N:M patterns to try."),
    budget: str = typer.Option(
        "variance<=0.5", "--budget", help="With --recommend: 'variance<=X', 'mse<=X' or 'angle<=DEG' (comma: all)."
    ),
    plan_out: Path = typer.Option(None, "--plan-out", help="With --recommend: write the plan JSON (`train --plan`)."),
    plot_out: Path = typer.Option(None, "--plot", help="Also draw the errors into this PNG (`nmgrad plot`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
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
            pattern=pattern, methods=names, axis=axis.value, layers=layers, steps=steps, every=every,
            max_records=max_records, samples=samples, seed=seed, mc_check=mc_check, device=device,
            backend=backend, workers=workers, threads=threads, memory_budget=memory_budget,
        )
        thresholds = [lib.parse_threshold(expr) for expr in fail_if or []]
        for t in thresholds:
            lib.check_threshold_applies(t, config)
        to_stdout = [p for p in (json_out, csv_out) if p is not None and str(p) == "-"]
        if len(to_stdout) > 1:
            raise NmgradError("--json - and --csv - both ask for stdout: send one of them to a file")
        outputs = {"--json": json_out, "--csv": csv_out, "--plot": plot_out, "--plan-out": plan_out}
        check_distinct(outputs, inputs=dumps)  # even with --force
        check_new_file(json_out, force)
        check_new_file(csv_out, force)
        check_new_file(plot_out, force)
        if recommend:  # the plan: one evaluation per candidate pattern (nmgrad_cli/plan.py)
            if fail_if:
                raise NmgradError("--recommend writes a plan: leave out --fail-if (run evaluate without --recommend)")
            from . import plan as plan_cli

            plan_cli.recommend(dumps, config, budget, candidates, names, plan_out, force,
                               err_console if to_stdout else console, json_out, csv_out)
            return
        elif plan_out is not None:
            raise NmgradError("--plan-out needs --recommend: e.g. --recommend --budget 'variance<=0.5'")
        # with --json - or --csv - stdout carries only that output: tables and notes go to stderr
        out = err_console if to_stdout else console
        main = dist_info().is_main  # under torchrun every rank evaluates a shard; rank 0 reports
        report = _run(dumps, config, quiet=quiet or not main)
        if not main:
            return
        if not quiet:
            render(report, out)
        write_json(json_out, report.to_dict())
        if csv_out is not None:
            write_csv(csv_out, report)
        if plot_out is not None:
            from ..plot import plot_results

            plot_results(report.to_dict(), plot_out)
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


def _run(dumps: list[Path], config: EvalConfig, quiet: bool = False) -> EvalReport:
    """Run the library evaluation with progress on stderr (rich on a terminal, else plain lines), in a
    process whose allocator keeps freed memory (a process-wide setting: the command's, not the library's)."""
    from ..evaluate.allocator import keep_freed_memory

    keep_freed_memory()
    return lib.evaluate(dumps, config, cli_progress(quiet))



def _angle(row: dict) -> str:
    if row["angle"] is None:
        return "-"
    se = row["angle_se"]
    return f"{row['angle']:.2f}" + (f"±{se:.2f}" if se is not None else "")


def _bias(row: dict, value) -> str:
    """A bias of 0 prints as 0: the evaluation already made every bias at or below its record's
    float64 noise floor exactly 0 (metrics.rounded_bias, the rule the JSON and --fail-if share)."""
    return "0" if value == 0 else num(value)


def _gemm(row: dict, key: str) -> str:
    g = row.get("gemm")
    if not g or g.get(key) is None:
        return "-"
    if key == "bias":
        return _bias(row, g[key])
    if key == "mc_mse":
        return f"{g[key]:.2e}" + (f"±{g['mc_mse_se']:.1e}" if g.get("mc_mse_se") is not None else "")
    return num(g[key])


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
    gemm_cols = []
    if gemm_targets:
        gemm_cols = ["mse", "bias", "variance"]
        if any((r.get("gemm") or {}).get("mc_mse") is not None for r in rows):
            gemm_cols.append("mc_mse")
        names = {"mse": "mse", "bias": "bias", "variance": "var", "mc_mse": "MC mse"}
        for col in gemm_cols:
            table.add_column(f"{'|'.join(gemm_targets)} {names[col]}", justify="right")
    table.add_column("n", justify="right")
    norms = " (".join(f"||{t}||^2" for t in gemm_targets) + ")" * (len(gemm_targets) - 1)
    table.caption = "n: grad records evaluated" + (
        f"; {'|'.join(gemm_targets)}: exact error of the backward GEMM fed with the pruned dY, relative to {norms}"
        if gemm_targets else ""
    )
    table.caption_justify = "left"
    prev = None
    for r in rows:
        labels = [str(r[c]) for c in label_cols]
        if prev is not None and labels != prev:
            table.add_section()
        shown = labels if labels != prev else [""] * len(labels)
        prev = labels
        cells = [*shown, *([r["axis"]] if show_axis else []), r["method"]]
        cells += [num(r["mse"]), _bias(r, r["bias"]), num(r["variance"]), _angle(r)]
        if mc:
            cells.append(num(r.get("mc_mse")))
        cells += [_gemm(r, col) for col in gemm_cols]
        cells.append(str(r["records"]))
        table.add_row(*map(Text, cells))  # Text: a '[' in a layer or file name is not markup
    return table


def render(report: EvalReport, out: Console) -> None:
    """The per-layer table, the ||g||^2-weighted summary table, notes."""
    cfg = report.config
    show_axis = cfg.axis == "both"
    several = len(report.files) > 1
    rows = [{**r, "file": Path(r["file"]).name} for r in report.layers]
    label_cols = ["file", "layer"] if several else ["layer"]
    head = f"nmgrad evaluate: pattern {cfg.pattern}, axis {cfg.axis}, {cfg.samples} samples, seed {cfg.seed}"
    if rows:
        print_table(out, _table(f"{head}: per layer", rows, label_cols, show_axis))
    if report.file_summary:
        frows = [{**r, "file": Path(r["file"]).name} for r in report.file_summary]
        print_table(out, _table("summary of each file (weighted by ||g||^2)", frows, ["file"], show_axis))
    if report.summary:
        title = "summary over layers" + (" of every file" if several else "") + " (weighted by ||g||^2)"
        print_table(out, _table(title, report.summary, [], show_axis))
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def csv_rows(report: EvalReport):
    """One row per (file, layer, axis, method) (level "layer"), per (file, axis, method) with several
    files ("file"), and per (axis, method) over everything ("summary")."""
    def flat(level: str, row: dict) -> dict:
        g = row.get("gemm") or {}
        out = {k: row.get(k, "") for k in CSV_FIELDS if k != "level" and not k.startswith("gemm")}
        out.update({k: g.get(v, "") for k, v in GEMM_CSV.items()})
        return {**out, "level": level, "gemm": g.get("target", "")}

    for level, rows in (("layer", report.layers), ("file", report.file_summary), ("summary", report.summary)):
        for row in rows:
            yield flat(level, row)


def write_csv(path: Path, reports: EvalReport | dict[str, EvalReport]) -> None:
    """:func:`csv_rows` of one evaluation; of several (pattern -> report, `--recommend`) with a
    leading ``pattern`` column."""
    several = isinstance(reports, dict)
    with atomic_open(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=(("pattern",) if several else ()) + CSV_FIELDS)
        w.writeheader()
        for pattern, report in (reports.items() if several else [(None, reports)]):
            for row in csv_rows(report):
                w.writerow({"pattern": pattern, **row} if several else row)

