"""Sparse-gradient GEMMs: Linear and convolutions whose backward prunes the neural gradient dY N:M.

The forward is the dense GEMM's (optionally with an N:M magnitude mask on the weights). In the
backward dY is pruned with a registry method before each GEMM that consumes it, along the GEMM's
reduction axis: features for dX = dY W, tokens for dW = dY^T X, with independent draws (see
:mod:`.gemm`). The bias gradient sum_T dY is a reduction, not a GEMM a sparse kernel would speed
up, so it uses the dense dY (exact, and no extra variance).

With a weight pattern the forward uses W * mask, the mask keeping the N largest |W| of every M
consecutive in-features (greedy, recomputed by ``refresh_weight_masks_``); dX uses the masked
W, and dW is passed straight through to all weights (a straight-through estimator, as in SR-STE
without its decay term), so pruned weights keep learning and the mask can change.

One path applies them to a model: :class:`SparseGradSites`, the handler of the GEMM-site
interception (:class:`~nmgrad_cli.sites.SiteMode`) that ``nmgrad train`` runs. What a site's call
cannot take runs dense and is recorded with its reason (``SparseGradSites.fallback``).
``sparsify_gradients_(model, method, pattern)``, the older module swap, is a thin alias of it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NmgradError
from ..layers import layer_matches, parse_layers
from ..patterns import Pattern
from ..prune import prune
from ..sites import ParamIndex, Site, SiteMode, dense_gemm, site_name
from .config import SparseGradConfig
from .gemm import conv_grad_gemms, grad_gemms

# ---------------------------------------------------------------------------------------------
# Linear


def sparse_grad_linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Y = X W^T + b; X (..., I), W (F, I) -> Y (..., F)."""
    return F.linear(x, w, b)


def sparse_grad_linear_bwd(dy, x, w, cfg, gen, need_dx=True, need_dw=True, need_db=True):
    """(dX, dW, db) of Y = X W^T + b, dX and dW from pruned dY (:func:`.gemm.grad_gemms`), db dense."""
    dy2d = dy.reshape(-1, dy.shape[-1])  # (T, F)
    x2d = x.reshape(-1, x.shape[-1])  # (T, I)
    dx2d, dw = grad_gemms(dy2d, x2d, w, cfg, gen, need_dx, need_dw)
    dx = None if dx2d is None else dx2d.reshape(x.shape)
    db = dy2d.sum(0) if need_db else None
    return dx, dw, db


