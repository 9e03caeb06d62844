"""2:4 sparse tensor-core GEMMs for the backward pass of a sparse-gradient Linear: the mechanics.

With dY (T, F), X (T, I), W (F, I):
    dX = dY^ @ W        dY^ pruned along F (features), sparse A = dY^ (T x F), 2:4 along its K = F
    dW = dY^^T @ X      dY^ pruned along T (tokens),   sparse A = dY^^T (F x T), 2:4 along its K = T
Sparse tensor cores compute (sparse A) @ (dense B) with A 2:4 along K, so the Triton kernel writes
each operand in exactly that form: dY^ for dX, and dY^^T directly (K-major) for dW.

Which route runs is decided in :mod:`nmgrad_cli.backend` (``plan_gemm``, ``GEMM_ROUTES``), and
:mod:`nmgrad_cli.sparse_backward` runs it; this module only holds the GEMMs and imports neither.

- ``cusparselt``: ``torch._cslt_sparse_mm`` (sm80+; the only sparse path on Hopper). At 2:4 the
  Triton kernel prunes dY straight into cuSPARSELt's compressed buffer
  (:func:`..triton_prune.prune_pack_2d`, the layout modelled in :mod:`.cslt_layout`); 1:2 runs
  prune -> ``torch._cslt_compress``. Each GEMM shape's ``alg_id`` is searched once and every
  candidate's product checked against a dense GEMM of the same operand (:func:`fastest_alg`): an
  alg_id that returns a wrong product is rejected, and a shape with none left (or a layout model
  that does not match the library) raises :class:`SparseCheckFailed`, so the caller runs dense.
- ``cutlass``: ``torch._sparse_semi_structured_mm(packed, meta, B)`` (sm8x only); the prune kernel
  writes ``packed`` and ``meta`` in the same pass (:func:`..triton_prune.prune_compress_2d`).
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch

from . import cslt_layout, triton_prune

log = logging.getLogger(__name__)

CSLT_B_COLUMN_MAJOR = True
"""cuSPARSELt gets the dense operand B column-major (a copy when it is row-major). On an H200
(gpu_bench, 16384 x 8192 x 8192 bf16) column-major B made the 2:4 GEMMs 1.49x the dense one where
row-major gave 1.25x (dX) and 1.31x (dW); the copy costs ~0.1 ms of the ~0.35 ms it saves."""

CSLT_SEARCH = True
"""Time cuSPARSELt's algorithms (``alg_id``) once per GEMM shape and use the quickest: on an H200
alg 3 or 6 took 0.95/2.13 ms where the default alg 0 took 1.12/2.74 ms (4096 / 8192 wide)."""

CSLT_MAX_ALG = 16
CHECK_RTOL = 1e-2
"""A cuSPARSELt product whose relative Frobenius error against the dense GEMM of the same operand
exceeds this is wrong (bf16 products differ by ~1.7e-3 from accumulation order on an H200)."""


class SparseCheckFailed(RuntimeError):
    """The sparse GEMM could not be checked against a dense one, or failed the check: run dense."""


def cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


@functools.cache
def log_once(reason: str, backend: str = "dense") -> None:
    log.info("2:4 sparse GEMM -> %s GEMM: %s", backend, reason)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius, float32); 0 when both are zero."""
    den = float(want.float().norm())
    num = float((got.float() - want.float()).norm())
    return num / den if den > 0 else num


def fastest_alg(run, time_ms, max_alg: int = CSLT_MAX_ALG, check=None) -> int | None:
    """The ``alg_id`` in 0, 1, ... for which ``time_ms(lambda: run(alg_id))`` is least, among those
    whose product passes ``check(product) -> bool`` (all, without ``check``); None when none does.
    An id that raises RuntimeError ends the search (cuSPARSELt numbers its algorithms from 0 without gaps)."""
    best, best_ms = None, float("inf")
    for alg in range(max_alg):
        try:
            out = run(alg)  # warm-up, and the check that this id exists
            took = time_ms(lambda alg=alg: run(alg))
        except RuntimeError:
            break
        if check is not None and not check(out):
            log.warning("cuSPARSELt alg_id %d returned a wrong product (checked against a dense GEMM): rejected", alg)
            continue
        if took < best_ms:
            best, best_ms = alg, took
    return best


def cuda_time_ms(fn, calls: int = 3) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


