"""`nmgrad capture`: train a model and stream the neural gradients dL/dY of its layers to an HDF5 dump."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from ..capture import MODULE_TYPES, CaptureConfig, run_capture
from ..capture.config import AMP, OPTIMIZERS
from ..dump.writer import COMPRESSIONS
from ..errors import NmgradError
from ..models.hf import HF_BATCH_SIZE, HF_TASK_HELP
from ..models.registry import DEFAULT_BATCH_SIZE
from .common import console, err_console, user_errors
from .progress import cli_progress


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise NmgradError(f"{option} '{value}' is unknown: choose one of {', '.join(choices)}")
    return value


def capture(
    model: str = typer.Option(
        ..., "--model", help="mlp, cnn, gpt, package.module:factory returning an nn.Module, or hf:FOLDER "
        "(a Hugging Face model, offline)."
    ),
    hf_task: str = typer.Option("causal-lm", "--hf-task", help=HF_TASK_HELP),
    data: str = typer.Option(
        None, "--data", help="digits, text, text:FILE, or package.module:factory returning (input, target) "
        "or dict batches (default: the built-in model's data; required for your own model)."
    ),
    loss: str = typer.Option(None, "--loss", help="cross_entropy (default) or package.module:fn(output, target)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dump (.h5); under torchrun one file per rank."),
    steps: int = typer.Option(10, "--steps", help="Optimizer steps after the warm-up."),
    every: int = typer.Option(1, "--every", help="Record one step in this many."),
    warmup: int = typer.Option(0, "--warmup", help="Optimizer steps before recording starts."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model and data: same seed, same file contents."),
    layers: str = typer.Option(
        None, "--layers", help="Comma-separated globs on GEMM site names, e.g. 'fc*,blocks.*.mlp.*'."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail when a 2+-dim parameter gets a gradient outside every GEMM site."
    ),
    module_types: str = typer.Option(
        ",".join(MODULE_TYPES), "--module-types", help="GEMM families recorded: any of Linear,Conv1d,Conv2d,Conv3d."
    ),
    with_inputs: bool = typer.Option(False, "--with-inputs", help="Also store each layer's input X and weight W."),
    compression: str = typer.Option(
        "none", "--compression", help="none (default: float gradients barely compress), lzf or gzip."
    ),
    max_bytes: str = typer.Option(
        None, "--max-bytes", help="Byte budget of the recorded tensors (e.g. 500M, 2G); stops cleanly before it."
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", help=f"Batch size (default: digits {DEFAULT_BATCH_SIZE['digits']}, text and text:FILE "
        f"{DEFAULT_BATCH_SIZE['text']}, text:FILE or images:FOLDER with an hf: model {HF_BATCH_SIZE}; a "
        "package.module:factory's data: its own default)."
    ),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto (cuda when available)."),
    amp: str = typer.Option("none", "--amp", help="Autocast the forward: none or bf16."),
    data_dir: Path = typer.Option(
        None, "--data-dir", help="Folder of the sample data (default: $NMGRAD_SAMPLE_DATA or sample_data/)."
    ),
    threads: int = typer.Option(
        0, "--threads", help="torch CPU threads (0: torch's default; 1 is often fastest on a busy machine)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a model for --warmup + --steps optimizer steps and record dL/dY of every selected layer.

    Ctrl-C or SIGTERM finishes the current step and leaves a valid file marked interrupted.
    """
    with user_errors():
        if threads < 0:
            raise NmgradError(f"--threads must be >= 0 (0: torch's default), got {threads}")
        if threads:
            torch.set_num_threads(threads)
        config = CaptureConfig(
            model=model, hf_task=hf_task, data=data, loss=loss, out=str(out), steps=steps, every=every, warmup=warmup,
            seed=seed,
            layers=layers, module_types=module_types, with_inputs=with_inputs, strict=strict,
            compression=_choice(compression, COMPRESSIONS, "--compression"), max_bytes=parse_bytes(max_bytes),
            batch_size=batch_size, optimizer=_choice(optimizer, OPTIMIZERS, "--optimizer"), lr=lr, device=device,
            amp=_choice(amp, AMP, "--amp"), data_dir=str(data_dir) if data_dir else None, force=force,
        )
        result = run_capture(config, progress=cli_progress(quiet, unit="steps"))
    prefix = f"rank {result.rank}: " if result.world_size > 1 else ""
    for name, why in result.skipped:
        err_console.print(
            f"[yellow]warning:[/] {prefix}{name} not intercepted: {why}", highlight=False, soft_wrap=True
        )
    if result.silent:
        err_console.print(
            f"[yellow]warning:[/] {prefix}no gradient reached {', '.join(result.silent)} (unused or frozen)",
            highlight=False, soft_wrap=True,
        )
    how = {"done": "complete", "max-bytes": "complete, stopped at --max-bytes"}.get(result.stopped)
    status = how or f"interrupted ({result.stopped})"
    console.print(f"{prefix}sites: {', '.join(result.layers)}", highlight=False, soft_wrap=True)
    console.print(
        f"{prefix}wrote {result.path}: {len(result.layers)} layers, {result.steps_recorded} recorded steps "
        f"of {result.steps_run}, {result.bytes_recorded / 1e6:.1f} MB of tensors, "
        f"{result.file_bytes / 1e6:.1f} MB on disk, {status}",
        highlight=False, soft_wrap=True,
    )
    if result.interrupted:
        raise typer.Exit(130)


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_bytes(text: str | None) -> int | None:
    """``"500M"`` -> 500_000_000, ``"1Gi"`` -> 2**30, ``"1234"`` -> 1234 (a trailing B is allowed)."""
    if text is None:
        return None
    s = text.strip().upper().removesuffix("B")
    num = s.rstrip("KMGTI")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not (0 < value < float("inf")):  # also refuses nan
        raise NmgradError(f"--max-bytes '{text}' is not a size: use e.g. 500M, 2G, 1Gi or a number of bytes")
    return int(value * _UNITS[unit])
