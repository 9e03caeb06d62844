"""What a run reports: :class:`RunSummary` (summary.json, a row of the table), the callbacks a
renderer gets (:class:`Hooks`), and the honest steps/s of :class:`StepTimer`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

WARMUP_STEPS = 2
"""Steps left out of steps/s: the first ones pay one-time costs (kernel compiles, autotuning, the
allocator's first requests), 10 s or more for a compiled CPU kernel, seconds for Triton."""


def warmup_steps(steps: int) -> int:
    """How many of ``steps`` steps are warm-up: :data:`WARMUP_STEPS`, leaving at least one timed step."""
    return max(0, min(WARMUP_STEPS, steps - 1))


class StepTimer:
    """Training time per step (the forward, backward and optimizer step; not evaluation).

    ``steps_per_s`` counts the steps after the first ``warmup`` (:func:`warmup_steps`) over their
    time; ``steps_per_s_all`` every step over all the time. On CUDA each timing ends with a
    synchronize, so the step's kernels are in its own time."""

    def __init__(self, steps: int, device: torch.device):
        self.warmup = warmup_steps(steps)
        self.device = device
        self.done = 0
        self.total_s = self.warm_s = 0.0
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        dt = time.perf_counter() - self._t0
        self.done += 1
        self.total_s += dt
        if self.done <= self.warmup:
            self.warm_s += dt

    @property
    def timed(self) -> int:
        """Steps after the warm-up (0 while still warming up)."""
        return max(0, self.done - self.warmup)

    @property
    def steps_per_s_all(self) -> float:
        return self.done / self.total_s if self.total_s > 0 else 0.0

    @property
    def steps_per_s(self) -> float:
        """After the warm-up; every step so far while there is none after it."""
        timed_s = self.total_s - self.warm_s
        return self.timed / timed_s if self.timed and timed_s > 0 else self.steps_per_s_all

    @property
    def warmup_done(self) -> int:
        """How many steps ``steps_per_s`` leaves out (0 when it counts every step)."""
        return self.warmup if self.timed else 0


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
    """Training steps per second after the first ``warmup_steps`` steps (see :class:`StepTimer`)."""
    steps_per_s_all: float = 0.0
    """Training steps per second over every step, warm-up included."""
    warmup_steps: int = 0
    """How many first steps ``steps_per_s`` leaves out (one-time compile and allocation costs)."""
    diverged: str | None = None
    """None, or the message of the non-finite loss that stopped the run."""
    interrupted: str | None = None
    """None, or why the run stopped early (``SIGINT``: Ctrl-C); ``steps_done`` counts whole steps."""
    kind: str = ""
    layers: list[str] = field(default_factory=list)
    """The GEMM sites that got sparse gradients (or a weight mask) in every call; empty for dense."""
    ran_dense: list[tuple[str, str]] = field(default_factory=list)
    """(site, reason) for each selected site whose GEMM the sparse path could not take: it ran dense."""
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
    sites: Callable[[str, dict], None] | None = None
    """(label, {"layers", "ran_dense", "not_intercepted"}) after the first backward: what is sparse."""
    step: Callable[[str, dict], None] | None = None
    """(label, train record) after every step."""
    eval: Callable[[str, dict], None] | None = None
    """(label, eval record) after every evaluation."""
    end: Callable[[RunSummary], None] | None = None


def call(fn, *args) -> None:
    """``fn(*args)`` for a hook that may be None."""
    if fn is not None:
        fn(*args)


def step_info(rec: dict) -> str:
    """``loss 2.1034 acc 0.412 3.1 steps/s``: what the progress line shows after a step."""
    loss = rec["loss"]
    text = "loss " + (f"{loss:.4f}" if abs(loss) < 1e4 else f"{loss:.2e}")
    if rec["acc"] is not None:
        text += f" acc {rec['acc']:.3f}"
    return text + f" {rec['steps_per_s']:.1f} steps/s"
