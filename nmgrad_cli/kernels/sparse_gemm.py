"""2:4 sparse tensor-core GEMMs for the backward pass of a sparse-gradient Linear.

With dY (T, F), X (T, I), W (F, I):
    dX = dY^ @ W        dY^ pruned along F (features), sparse A = dY^ (T x F), 2:4 along its K = F
    dW = dY^^T @ X      dY^ pruned along T (tokens),   sparse A = dY^^T (F x T), 2:4 along its K = T
Sparse tensor cores compute (sparse A) @ (dense B) with A 2:4 along K, so the Triton kernel writes
each operand in exactly that form: dY^ for dX, and dY^^T directly (K-major) for dW.

Backends (``backend="auto"`` picks by compute capability):
- ``cusparselt``: ``torch._cslt_compress`` + ``torch._cslt_sparse_mm`` (sm80+; the only sparse path
  on Hopper, where CUTLASS's sparse kernels do not run). Its compressed format is opaque, so the
  route is prune kernel -> pruned dense -> ``_cslt_compress`` (one extra read + half write).
- ``cutlass``: ``torch._sparse_semi_structured_mm(packed, meta, B)`` (sm8x only); the prune kernel
  writes ``packed`` and ``meta`` in the same pass (:func:`..triton_prune.prune_compress_2d`).
- ``dense``: the pruned tensor in a dense GEMM (same numbers up to accumulation order).
The dense fallback is taken, with the reason logged once, off CUDA, below sm80, for float32
(semi-structured GEMMs take fp16/bf16; ``fp32="bf16"`` casts instead), for patterns other than
1:2 / 2:4, for shapes not aligned to the kernels' minimums, and below ``MIN_SPARSE_MNK``.

:func:`grad_input_reference` and :func:`grad_weight_reference` are the plain-torch functions these
compute (reference pruning + dense GEMM on the same uniforms).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal, NamedTuple

import torch

from ..errors import NmgradError
from ..methods import get_method
from ..patterns import parse_pattern
from ..prune import draw_uniforms, prune
from . import triton_prune

log = logging.getLogger(__name__)

Backend = Literal["auto", "cusparselt", "cutlass", "dense"]
Fp32Mode = Literal["dense", "bf16"]

MIN_SPARSE_MNK = 1 << 31
"""Below m*n*k = 2^31 (e.g. 1024^3 * 2) the dense GEMM is used: a 2:4 GEMM saves at most half the
math, and small GEMMs are launch- and memory-bound; tune with ``benchmarks/gpu_bench.py``."""

# (rows of A, K, columns of B) multiples: torch's _DTYPE_SHAPE_CONSTRAINTS for fp16/bf16, no padding
ALIGN = {"cusparselt": (16, 16, 8), "cutlass": (32, 64, 8)}
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _log_once(reason: str, backend: str = "dense") -> None:
    log.info("2:4 sparse GEMM -> %s GEMM: %s", backend, reason)


def _cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


def pick_backend(capability: tuple[int, int] | None, cusparselt: bool) -> tuple[str, str | None]:
    """(backend, reason for dense or None) for a device of compute ``capability`` (None: no CUDA)."""
    if capability is None:
        return "dense", "no CUDA device (the sparse GEMMs need an sm80+ GPU)"
    if capability < (8, 0):
        return "dense", f"sm{capability[0]}{capability[1]} has no sparse tensor cores (needs sm80+)"
    if capability[0] == 8:
        return "cutlass", None  # in-kernel compression; cuSPARSELt works too (backend="cusparselt")
    if cusparselt:
        return "cusparselt", None
    return "dense", (
        f"sm{capability[0]}{capability[1]}: CUTLASS sparse runs only on sm8x and this torch has no cuSPARSELt"
    )


def dense_reason(
    m: int, k: int, n: int, dtype: torch.dtype, backend: str, pattern: str, min_mnk: int | None = None
) -> str | None:
    """Why A (m x k, pruned along k) @ B (k x n) must run dense on ``backend``, or None."""
    if backend == "dense":
        return "backend 'dense'"
    pat = parse_pattern(pattern)
    if (pat.n, pat.m) not in ((1, 2), (2, 4)):
        return f"pattern {pat} is not 2:4-compatible (sparse tensor cores run 2:4; 1:2 is a special case)"
    if dtype not in SPARSE_DTYPES:
        return f"{dtype}: semi-structured GEMMs take float16/bfloat16 (fp32='bf16' casts)"
    am, ak, an = ALIGN[backend]
    if m % am or k % ak or n % an:
        return (
            f"shape A {m}x{k} @ B {k}x{n}: {backend} needs A rows a multiple of {am}, K of {ak} and B "
            f"columns of {an}"
        )
    min_mnk = MIN_SPARSE_MNK if min_mnk is None else min_mnk
    if m * n * k < min_mnk:
        return f"m*n*k = {m * n * k} is below {min_mnk} (MIN_SPARSE_MNK: dense is as fast)"
    return None


def unavailable_reason(backend: str, capability: tuple[int, int], cusparselt: bool) -> str | None:
    """Why the sparse ``backend`` cannot run on a GPU of compute ``capability``, or None."""
    sm = f"sm{capability[0]}{capability[1]}"
    if capability < (8, 0):
        return f"{sm} has no sparse tensor cores (needs sm80+)"
    if backend == "cutlass" and capability[0] != 8:
        return f"torch's CUTLASS sparse kernels run only on sm8x, this GPU is {sm}"
    if backend == "cusparselt" and not cusparselt:
        return "this torch build has no cuSPARSELt"
    return None


class GemmPlan(NamedTuple):
    """Which GEMM runs (``cusparselt``, ``cutlass`` or ``dense``) and why it is not the one asked for
    (or why dense), logged once per reason; ``reason`` is None when the requested backend runs."""

    backend: str
    reason: str | None


def plan_gemm(
    capability: tuple[int, int] | None,
    cusparselt: bool,
    dtype: torch.dtype,
    pattern: str,
    m: int,
    k: int,
    n: int,
    backend: Backend = "auto",
    min_mnk: int | None = None,
) -> GemmPlan:
    """The one decision for A (m x k, ``pattern`` along k, in ``dtype``) @ B (k x n): a pure function
    of the device's compute ``capability`` (None: not a CUDA tensor), whether torch has cuSPARSELt,
    the operand, and the user's ``backend``. An explicit backend that cannot run here falls back to
    what ``auto`` picks (e.g. ``cutlass`` on Hopper -> ``cusparselt``), with the reason."""
    if backend not in ("auto", "cusparselt", "cutlass", "dense"):
        raise NmgradError(f"backend must be auto, cusparselt, cutlass or dense, got {backend!r}")
    if capability is None:
        return GemmPlan("dense", "not a CUDA tensor")
    note = None
    chosen = backend
    if backend == "auto":
        chosen, why = pick_backend(capability, cusparselt)
        if why is not None:
            return GemmPlan("dense", why)
    elif backend != "dense":
        why = unavailable_reason(backend, capability, cusparselt)
        if why is not None:
            chosen, auto_why = pick_backend(capability, cusparselt)
            note = f"backend '{backend}' cannot run here ({why})"
            if auto_why is not None:
                return GemmPlan("dense", f"{note}; {auto_why}")
    if chosen == "cutlass" and parse_pattern(pattern).n != 2 and cusparselt:
        chosen = "cusparselt"  # the fused compressor is 2:4-only; 1:2 goes through _cslt_compress
    dense_why = dense_reason(m, k, n, dtype, chosen, pattern, min_mnk)
    if dense_why is not None:
        return GemmPlan("dense", f"{note}; {dense_why}" if note else dense_why)
    return GemmPlan(chosen, note)


def sparse_mm(a: torch.Tensor, b: torch.Tensor, backend: str, compressed=None) -> torch.Tensor:
    """A @ B for A (m x k) already 2:4 along k, on sparse tensor cores (``backend`` checked by the caller).

    ``compressed``: A's CUTLASS (packed, meta) when the prune kernel wrote them."""
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()  # cuSPARSELt reads B as row-major if contiguous, else as its contiguous transpose
    if backend == "cusparselt":
        return torch._cslt_sparse_mm(torch._cslt_compress(a.contiguous()), b)
    if backend == "cutlass":
        if compressed is None:
            from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

            compressed = sparse_semi_structured_from_dense_cutlass(a.contiguous())
        packed, meta = compressed
        return torch._sparse_semi_structured_mm(packed, meta, b)
    return a @ b


