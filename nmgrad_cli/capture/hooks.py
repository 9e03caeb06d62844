"""Record dY = dL/dY of the selected GEMM sites: :class:`SiteRecorder`, a handler of
:class:`~nmgrad_cli.sites.SiteMode`.

The mode hands the recorder every GEMM whose weight is a model parameter (``nn.Linear``, HF
``Conv1D``'s ``addmm``, convolutions, the q/k/v/out projections inside ``nn.MultiheadAttention``, a
custom module's ``F.linear``). The recorder computes the GEMM as the model would and registers a
tensor hook on its output. Why on the output tensor: ``register_hook`` binds to the output's
autograd node at that moment, so it receives dL/dY of the GEMM's own output even when an in-place op
(``ReLU(inplace=True)``) later rewrites the tensor. Each call registers its own hook, so a site used
k times in one step yields calls 0..k-1.

With ``with_inputs`` it also stores the call's input X and the weight in the site's canonical layout:
W (F, I) for linear-like sites (HF ``Conv1D``'s (I, F) weight transposed, the q/k/v row block of a
packed ``in_proj_weight``), the convolution weight as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..layers import layer_matches, parse_layers
from ..sites import Site, dense_gemm


def dy_axes(kind: str, ndim: int) -> tuple[int, tuple[int, ...]]:
    """(feature_axis, token_axes) of dY: features last for Linear, dim 1 for convolutions."""
    if kind == "Linear" or ndim < 2:
        return -1, tuple(range(ndim - 1))
    return 1, (0, *range(2, ndim))


Sink = Callable[[Site, str, int, torch.Tensor], None]
"""``sink(site, kind, call, tensor)``: receives each recorded tensor (already copied)."""


def _copy(t: torch.Tensor) -> torch.Tensor:
    # own the data: autograd may reuse its buffers, and the writer reads it later on another thread
    return t.detach().to("cpu", copy=True)


class SiteRecorder:
    """Selects sites by ``--layers`` globs and module types; while :attr:`active`, sends every dY
    (and X, W) of the selected ones to ``sink``. ``selected`` lists them in first-seen order."""

    def __init__(self, layers: str | None, module_types: tuple[str, ...], sink: Sink, with_inputs: bool = False):
        self.globs = parse_layers(layers)
        self.module_types = module_types
        self.sink = sink
        self.with_inputs = with_inputs
        self.active = False
        self.selected: dict[str, Site] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        """The weight shape of each selected site in its canonical layout ((F, I) for linear-like)."""
        self._calls: dict[str, int] = {}
        self._chosen: dict[str, bool] = {}

    def chooses(self, site: Site) -> bool:
        chosen = self._chosen.get(site.name)
        if chosen is None:
            chosen = site.module_type in self.module_types and layer_matches(site.name, self.globs)
            self._chosen[site.name] = chosen
        return chosen

    def start_step(self) -> None:
        """Record from now on; call indices restart at 0."""
        self._calls = {}
        self.active = True

    def stop_step(self) -> None:
        self.active = False

    def __call__(self, site: Site, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: dict | None):
        if not self.chooses(site):
            return None
        if site.name not in self.selected:
            self.selected[site.name] = site
            self.shapes[site.name] = tuple(w.shape)
        y = dense_gemm(site, x, w, b, conv)
        if not self.active or not y.requires_grad:
            return y
        call = self._calls.get(site.name, 0)
        self._calls[site.name] = call + 1
        if self.with_inputs:
            self.sink(site, "input", call, _copy(x))
            self.sink(site, "weight", call, _copy(w))

        def grad_hook(g: torch.Tensor) -> None:
            if self.active:
                self.sink(site, "grad", call, _copy(g))

        y.register_hook(grad_hook)
        return y