class AlgTable:
    """cuSPARSELt's checked ``alg_id`` per GEMM shape (A shape, B shape and strides, dtype, device)."""

    def __init__(self) -> None:
        self._algs: dict[tuple, int | None] = {}

    def alg(self, key: tuple, run, reference, time_ms=cuda_time_ms) -> int:
        """The checked alg_id for ``key``, searched (``run(alg_id)`` timed, each product compared
        with ``reference()``) on first use; raises :class:`SparseCheckFailed` when no alg_id
        matches the dense product, or when the shape is new while a CUDA graph is being captured."""
        if key not in self._algs:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise SparseCheckFailed("a new GEMM shape during CUDA-graph capture: its alg_id is not checked yet")
            want = reference()
            ok = lambda out: rel_err(out, want) <= CHECK_RTOL  # noqa: E731
            self._algs[key] = fastest_alg(run, time_ms, CSLT_MAX_ALG if CSLT_SEARCH else 1, ok)
            log.info("cuSPARSELt alg_id %s for %s", self._algs[key], key)
        alg = self._algs[key]
        if alg is None:
            raise SparseCheckFailed(
                "no cuSPARSELt alg_id reproduced the dense GEMM of the same operand (a wrong layout or library)"
            )
        return alg

    def clear(self) -> None:
        self._algs.clear()


CSLT_ALGS = AlgTable()


class ColumnMajorCache:
    """B column-major in ``dtype``, made once per weight version: ``get(w, dtype)`` returns the same
    copy until ``w`` is changed in place (its version counter moves, e.g. by the optimizer step) or freed."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple] = {}

    def get(self, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or b.dtype
        entry = self._copies.get(id(b))
        if entry is not None:
            ref, version, copy = entry
            if ref() is b and version == b._version and copy.shape == b.shape and copy.dtype == dtype:
                return copy
        copy = column_major(b.to(dtype))
        key = id(b)
        self._copies[key] = (weakref.ref(b, lambda _r, key=key: self._copies.pop(key, None)), b._version, copy)
        return copy

    def __len__(self) -> int:
        return len(self._copies)


WEIGHT_COPIES = ColumnMajorCache()


def column_major(b: torch.Tensor) -> torch.Tensor:
    """``b`` with column-major strides (itself when it already is)."""
    return b if b.t().is_contiguous() else b.t().contiguous().t()


def dense_operand(b: torch.Tensor, weight: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """B in ``dtype`` as cuSPARSELt gets it: column-major (:data:`CSLT_B_COLUMN_MAJOR`), cached per
    version for a weight (the cast included)."""
    if CSLT_B_COLUMN_MAJOR and b.shape[1] > 1:
        return WEIGHT_COPIES.get(b, dtype) if weight else column_major(b.to(dtype or b.dtype))
    b = b.to(dtype or b.dtype)
    # cuSPARSELt reads B as row-major if contiguous, else as its contiguous transpose
    return b if b.is_contiguous() or b.t().is_contiguous() else b.contiguous()


def cslt_operand(dy, method, pattern, axis, uniforms, seed, sparse_dtype) -> tuple[torch.Tensor, tuple, object]:
    """(cuSPARSELt buffer of the sparse operand, its dense shape, a function giving the dense operand):
    at 2:4 the fused prune + pack kernel; at 1:2 the prune kernel and ``torch._cslt_compress``."""
    if (pattern.n, pattern.m) == (2, 4):
        buf = triton_prune.prune_pack_2d(dy, method, axis, uniforms=uniforms, seed=seed, out_dtype=sparse_dtype)
        shape = (dy.shape[1], dy.shape[0]) if axis == "tokens" else tuple(dy.shape)
        return buf, shape, lambda: cslt_layout.unpack(buf, shape)
    a = triton_prune.prune_2d(dy, method, pattern, axis, uniforms=uniforms, seed=seed, out_dtype=sparse_dtype)
    return torch._cslt_compress(a.contiguous()), tuple(a.shape), lambda: a


def cslt_mm(buf: torch.Tensor, a_shape: tuple[int, int], dense_a, b: torch.Tensor) -> torch.Tensor:
    """A @ B by ``_cslt_sparse_mm`` on A's compressed ``buf``, with the alg_id checked for this shape
    (``dense_a()`` gives A for the dense reference, computed only when the shape is new)."""
    key = (a_shape, tuple(b.shape), b.stride(), b.dtype, b.device)
    run = lambda i: torch._cslt_sparse_mm(buf, b, alg_id=i)  # noqa: E731
    alg = CSLT_ALGS.alg(key, run, lambda: dense_a() @ b)
    return torch._cslt_sparse_mm(buf, b, alg_id=alg)


def cutlass_mm(packed: torch.Tensor, meta: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A @ B on sm8x from A's CUTLASS (packed, meta): the prune kernel's, or :func:`cutlass_compress`'s."""
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    return torch._sparse_semi_structured_mm(packed, meta, b)


def cutlass_compress(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CUTLASS (packed, meta) of an already pruned A (the 1:2 route, where the fused compressor is 2:4-only)."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(a.contiguous())


def time_routes(sparse, dense, time_ms=cuda_time_ms) -> tuple[float, float] | str:
    """(sparse ms, dense ms) of two zero-argument routes after a warm-up call each, or the reason
    the sparse one cannot run (its :class:`SparseCheckFailed` message)."""
    try:
        sparse()
    except SparseCheckFailed as exc:
        return str(exc)
    dense()
    return time_ms(sparse), time_ms(dense)
