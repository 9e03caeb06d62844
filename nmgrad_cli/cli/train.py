"""`nmgrad train`: a short training run with N:M-sparse neural gradients, or several compared.

Exit codes: 0 done; 1 a run diverged (NaN/Inf loss; its metrics.jsonl is kept); 2 bad input.
Works under ``torchrun --nproc-per-node P -m nmgrad_cli train ...``: rank 0 prints and writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..models.hf import HF_TASK_HELP
from ..train import run_config
from ..train import trainer as lib
from ..train.distributed import dist_info
from ..train.plot import plot_available
from .common import QUIET_HELP, check_new_file, console, err_console, fail, print_table, user_errors, write_json
from .progress import cli_progress


def _batch_size_help() -> str:
    """--batch-size's help, from the defaults the trainer uses (so it stays true)."""
    by_size: dict[int, list[str]] = {}
    for name, d in run_config.TASK_DEFAULTS.items():
        by_size.setdefault(d.batch_size, []).append(name)
    builtin = ", ".join(f"{'/'.join(names)} {size}" for size, names in by_size.items())
    return (f"Per-process batch size (default by --model: {builtin}, package.module:factory "
            f"{run_config.CUSTOM_DEFAULTS.batch_size}, hf: {run_config.HF_DEFAULTS.batch_size}).")


