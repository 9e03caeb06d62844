"""Record dY = dL/dY of selected layers with forward hooks that attach a tensor hook to the output.

Why on the output tensor: a forward hook runs right after the layer, before anything downstream.
``output.register_hook`` binds the hook to the output's autograd node at that moment, so it receives
dL/dY of the layer's own output even when an in-place op (``ReLU(inplace=True)``) later rewrites the
tensor (torch docs, "Behavior of Tensor hooks when Tensor is modified in-place"). Each forward call
registers its own hook, so a module called k times in one step yields calls 0..k-1.

``nn.MultiheadAttention`` does not call its ``out_proj`` module: ``F.multi_head_attention_forward``
uses ``out_proj.weight`` directly, and the attention output *is* out_proj's output (reshaped from
(T*B, E) to the module's layout). So ``<mha>.out_proj`` is recorded from the hook on the MHA
module's first output. The packed input projection ``in_proj_weight`` (or q/k/v_proj_weight) is a
bare parameter used inside that function: its dY is not observable without changing the model, and
it is reported as skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NmgradError

TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}


@dataclass(frozen=True)
class Target:
    """One recorded layer."""

    name: str
    """Module path, e.g. ``blocks.0.attn.q`` (``<mha>.out_proj`` for attention output projections)."""
    module: nn.Module
    """The module whose forward hook records it (the MHA module for ``out_proj``)."""
    kind: str
    """Linear, Conv1d or Conv2d: the GEMM the dY feeds."""
    weight: torch.nn.Parameter | None
    """The layer's weight W (stored with ``with_inputs``)."""
    via_mha: bool = False
    """Recorded from the MultiheadAttention's output (no input X available)."""

    @property
    def module_class(self) -> str:
        return "NonDynamicallyQuantizableLinear" if self.via_mha else type(self.module).__name__


def _match(name: str, globs: list[str] | None) -> bool:
    return globs is None or any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_layers(
    model: nn.Module, layers: str | None, module_types: tuple[str, ...]
) -> tuple[list[Target], list[tuple[str, str]]]:
    """(targets in module order, [(name, why skipped)]) for the globs ``layers`` and ``module_types``.

    Raises a one-line error naming some of the model's layers when nothing matches.
    """
    globs = [g.strip() for g in layers.split(",") if g.strip()] if layers else None
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    handled: set[int] = set()
    seen: list[str] = []  # every layer of the selected types, for the error message
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            handled.add(id(m.out_proj))
            if "Linear" not in module_types:
                continue
            prefix = f"{name}." if name else ""
            proj = [f"{prefix}in_proj"] if m.in_proj_weight is not None else [f"{prefix}{p}_proj" for p in "qkv"]
            skipped += [(p, "bare parameter inside F.multi_head_attention_forward, not an nn.Linear") for p in proj
                        if _match(p, globs)]
            op = f"{prefix}out_proj"
            seen.append(op)
            if _match(op, globs):
                targets.append(Target(op, m, "Linear", m.out_proj.weight, via_mha=True))
            continue
        kind = next((t for t in module_types if isinstance(m, TYPES[t])), None)
        if kind is None or id(m) in handled:
            continue
        seen.append(name)
        if _match(name, globs):
            targets.append(Target(name, m, kind, m.weight))
    if not targets:
        what = "/".join(module_types)
        if not seen:
            raise NmgradError(f"the model has no {what} layers to capture: check --module-types (Linear,Conv1d,Conv2d)")
        shown = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "")
        raise NmgradError(f"no {what} layer matches --layers '{layers}': the model has {shown}")
    return targets, skipped


def dy_axes(kind: str, ndim: int) -> tuple[int, tuple[int, ...]]:
    """(feature_axis, token_axes) of dY: features last for Linear, dim 1 for convolutions."""
    if kind == "Linear" or ndim < 2:
        return -1, tuple(range(ndim - 1))
    return 1, (0, *range(2, ndim))


Sink = Callable[[int, str, int, torch.Tensor], None]
"""``sink(target_index, kind, call, tensor)``: receives each recorded tensor (already copied)."""


def _copy(t: torch.Tensor) -> torch.Tensor:
    # own the data: autograd may reuse its buffers, and the writer reads it later on another thread
    return t.detach().to("cpu", copy=True)


class GradRecorder:
    """Hooks ``targets``; while :meth:`recording` is on, sends every dY (and X, W) to ``sink``."""

    def __init__(self, targets: list[Target], sink: Sink, with_inputs: bool = False):
        self.targets = targets
        self.sink = sink
        self.with_inputs = with_inputs
        self.active = False
        self._calls = [0] * len(targets)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> GradRecorder:
        for i, t in enumerate(self.targets):
            self._handles.append(t.module.register_forward_hook(self._forward_hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start_step(self) -> None:
        """Record from now on; call indices restart at 0."""
        self._calls = [0] * len(self.targets)
        self.active = True

    def stop_step(self) -> None:
        self.active = False

    def _forward_hook(self, i: int):
        target = self.targets[i]

        def hook(_module: nn.Module, inputs: tuple, output) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            y = output[0] if target.via_mha else output
            if not isinstance(y, torch.Tensor) or not y.requires_grad:
                return
            call = self._calls[i]
            self._calls[i] += 1
            if self.with_inputs:
                if not target.via_mha and inputs and isinstance(inputs[0], torch.Tensor):
                    self.sink(i, "input", call, _copy(inputs[0]))
                if target.weight is not None:
                    self.sink(i, "weight", call, _copy(target.weight))

            def grad_hook(g: torch.Tensor) -> None:
                if self.active:
                    self.sink(i, "grad", call, _copy(g))

            y.register_hook(grad_hook)

        return hook

    def __enter__(self) -> GradRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
