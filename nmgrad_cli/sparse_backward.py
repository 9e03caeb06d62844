"""dX and dW of a sparse-gradient Linear on the fastest correct route.

With dY (T, F), X (T, I), W (F, I):
    dX = prune_F(dY) @ W      (T, I)   sparse A = dY^ (T x F), 2:4 along its K = F
    dW = prune_T(dY)^T @ X    (F, I)   sparse A = dY^^T (F x T), 2:4 along its K = T

One decision, then the mechanics: :func:`nmgrad_cli.backend.resolve_gemm` picks who prunes and
which GEMM runs (``auto`` on cuSPARSELt takes the sparse route per shape only where
:data:`nmgrad_cli.backend.GEMM_ROUTES` measured it faster, and records why), and
:mod:`nmgrad_cli.kernels.sparse_gemm` runs it. Every dense fallback (off CUDA, below sm80, float32,
a pattern other than 1:2/2:4, a shape the layout cannot take, no cuSPARSELt, a sparse product that
failed its dense check) is logged once and recorded; the product is never a wrong one.

:func:`grad_input_reference` and :func:`grad_weight_reference` are the plain-torch functions these
compute (reference pruning + dense GEMM on the same uniforms).
"""

from __future__ import annotations

from typing import Literal

import torch

from .backend import GEMM_ROUTES, resolve_gemm
from .kernels import sample_blocks, sparse_gemm, triton_prune
from .methods import get_method
from .patterns import from_blocks, parse_pattern, to_blocks

Backend = Literal["auto", "cusparselt", "cutlass", "dense"]
Fp32Mode = Literal["dense", "bf16"]


def _pruned_times(dy, b, method, pattern, axis, generator, uniforms, seed, backend, fp32, min_mnk, weight):
    """prune(dY) along ``axis`` as the sparse operand A, times B, on the route :func:`resolve_gemm` picks."""
    pat = parse_pattern(pattern)
    meth = get_method(method)
    meth.check(pat)
    t, f = dy.shape
    m_rows, k_len = (f, t) if axis == "tokens" else (t, f)
    choice = resolve_gemm(  # the one decision: who prunes (and with which uniforms), which GEMM
        meth, pat, dy.dtype, dy.device, m_rows, k_len, b.shape[1], backend, fp32=fp32, min_mnk=min_mnk,
        uniforms_given=uniforms is not None, seeded=seed is not None,
    )
    if uniforms is None and choice.prune.uniforms == "generator":
        # the same draws prune(dy, ..., generator=generator) takes (or a seeded generator's)
        gen = generator if seed is None else torch.Generator(dy.device).manual_seed(seed)
        uniforms = meth.draw_uniforms(m_rows * -(-k_len // pat.m), pat, dy.device, gen)
    key = (m_rows, k_len, b.shape[1], choice.sparse_dtype, str(dy.device))

    def pruned_dense():  # prune + dense GEMM: the fallback, and what auto measures the sparse route against
        if choice.prune.name == "triton":
            a = triton_prune.prune_2d(dy, meth.name, pat, axis, uniforms=uniforms, seed=seed)
        else:
            a = _reference_prune(dy, meth.name, pat, axis, uniforms, choice.prune.name)
        return a @ b

    def dense(reason: str):
        GEMM_ROUTES.record(key, "dense", reason)
        sparse_gemm.log_once(reason)
        return pruned_dense()

    if choice.gemm == "dense":
        return dense(choice.reason or "backend 'dense'")
    if choice.reason is not None:
        sparse_gemm.log_once(choice.reason, choice.gemm)
    out_dtype, sparse_dtype = dy.dtype, choice.sparse_dtype
    # fp32 -> bf16: the kernel prunes the float32 dY (same decisions) and writes bf16; B is cast

    if choice.gemm == "cutlass":
        if pat.n == 2:
            kw = dict(uniforms=uniforms, seed=seed, out_dtype=sparse_dtype)
            _, packed, meta = triton_prune.prune_compress_2d(dy, meth.name, pat, axis, **kw)
        else:
            a = triton_prune.prune_2d(dy, meth.name, pat, axis, uniforms=uniforms, seed=seed, out_dtype=sparse_dtype)
            packed, meta = sparse_gemm.cutlass_compress(a)
        return sparse_gemm.cutlass_mm(packed, meta, b.to(sparse_dtype)).to(out_dtype)

    bc = sparse_gemm.dense_operand(b, weight, sparse_dtype)

    def sparse():
        buf, shape, dense_a = sparse_gemm.cslt_operand(dy, meth.name, pat, axis, uniforms, seed, sparse_dtype)
        return sparse_gemm.cslt_mm(buf, shape, dense_a, bc)

    if choice.measured:  # auto: sparse only where measured faster on this GPU, decided once per shape
        measure = None if torch.cuda.is_current_stream_capturing() else (
            lambda: sparse_gemm.time_routes(sparse, pruned_dense)
        )
        decision = GEMM_ROUTES.decide(key, measure)
        if decision.route != "sparse":
            sparse_gemm.log_once(decision.reason)
            return pruned_dense()
    try:
        out = sparse()
    except sparse_gemm.SparseCheckFailed as exc:
        return dense(f"cuSPARSELt: {exc}")
    if not choice.measured:
        GEMM_ROUTES.record(key, "sparse", choice.reason or f"backend '{backend}'")
    return out.to(out_dtype)


def _reference_prune(dy, method, pattern, axis, uniforms, backend="reference") -> torch.Tensor:
    """The sparse operand by the reference (or ``backend``, the same function of the uniforms):
    dY^ (T, F) for features, dY^^T (F, T) for tokens."""
    meth, pat = get_method(method), parse_pattern(pattern)
    blocks, view = to_blocks(dy, pat.m, 1 if axis == "features" else 0)
    u = uniforms if uniforms is not None else blocks.new_empty(len(blocks), 0)  # a method that draws nothing
    out = from_blocks(sample_blocks(blocks, u.to(blocks.dtype), meth, pat.n, backend), view)
    return out if axis == "features" else out.t()


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
    ``backend``: auto (by compute capability, measured per shape on cuSPARSELt), cusparselt,
    cutlass or dense; ``fp32``: 'dense' (default, or env NMGRAD_SPARSE_FP32) or 'bf16' (cast the
    operands, return float32); ``min_mnk``: the size below which the dense GEMM runs (default
    ``backend.MIN_SPARSE_MNK``). W's column-major copy for cuSPARSELt is made once per version of W."""
    return _pruned_times(dy, w, method, pattern, "features", generator, uniforms, seed, backend, fp32, min_mnk, True)


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
    return _pruned_times(dy, x, method, pattern, "tokens", generator, uniforms, seed, backend, fp32, min_mnk, False)


def grad_input_reference(dy, w, method, pattern, uniforms) -> torch.Tensor:
    """Plain torch: prune(dY, dim=1, uniforms) @ W."""
    return _reference_prune(dy, method, pattern, "features", uniforms) @ w


def grad_weight_reference(dy, x, method, pattern, uniforms) -> torch.Tensor:
    """Plain torch: prune(dY, dim=0, uniforms)^T @ X."""
    return _reference_prune(dy, method, pattern, "tokens", uniforms) @ x
