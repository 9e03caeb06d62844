"""Error metrics of a pruning method on a tensor g (docs/methods.md, "Metrics").

All relative to ||g||^2:
  bias     = ||E[g^] - g||^2 / ||g||^2
  variance = E||g^ - E[g^]||^2 / ||g||^2
  mse      = E||g^ - g||^2 / ||g||^2 = bias + variance
  angle    = E[arccos(<g^, g> / (||g^|| ||g||))] in degrees (Monte Carlo, with its standard error)
The first three are exact, from each method's per-element marginals (E[g^_i] = p_i v_i,
E[g^_i^2] = p_i v_i^2), accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .methods import PruningMethod
from .patterns import Pattern
from .prune import marginals, prune, resolve


@dataclass
class Metrics:
    """Metrics of one method on one tensor along one block axis."""

    mse: float
    bias: float
    variance: float
    norm2: float
    """||g||^2, the normaliser (and the weight of this tensor in summaries)."""
    mse_abs: float
    """E||g^ - g||^2, not normalised."""
    angle: float = math.nan
    angle_se: float = math.nan
    samples: int = 0
    mc_mse: float = math.nan
    mc_bias: float = math.nan
    mc_variance: float = math.nan

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def exact_moments(g: torch.Tensor, method, pattern, dim: int = -1) -> tuple[float, float, float]:
    """(||E g^ - g||^2, E||g^ - E g^||^2, ||g||^2) in float64, exactly from the marginals."""
    g64 = g.detach().to(torch.float64)
    p, v = marginals(g64, method, pattern, dim, dtype=torch.float64)
    mean = p * v
    bias = torch.sum((mean - g64) ** 2).item()
    var = torch.sum(p * v * v - mean * mean).clamp_min(0).item()
    return bias, var, torch.sum(g64 * g64).item()


def evaluate_tensor(
    g: torch.Tensor,
    method: str | PruningMethod,
    pattern: str | Pattern,
    dim: int = -1,
    samples: int = 16,
    generator: torch.Generator | None = None,
    mc_check: bool = False,
    on_sample: Callable[[torch.Tensor], None] | None = None,
) -> Metrics:
    """Exact mse/bias/variance of ``method`` on ``g`` along ``dim``, plus the Monte-Carlo angle
    from ``samples`` draws (and Monte-Carlo mse/bias/variance when ``mc_check``). ``on_sample``
    is called with every draw (shape and dtype of ``g``), so callers can reuse the draws."""
    meth, pat = resolve(method, pattern)
    bias, var, norm2 = exact_moments(g, meth, pat, dim)
    if norm2 == 0.0:  # all-zero gradient: every method returns zeros exactly
        return Metrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, samples, *(3 * [0.0] if mc_check else 3 * [math.nan]))
    metrics = Metrics(
        mse=(bias + var) / norm2, bias=bias / norm2, variance=var / norm2, norm2=norm2, mse_abs=bias + var
    )
    if samples > 0:
        mc = monte_carlo(g, meth, pat, dim, samples, generator, mc_check, on_sample)
        metrics.angle, metrics.angle_se, metrics.samples = mc["angle"], mc["angle_se"], samples
        if mc_check:
            metrics.mc_mse, metrics.mc_bias, metrics.mc_variance = mc["mse"], mc["bias"], mc["variance"]
    return metrics


def mc_backend(g: torch.Tensor, method, pattern, dim: int = -1) -> dict:
    """The backend and uniform source the Monte-Carlo draws of :func:`monte_carlo` run on for ``g``
    (:meth:`nmgrad_cli.backend.BackendChoice.to_dict`), for an output's metadata."""
    from .backend import resolve_backend
    from .patterns import compute_dtype, parse_pattern

    m = parse_pattern(pattern).m
    length = g.shape[dim] if g.dim() else 1
    padded = g.numel() // max(length, 1) * (-(-length // m) * m)  # the blocks prune() sees
    return resolve_backend(method, pattern, compute_dtype(g.dtype), g.device, padded, stream="generator").to_dict()


def monte_carlo(g, method, pattern, dim=-1, samples=16, generator=None, moments=False, on_sample=None) -> dict:
    """Angle (degrees, mean and standard error) over ``samples`` draws; with ``moments`` also
    Monte-Carlo mse, bias (of the sample mean, which carries variance/samples on top) and
    variance (unbiased per-element sample variance), all relative to ||g||^2. The draws use
    ``torch.rand`` uniforms from ``generator`` whatever backend runs (:func:`mc_backend` says which)."""
    g64 = g.detach().to(torch.float64).flatten()
    norm2 = torch.dot(g64, g64).item()
    angles = []
    total = torch.zeros_like(g64) if moments else None
    total2 = torch.zeros_like(g64) if moments else None
    err2 = 0.0
    for _ in range(samples):
        # stream="generator": the reference's uniforms on every backend, so a seed gives the same
        # draws whether or not the fused kernel can be compiled here
        draw = prune(g, method, pattern, dim, generator, stream="generator")
        if on_sample is not None:
            on_sample(draw)
        est = draw.detach().to(torch.float64).flatten()
        denom = math.sqrt(torch.dot(est, est).item() * norm2)
        cos = torch.dot(est, g64).item() / denom if denom > 0 else 0.0
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
        if moments:
            total += est
            total2 += est * est
            err2 += torch.sum((est - g64) ** 2).item()
    at = torch.tensor(angles, dtype=torch.float64)
    out = {
        "angle": at.mean().item(),
        "angle_se": (at.std(unbiased=True).item() / math.sqrt(samples)) if samples > 1 else math.nan,
    }
    if moments:
        mean = total / samples
        out["mse"] = err2 / samples / norm2
        out["bias"] = torch.sum((mean - g64) ** 2).item() / norm2
        if samples > 1:
            var = (total2 - samples * mean * mean) / (samples - 1)
            out["variance"] = torch.sum(var).item() / norm2
        else:
            out["variance"] = math.nan
    return out
