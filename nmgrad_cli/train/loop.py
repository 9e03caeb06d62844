"""The training loop of ``nmgrad train`` and ``nmgrad capture``: :func:`run_steps`.

One loop for both commands: each step sets the learning rate (train's schedule), draws a batch,
runs :func:`.step.forward_backward` through the GEMM-site mode (under autocast), clips and takes
the optimizer step. What differs between the commands are callbacks around it: capture starts
and stops its recorder and writes the step, train checks the loss, logs and evaluates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models import to_device
from .step import forward_backward


@dataclass
class StepCallbacks:
    """What a command adds around each step (all optional)."""

    before: Callable[[int], bool] | None = None
    """(step) before the batch is drawn; True stops the loop (e.g. a signal during the set-up)."""
    start: Callable[[int], None] | None = None
    """(step) right before the forward (capture: start recording)."""
    check: Callable[[object, torch.Tensor, object], bool] | None = None
    """(output, loss, target) between forward and backward; False stops the loop there (train: a
    non-finite loss), without a backward or an optimizer step."""
    stop: Callable[[int], None] | None = None
    """(step) after the backward, also when the step raised (capture: stop recording)."""
    after_backward: Callable[[int], None] | None = None
    """(step) after the backward, before the optimizer step (both: the first step's site report)."""
    after: Callable[[int], bool] | None = None
    """(step) after the optimizer step; True stops the loop (budget, signal)."""


def run_steps(
    net: nn.Module,
    batches,
    loss_fn: Callable,
    opt: torch.optim.Optimizer,
    mode,
    device: torch.device,
    steps: int,
    callbacks: StepCallbacks,
    amp=None,
    lr_at: Callable[[int], float] | None = None,
    clip: float = 0.0,
    number_from: int = 0,
) -> tuple[int, bool]:
    """Run up to ``steps`` optimizer steps; returns (steps completed, stopped by ``check``).

    ``number_from``: the number a failing step is named by in errors for step index 0 (train counts
    from 1 as in metrics.jsonl, capture from 0 as in its records)."""
    cb = callbacks
    net.train()
    done = 0
    ok = [True]  # what check said in this step

    def check(output, loss, y) -> bool:
        ok[0] = cb.check is None or cb.check(output, loss, y)
        return ok[0]

    for step in range(steps):
        if cb.before is not None and cb.before(step):
            break
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        ok[0] = True
        batch = to_device(next(batches), device)
        if cb.start is not None:
            cb.start(step)
        try:
            forward_backward(net, batch, loss_fn, mode, opt, step + number_from, amp, check)
        finally:
            if cb.stop is not None:
                cb.stop(step)
        if not ok[0]:
            return done, True
        if cb.after_backward is not None:
            cb.after_backward(step)
        if clip:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        done += 1
        if cb.after is not None and cb.after(step):
            break
    return done, False
