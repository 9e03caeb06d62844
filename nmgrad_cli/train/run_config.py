"""What one training run is: :class:`TrainConfig` (every ``nmgrad train`` option), the per-task
defaults it falls back on, and the learning-rate schedule :func:`lr_at`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import NmgradError
from ..limits import MAX_BATCH, MAX_STEPS, check_count
from ..plan import load as load_plan
from .config import DENSE, SparseGradConfig, parse_gemms

__all__ = ["CUSTOM_DEFAULTS", "HF_DEFAULTS", "TASK_DEFAULTS", "TaskDefaults", "TrainConfig", "lr_at"]


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


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field maps onto an ``nmgrad train`` option; written to config.json."""

    model: str = "mlp"
    """Built-in model (mlp, cnn, gpt), ``package.module:factory`` or ``hf:<folder or hub id>``."""
    data: str | None = None
    """Built-in data (digits, text), ``text:<file>`` or ``package.module:factory``; None: the model's default."""
    hf_task: str = "causal-lm"
    """For ``hf:`` models: causal-lm, seq-cls, seq2seq-lm or image-cls (the Auto class loaded)."""
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
        check_count("--steps", self.steps, 1, MAX_STEPS)
        check_count("--eval-every", self.eval_every, 0, MAX_STEPS, meaning="0: only at the end")
        check_count("--eval-batches", self.eval_batches, 0, MAX_STEPS, meaning="0: all")
        check_count("--capture-every", self.capture_every, 1, MAX_STEPS)
        check_count("--batch-size", self.batch_size, 1, MAX_BATCH)
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise NmgradError(f"--lr must be a positive number, got {self.lr}")
        if self.amp not in ("none", "bf16"):
            raise NmgradError(f"--amp '{self.amp}' is unknown: choose one of none, bf16")
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
