"""Intercept every GEMM site of a forward pass at the functional level: :class:`SiteMode`.

A ``torch.overrides.TorchFunctionMode`` sees each torch function call made while it is active,
whichever module (or none) makes it. A call is a site when a model parameter is its weight operand:

- ``F.linear(x, W, b)``                                     -> site ``linear``, W (F, I)
- ``torch.matmul(x, W)``, ``x @ W``, ``torch.addmm(b, x, W)`` -> site ``matmul``, W (I, F) (HF ``Conv1D``)
- ``F.conv1d/conv2d/conv3d(x, W, b, ...)``                  -> site ``convNd``
- ``F.multi_head_attention_forward``: a mode does not see the calls *inside* a Python-level torch
  function (it is popped while handling the outer call), so this one is computed by
  :func:`.mha.mha_forward`, the same function written with its projections as sites (q, k, v of the
  packed ``in_proj_weight``, and ``out_proj``). ``nn.MultiheadAttention``'s fused fast path is never
  taken while a mode is active, and it only applies without grad anyway.

Each site call goes to ``handler(site, x, W_FI, b, conv)``: it returns the output (capture records,
train prunes the backward) or None for the dense GEMM (under ``torch.no_grad`` too: a weight mask
still applies in evaluation).
With ``watch`` on, the mode also notes which other functions used a parameter, so a parameter
that got a gradient but was never a GEMM weight is reported with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import NmgradError
from ..layers import LayerSelectionError, no_match_message
from .mha import mha_forward
from .site import ParamIndex, Site, site_name

Handler = Callable[[Site, torch.Tensor, torch.Tensor, "torch.Tensor | None", "dict | None"], "torch.Tensor | None"]
"""``handler(site, x, w, b, conv)``: w is (F, I) for linear-like sites, the conv weight otherwise;
``conv`` holds stride/padding/dilation/groups for convolutions, None for linear-like sites."""

CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def dense_gemm(site: Site, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: dict | None):
    """The site's GEMM as the model computes it: ``F.linear`` or ``F.convNd``."""
    return F.linear(x, w, b) if conv is None else CONV_FN[site.gemm](x, w, b, **conv)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