class _SparseGradLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, cfg, gen):
        w = weight if mask is None else weight * mask
        ctx.save_for_backward(x, w)
        ctx.cfg, ctx.gen = cfg, gen
        return sparse_grad_linear_fwd(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = sparse_grad_linear_bwd(dy, x, w, ctx.cfg, ctx.gen, need_dx, need_dw, need_db)
        return dx, dw, db, None, None, None


def sparse_grad_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: SparseGradConfig,
    generator: torch.Generator | None = None,
    weight_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` whose backward prunes dY as ``cfg`` says."""
    if x.shape[-1] != weight.shape[-1]:
        raise NmgradError(f"input has {x.shape[-1]} features but the weight expects {weight.shape[-1]}")
    if weight_mask is not None and weight_mask.shape != weight.shape:
        raise NmgradError(f"weight mask shape {tuple(weight_mask.shape)} != weight shape {tuple(weight.shape)}")
    return _SparseGradLinearFunction.apply(x, weight, bias, weight_mask, cfg, generator)


# ---------------------------------------------------------------------------------------------
# Conv1d / Conv2d / Conv3d

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def sparse_grad_conv_fwd(x, w, b, conv: dict) -> torch.Tensor:
    """The dense convolution: X (B, I, *S) -> Y (B, C, *S'), Conv1d/2d/3d by ``x.dim()``."""
    return _CONV[x.dim() - 2](x, w, b, **conv)


def sparse_grad_conv_bwd(dy, x, w, conv, cfg, gen, need_dx=True, need_dw=True, need_db=True):
    """(dX, dW, db) of a convolution, dX and dW from pruned dY (:func:`.gemm.conv_grad_gemms`), db dense."""
    dx, dw = conv_grad_gemms(dy, x, w, conv, cfg, gen, need_dx, need_dw)
    db = dy.sum((0, *range(2, dy.dim()))) if need_db else None
    return dx, dw, db


sparse_grad_conv2d_fwd = sparse_grad_conv_fwd
sparse_grad_conv2d_bwd = sparse_grad_conv_bwd


class _SparseGradConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, conv, cfg, gen):
        w = weight if mask is None else weight * mask
        ctx.save_for_backward(x, w)
        ctx.conv, ctx.cfg, ctx.gen = conv, cfg, gen
        return sparse_grad_conv_fwd(x, w, bias, conv)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = sparse_grad_conv_bwd(dy, x, w, ctx.conv, ctx.cfg, ctx.gen, need_dx, need_dw, need_db)
        return dx, dw, db, None, None, None, None


def sparse_grad_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: SparseGradConfig,
    generator: torch.Generator | None = None,
    weight_mask: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv1d/2d/3d`` (by the weight's dims; zero padding given as ints) whose backward prunes dY."""
    nd = weight.dim() - 2
    if nd not in _CONV or x.dim() != nd + 2:
        raise NmgradError(
            f"sparse-gradient convolution needs a batched {nd + 2}-d input (B, C, ...) for a {weight.dim()}-d weight,"
            f" got {x.dim()}-d"
        )
    if isinstance(padding, str):
        raise NmgradError(f"padding '{padding}' is not supported by the sparse-gradient convolution: give ints")
    if weight_mask is not None and weight_mask.shape != weight.shape:
        raise NmgradError(f"weight mask shape {tuple(weight_mask.shape)} != weight shape {tuple(weight.shape)}")
    conv = {"stride": _tuple(stride, nd), "padding": _tuple(padding, nd), "dilation": _tuple(dilation, nd),
            "groups": int(groups)}
    return _SparseGradConvFunction.apply(x, weight, bias, weight_mask, conv, cfg, generator)


def sparse_grad_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: SparseGradConfig,
    generator: torch.Generator | None = None,
    weight_mask: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` (zero padding given as ints) whose backward prunes dY as ``cfg`` says."""
    if x.dim() != 4:
        raise NmgradError(f"sparse-gradient Conv2d needs a 4-d input (B, C, H, W), got {x.dim()}-d")
    return sparse_grad_conv(x, weight, bias, cfg, generator, weight_mask, stride, padding, dilation, groups)


def _tuple(v, nd: int) -> tuple[int, ...]:
    return (int(v),) * nd if isinstance(v, int) else tuple(int(a) for a in v)


# ---------------------------------------------------------------------------------------------
# GEMM sites: the one path (the trainer's; any module's F.linear, x @ W, conv, attention projections)


def layer_seed(seed: int, name: str, offset: int = 0) -> int:
    """A stable per-site seed: from the config seed, the site name (CRC32) and a rank offset."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) + int(offset) * 7_919_993) % (1 << 62)


def weight_nm_mask(weight: torch.Tensor, pattern: str | Pattern) -> torch.Tensor:
    """Boolean-valued (weight dtype) mask keeping the N largest |W| per M consecutive in-features.

    In-features are dim 1 onward flattened (I for Linear (F, I), I*kh*kw for Conv2d (C, I, kh, kw))."""
    w2d = weight.detach().reshape(weight.shape[0], -1)
    kept = prune(w2d, "greedy", pattern, dim=-1, backend="reference")
    return (kept != 0).to(weight.dtype).reshape(weight.shape)


class SparseGradSites:
    """A :class:`~nmgrad_cli.sites.SiteMode` handler: every site selected by ``layers`` runs its GEMM
    through :func:`sparse_grad_linear` (W in (F, I) layout: HF ``Conv1D``'s transpose, a q/k/v row
    block) or :func:`sparse_grad_conv`, so its backward prunes dY as ``cfg`` says.

    Each site has its own generator per device, seeded by :func:`layer_seed` from its name and
    ``seed_offset`` (the rank), and, with ``cfg.weight_pattern``, its own weight mask, computed at
    first use and again after :meth:`refresh_weight_masks_`.

    What happened to each selected site (first-seen order):

    - ``selected``: every site ``layers`` matched;
    - ``sparse``: the sites that ran the sparse-gradient GEMM (or a weight mask) in training;
    - ``fallback``: site -> why it ran the dense GEMM (a call the sparse path cannot take); such a
      site is never reported as sparse (:meth:`sparse_sites`), and ``--strict`` refuses it;
    - ``planned_dense``: the sites a per-site plan keeps dense in both GEMMs.

    ``per_site`` (``train --plan``): site name -> that site's config (its dX and dW pattern and
    method, :meth:`SparseGradConfig.for_gemm`); a selected site it lacks is an error (``missing``).
    """

    def __init__(self, cfg: SparseGradConfig, layers: str | None = "*", seed_offset: int = 0,
                 per_site: dict[str, SparseGradConfig] | None = None, missing=None):
        self.cfg = cfg
        self.per_site = per_site
        self.missing = missing
        self.globs = parse_layers(layers)
        self.seed_offset = seed_offset
        self.selected: dict[str, Site] = {}
        self.sparse: dict[str, Site] = {}
        self.fallback: dict[str, str] = {}
        self.planned_dense: dict[str, Site] = {}
        self._chosen: dict[str, bool] = {}
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}
        self._masks: dict[str, torch.Tensor] = {}

    def sparse_sites(self) -> list[str]:
        """The sites that got sparse gradients (or a weight mask) in every call: no fallback."""
        return [n for n in self.sparse if n not in self.fallback]

    def generator(self, name: str, device: torch.device) -> torch.Generator:
        """Site ``name``'s generator on ``device`` (created and seeded on first use)."""
        key = (name, torch.device(device))
        if key not in self._generators:
            seed = layer_seed(self.cfg.seed, name, self.seed_offset)
            self._generators[key] = torch.Generator(device=key[1]).manual_seed(seed)
        return self._generators[key]

    def refresh_weight_masks_(self, name: str | None = None) -> None:
        """Recompute the weight masks (of site ``name`` only, if given) at the next use."""
        if name is None:
            self._masks.clear()
        else:
            self._masks.pop(name, None)

    def mask(self, site: Site, w: torch.Tensor) -> torch.Tensor | None:
        """Site ``site``'s N:M weight mask for its weight ``w`` (None without a weight pattern)."""
        if self.cfg.weight_pattern is None:
            return None
        mask = self._masks.get(site.name)
        if mask is None:
            mask = self._masks[site.name] = weight_nm_mask(w, self.cfg.parsed_weight_pattern)
        return mask

    def _config(self, site: Site) -> SparseGradConfig:
        if self.per_site is None:
            return self.cfg
        cfg = self.per_site.get(site.name)
        if cfg is None:
            raise self.missing(site.name)
        return cfg

    def __call__(self, site: Site, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: dict | None):
        chosen = self._chosen.get(site.name)
        if chosen is None:
            chosen = self._chosen[site.name] = layer_matches(site.name, self.globs)
        if not chosen:
            return None
        self.selected.setdefault(site.name, site)
        cfg = self._config(site)
        if not (cfg.prunes or cfg.weight_pattern is not None):
            if self.per_site is not None:
                self.planned_dense.setdefault(site.name, site)
            return None
        mask = self.mask(site, w)
        if not torch.is_grad_enabled():  # evaluation: the masked forward, nothing to prune
            return None if mask is None else dense_gemm(site, x, w * mask, b, conv)
        if conv is None and x.shape[-1] != w.shape[-1]:
            return None  # the dense call raises torch's own shape error
        if conv is not None and conv["padding"] == "same" and any(v != 1 for v in _tuple(conv["stride"], w.dim() - 2)):
            return None  # torch refuses 'same' with a stride: the dense call raises its error
        reason = unsupported(x, w)
        if reason is not None:
            self.fallback.setdefault(site.name, reason)
            return None
        gen = self.generator(site.name, x.device) if cfg.prunes else None
        kind = x.device.type
        amp = torch.is_autocast_enabled(kind)
        if amp:  # as autocast runs linear/conv: inputs cast to its dtype (autograd casts dW, dX back)
            dt = torch.get_autocast_dtype(kind)
            x, w = x.to(dt), w.to(dt)
            b = None if b is None else b.to(dt)
            mask = None if mask is None else mask.to(dt)
        self.sparse.setdefault(site.name, site)
        with torch.autocast(kind, enabled=False) if amp else contextlib.nullcontext():
            if conv is None:
                return sparse_grad_linear(x, w, b, cfg, gen, mask)
            unbatched = x.dim() == w.dim() - 1  # (C, *S): as a batch of one, as torch does
            x = x.unsqueeze(0) if unbatched else x
            x, conv = explicit_padding(x, w, conv)
            y = sparse_grad_conv(x, w, b, cfg, gen, mask, **conv)
            return y.squeeze(0) if unbatched else y


