"""Held-out evaluation of a training run: mean loss, accuracy and perplexity."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import forward_loss, to_device


def accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[float, int] | None:
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
        acc = accuracy(out, y) if isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor) else None
        if acc is not None:
            correct, counted = correct + acc[0], counted + acc[1]
    model.train(was_training)
    if n == 0:
        return {"eval_loss": None, "eval_acc": None}
    return {"eval_loss": total / n, "eval_acc": correct / counted if counted else None}


def eval_record(model: nn.Module, task, device: torch.device, step: int, limit: int) -> dict:
    """Evaluate on every rank (the held-out data is the same everywhere; no collective needed)."""
    ev = evaluate(model, task.eval_batches, task.loss_fn, device, limit)
    record = {"step": step, **ev, "eval_ppl": None}
    if task.kind == "language-model" and ev["eval_loss"] is not None and ev["eval_loss"] < 50:
        record["eval_ppl"] = math.exp(ev["eval_loss"])
    return record
