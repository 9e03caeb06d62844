"""A small trainer: one task, one gradient-pruning setting, N steps; and ``compare`` over methods.

``train(cfg, out)`` builds the task (``nmgrad_cli.models.build_task``), swaps in sparse-gradient
layers unless the method is ``dense``, trains ``cfg.steps`` AdamW steps with the task's fixed lr
schedule (linear warm-up over 5% of the steps, cosine decay to 10%), evaluates on the held-out
data, and writes (rank 0 only)::

    out/config.json     the TrainConfig and what it resolved to
    out/metrics.jsonl   one line per step {"step", "loss", "acc", "lr", "steps_per_s", "time_s"}
                        and per evaluation {"step", "eval_loss", "eval_acc", "eval_ppl"}
    out/summary.json    final numbers (see RunSummary)
    out/loss.png        loss curves, when matplotlib is installed

A non-finite loss stops the run with :class:`TrainingDiverged` after writing what it has.
``compare(cfg, methods, out)`` runs every method from the same seed (same initial weights, same
data order) into ``out/<method>/`` and writes ``out/summary.json`` and one plot of all curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..capture.config import MODULE_TYPES
from ..capture.hooks import StepRecords
from ..capture.stream import CaptureFile
from ..errors import Interrupted, NmgradError, OutputError, OutputExistsError
from ..limits import MAX_BATCH, MAX_STEPS, check_count
from ..models import build_task, forward_loss, to_device
from ..outputs import check_output, write_text
from ..plan import load as load_plan
from ..progress import Progress, ProgressLike, resolve_progress
from ..sites import ParamIndex, SiteMode, site_report
from .config import DENSE, SparseGradConfig, parse_gemms
from .distributed import (
    DATA_SEED_STRIDE,
    DistInfo,
    all_reduce_sum,
    dist_info,
    process_group,
    rank_seed,
    resolve_device,
    wrap_ddp,
)
from .loop import StepCallbacks, run_steps
from .plot import plot_loss_curves
from .sparse_grad import SparseGradSites
from .step import autocast

__all__ = ["DATA_SEED_STRIDE", "TrainConfig", "compare", "train"]


@dataclass(frozen=True)
class TaskDefaults:
    lr: float
    """Peak learning rate of AdamW."""
    batch_size: int
    """Samples (classification) or sequences (language model) per step and rank."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""


TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "mlp": TaskDefaults(lr=2e-3, batch_size=64),
    "cnn": TaskDefaults(lr=3e-3, batch_size=64),
    "gpt": TaskDefaults(lr=2e-3, batch_size=16),
}
CUSTOM_DEFAULTS = TaskDefaults(lr=1e-3, batch_size=32)
"""For ``package.module:factory`` models."""
HF_DEFAULTS = TaskDefaults(lr=5e-4, batch_size=8)
"""For ``hf:`` models (sequences of up to 64 tokens per batch row)."""


