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
from typing import Literal, NamedTuple

import torch

from ..backend import resolve_gemm
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

AUTO_CUSPARSELT = False
"""Whether ``backend="auto"`` takes the cuSPARSELt route (prune -> ``_cslt_compress`` -> 2:4 GEMM).
Measured on an H200 (BENCHMARKS.md, gpu_bench): ``_cslt_compress`` of a 16384 x 8192 bf16 operand
takes 3.1 ms, 6.7x the prune kernel, while the 2:4 GEMM saves ~1.1 ms of 3.3; the Linear backward
(dX + dW) took 12.6 ms sparse, 7.5 ms pruned + dense and 6.7 ms dense. So ``auto`` prunes with the
Triton kernel and runs the dense GEMM whenever the sparse path would need ``_cslt_compress``;
``backend="cusparselt"`` still runs it. Set True once a compressed form can be written in the prune
pass (as the CUTLASS route does on sm8x)."""
AUTO_CUSPARSELT_REASON = (
    "auto: the cuSPARSELt route costs more than it saves here (_cslt_compress took 6.7x the prune kernel on "
    "an H200; prune + dense GEMM was 1.7x faster than prune + compress + 2:4 GEMM); pass backend "
    "'cusparselt' to run it anyway"
)

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
    if backend == "auto" and chosen == "cusparselt" and not AUTO_CUSPARSELT:
        return GemmPlan("dense", AUTO_CUSPARSELT_REASON)
    return GemmPlan(chosen, note)


CSLT_B_COLUMN_MAJOR = True
"""cuSPARSELt gets the dense operand B column-major (a copy when it is row-major). On an H200
(gpu_bench, 16384 x 8192 x 8192 bf16) column-major B made the 2:4 GEMMs 1.49x the dense one where
row-major gave 1.25x (dX) and 1.31x (dW); the copy costs ~0.1 ms of the ~0.35 ms it saves."""

CSLT_SEARCH = True
"""Time cuSPARSELt's algorithms (``alg_id``) once per GEMM shape and use the quickest: on an H200
alg 3 or 6 took 0.95/2.13 ms where the default alg 0 took 1.12/2.74 ms (4096 / 8192 wide)."""

CSLT_MAX_ALG = 16
_CSLT_ALG: dict[tuple, int] = {}


def fastest_alg(run, time_ms, max_alg: int = CSLT_MAX_ALG) -> int:
    """The ``alg_id`` in 0, 1, ... for which ``time_ms(lambda: run(alg_id))`` is least; an id that
    raises RuntimeError ends the search (cuSPARSELt numbers its algorithms from 0 without gaps)."""
    best, best_ms = 0, float("inf")
    for alg in range(max_alg):
        try:
            run(alg)  # warm-up, and the check that this id exists
            took = time_ms(lambda alg=alg: run(alg))
        except RuntimeError:
            break
        if took < best_ms:
            best, best_ms = alg, took
    return best


def _cuda_time_ms(fn, calls: int = 3) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _cslt_mm(ca: torch.Tensor, a_shape: tuple[int, int], b: torch.Tensor) -> torch.Tensor:
    """``_cslt_sparse_mm`` with the algorithm found quickest for this shape (searched on first use,
    never while a CUDA graph is being captured: then the default algorithm runs)."""
    key = (a_shape, tuple(b.shape), b.stride(), b.dtype, b.device)
    alg = _CSLT_ALG.get(key)
    if alg is None:
        if not CSLT_SEARCH or torch.cuda.is_current_stream_capturing():
            alg = 0
        else:
            alg = _CSLT_ALG[key] = fastest_alg(lambda i: torch._cslt_sparse_mm(ca, b, alg_id=i), _cuda_time_ms)
            log.info("cuSPARSELt alg_id %d for A %s @ B %s", alg, a_shape, tuple(b.shape))
    return torch._cslt_sparse_mm(ca, b, alg_id=alg)


def sparse_mm(a: torch.Tensor, b: torch.Tensor, backend: str, compressed=None) -> torch.Tensor:
    """A @ B for A (m x k) already 2:4 along k, on sparse tensor cores (``backend`` checked by the caller).

    ``compressed``: A's CUTLASS (packed, meta) when the prune kernel wrote them."""
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()  # cuSPARSELt reads B as row-major if contiguous, else as its contiguous transpose
    if backend == "cusparselt":
        if CSLT_B_COLUMN_MAJOR and b.is_contiguous() and b.shape[1] > 1:
            b = b.t().contiguous().t()
        return _cslt_mm(torch._cslt_compress(a.contiguous()), tuple(a.shape), b)
    if backend == "cutlass":
        if compressed is None:
            from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

            compressed = sparse_semi_structured_from_dense_cutlass(a.contiguous())
        packed, meta = compressed
        return torch._sparse_semi_structured_mm(packed, meta, b)
    return a @ b


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
    choice = resolve_gemm(  # the one decision: who prunes (and with which uniforms), which GEMM
        meth, pat, dy.dtype, dy.device, m_rows, k_len, b.shape[1], backend, fp32=fp32, min_mnk=min_mnk,
        uniforms_given=uniforms is not None, seeded=seed is not None,
    )
    use_triton = choice.prune.name == "triton"
    n_blocks = m_rows * -(-k_len // pat.m)
    if uniforms is None and choice.prune.uniforms == "generator":
        # the same draws prune(dy, ..., generator=generator) takes (or a seeded generator's)
        gen = generator if seed is None else torch.Generator(dy.device).manual_seed(seed)
        uniforms = draw_uniforms(n_blocks, meth, pat, dy.device, gen)
    out_dtype = dy.dtype
    sparse_dtype = choice.sparse_dtype
    plan = GemmPlan(choice.gemm, choice.reason)
    if plan.reason is not None:
        _log_once(plan.reason, plan.backend)
    chosen = plan.backend
    if chosen == "dense":
        if use_triton:
            a = triton_prune.prune_2d(dy, meth.name, pat, axis, uniforms=uniforms, seed=seed)
        else:
            a = _reference_prune(dy, meth.name, pat, axis, uniforms, choice.prune.name)
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


def _reference_prune(dy, method, pattern, axis, uniforms, backend="reference") -> torch.Tensor:
    """The sparse operand by the reference (or ``backend``, the same function of the uniforms):
    dY^ (T, F) for features, dY^^T (F, T) for tokens."""
    if axis == "features":
        return prune(dy, method, pattern, dim=1, uniforms=uniforms, backend=backend)
    return prune(dy, method, pattern, dim=0, uniforms=uniforms, backend=backend).t()


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
