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
from .host import HostCopies, owned_copy


def conv_attrs(conv: dict) -> dict:
    """A conv call's stride/padding/dilation/groups as JSON values (tuples as lists; padding may be
    'same' or 'valid'), stored as the layer attribute ``conv`` so evaluate can unfold X for dW."""
    out = {}
    for k, v in conv.items():
        out[k] = v if isinstance(v, (int, str)) else [int(x) for x in v]
    return out


def dy_axes(kind: str, ndim: int) -> tuple[int, tuple[int, ...]]:
    """(feature_axis, token_axes) of dY: features last for Linear, dim 1 for convolutions."""
    if kind == "Linear" or ndim < 2:
        return -1, tuple(range(ndim - 1))
    return 1, (0, *range(2, ndim))


Sink = Callable[[Site, str, int, torch.Tensor], None]
"""``sink(site, kind, call, tensor)``: receives each recorded tensor (already copied)."""


class SiteRecorder:
    """Selects sites by ``--layers`` globs and module types; while :attr:`active`, sends every dY
    (and X, W) of the selected ones to ``sink``. ``selected`` lists them in first-seen order."""

    def __init__(
        self, layers: str | None, module_types: tuple[str, ...], sink: Sink, with_inputs: bool = False,
        compute=None, copy: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.copy = copy or owned_copy
        """Makes the host copy ``sink`` gets (owned: autograd may reuse its buffers, and the writer reads
        it later on another thread); ready when made by default, asynchronous from a GPU with
        :class:`~.host.HostCopies` (what :class:`StepRecords` uses, handing each record's event on)."""
        self.compute = compute
        """Another site handler (train's sparse-gradient one) that computes the GEMMs; None: dense."""
        self.globs = parse_layers(layers)
        self.module_types = module_types
        self.sink = sink
        self.with_inputs = with_inputs
        self.active = False
        self.selected: dict[str, Site] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.convs: dict[str, dict] = {}
        """stride/padding/dilation/groups of each conv site (as JSON values), for the dump."""
        """The weight shape of each selected site in its canonical layout ((F, I) for linear-like)."""
        self._calls: dict[str, int] = {}
        self._chosen: dict[str, bool] = {}
        self.needs_grad: dict[str, dict[str, bool]] = {}
        """Whether each site's input and weight needed a gradient in a recorded step: its backward dX
        (dW) GEMM runs only then (the first layer's input, a frozen weight: never)."""

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
        inner = self.compute(site, x, w, b, conv) if self.compute is not None else None
        if not self.chooses(site):
            return inner
        if site.name not in self.selected:
            self.selected[site.name] = site
            self.shapes[site.name] = tuple(w.shape)
            if conv is not None:
                self.convs[site.name] = conv_attrs(conv)
        y = dense_gemm(site, x, w, b, conv) if inner is None else inner
        if not self.active or not y.requires_grad:
            return y
        call = self._calls.get(site.name, 0)
        self._calls[site.name] = call + 1
        seen = self.needs_grad.setdefault(site.name, {"input": False, "weight": False})
        seen["input"] |= bool(x.requires_grad)
        seen["weight"] |= bool(w.requires_grad)
        if self.with_inputs:
            self.sink(site, "input", call, self.copy(x))
            self.sink(site, "weight", call, self.copy(w))

        def grad_hook(g: torch.Tensor) -> None:
            if self.active:
                self.sink(site, "grad", call, self.copy(g))

        y.register_hook(grad_hook)
        return y


class StepRecords:
    """The records of the recorded steps: a :class:`SiteRecorder` whose tensors are buffered during
    a step and then queued to a dump's writer in a fixed order (what ``nmgrad capture`` and
    ``nmgrad train --capture`` both attach to their step)."""

    def __init__(self, layers: str | None, module_types: tuple[str, ...], with_inputs: bool = False, compute=None):
        self.buffer: list[tuple[Site, str, int, torch.Tensor]] = []
        self.host = HostCopies()
        """Host copies of the records: on a GPU they land asynchronously, each with its event."""
        self.recorder = SiteRecorder(
            layers, module_types, lambda site, kind, call, t: self.buffer.append((site, kind, call, t)),
            with_inputs, compute, copy=self.host.copy,
        )
        self.declared: set[str] = set()
        self.seen: set[str] = set()
        self.steps = 0

    @property
    def bytes(self) -> int:
        """Uncompressed bytes buffered for the current step."""
        return sum(t.numel() * t.element_size() for *_, t in self.buffer)

    def write(self, stream, step: int) -> None:
        """Declare new sites (in first-seen order) and queue the step's records, then end the step."""
        sites = list(self.recorder.selected.values())
        order = {"input": 0, "weight": 1, "grad": 2}
        rank = {site.name: i for i, site in enumerate(sites)}
        self.buffer.sort(key=lambda r: (rank[r[0].name], order[r[1]], r[2]))
        with_grad = {site.name for site, kind, *_ in self.buffer if kind == "grad"}
        needs = self.recorder.needs_grad
        for site in sites:
            if site.name in self.declared or site.name not in with_grad:
                continue
            g = next(r[3] for r in self.buffer if r[0].name == site.name and r[1] == "grad")
            feature_axis, token_axes = dy_axes(site.module_type, g.dim())
            stream.add_layer(
                name=site.name, module_type=site.module_type, feature_axis=feature_axis, token_axes=token_axes,
                weight_shape=self.recorder.shapes.get(site.name), module_class=site.owner, has_input=True,
                gemm=site.gemm, parameter=site.param,
                weight_layout="(F, I/groups, *kernel)" if site.is_conv else "(F, I)",
                **({"rows": list(site.rows)} if site.rows else {}),
                **({"conv": self.recorder.convs[site.name]} if site.name in self.recorder.convs else {}),
                **({"needs_grad": needs[site.name]} if site.name in needs else {}),
            )
            self.declared.add(site.name)
        for site, kind, call, tensor in self.buffer:
            ready = self.host.ready(tensor)
            if site.name in self.declared:
                stream.write(site.name, kind, step, call, tensor, ready=ready)
        stream.step_done(step)
        self.seen |= with_grad
        self.steps += 1
        self.buffer.clear()

    def drop(self) -> None:
        """Forget the current step's records (a step that is not written)."""
        self.buffer.clear()
        self.host.forget()

    def silent(self) -> list[str]:
        """Selected sites that received no gradient in any written step."""
        return [n for n in self.recorder.selected if n not in self.seen] if self.steps else []