class TrainingDiverged(NmgradError):
    """The loss became NaN or Inf; what was written so far is kept."""

    exit_code = 1


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field maps onto an ``nmgrad train`` option; written to config.json."""

    model: str = "mlp"
    """Built-in model (mlp, cnn, gpt), ``package.module:factory`` or ``hf:<folder or hub id>``."""
    data: str | None = None
    """Built-in data (digits, text), ``text:<file>`` or ``package.module:factory``; None: the model's default."""
    hf_task: str = "causal-lm"
    """For ``hf:`` models: causal-lm or seq-cls (the Auto class loaded)."""
    loss: str | None = None
    """Loss name or ``package.module:fn``; None: cross-entropy."""
    method: str = "mvue"
    """Gradient pruning method (``nmgrad methods``) or ``dense``."""
    pattern: str = "2:4"
    """N:M pattern of the pruned neural gradients."""
    grad_gemms: tuple[str, ...] = ("dx", "dw")
    """Backward GEMMs that get a pruned dY (dx: dX = dY W, dw: dW = dY^T X)."""
    layers: str = "*"
    """Comma-separated globs of the GEMM site names to sparsify (``nmgrad_cli.layers``; sites: any
    module's F.linear, x @ W / addmm (HF Conv1D), conv1d/2d/3d, attention's q/k/v/out projections)."""
    strict: bool = False
    """Fail (exit 2) when a parameter of 2+ dims gets a gradient outside every GEMM site."""
    weight_pattern: str | None = None
    """Optional N:M magnitude pattern of the weights in the forward (e.g. 2:4)."""
    weight_every: int = 100
    """Recompute the weight masks every this many steps."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int | None = None
    """Per-rank batch size; None: the task's default (TASK_DEFAULTS)."""
    lr: float | None = None
    """Peak learning rate; None: the task's default."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    eval_batches: int = 0
    """Use at most this many held-out batches per evaluation (0: all of them)."""
    seed: int = 0
    """Seeds the initial weights, the data order and the pruning draws."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    amp: str = "none"
    """Autocast the forward: none or bf16 (the sparse-gradient GEMMs then run in bf16, like autocast's)."""
    capture: str | None = None
    """Also record the dY (the neural gradients, before pruning) of the selected sites into this dump
    (``nmgrad capture``'s format; ``--compare`` writes ``<stem>.<method><suffix>`` per method)."""
    capture_every: int = 1
    """Record one step in this many (steps 0, K, 2K, ...)."""
    capture_with_inputs: bool = False
    """Also store each recorded call's X and W (for evaluate's dX/dW errors)."""
    plan: str | None = None
    """A per-site plan (``nmgrad evaluate --recommend --plan-out``): each site's dX and dW pattern and
    method, dense where the plan says so; then ``method``/``pattern`` are not used (``nmgrad_cli.plan``)."""
    backend: str = "auto"
    """Pruning backend: auto (for training: the compiled CPU kernel where it exists, which pays a
    one-time compile of ~10 s per method for several times faster steps), reference, fused, triton."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grad_gemms", parse_gemms(self.grad_gemms))
        if self.steps < 1:
            raise NmgradError(f"--steps must be >= 1, got {self.steps}")
        if self.eval_every < 0:
            raise NmgradError(f"--eval-every must be >= 0 (0: only at the end), got {self.eval_every}")
        if self.eval_batches < 0:
            raise NmgradError(f"--eval-batches must be >= 0 (0: all), got {self.eval_batches}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise NmgradError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise NmgradError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.amp not in ("none", "bf16"):
            raise NmgradError(f"--amp '{self.amp}' is unknown: choose one of none, bf16")
        if self.capture_every < 1:
            raise NmgradError(f"--capture-every must be >= 1, got {self.capture_every}")
        for option, value in (("--steps", self.steps), ("--eval-every", self.eval_every),
                              ("--eval-batches", self.eval_batches), ("--capture-every", self.capture_every)):
            check_count(option, value, 0 if option.startswith("--eval") else 1, MAX_STEPS)
        check_count("--batch-size", self.batch_size, 1, MAX_BATCH)
        self.sparse_config()  # validates method, pattern, weight pattern
        if self.plan is not None:
            load_plan(self.plan)  # a missing or damaged plan fails before any work

    @property
    def defaults(self) -> TaskDefaults:
        return TASK_DEFAULTS.get(self.model, HF_DEFAULTS if self.model.startswith("hf:") else CUSTOM_DEFAULTS)

    def sparse_config(self) -> SparseGradConfig:
        return SparseGradConfig(
            method=self.method,
            pattern=self.pattern,
            grad_gemms=self.grad_gemms,
            weight_pattern=self.weight_pattern,
            weight_every=self.weight_every,
            seed=self.seed,
            backend=self.backend,
        )

    @property
    def label(self) -> str:
        """How the run is named in tables and plots: ``mvue 2:4``, ``dense`` or ``plan variance<=0.5``."""
        text = self.method if self.method == DENSE else f"{self.method} {self.pattern}"
        if self.plan is not None:
            text = f"plan {load_plan(self.plan).budget}"
        return text + (f" +W{self.weight_pattern}" if self.weight_pattern else "")


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of the steps (at least 1), then cosine decay to peak/10."""
    warm = max(1, round(0.05 * steps))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class RunSummary:
    """The outcome of one run (summary.json; a row of the final table)."""

    label: str
    method: str
    pattern: str
    steps_done: int
    final_train_loss: float | None
    """Mean train loss over the last max(1, min(20, steps // 10)) steps."""
    final_train_acc: float | None
    eval_loss: float | None
    eval_acc: float | None
    """Accuracy (classification) or next-token accuracy (language model) on the held-out data."""
    eval_ppl: float | None
    """exp(eval_loss) for a language model."""
    wall_s: float
    steps_per_s: float
    diverged: str | None = None
    """None, or the message of the non-finite loss that stopped the run."""
    interrupted: str | None = None
    """None, or why the run stopped early (``SIGINT``: Ctrl-C); ``steps_done`` counts whole steps."""
    kind: str = ""
    layers: list[str] = field(default_factory=list)
    """The GEMM sites that got sparse gradients (or a weight mask); empty for dense."""
    not_intercepted: list[tuple[str, str]] = field(default_factory=list)
    """(parameter, reason) for each parameter of 2+ dims that got a gradient outside every GEMM site."""
    init_checksum: str = ""
    """CRC32 of the initial weights: equal across the runs of a compare."""
    world_size: int = 1
    out: str | None = None


