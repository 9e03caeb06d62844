"""A small trainer: one task, one gradient-pruning setting, N steps (:func:`train`).

``train(cfg, out)`` builds the task (``nmgrad_cli.models.build_task``), routes its GEMM sites
through the sparse-gradient handler (:class:`.sparse_grad.SparseGradSites`) unless the method is
``dense``, trains ``cfg.steps`` AdamW steps with the schedule of :func:`.run_config.lr_at` in the
one loop (:func:`.loop.run_steps`), evaluates on the held-out data, and writes (rank 0 only)::

    out/config.json     the TrainConfig and what it resolved to (_Run.resolved)
    out/metrics.jsonl   one line per step {"step", "loss", "acc", "lr", "steps_per_s", "time_s"}
                        and per evaluation {"step", "eval_loss", "eval_acc", "eval_ppl"}
                        (also TensorBoard events when ``tensorboard`` is installed)
    out/summary.json    final numbers (:class:`.records.RunSummary`)
    out/loss.png        loss curves, when matplotlib is installed

A non-finite loss stops the run with :class:`TrainingDiverged` after writing what it has.
Several methods side by side: :func:`.compare.compare`. The pieces: :mod:`.run_config` (the config
and schedule), :mod:`.records` (summary, hooks, steps/s), :mod:`.run_files` (the files),
:mod:`.evaluation`, :mod:`.signals` (Ctrl-C).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Interrupted, NmgradError
from ..progress import ProgressLike, resolve_progress
from .compare import compare
from .distributed import DATA_SEED_STRIDE, dist_info, process_group, resolve_device
from .plot import plot_loss_curves
from .records import Hooks, RunSummary
from .run import run_one, title
from .run_config import TrainConfig, lr_at
from .run_files import check_captures, read_curves, run_folder
from .signals import CtrlC

__all__ = [
    "DATA_SEED_STRIDE", "CtrlC", "Hooks", "RunSummary", "TrainConfig", "TrainingDiverged", "compare", "lr_at", "train",
]


class TrainingDiverged(NmgradError):
    """The loss became NaN or Inf; what was written so far is kept."""

    exit_code = 1


def train(
    cfg: TrainConfig,
    out: Path | str | None = None,
    force: bool = False,
    hooks: Hooks | None = None,
    plot: bool = True,
    progress: ProgressLike = None,
) -> RunSummary:
    """Train once as ``cfg`` says; write the run files into ``out`` (rank 0; None: write nothing).

    ``progress``: what shows the steps (:mod:`nmgrad_cli.progress`: None silent, True tqdm or plain
    lines, or a renderer such as the CLI's); ``hooks`` get the structured records.

    Raises :class:`TrainingDiverged` on a NaN/Inf loss, and :class:`Interrupted` after Ctrl-C,
    both after writing metrics.jsonl and summary.json.
    """
    out = Path(out) if out is not None else None
    info = dist_info()
    check_captures([cfg.capture], info, force)
    device = resolve_device(cfg.device, info)
    main_out = out if info.is_main else None
    with run_folder(main_out, force), process_group(info, device), \
            resolve_progress(progress if info.is_main else None, unit="steps") as bar:
        summary = run_one(cfg, main_out, hooks or Hooks(), info, device, bar)
    if main_out is not None and plot and not summary.interrupted:
        plot_loss_curves({summary.label: read_curves(out)}, out / "loss.png", title=title(cfg))
    if summary.interrupted:
        raise Interrupted(
            f"interrupted ({summary.interrupted}) after {summary.steps_done} steps"
            + (f": {out}/metrics.jsonl and summary.json hold them" if main_out is not None else "")
        )
    if summary.diverged:
        raise TrainingDiverged(summary.diverged)
    return summary
