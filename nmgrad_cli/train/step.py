"""One training step's forward and backward, shared by ``nmgrad train`` and ``nmgrad capture``.

Both commands run the model through the GEMM-site interception (:class:`~nmgrad_cli.sites.SiteMode`:
train prunes the selected sites' gradients, capture records them), under optional autocast, with
the loss from :func:`~nmgrad_cli.models.forward_loss` (``loss_fn(model(x), y)``, or a Hugging Face
output's ``.loss`` for dict batches). A step that fails inside the user's model or loss becomes one
line naming the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..errors import NmgradError
from ..models import forward_loss
from ..models.spec import one_line
from .distributed import lost_rank


def autocast(device: torch.device, amp: str):
    """The forward's autocast context: ``bf16`` or ``none``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def forward_backward(
    net: nn.Module, batch, loss_fn: Callable, mode, opt: torch.optim.Optimizer, step: int, amp=None,
    check: Callable[[object, torch.Tensor, object], bool] | None = None,
) -> tuple:
    """(output, loss, target) after ``opt.zero_grad`` and ``loss.backward()`` of one batch.

    ``check(output, loss, target)`` runs between forward and backward; returning False skips the backward (the
    trainer stops on a non-finite loss there). Errors other than :class:`NmgradError` raised by
    the model, the loss or autograd become ``training step S failed: Type: message; ...``.
    """
    try:
        with amp or contextlib.nullcontext(), mode:
            output, loss, y = forward_loss(net, batch, loss_fn)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise NmgradError(
                f"the loss returned {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                + ": --loss must return a scalar tensor"
            )
        if check is not None and not check(output, loss, y):
            return output, loss, y
        opt.zero_grad(set_to_none=True)
        loss.backward()
    except NmgradError:
        raise
    except Exception as exc:
        lost = lost_rank(exc, f"in training step {step}")
        if lost is not None:
            raise lost from None
        raise NmgradError(
            f"training step {step} failed: {one_line(exc)}; check that --data yields batches "
            f"the --model accepts and --loss fits its output"
        ) from None
    return output, loss, y