def _fp32_mode(fp32: Fp32Mode | None) -> str:
    mode = fp32 or os.environ.get("NMGRAD_SPARSE_FP32", "dense")
    if mode not in ("dense", "bf16"):
        raise ValueError(f"fp32 mode must be 'dense' or 'bf16', got {mode!r} (env NMGRAD_SPARSE_FP32)")
    return mode


def _pruned_times(
    dy: torch.Tensor,
    b: torch.Tensor,
    method: str,
    pattern: str,
    axis: str,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None,
    seed: int | None,
    backend: Backend,
    fp32: Fp32Mode | None,
    min_mnk: int | None,
) -> torch.Tensor:
    """prune(dY) along ``axis`` as the sparse operand A, times B, on the fastest path available."""
    pat = parse_pattern(pattern)
    meth = get_method(method)
    meth.check(pat)
    t, f = dy.shape
    m_rows, k_len = (f, t) if axis == "tokens" else (t, f)
    use_triton = dy.is_cuda and triton_prune.available() and triton_prune.supports(meth.name, pat.n, pat.m)
    n_blocks = m_rows * -(-k_len // pat.m)
    if uniforms is None and (seed is None or not use_triton):
        # the same draws prune(dy, ..., generator=generator) takes (or a seeded generator's)
        gen = generator if seed is None else torch.Generator(dy.device).manual_seed(seed)
        uniforms = draw_uniforms(n_blocks, meth, pat, dy.device, gen)
    out_dtype = dy.dtype
    cast = dy.is_cuda and dy.dtype == torch.float32 and _fp32_mode(fp32) == "bf16"
    sparse_dtype = torch.bfloat16 if cast else dy.dtype
    if dy.is_cuda and not use_triton:
        plan = GemmPlan("dense", f"no Triton prune kernel for {meth.name} {pat} (or triton is not installed)")
    else:
        capability = torch.cuda.get_device_capability(dy.device) if dy.is_cuda else None
        plan = plan_gemm(
            capability, _cusparselt_available(), sparse_dtype, str(pat), m_rows, k_len, b.shape[1], backend, min_mnk
        )
    if plan.reason is not None:
        _log_once(plan.reason, plan.backend)
    chosen = plan.backend
    if chosen == "dense":
        if use_triton:
            a = triton_prune.prune_2d(dy, meth.name, pat, axis, uniforms=uniforms, seed=seed)
        else:
            a = _reference_prune(dy, meth.name, str(pat), axis, uniforms)
        return a @ b
    # fp32 -> bf16: the kernel prunes the float32 dY (same decisions) and writes bf16
    b = b.to(sparse_dtype)
    if chosen == "cutlass" and pat.n == 2 and triton_prune.supports(meth.name, 2, 4):
        a, packed, meta = triton_prune.prune_compress_2d(
            dy, meth.name, pat, axis, uniforms=uniforms, seed=seed, out_dtype=sparse_dtype
        )
        return sparse_mm(a, b, chosen, (packed, meta)).to(out_dtype)
    a = triton_prune.prune_2d(dy, meth.name, pat, axis, uniforms=uniforms, seed=seed, out_dtype=sparse_dtype)
    return sparse_mm(a, b, chosen).to(out_dtype)


def _reference_prune(dy, method, pattern, axis, uniforms) -> torch.Tensor:
    """The sparse operand by the reference: dY^ (T, F) for features, dY^^T (F, T) for tokens."""
    if axis == "features":
        return prune(dy, method, pattern, dim=1, uniforms=uniforms, backend="reference")
    return prune(dy, method, pattern, dim=0, uniforms=uniforms, backend="reference").t()


def grad_input(
    dy: torch.Tensor,
    w: torch.Tensor,
    method: str,
    pattern: str = "2:4",
    *,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    seed: int | None = None,
    backend: Backend = "auto",
    fp32: Fp32Mode | None = None,
    min_mnk: int | None = None,
) -> torch.Tensor:
    """dX = prune_F(dY) @ W: dY (T, F), W (F, I) -> (T, I).

    Random draws: ``uniforms`` (K, U) in ``prune()``'s block order; else, with ``seed``, in-kernel
    Philox; else uniforms drawn from ``generator`` exactly as ``prune(dy, ..., dim=1,
    generator=generator)`` draws them (so the result is that function of the same draws).
    ``backend``: auto (by compute capability), cusparselt, cutlass or dense; ``fp32``: 'dense' (default,
    or env NMGRAD_SPARSE_FP32) or 'bf16' (cast the operands, return float32); ``min_mnk``: the size
    below which the dense GEMM runs (default :data:`MIN_SPARSE_MNK`)."""
    return _pruned_times(dy, w, method, pattern, "features", generator, uniforms, seed, backend, fp32, min_mnk)


def grad_weight(
    dy: torch.Tensor,
    x: torch.Tensor,
    method: str,
    pattern: str = "2:4",
    *,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    seed: int | None = None,
    backend: Backend = "auto",
    fp32: Fp32Mode | None = None,
    min_mnk: int | None = None,
) -> torch.Tensor:
    """dW = prune_T(dY)^T @ X: dY (T, F), X (T, I) -> (F, I); draws as :func:`grad_input` with
    ``prune(dy, ..., dim=0)``'s block order."""
    return _pruned_times(dy, x, method, pattern, "tokens", generator, uniforms, seed, backend, fp32, min_mnk)


def grad_input_reference(dy, w, method, pattern, uniforms) -> torch.Tensor:
    """Plain torch: prune(dY, dim=1, uniforms) @ W."""
    return _reference_prune(dy, method, pattern, "features", uniforms) @ w


def grad_weight_reference(dy, x, method, pattern, uniforms) -> torch.Tensor:
    """Plain torch: prune(dY, dim=0, uniforms)^T @ X."""
    return _reference_prune(dy, method, pattern, "tokens", uniforms) @ x
