"""The public pruning API: ``prune`` draws one N:M-sparse estimate, ``marginals`` gives the exact
per-element keep-probabilities and kept values the metrics are computed from."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .backend import FUSED_MIN_NUMEL, BackendChoice, resolve_backend
from .errors import NmgradError
from .kernels import sample_blocks
from .methods import PruningMethod, get_method
from .patterns import Pattern, from_blocks, parse_pattern, to_blocks

Backend = Literal["auto", "reference", "fused", "triton"]
__all__ = ["FUSED_MIN_NUMEL", "Backend", "Marginals", "draw_uniforms", "marginals", "prune", "resolve"]


class Marginals(NamedTuple):
    """Per-element law of a pruning: element i is kept with probability ``prob[i]`` and is then
    ``value[i]``, else 0. So E[g^] = prob * value and E[g^^2] = prob * value^2."""

    prob: torch.Tensor
    value: torch.Tensor


def resolve(method: str | PruningMethod, pattern: str | Pattern) -> tuple[PruningMethod, Pattern]:
    """Look up the method, parse the pattern, and check the method is defined for it."""
    meth = get_method(method)
    pat = parse_pattern(pattern)
    meth.check(pat)
    return meth, pat


def draw_uniforms(k: int, meth: PruningMethod, pat: Pattern, device, generator=None) -> torch.Tensor:
    """The uniforms in [0, 1) one draw of ``k`` blocks consumes, (k, n_uniforms), float32."""
    return meth.draw_uniforms(k, pat, device, generator)


def prune(
    x: torch.Tensor,
    method: str | PruningMethod,
    pattern: str | Pattern,
    dim: int = -1,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    backend: Backend = "auto",
    stream: Literal["auto", "generator"] = "auto",
) -> torch.Tensor:
    """Prune ``x`` to the N:M ``pattern`` along ``dim`` with a registered ``method``.

    Computes in float32 (float64 stays float64) and returns a tensor of ``x``'s shape and dtype.
    Random draws come from ``generator`` (or the global one), or from ``uniforms`` of shape
    (K, n_uniforms) with K the number of blocks, which makes a draw a deterministic function.
    ``backend``: ``reference`` (plain torch), ``fused`` (torch.compile, CPU, 1:2 and 2:4),
    ``triton`` (GPU kernels), or ``auto`` (the fastest available for this tensor; ``$NMGRAD_BACKEND``
    overrides it); :func:`nmgrad_cli.backend.resolve_backend` decides. ``stream="generator"`` makes
    every backend draw its uniforms with ``torch.rand`` from ``generator`` (the reference's numbers,
    whatever runs); with ``auto`` the fused backend makes its own from a seed drawn from
    ``generator`` (reproducible, faster, but other numbers than the reference's).
    """
    return prune_with(x, method, pattern, dim, generator, uniforms=uniforms, backend=backend, stream=stream)[0]


def prune_with(
    x: torch.Tensor,
    method: str | PruningMethod,
    pattern: str | Pattern,
    dim: int = -1,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    backend: Backend = "auto",
    stream: Literal["auto", "generator"] = "auto",
    training: bool = False,
) -> tuple[torch.Tensor, BackendChoice]:
    """:func:`prune`, also returning the :class:`BackendChoice` that ran (``training``: see
    :func:`nmgrad_cli.backend.resolve_backend`)."""
    meth, pat = resolve(method, pattern)
    blocks, view = to_blocks(x, pat.m, dim)
    choice = resolve_backend(
        meth, pat, blocks.dtype, blocks.device, blocks.numel(), backend,
        stream="given" if uniforms is not None else stream, training=training,
    )
    if choice.uniforms == "hash":  # uniforms made inside the fused pass
        from .kernels.cpu_fused import fused_sample_seeded

        seed = torch.randint(0, 2**62, (), generator=generator, device=blocks.device)
        return from_blocks(fused_sample_seeded(blocks, seed, meth.name, pat.n), view), choice
    u = uniforms if uniforms is not None else draw_uniforms(len(blocks), meth, pat, blocks.device, generator)
    if u.shape != (len(blocks), meth.n_uniforms(pat)):
        raise NmgradError(
            f"uniforms must have shape ({len(blocks)}, {meth.n_uniforms(pat)}) for {meth.name} {pat}"
            f" on this tensor, got {tuple(u.shape)}"
        )
    return from_blocks(sample_blocks(blocks, u.to(blocks.dtype), meth, pat.n, choice.name), view), choice


def marginals(
    x: torch.Tensor, method: str | PruningMethod, pattern: str | Pattern, dim: int = -1, dtype=None
) -> Marginals:
    """Exact keep-probability and kept value of every element of ``x`` (same shape as ``x``).

    Computed in ``dtype`` (default float32, float64 for float64 input)."""
    meth, pat = resolve(method, pattern)
    blocks, view = to_blocks(x, pat.m, dim, dtype=dtype)
    p, v = meth.marginals(blocks, pat.n)
    return Marginals(from_blocks(p, view, p.dtype), from_blocks(v, view, v.dtype))