def train(
    model: str = typer.Option(
        "mlp", "--model", help="mlp, cnn, gpt, package.module:factory (an nn.Module), or hf:FOLDER (Hugging Face)."
    ),
    hf_task: str = typer.Option("causal-lm", "--hf-task", help=HF_TASK_HELP),
    data: str = typer.Option(
        None, "--data", help="digits, text, text:FILE, or package.module:factory (default: the model's own data)."
    ),
    loss: str = typer.Option(None, "--loss", help="Loss name or package.module:fn (default: cross-entropy)."),
    method: str = typer.Option("mvue", "--method", "-m", help="Gradient pruning method (`nmgrad methods`) or dense."),
    pattern: str = typer.Option("2:4", "--pattern", "-p", help="N:M pattern of the pruned gradients, e.g. 2:4 or 1:2."),
    compare: str = typer.Option(
        None, "--compare", help="Comma-separated methods to run from the same seed and init, e.g. dense,greedy,mvue."
    ),
    grad_gemms: str = typer.Option("dx,dw", "--grad-gemms", help="Backward GEMMs on pruned dY: dx, dw, dx,dw or none."),
    weight_pattern: str = typer.Option(
        None, "--weight-pattern", help="Also N:M-prune the weights in the forward (magnitude mask), e.g. 2:4."
    ),
    weight_every: int = typer.Option(100, "--weight-every", help="Recompute the weight masks every K steps."),
    layers: str = typer.Option(
        "*", "--layers", help="Comma-separated globs of the GEMM site names to sparsify, e.g. '*self_attn*,fc1'."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail when a 2+-dim parameter gets a gradient outside every GEMM site."
    ),
    steps: int = typer.Option(200, "--steps", "-n", help="Optimizer steps."),
    batch_size: int = typer.Option(None, "--batch-size", help=_batch_size_help()),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: the task's)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (0: only at the end)."),
    eval_batches: int = typer.Option(0, "--eval-batches", help="Held-out batches per evaluation (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the weights, the data order and the pruning draws."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    amp: str = typer.Option("none", "--amp", help="Autocast the forward: none or bf16."),
    backend: str = typer.Option(
        "auto", "--backend", help="Pruning backend: auto (compiled CPU kernels where they exist), reference, "
        "fused or triton."
    ),
    threads: int = typer.Option(
        0, "--threads", help="torch CPU threads per process (0: torch's default; 1 is often fastest on a busy machine)."
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Run folder for metrics.jsonl, config.json, summary.json, loss.png "
        "(default: runs/MODEL-TIMESTAMP)."
    ),
    force: bool = typer.Option(False, "--force", help="Write into an existing --out (overwrites the run files only)."),
    capture: Path = typer.Option(
        None, "--capture", help="Also record the selected sites' neural gradients dY into this dump (as `nmgrad "
        "capture` does); with --compare one file per method."
    ),
    capture_every: int = typer.Option(1, "--capture-every", help="Record one step in this many."),
    capture_with_inputs: bool = typer.Option(
        False, "--capture-with-inputs", help="Also store X and W of the recorded steps (for evaluate's dX/dW errors)."
    ),
    plan: Path = typer.Option(
        None, "--plan", help="Per-site dX/dW patterns and methods from `nmgrad evaluate --recommend --plan-out` "
        "(instead of --method/--pattern)."
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the final table as JSON to FILE, or '-' for stdout."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Do not write loss.png."),
    quiet_opt: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Train a model with N:M-pruned neural gradients; --compare runs several methods side by side."""
    with user_errors():
        info = dist_info()
        cfg = lib.TrainConfig(
            model=model, hf_task=hf_task, data=data, loss=loss, method=method, pattern=pattern, grad_gemms=grad_gemms,
            layers=layers, weight_pattern=weight_pattern, weight_every=weight_every, steps=steps,
            batch_size=batch_size, lr=lr, eval_every=eval_every, eval_batches=eval_batches, seed=seed, device=device,
            backend=backend, strict=strict, amp=amp, capture=str(capture) if capture else None,
            capture_every=capture_every, capture_with_inputs=capture_with_inputs,
            plan=str(plan) if plan is not None else None,
        )
        methods = [m.strip() for m in compare.split(",") if m.strip()] if compare is not None else None
        if plan is not None and methods is not None:
            raise fail("--plan gives every site its method and pattern: run it without --compare")
        if out is None:
            out = Path("runs") / f"{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_new_file(json_out, force)
        if threads < 0:
            raise fail(f"--threads must be >= 0 (0: torch's default), got {threads}")
        if threads:
            torch.set_num_threads(threads)
        # with --json - stdout carries only the JSON: tables and progress go to stderr
        shown = err_console if json_out is not None and str(json_out) == "-" else console
        quiet = quiet_opt or not info.is_main
        bar = cli_progress(quiet, unit="steps")  # on stderr: rich on a terminal, plain lines in logs
        # -q keeps the warnings (on stderr), other ranks print nothing
        sites = SiteLines(err_console, warnings_only=True) if quiet_opt else SiteLines(shown)
        hooks = lib.Hooks(sites=sites) if info.is_main else None
        if methods is not None:
            summaries = lib.compare(cfg, methods, out, force=force, hooks=hooks, plot=not no_plot, progress=bar)
        else:
            summaries = [lib.train(cfg, out, force=force, hooks=hooks, plot=not no_plot, progress=bar)]
        if not info.is_main:
            return
        if not quiet:
            render(summaries, cfg, shown)
            if not no_plot and not plot_available():
                shown.print("note: matplotlib is not installed, no loss.png (pip install 'nmgrad[plot]')")
            shown.print(f"run files in {out}/", highlight=False)
        write_json(json_out, {"config": asdict(cfg), "runs": [asdict(s) for s in summaries]})
        diverged = [s for s in summaries if s.diverged]
        if diverged:
            raise fail("; ".join(f"{s.label}: {s.diverged}" for s in diverged), 1)


class SiteLines:
    """The ``sites`` hook: after a run's first step, which sites are sparse, which selected ones ran
    dense (with the reason), and what no GEMM site covers; each line once per command."""

    def __init__(self, shown: Console, warnings_only: bool = False):
        self.shown = shown
        self.warnings_only = warnings_only
        self.said: set[str] = set()

    def _say(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            self.shown.print(text, highlight=False, soft_wrap=True, markup=False)

    def __call__(self, label: str, info: dict) -> None:
        if info["layers"] and not self.warnings_only:
            self._say(f"sparse-gradient sites ({len(info['layers'])}): {', '.join(info['layers'])}")
        for name, why in info.get("ran_dense", {}).items():
            self._say(f"warning: {name} runs dense, not sparse: {why}")
        for name, why in info.get("not_intercepted", {}).items():
            self._say(f"warning: {name} not intercepted: {why}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.2e}"


def render(summaries: list[lib.RunSummary], cfg: lib.TrainConfig, console: Console) -> None:
    """The final table: one row per run (eval acc is next-token accuracy for a language model)."""
    lm = any(s.kind == "language-model" for s in summaries)
    failed = any(s.diverged for s in summaries)
    title = f"nmgrad train · {cfg.model} · {cfg.steps} steps · seed {cfg.seed}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("run", style="bold", no_wrap=True)
    warm = max((s.warmup_steps for s in summaries), default=0)
    table.caption = "train loss: final (mean of the last steps); eval: held-out data" + (
        f"; steps/s: after the first {warm} steps (warm-up: compiles, first allocations)" if warm else "")
    for name in ["steps", "train loss", "eval loss", "eval acc", *(["eval ppl"] if lm else []), "steps/s", "wall s"]:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    if failed:
        table.add_column("status", no_wrap=True)
    for s in summaries:
        row = [s.label, str(s.steps_done), _fmt(s.final_train_loss), _fmt(s.eval_loss), _fmt(s.eval_acc)]
        if lm:
            row.append(_fmt(s.eval_ppl, 2))
        row += [f"{s.steps_per_s:.1f}", f"{s.wall_s:.1f}"]
        if failed:
            row.append("[red]diverged[/]" if s.diverged else "ok")
        table.add_row(*row)
    print_table(console, table)
