"""The public pruning API: ``prune`` draws one N:M-sparse estimate, ``marginals`` gives the exact
per-element keep-probabilities and kept values the metrics are computed from."""

from __future__ import annotations

import os
from typing import Literal, NamedTuple

import torch

from .errors import NmgradError
from .methods import PruningMethod, get_method
from .patterns import Pattern, from_blocks, parse_pattern, to_blocks

Backend = Literal["auto", "reference", "fused", "triton"]
FUSED_MIN_NUMEL = 1 << 20
"""Below this many elements ``auto`` runs the reference on CPU: compiling costs more than it saves."""


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
    return torch.rand(k, meth.n_uniforms(pat), generator=generator, device=device)


def _choose_backend(backend: str, blocks: torch.Tensor, meth: PruningMethod, pat: Pattern) -> str:
    from .kernels import cpu_fused

    backend = os.environ.get("NMGRAD_BACKEND", backend) if backend == "auto" else backend
    if backend == "reference":
        return backend
    if backend == "triton":
        from .kernels import triton_prune

        if not triton_prune.supports(meth.name, pat.n, pat.m):
            raise NmgradError(f"no Triton kernel for {meth.name} {pat}: use backend='reference'")
        return backend
    fusable = cpu_fused.supports(meth.name, pat.n, pat.m) and blocks.dtype == torch.float32
    if backend == "fused":
        if not fusable:
            raise NmgradError(f"no fused kernel for {meth.name} {pat}: use backend='reference'")
        return backend
    if blocks.is_cuda:
        from .kernels import triton_prune

        if triton_prune.available() and triton_prune.supports(meth.name, pat.n, pat.m):
            return "triton"
        return "reference"
    if fusable and blocks.numel() >= FUSED_MIN_NUMEL and cpu_fused.compile_available():
        return "fused"
    return "reference"


def prune(
    x: torch.Tensor,
    method: str | PruningMethod,
    pattern: str | Pattern,
    dim: int = -1,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Prune ``x`` to the N:M ``pattern`` along ``dim`` with a registered ``method``.

    Computes in float32 (float64 stays float64) and returns a tensor of ``x``'s shape and dtype.
    Random draws come from ``generator`` (or the global one), or from ``uniforms`` of shape
    (K, n_uniforms) with K the number of blocks, which makes a draw a deterministic function.
    Without ``uniforms`` the fused and Triton backends make their random numbers in the kernel
    from a seed drawn from ``generator``: reproducible, but not the reference backend's draw.
    ``backend``: ``reference`` (plain torch), ``fused`` (torch.compile, CPU, 1:2 and 2:4),
    ``triton`` (GPU kernels), or ``auto`` (the fastest available for this tensor).
    """
    meth, pat = resolve(method, pattern)
    blocks, view = to_blocks(x, pat.m, dim)
    chosen = _choose_backend(backend, blocks, meth, pat)
    if chosen == "fused" and uniforms is None:  # uniforms made inside the fused pass
        from .kernels.cpu_fused import fused_sample_seeded

        seed = torch.randint(0, 2**62, (), generator=generator, device=blocks.device)
        return from_blocks(fused_sample_seeded(blocks, seed, meth.name, pat.n), view)
    u = uniforms if uniforms is not None else draw_uniforms(len(blocks), meth, pat, blocks.device, generator)
    if u.shape != (len(blocks), meth.n_uniforms(pat)):
        raise NmgradError(
            f"uniforms must have shape ({len(blocks)}, {meth.n_uniforms(pat)}) for {meth.name} {pat}"
            f" on this tensor, got {tuple(u.shape)}"
        )
    u = u.to(blocks.dtype)
    if chosen == "fused":
        from .kernels.cpu_fused import fused_sample

        out = fused_sample(blocks, u, meth.name, pat.n)
    elif chosen == "triton":
        from .kernels.triton_prune import triton_sample_blocks

        out = triton_sample_blocks(blocks, u, meth.name, pat.n)
    else:
        out = meth.sample(blocks, pat.n, u)
    return from_blocks(out, view)


def marginals(
    x: torch.Tensor, method: str | PruningMethod, pattern: str | Pattern, dim: int = -1, dtype=None
) -> Marginals:
    """Exact keep-probability and kept value of every element of ``x`` (same shape as ``x``).

    Computed in ``dtype`` (default float32, float64 for float64 input)."""
    meth, pat = resolve(method, pattern)
    blocks, view = to_blocks(x, pat.m, dim, dtype=dtype)
    p, v = meth.marginals(blocks, pat.n)
    return Marginals(from_blocks(p, view, p.dtype), from_blocks(v, view, v.dtype))