def unsupported(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why the sparse-gradient GEMM cannot take this call (it then runs dense), or None."""
    for what, t in (("input", x), ("weight", w)):
        if t.layout != torch.strided:
            return f"the {what} is a {t.layout} tensor: the sparse path takes strided tensors only; ran dense"
        if not t.is_floating_point():
            return f"the {what} is {t.dtype}: the sparse path prunes real floating-point tensors only; ran dense"
    return None


def explicit_padding(x: torch.Tensor, w: torch.Tensor, conv: dict) -> tuple[torch.Tensor, dict]:
    """(x, conv) with a string padding made explicit: ``'valid'`` is 0; ``'same'`` pads
    dilation * (k - 1) in total per spatial dim, half on each side, and an odd total's extra element
    on the right/bottom (as torch does, with ``F.pad`` first), so every convolution has int padding."""
    padding = conv["padding"]
    if not isinstance(padding, str):
        return x, conv
    if padding == "valid":
        return x, {**conv, "padding": 0}
    nd = w.dim() - 2
    total = [d * (k - 1) for d, k in zip(_tuple(conv["dilation"], nd), w.shape[2:])]
    extra = [t % 2 for t in total]
    if any(extra):  # F.pad's pairs run from the last dim to the first
        x = F.pad(x, [v for e in reversed(extra) for v in (0, e)])
    return x, {**conv, "padding": tuple(t // 2 for t in total)}


# ---------------------------------------------------------------------------------------------
# The older module swap, a thin alias of the site path


class _SiteLayer(nn.Module):
    """A swapped-in layer: the dense layer's Parameters under the same names; its forward is the
    dense layer's forward run through a :class:`~nmgrad_cli.sites.SiteMode` with the shared
    :class:`SparseGradSites` handler, so it prunes exactly as ``nmgrad train`` does."""

    gemm = "linear"

    def __init__(self, dense: nn.Module, cfg: SparseGradConfig | SparseGradSites, name: str = "",
                 seed_offset: int = 0):
        super().__init__()
        self.weight = dense.weight  # the same Parameter objects
        self.bias = dense.bias
        sites = cfg if isinstance(cfg, SparseGradSites) else SparseGradSites(cfg, "*", seed_offset)
        index = ParamIndex(nn.Module())  # this layer's parameters under their names in the model
        for part in ("weight", "bias"):
            p = getattr(dense, part)
            if p is not None:
                full = f"{name}.{part}" if name else part
                index.names[id(p)], index.owners[id(p)], index.params[full] = full, type(dense).__name__, p
        object.__setattr__(self, "_dense", dense)  # not a submodule: state_dict keys stay the dense layer's
        object.__setattr__(self, "_sites", sites)
        object.__setattr__(self, "_index", index)
        self.layer_name = name
        self.site = Site(site_name(index.names[id(dense.weight)]), index.names[id(dense.weight)], self.gemm,
                         type(dense).__name__)

    @property
    def cfg(self) -> SparseGradConfig:
        return self._sites.cfg

    @property
    def seed(self) -> int:
        return layer_seed(self.cfg.seed, self.site.name, self._sites.seed_offset)

    @property
    def weight_mask(self) -> torch.Tensor | None:
        """The N:M magnitude mask of the weight (None without a weight pattern)."""
        return self._sites.mask(self.site, self.weight)

    def refresh_weight_mask_(self) -> None:
        """Recompute the weight mask from the current weights (no-op without a weight pattern)."""
        self._sites.refresh_weight_masks_(self.site.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with SiteMode(self._index, self._sites, watch=False):
            return self._dense(x)

    def extra_repr(self) -> str:
        return f"{self._dense.extra_repr()}, {_describe(self.cfg)}"


class SparseGradLinear(_SiteLayer):
    """An ``nn.Linear`` (same parameters) whose backward prunes dY N:M (see :func:`sparsify_gradients_`)."""


class SparseGradConv2d(_SiteLayer):
    """An ``nn.Conv2d`` (same parameters) whose backward prunes dY N:M (see :func:`sparsify_gradients_`)."""

    gemm = "conv2d"


def _describe(cfg: SparseGradConfig) -> str:
    text = f"grad={cfg.method} {cfg.pattern} on {','.join(cfg.grad_gemms) or 'none'}"
    if cfg.weight_pattern:
        text += f", weight={cfg.weight_pattern} every {cfg.weight_every}"
    return text


SPARSE_LAYERS = (SparseGradLinear, SparseGradConv2d)


def sparsify_gradients_(
    model: nn.Module,
    method: str | SparseGradConfig,
    pattern: str = "2:4",
    layers: str | list[str] | tuple[str, ...] = "*",
    grad_gemms: str | tuple[str, ...] = ("dx", "dw"),
    weight_pattern: str | None = None,
    weight_every: int = 100,
    seed: int = 0,
    seed_offset: int = 0,
) -> list[str]:
    """Replace, in place, every ``nn.Linear``/``nn.Conv2d`` whose qualified name matches ``layers``
    (comma-separated fnmatch globs) by its sparse-gradient counterpart; return the replaced names.

    A thin alias of the GEMM-site path: each swapped layer runs its own forward through one shared
    :class:`SparseGradSites` handler (the one ``nmgrad train`` uses). ``method`` may be a
    :class:`SparseGradConfig`, which then overrides the keyword settings. ``seed_offset`` (e.g. the
    distributed rank) gives each process its own draws. Use it outside ``nmgrad train``'s own
    interception (the trainer selects sites with ``--layers``).
    """
    cfg = method if isinstance(method, SparseGradConfig) else SparseGradConfig(
        method=method,
        pattern=pattern,
        grad_gemms=grad_gemms,
        weight_pattern=weight_pattern,
        weight_every=weight_every,
        seed=seed,
    )
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    chosen = [(n, m) for n, m in candidates if _matches(n, layers)]
    if not chosen:
        names = ", ".join(n for n, _ in candidates[:8]) or "none"
        raise NmgradError(
            f"no Linear or Conv2d layer matches --layers '{layers}': the model's layers are {names}"
            f"{' ...' if len(candidates) > 8 else ''}; use a glob such as '*' or 'blocks.*.mlp.*'"
        )
    sites = SparseGradSites(cfg, "*", seed_offset)  # each layer's mode sees its own weight only
    replaced = []
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = (SparseGradLinear if isinstance(module, nn.Linear) else SparseGradConv2d)(module, sites, name)
        new.train(module.training)
        parent.register_module(child, new)
        replaced.append(name)
    return replaced


def _matches(name: str, layers: str | list[str] | tuple[str, ...]) -> bool:
    globs = [g.strip() for g in layers.split(",")] if isinstance(layers, str) else list(layers)
    return any(fnmatch.fnmatchcase(name, g) for g in globs if g)


def sparse_grad_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of the sparse-gradient layers in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)]


def refresh_weight_masks_(model: nn.Module) -> int:
    """Recompute every sparse layer's weight mask; returns how many layers have one."""
    count = 0
    for _, module in sparse_grad_layers(model):
        if module.cfg.weight_pattern is not None:
            module.refresh_weight_mask_()
            count += 1
    return count