@dataclass
class Hooks:
    """Optional callbacks for progress display (the CLI renders them; the library prints nothing)."""

    start: Callable[[str, int], None] | None = None
    """(label, total steps) at the start of a run."""
    step: Callable[[str, dict], None] | None = None
    """(label, train record) after every step."""
    eval: Callable[[str, dict], None] | None = None
    """(label, eval record) after every evaluation."""
    end: Callable[[RunSummary], None] | None = None


def _step_info(rec: dict) -> str:
    """``loss 2.1034 acc 0.412 3.1 steps/s``: what the progress line shows after a step."""
    loss = rec["loss"]
    text = "loss " + (f"{loss:.4f}" if abs(loss) < 1e4 else f"{loss:.2e}")
    if rec["acc"] is not None:
        text += f" acc {rec['acc']:.3f}"
    return text + f" {rec['steps_per_s']:.1f} steps/s"


def _call(fn, *args) -> None:
    if fn is not None:
        fn(*args)


def prepare_out(out: Path | None, force: bool) -> None:
    """Refuse an existing non-empty ``out`` without ``force`` (files are overwritten, never deleted)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"--out {out} exists: pass --force to overwrite its run files, or choose another folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only file system, a folder we may not write to, /proc
        raise OutputError(f"cannot write into --out {out}: {exc.strerror or exc}; choose another folder") from None


def _checksum(model: nn.Module) -> str:
    crc = 0
    for t in model.state_dict().values():
        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[float, int] | None:
    """(number correct, count) when output are logits over the last dim for integer targets."""
    if target.dtype in (torch.int64, torch.int32) and output.dim() == target.dim() + 1:
        return float((output.argmax(-1) == target).sum()), target.numel()
    return None


@torch.no_grad()
def evaluate(model: nn.Module, batches, loss_fn, device: torch.device, limit: int = 0) -> dict:
    """Mean loss (weighted by targets per batch) and accuracy over held-out ``batches`` (the first
    ``limit`` of them when ``limit`` > 0)."""
    was_training = model.training
    model.eval()
    total, n, correct, counted = 0.0, 0, 0.0, 0
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        out, loss, y = forward_loss(model, to_device(batch, device), loss_fn)
        k = y.numel() if isinstance(y, torch.Tensor) else 1
        total += float(loss) * k
        n += k
        acc = _accuracy(out, y) if isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor) else None
        if acc is not None:
            correct, counted = correct + acc[0], counted + acc[1]
    model.train(was_training)
    if n == 0:
        return {"eval_loss": None, "eval_acc": None}
    return {"eval_loss": total / n, "eval_acc": correct / counted if counted else None}


class _Writer:
    """metrics.jsonl, line by line and flushed, on rank 0 only (created at the first record, so a run
    that fails in its first step, e.g. on ``--layers``, leaves no metrics file)."""

    def __init__(self, out: Path | None):
        self.path = None if out is None else out / "metrics.jsonl"
        self.file = None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = self.path.open("w", encoding="utf-8")
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:  # e.g. the disk filled up
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _write_json(path: Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")  # temporary file, then rename


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


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
    prepare_out(out, force)
    _check_captures([cfg], info, force)
    device = resolve_device(cfg.device, info)
    with process_group(info, device), resolve_progress(progress if info.is_main else None, unit="steps") as bar:
        summary = _run(cfg, out if info.is_main else None, hooks or Hooks(), info, device, bar)
    if out is not None and info.is_main and plot and not summary.interrupted:
        plot_loss_curves({summary.label: read_curves(out)}, out / "loss.png", title=_title(cfg))
    if summary.interrupted:
        raise Interrupted(
            f"interrupted ({summary.interrupted}) after {summary.steps_done} steps"
            + (f": {out}/metrics.jsonl and summary.json hold them" if out is not None and info.is_main else "")
        )
    if summary.diverged:
        raise TrainingDiverged(summary.diverged)
    return summary


def _title(cfg: TrainConfig, compare: bool = False) -> str:
    """loss.png's title: model, what prunes the gradients (the method and pattern, or the plan), steps, seed."""
    what = f"pattern {cfg.pattern}" if compare else cfg.label
    return f"{cfg.model} · {what} · {cfg.steps} steps · seed {cfg.seed}"