class SiteMode(TorchFunctionMode):
    """While active, routes every GEMM with a parameter of ``model`` as its weight through ``handler``.

    ``sites`` (name -> :class:`Site`, first-seen order) and ``params_seen`` grow as calls are seen;
    ``uses`` (parameter name -> function names) and ``not_intercepted`` (parameter -> reason) are
    filled while ``watch`` is True.
    """

    def __init__(self, index: ParamIndex, handler: Handler | None = None, watch: bool = True):
        super().__init__()
        self.index = index
        self.handler = handler
        self.watch = watch
        self.sites: dict[str, Site] = {}
        self.params_seen: set[str] = set()
        self.uses: dict[str, set[str]] = {}
        self.not_intercepted: dict[str, str] = {}

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            out = route(self, args, kwargs)
            if out is not NotImplemented:
                return out
        elif self.watch:
            self._note_uses(func, args, kwargs)
        return func(*args, **kwargs)

    def _note_uses(self, func, args: tuple, kwargs: dict) -> None:
        for a in (*args, *kwargs.values()):
            name = self.index.name(a)
            if name is not None:
                self.uses.setdefault(name, set()).add(getattr(func, "__name__", str(func)))

    def site(self, param: str, gemm: str, owner: str | None = None, part: str | None = None,
             rows: tuple[int, int] | None = None) -> Site:
        name = site_name(param) + (f".{part}" if part else "")
        s = self.sites.get(name)
        if s is None:
            s = Site(name, param, gemm, owner or self.index.owners.get(id(self.index.params[param]), ""), rows)
            self.sites[name] = s
        self.params_seen.add(param)
        return s

    def run(self, site: Site, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            conv: dict | None = None) -> torch.Tensor:
        """The site's output: the handler's, or the dense GEMM."""
        w = weight if site.is_conv else site.weight_fi(weight)
        b = site.bias_part(bias)
        out = self.handler(site, x, w, b, conv) if self.handler is not None else None
        return dense_gemm(site, x, w, b, conv) if out is None else out

    def note(self, param: str, reason: str) -> None:
        if self.watch:
            self.not_intercepted.setdefault(param, reason)

    # -- routes (NotImplemented: not a site, run the call as it is) -------------------------
    def _linear(self, args, kwargs):
        x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        param = self.index.name(w)
        if param is None:
            return NotImplemented
        return self.run(self.site(param, "linear"), x, w, b)

    def _matmul(self, args, kwargs):
        a, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
        param = self.index.name(w)
        if param is None or not isinstance(a, torch.Tensor) or w.dim() != 2 or a.dim() < 1:
            if self.index.name(a) is not None:
                self.note(self.index.name(a), "used as the left operand of a matmul (W @ x), not a GEMM site")
            return NotImplemented
        return self.run(self.site(param, "matmul"), a, w, None)

    def _addmm(self, args, kwargs):
        bias, x, w = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "mat1", "mat2")))
        param = self.index.name(w)
        if param is None:
            return NotImplemented
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or (bias is not None and bias.dim() != 1):
            self.note(param, "addmm with beta/alpha != 1 or a 2-d input term, not intercepted")
            return NotImplemented
        return self.run(self.site(param, "matmul"), x, w, bias)

    def _conv(self, gemm: str):
        def route(self, args, kwargs):
            x, w, b = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "weight", "bias")))
            param = self.index.name(w)
            if param is None:
                return NotImplemented
            conv = {
                "stride": _arg(args, kwargs, 3, "stride", 1),
                "padding": _arg(args, kwargs, 4, "padding", 0),
                "dilation": _arg(args, kwargs, 5, "dilation", 1),
                "groups": _arg(args, kwargs, 6, "groups", 1),
            }
            return self.run(self.site(param, gemm), x, w, b, conv)

        return route

    def _mha(self, args, kwargs):
        return mha_forward(self, args, kwargs)


_ROUTES = {
    F.linear: SiteMode._linear,
    torch.matmul: SiteMode._matmul,
    torch.Tensor.matmul: SiteMode._matmul,
    torch.Tensor.__matmul__: SiteMode._matmul,
    torch.addmm: SiteMode._addmm,
    F.conv1d: SiteMode._conv(None, "conv1d"),
    F.conv2d: SiteMode._conv(None, "conv2d"),
    F.conv3d: SiteMode._conv(None, "conv3d"),
    F.multi_head_attention_forward: SiteMode._mha,
}


VIEWS = {"t", "transpose", "permute", "view", "reshape", "T", "mT", "H", "mH", "contiguous", "flatten", "unflatten",
         "expand", "narrow", "__getitem__", "chunk", "split"}
"""Torch functions that hand a GEMM a view or copy of a parameter rather than the parameter itself."""


def unintercepted(index: ParamIndex, mode: SiteMode) -> list[tuple[str, str]]:
    """[(parameter, reason)] for every parameter with 2 or more dims that has a gradient but was
    never the weight of an intercepted GEMM (call after a backward pass)."""
    out = []
    for name, p in index.unique().items():
        if p.dim() < 2 or p.grad is None or name in mode.params_seen:
            continue
        reason = mode.not_intercepted.get(name) or _reason(name, id(p) in index.rnn, mode.uses.get(name, set()))
        out.append((name, reason))
    return out


