"""`nmgrad evaluate --recommend`: run the plan library, print the plan table, write the plan JSON."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import plan as lib
from ..evaluate import EvalConfig
from .common import check_new_file, print_table, write_json
from .evaluate import write_csv
from .progress import cli_progress


def recommend(
    dumps: list[Path], config: EvalConfig, budget: str, candidates: str, methods: tuple[str, ...] | None,
    plan_out: Path | None, force: bool, out: Console, json_out: Path | None = None, csv_out: Path | None = None,
) -> lib.Plan:
    """Check the plan options, evaluate every candidate, render the table and write ``plan_out``, and
    with ``json_out``/``csv_out`` the evaluations the plan was made from (the same passes)."""
    bounds = lib.parse_budget(budget)  # bad input fails before any work
    lib.parse_candidates(candidates)
    lib.admit_methods(tuple(methods or lib.DEFAULT_METHODS), bounds)
    check_new_file(plan_out, force)
    plan = lib.recommend(dumps, budget, candidates, methods or lib.DEFAULT_METHODS, config, cli_progress(False))
    render(plan, out)
    if plan_out is not None:
        lib.save(plan, plan_out)
        out.print(f"plan written to {escape(str(plan_out))}", highlight=False)
    write_json(json_out, {"kind": "nmgrad-recommend-evaluations", "budget": plan.budget,
                          "evaluations": {p: r.to_dict() for p, r in plan.evaluations.items()}})
    if csv_out is not None:
        write_csv(csv_out, plan.evaluations)
    return plan


def _choice(c: dict) -> str:
    if not c.get("runs", True):
        return "not run"
    if c["pattern"] is None:
        return "dense"
    return f"{c['pattern']} {c['method']}" + (" (biased)" if c.get("biased") else "")


def _err(c: dict, metric: str) -> str:
    """The chosen pattern's error; for a dense GEMM '> x', the smallest error of the patterns tried."""
    if not c.get("runs", True):
        return "-"
    fmt = ".2f" if metric == "angle" else ".2e"
    errs = c.get("errors")
    if errs is None:
        tried = [o["errors"][metric] for o in c.get("tried", []) if o["errors"].get(metric) is not None]
        return f"> {format(min(tried), fmt)}" if tried else "-"
    return "-" if errs.get(metric) is None else format(errs[metric], fmt)


def render(plan: lib.Plan, out: Console) -> None:
    metric = lib.parse_budget(plan.budget)[0].metric
    table = Table(
        title=f"nmgrad plan: budget {plan.budget}, candidates {','.join(plan.candidates)}", title_justify="left"
    )
    for col in ("layer", "type", "T x F x I", "dX", f"dX {metric}", "dW", f"dW {metric}", "bwd FLOPs saved"):
        table.add_column(col, justify="right" if col not in ("layer", "type", "dX", "dW") else "left")
    for name, e in plan.layers.items():
        dims = "-" if e.get("I") is None else f"{e['T']:.0f} x {e['F']} x {e['I']}"
        table.add_row(*map(Text, [
            name, e["module_type"], dims, _choice(e["dx"]), _err(e["dx"], metric), _choice(e["dw"]),
            _err(e["dw"], metric), f"{100 * e['flops_saved']:.1f}%",
        ]))
    level = {c["level"] for e in plan.layers.values() for c in (e["dx"], e["dw"]) if c["level"]}
    what = "angle of dY (degrees)" if metric == "angle" else (
        f"{metric} of the backward GEMM relative to ||dX||^2 (||dW||^2)" if level == {"gemm"}
        else f"{metric} relative to ||dY||^2 (or of the GEMM where the dump holds X and W)")
    total = "-" if plan.flops_saved is None else f"{100 * plan.flops_saved:.1f}%"
    table.caption = (f"error of the chosen pattern: {what}; dense: no candidate fits; not run: the GEMM never "
                     "runs in training (neither pruned nor counted). Saved: the kept fraction of dY with padding "
                     f"(F or T not a multiple of M keeps more than N/M). Backward GEMM FLOPs saved over these "
                     f"layers: {total}")
    table.caption_justify = "left"
    print_table(out, table)
    for note in plan.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for line in plan.warnings:
        out.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