def _run(
    cfg: TrainConfig, out: Path | None, hooks: Hooks, info: DistInfo, device: torch.device, bar: Progress
) -> RunSummary:
    d = cfg.defaults
    lr = cfg.lr or d.lr
    batch_size = cfg.batch_size or d.batch_size
    # each rank its own data order; DDP broadcasts rank 0's initial weights (= the 1-process run's)
    seed = rank_seed(cfg.seed, info)
    task = build_task(cfg.model, cfg.data, cfg.loss, seed=seed, batch_size=batch_size, hf_task=cfg.hf_task)
    model = task.model.to(device)
    checksum = _checksum(model)
    layers: list[str] = []
    scfg = cfg.sparse_config()
    index = ParamIndex(model)
    per_site = plan = None
    if cfg.plan is not None:  # per-site configs; a plan for another model fails before the first step
        plan = load_plan(cfg.plan)
        plan.check_model(list(index.unique()))
        per_site = plan.site_configs(scfg)
    sites = SparseGradSites(scfg, cfg.layers, seed_offset=info.rank, per_site=per_site,
                            missing=plan.missing_error if plan else None)
    # --capture: a recorder in front of the sparse-gradient handler records the selected sites' dY
    records = StepRecords(cfg.layers, MODULE_TYPES, cfg.capture_with_inputs, compute=sites) if cfg.capture else None
    mode = SiteMode(index, records.recorder if records else sites, watch=True)
    report = None
    net = wrap_ddp(model, device, info)
    if not any(p.requires_grad for p in model.parameters()):
        raise NmgradError("the model has no trainable parameters (all frozen?): train needs a model that trains")
    if out is not None:
        prepare_out(out, force=True)  # a --compare run's own folder
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=d.weight_decay)

    resolved = {"lr": lr, "batch_size": batch_size, "task": task.spec, "kind": task.kind, "layers": layers}
    resolved |= {"world_size": info.world_size, "device": str(device), "torch": torch.__version__}
    resolved["backend"] = scfg.backend_record(torch.float32, device)  # what prunes dY (backend.py)
    if plan is not None:
        resolved["plan"] = plan.record(cfg.plan)
    writer = _Writer(out)
    _call(hooks.start, cfg.label, cfg.steps)
    bar.start(cfg.steps, cfg.label)

    recent: list[tuple[float, float | None]] = []
    keep = max(1, min(20, cfg.steps // 10))
    last_eval: dict = {"eval_loss": None, "eval_acc": None}
    diverged = interrupted = None
    written = 0
    t_train = 0.0
    t_start = time.perf_counter()
    stats: list[float] = []
    ctrl_c = CtrlC()

    def finite(output, loss, y) -> bool:  # every rank agrees: all-reduced loss and accuracy
        tensors = isinstance(y, torch.Tensor) and isinstance(output, torch.Tensor)
        acc = _accuracy(output.detach(), y) if tensors else None
        stats[:] = all_reduce_sum(  # the last: ranks that saw Ctrl-C, so that every rank stops after this step
            [float(loss.detach()), acc[0] if acc else 0.0, acc[1] if acc else 0, 1, float(ctrl_c.seen)], device, info
        )
        return math.isfinite(stats[0] / stats[3])

    with contextlib.ExitStack() as stack:
        stream = None
        if records is not None:
            cap = stack.enter_context(CaptureFile(capture_path(cfg, info), handle_signals=False))
            run_meta = {"train": asdict(cfg), "task": task.spec, "task_kind": task.kind, "rank": info.rank,
                        "world_size": info.world_size, "device": str(device), "every": cfg.capture_every,
                        "recorded_by": "nmgrad train --capture", "backend": resolved["backend"]}
            stream = cap.open(run_meta, "none", 256 << 20)
        st = {"t0": 0.0, "recording": False, "report": None}

        def before(step: int) -> bool:
            st["t0"] = time.perf_counter()
            st["recording"] = records is not None and step % cfg.capture_every == 0
            return False

        def start(_step: int) -> None:
            if st["recording"]:
                records.recorder.start_step()

        def stop(_step: int) -> None:
            if records is not None:
                records.recorder.stop_step()

        def after_backward(step: int) -> None:
            nonlocal layers
            if st["report"] is None:  # after the first backward: what is selected, what no site covers
                report = st["report"] = site_report(index, mode, list(sites.selected.values()), cfg.layers, cfg.strict)
                mode.watch = False
                if scfg.prunes or scfg.weight_pattern is not None or plan is not None:
                    layers = list(sites.selected)
                resolved.update({"layers": layers} | report.to_dict())
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    _write_json(out / "config.json", {"config": asdict(cfg), "resolved": resolved})
                if stream is not None:
                    stream.set_run(**report.to_dict())
            if st["recording"]:
                records.write(stream, step)

        def after(step: int) -> bool:
            nonlocal t_train, recent, last_eval, written
            if cfg.weight_pattern and (step + 1) % cfg.weight_every == 0:
                sites.refresh_weight_masks_()
            t_train += time.perf_counter() - st["t0"]
            loss_sum, correct, counted, n, _ = stats
            acc_val = correct / counted if counted else None
            record = {
                "step": step + 1,
                "loss": loss_sum / n,
                "acc": acc_val,
                "lr": lr_at(step, cfg.steps, lr),
                "steps_per_s": (step + 1) / t_train,
                "time_s": time.perf_counter() - t_start,
            }
            writer.write(record)
            written = step + 1
            _call(hooks.step, cfg.label, record)
            bar.update(step + 1, _step_info(record))
            recent = (recent + [(loss_sum / n, acc_val)])[-keep:]
            is_last = step + 1 == cfg.steps
            if task.eval_batches is not None and (is_last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                with mode:  # a weight mask applies in evaluation too
                    last_eval = _eval_record(model, task, device, step + 1, cfg.eval_batches)
                writer.write(last_eval)
                _call(hooks.eval, cfg.label, last_eval)
            return stats[4] > 0  # Ctrl-C on some rank: stop here, after a whole step, on every rank

        callbacks = StepCallbacks(before=before, start=start, check=finite, stop=stop,
                                  after_backward=after_backward, after=after)
        try:
            stack.enter_context(ctrl_c)
            steps_done, stopped = run_steps(
                net, task.train_batches, task.loss_fn, opt, mode, device, cfg.steps, callbacks,
                autocast(device, cfg.amp), lambda step: lr_at(step, cfg.steps, lr), d.grad_clip, number_from=1,
            )
            if (ctrl_c.seen or (stats and stats[4] > 0)) and steps_done < cfg.steps:
                interrupted = "SIGINT"
            elif stopped:
                diverged = (  # step numbers as in metrics.jsonl: 1 is the first step
                    f"loss became {stats[0] / stats[3]} at step {steps_done + 1}: training diverged; lower --lr"
                    f" (was {lr:g}); metrics so far are kept"
                )
        except KeyboardInterrupt:  # Ctrl-C: the step in progress is dropped, what is done is summarised
            interrupted = "SIGINT"
            steps_done = written
        finally:
            writer.close()
            bar.close()
        report = st["report"]
        if stream is not None:
            why = interrupted or ("diverged" if diverged else None)
            stream.set_run(stopped=why or "done", steps_run=steps_done, layers_without_gradients=records.silent())
            cap.finish(why)
    if out is not None and report is None:  # stopped before the first backward (a non-finite loss)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", {"config": asdict(cfg), "resolved": resolved})
    accs = [a for _, a in recent if a is not None]
    summary = RunSummary(
        label=cfg.label,
        method="plan" if cfg.plan else cfg.method,  # a plan: per-site patterns (config.json resolved.plan)
        pattern="per site" if cfg.plan else cfg.pattern,
        steps_done=steps_done,
        final_train_loss=sum(v for v, _ in recent) / len(recent) if recent else None,
        final_train_acc=sum(accs) / len(accs) if accs else None,
        eval_loss=_finite(last_eval.get("eval_loss")),
        eval_acc=last_eval.get("eval_acc"),
        eval_ppl=last_eval.get("eval_ppl"),
        wall_s=time.perf_counter() - t_start,
        steps_per_s=steps_done / t_train if t_train else 0.0,
        diverged=diverged,
        interrupted=interrupted,
        kind=task.kind,
        layers=layers,
        not_intercepted=report.not_intercepted if report else [],
        init_checksum=checksum,
        world_size=info.world_size,
        out=str(out) if out is not None else None,
    )
    if out is not None:
        _write_json(out / "summary.json", asdict(summary))
    _call(hooks.end, summary)
    return summary


class CtrlC:
    """SIGINT while training (a context manager, main thread only): the first Ctrl-C lets the step in
    progress finish and stops the run after it (``seen``), the second interrupts at once
    (KeyboardInterrupt). No exception is raised at an arbitrary point by the first, so none can be
    lost in a finaliser or leave a half-written metrics line."""

    def __init__(self) -> None:
        self.seen = False
        self._old: list = []  # the handler to put back, when one was installed

    def _handler(self, signum, frame) -> None:
        if self.seen:
            raise KeyboardInterrupt
        self.seen = True

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._old = [signal.signal(signal.SIGINT, self._handler)]
        return self

    def __exit__(self, *exc) -> None:
        if self._old:
            old = self._old.pop()
            signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)


def capture_path(cfg: TrainConfig, info: DistInfo) -> Path:
    """The dump ``--capture`` writes for this rank (``<stem>.rank<r><suffix>`` under several)."""
    p = Path(cfg.capture)
    return p if info.world_size <= 1 else p.with_name(f"{p.stem}.rank{info.rank}{p.suffix}")


def _per_method(capture: str | None, method: str) -> str | None:
    if capture is None:
        return None
    p = Path(capture)
    return str(p.with_name(f"{p.stem}.{_safe_dirname(method)}{p.suffix}"))


def _check_captures(configs: list[TrainConfig], info: DistInfo, force: bool) -> None:
    """Refuse existing --capture dumps (without --force) before anything runs."""
    for c in configs:
        if c.capture:
            check_output(capture_path(c, info), force)


def _eval_record(model: nn.Module, task, device: torch.device, step: int, limit: int) -> dict:
    """Evaluate on every rank (the held-out data is the same everywhere; no collective needed)."""
    ev = evaluate(model, task.eval_batches, task.loss_fn, device, limit)
    record = {"step": step, **ev, "eval_ppl": None}
    if task.kind == "language-model" and ev["eval_loss"] is not None and ev["eval_loss"] < 50:
        record["eval_ppl"] = math.exp(ev["eval_loss"])
    return record


def read_curves(out: Path) -> dict:
    """Train and eval loss curves from ``out/metrics.jsonl`` (for plots)."""
    curves = {"step": [], "loss": [], "acc": [], "eval_step": [], "eval_loss": [], "eval_acc": []}
    path = out / "metrics.jsonl"
    if not path.exists():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            curves["step"].append(rec["step"])
            curves["loss"].append(rec["loss"])
            curves["acc"].append(rec.get("acc"))
        elif rec.get("eval_loss") is not None:
            curves["eval_step"].append(rec["step"])
            curves["eval_loss"].append(rec["eval_loss"])
            curves["eval_acc"].append(rec.get("eval_acc"))
    return curves


def _safe_dirname(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-")


def compare(
    cfg: TrainConfig,
    methods: Sequence[str],
    out: Path | str | None = None,
    force: bool = False,
    hooks: Hooks | None = None,
    plot: bool = True,
    progress: ProgressLike = None,
) -> list[RunSummary]:
    """Run ``cfg`` once per method (same seed: same initial weights, data order) into ``out/<method>/``.

    Every method is validated before the first run. A diverged run is recorded in its summary
    (``diverged``) and the others still run; raise on it yourself if you need to.
    """
    if not methods:
        raise NmgradError("--compare needs at least one method, e.g. dense,greedy,mvue")
    if len(set(methods)) != len(methods):
        raise NmgradError(f"--compare lists a method twice: {','.join(methods)}")
    configs = [  # validates each; with --capture, one dump per method
        dataclasses.replace(cfg, method=m, capture=_per_method(cfg.capture, m)) for m in methods
    ]
    out = Path(out) if out is not None else None
    info = dist_info()
    prepare_out(out, force)
    _check_captures(configs, info, force)
    device = resolve_device(cfg.device, info)
    summaries = []
    bar = resolve_progress(progress if info.is_main else None, unit="steps")
    with process_group(info, device), bar:
        for c in configs:
            sub = out / _safe_dirname(c.method) if out is not None and info.is_main else None
            summaries.append(_run(c, sub, hooks or Hooks(), info, device, bar))
            if summaries[-1].interrupted:  # Ctrl-C: no further methods
                break
    if out is not None and info.is_main:
        _write_json(out / "summary.json", [asdict(s) for s in summaries])
        if plot and not summaries[-1].interrupted:
            curves = {s.label: read_curves(out / _safe_dirname(s.method)) for s in summaries}
            plot_loss_curves(curves, out / "loss.png", title=_title(cfg, compare=True))
    if summaries[-1].interrupted:
        last = summaries[-1]
        raise Interrupted(f"interrupted ({last.interrupted}) during {last.label}: the runs so far are in summary.json")
    return summaries