def _reason(name: str, rnn: bool, uses: set[str]) -> str:
    """Why a parameter with a gradient is no GEMM site, in the words a researcher looks for."""
    if rnn:
        return ("fused RNN kernels (nn.GRU/nn.LSTM/nn.RNN) are not intercepted: their GEMMs run inside one "
                "kernel; write the cell with nn.Linear to sparsify it")
    if ".parametrizations." in f".{name}":
        return ("a parametrized weight (torch.nn.utils.parametrize): the GEMM takes the tensor computed from it, "
                "not the parameter, and is not intercepted")
    used = sorted(u for u in uses if not (u.startswith("__") and u.endswith("__")) or u == "__getitem__")
    if "einsum" in used:
        return "einsum is not intercepted: write the GEMM as x @ W or F.linear(x, W)"
    views = [u for u in used if u in VIEWS]
    if views:
        return (f"the GEMM gets a view of it ({', '.join(views)}), not the parameter: pass the parameter itself "
                "(F.linear(x, W) instead of x @ W.t())")
    if used:
        return f"used by {', '.join(used)}, not a linear/conv GEMM"
    return "not a weight operand of any torch call seen (e.g. used inside a fused kernel or a custom op)"


class NotInterceptedError(NmgradError):
    """``--strict``: some parameter got a gradient without being the weight of an intercepted GEMM."""


@dataclass
class SiteReport:
    """What the first step found: the selected sites and the parameters no GEMM site covers."""

    selected: list[Site]
    not_intercepted: list[tuple[str, str]]
    """(parameter, reason) for each parameter of 2+ dims that got a gradient outside every site."""
    ran_dense: list[tuple[str, str]] | None = None
    """(site, reason) for each selected site whose GEMM the handler could not take and ran dense
    (train's sparse-gradient fallbacks); None where the command does not transform the GEMMs."""

    def to_dict(self) -> dict:
        """As stored in dump attributes and config.json."""
        out = {"sites": [s.describe() for s in self.selected], "not_intercepted": dict(self.not_intercepted)}
        if self.ran_dense is not None:
            out["ran_dense"] = dict(self.ran_dense)
        return out


def site_report(
    index: ParamIndex, mode: SiteMode, selected: list[Site], layers: str | None, strict: bool = False,
    what: str = "GEMM site", ran_dense: dict[str, str] | None = None,
) -> SiteReport:
    """Check the first step's selection (call after its backward) and list what no site covers.

    ``ran_dense``: selected site -> why its GEMM ran dense (train's fallbacks), reported beside.
    Raises :class:`~nmgrad_cli.layers.LayerSelectionError` listing the site names when ``--layers``
    selected nothing, and :class:`NotInterceptedError` under ``strict`` when a parameter is uncovered
    or a selected site ran dense.
    """
    if not selected:
        if not mode.sites:
            raise LayerSelectionError(
                "the model's forward made no linear or convolution GEMM with a parameter as its weight: nothing to"
                " select (is the model built from nn.Linear/nn.Conv*, F.linear, x @ W or attention?)"
            )
        if layers is None:
            raise LayerSelectionError(f"the model has no {what}: its GEMM sites are {', '.join(list(mode.sites)[:12])}")
        raise LayerSelectionError(no_match_message(list(mode.sites), layers, what))
    dense = None if ran_dense is None else list(ran_dense.items())
    report = SiteReport(list(selected), unintercepted(index, mode), dense)
    if strict and report.not_intercepted:
        raise NotInterceptedError(
            f"--strict: {len(report.not_intercepted)} parameter(s) got gradients outside every GEMM site: "
            f"{_listed(report.not_intercepted)}; leave out --strict to run anyway"
        )
    if strict and dense:
        raise NotInterceptedError(
            f"--strict: {len(dense)} selected site(s) ran dense: {_listed(dense)}; leave them out with --layers,"
            " or leave out --strict to run anyway"
        )
    return report


def _listed(items: list[tuple[str, str]]) -> str:
    """``a (why); b (why)`` for the first four, ``and K more`` after."""
    text = "; ".join(f"{n} ({why})" for n, why in items[:4])
    return text + (f" and {len(items) - 4} more" if len(items) > 4 else "")
