"""Triton prune(-and-compress) kernels for 1:2 and 2:4 over a 2-D gradient dY [T, F].

Reference: the methods in :mod:`nmgrad_cli.methods` (``sample(a, n, u)`` on blocks). The kernels
compute the same function of the same uniforms in float32, with the IEEE-rounded division; they
can differ from the reference only by float32 rounding of sums (the CPU reference accumulates its
cumsums in float64), which moves a sampling boundary by ~1e-7 and so can flip a decision only for
uniforms within ~1e-7 of it.

- ``axis="features"``: blocks of M consecutive columns of dY (the pruning for dX = dY^ W).
- ``axis="tokens"``: blocks of M consecutive rows of dY (the pruning for dW = dY^^T X); by default
  the output is written transposed, dY^^T [F, T], so the weight-gradient GEMM gets its sparse
  operand K-major (2:4 along its reduction dim) without a separate transpose.

Random numbers: in-kernel Philox (one Philox4x32 call gives four uniforms, shared by 4 / U
consecutive blocks of a row, keyed by (seed, row, block // (4 / U))), or supplied ``uniforms`` (K, U) in
``prune()``'s block order (for tests). Inputs fp32/fp16/bf16; output in the input dtype.

The kernels are loaded lazily (this module imports without triton) and run compiled on CUDA
tensors, or under the Triton interpreter when ``TRITON_INTERPRET=1`` (the only way on CPU tensors).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from ..errors import NmgradError
from ..methods import METHODS
from ..patterns import Pattern

log = logging.getLogger(__name__)

Axis = Literal["features", "tokens"]

_PATTERNS = {(1, 2), (2, 4)}
# derived from the registry: each method declares its kernel_code and n_uniforms once
_METHOD_CODES = {name: meth.kernel_code for name, meth in METHODS.items() if meth.kernel_code is not None}
_N_UNIFORMS = {  # (method, m) -> uniforms per block, the reference's n_uniforms at (m/2):m
    (name, m): METHODS[name].n_uniforms(Pattern(n, m)) for name in _METHOD_CODES for n, m in _PATTERNS
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_JIT_FILE = Path(__file__).with_name("_triton_prune_jit.py")
_DEFAULT_TILE = {"features": (16, 64), "tokens": (64, 16)}  # (BLOCK_R rows, BLOCK_G blocks)
DEFAULT_WARPS = 8
"""Warps per program. On an H200 (gpu_bench's tile sweep, mvue 2:4 on 16384 x 8192 bf16) 8 warps took
0.462 ms (features) and 0.543 ms (tokens) at the default tiles, 4 warps 0.569 and 0.621; the tiles
themselves mattered less than 3%, and tiles of 2048 blocks were 15-30% slower."""


class Compressed(NamedTuple):
    """A 2:4-pruned matrix A [R, L] and its CUTLASS semi-structured form (fp16/bf16).

    ``packed`` [R, L/2]: the two kept values of each block in order; ``meta`` [R, L/16] int16: the
    kept positions, reordered to CUTLASS's interleaved layout, exactly as
    ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass(pruned)``
    returns them. Ready for ``torch._sparse_semi_structured_mm(packed, meta, B)`` = A @ B (sm8x)."""

    pruned: torch.Tensor
    packed: torch.Tensor
    meta: torch.Tensor


def supports(method: str, n: int, m: int) -> bool:
    """Whether a Triton kernel exists for ``method`` at pattern n:m (1:2 and 2:4)."""
    return method in _METHOD_CODES and (n, m) in _PATTERNS


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """Whether the compiled kernels can run here: a CUDA device and triton importable."""
    return torch.cuda.is_available() and _triton_importable()


@functools.cache
def _jit_module(interpret: bool):
    """The kernel module, loaded compiled or wrapped by the interpreter (each once).

    Triton decides compiled-vs-interpreted when ``@triton.jit`` runs, so the kernel file is loaded
    as two separate modules with the interpreter knob set accordingly; this makes the choice per
    call instead of per process (and independent of import order in test runs)."""
    if not _triton_importable():
        raise NmgradError("the Triton kernels need triton: pip install 'nmgrad[gpu]' (or triton>=3.0)")
    import triton

    name = f"nmgrad_cli.kernels._triton_prune_jit_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, _JIT_FILE)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _interpret_for(x: torch.Tensor) -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    if x.is_cuda:
        return False
    raise NmgradError(
        "the Triton kernels run on CUDA tensors; on the CPU set TRITON_INTERPRET=1 to use the (slow) "
        "Triton interpreter, or use prune(..., backend='reference')"
    )


def n_uniforms(method: str, m: int) -> int:
    """Uniforms per block the kernel reads in supplied-uniform mode (the reference's n_uniforms)."""
    return _N_UNIFORMS[(method, m)]


def _parse(method: str, pattern) -> tuple[int, int]:
    if isinstance(pattern, str):
        from ..patterns import parse_pattern

        pattern = parse_pattern(pattern)
    n, m = (pattern.n, pattern.m) if hasattr(pattern, "n") else tuple(pattern)
    if not supports(method, n, m):
        raise NmgradError(
            f"no Triton kernel for {method} {n}:{m}: kernels exist for {', '.join(_METHOD_CODES)} at 1:2 "
            "and 2:4; use prune(..., backend='reference')"
        )
    return n, m


def _launch(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: int,
    length: int,
    strides_x: tuple[int, int],
    strides_y: tuple[int, int],
    method: str,
    n: int,
    m: int,
    uniforms: torch.Tensor | None,
    seed: int,
    tile: tuple[int, int],
    packed: torch.Tensor | None = None,
    meta: torch.Tensor | None = None,
    num_warps: int = DEFAULT_WARPS,
    cslt: bool = False,
) -> None:
    """One launch over the logical matrix X[r, l] (rows x length, blocks of m along l)."""
    groups = -(-length // m)
    kernels = _jit_module(_interpret_for(x))
    u_arg = uniforms if uniforms is not None else x  # unused pointer when PHILOX
    compress = packed is not None
    grid = launch_grid(rows, groups, tile)
    kernels.prune_kernel[grid](
        x,
        y,
        u_arg,
        packed if compress else y,
        meta if compress else y,
        rows,
        length,
        groups,
        strides_x[0],
        strides_x[1],
        strides_y[0],
        strides_y[1],
        seed,
        METHOD=_METHOD_CODES[method],
        N=n,
        M=m,
        U=n_uniforms(method, m),
        PHILOX=uniforms is None,
        COMPRESS=compress,
        CSLT=cslt,
        OUT_BF16=y.dtype == torch.bfloat16,
        BLOCK_R=tile[0],
        BLOCK_G=tile[1],
        num_warps=num_warps,
        enable_fp_fusion=False,  # no FMA contraction: the reference's (and the interpreter's) rounding
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


MAX_GRID_X = (1 << 31) - 1
"""CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65,535)."""


def launch_grid(rows: int, groups: int, tile: tuple[int, int]) -> tuple[int]:
    """The launch grid for ``rows`` x ``groups`` blocks in tiles of (BLOCK_R rows, BLOCK_G blocks).

    One axis, ``cdiv(rows, BLOCK_R) * cdiv(groups, BLOCK_G)`` programs: program p owns row tile
    ``p % cdiv(rows, BLOCK_R)`` and block tile ``p // cdiv(rows, BLOCK_R)`` (the kernel's indexing),
    so neither dimension is bound by the 65,535 limit of grid axes 1 and 2 (a tokens-axis launch
    has cdiv(T / 4, BLOCK_G) block tiles: over 65,535 past ~4.2M tokens with the default tile)."""
    block_r, block_g = tile
    programs = _cdiv(rows, block_r) * _cdiv(groups, block_g)
    if programs > MAX_GRID_X:
        raise NmgradError(
            f"{rows} x {groups} blocks in tiles of {tile} need {programs} programs, over CUDA's {MAX_GRID_X}: "
            "use a larger tile or split the tensor"
        )
    return (programs,)


def _check_uniforms(uniforms: torch.Tensor, k: int, method: str, m: int, device) -> torch.Tensor:
    u_cols = n_uniforms(method, m)
    if uniforms.shape != (k, u_cols):
        raise NmgradError(
            f"uniforms must have shape ({k}, {u_cols}) for {method} on this tensor, got {tuple(uniforms.shape)}"
        )
    return uniforms.to(device=device, dtype=torch.float32).contiguous()


def _seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        return int(seed) & ((1 << 63) - 1)
    return int(torch.randint(0, 1 << 62, (1,), generator=generator).item())


def prune_2d(
    dy: torch.Tensor,
    method: str,
    pattern="2:4",
    axis: Axis = "features",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    transpose_out: bool | None = None,
    out_dtype: torch.dtype | None = None,
    tile: tuple[int, int] | None = None,
    num_warps: int = DEFAULT_WARPS,
) -> torch.Tensor:
    """Prune a 2-D ``dy`` [T, F] to ``pattern`` along ``axis`` with one kernel launch.

    Returns [T, F], or [F, T] when ``transpose_out`` (default: True for ``tokens``, False for
    ``features``), in ``out_dtype`` (default ``dy``'s dtype; float32 in, bf16 out rounds the pruned
    values once, so the decisions are those of the float32 input). Equal to ``prune(dy, method, pattern, dim=1 | 0,
    uniforms=uniforms)`` (transposed for tokens) up to float32 rounding. Without ``uniforms`` the
    draw uses in-kernel Philox with ``seed`` (default: drawn from ``generator`` / torch's global RNG).
    ``tile`` = (rows, blocks) per program, powers of two (tests use small tiles), and ``num_warps``
    per program: launch parameters only, the result does not depend on them.
    """
    args = (seed, generator, uniforms, transpose_out, out_dtype, tile)
    return _prune(dy, method, pattern, axis, *args, compress=None, num_warps=num_warps)


def prune_compress_2d(
    dy: torch.Tensor,
    method: str,
    pattern="2:4",
    axis: Axis = "features",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tile: tuple[int, int] | None = None,
    num_warps: int = DEFAULT_WARPS,
) -> Compressed:
    """:func:`prune_2d` (2:4, fp16/bf16) that also writes the CUTLASS compressed values and metadata
    in the same pass; the sparse operand is [T, F] for features and [F, T] for tokens.

    The sparse operand must have rows % 32 == 0 and columns % 64 == 0 (CUTLASS's minimum tile). The
    kernel stores each metadata element directly at its place in CUTLASS's interleaved layout."""
    args = (seed, generator, uniforms, None, out_dtype, tile)
    return _prune(dy, method, pattern, axis, *args, compress="cutlass", num_warps=num_warps)


def prune_pack_2d(
    dy: torch.Tensor,
    method: str,
    axis: Axis = "features",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tile: tuple[int, int] | None = None,
    num_warps: int = DEFAULT_WARPS,
) -> torch.Tensor:
    """2:4 prune of ``dy`` [T, F] along ``axis`` written straight into cuSPARSELt's compressed
    buffer (:mod:`.cslt_layout`'s model, unverified on a GPU) of the sparse operand, one launch,
    no pruned dense tensor: dX's operand dY^ [T, F] (features) or dW's dY^^T [F, T] (tokens, read
    through strides: no transpose copy). Returns the (R, C/2 + C/16) buffer in ``out_dtype``
    (float16/bfloat16; default ``dy``'s), equal to ``cslt_layout.pack`` of :func:`prune_2d`'s
    result on the same draws."""
    args = (seed, generator, uniforms, None, out_dtype, tile)
    return _prune(dy, method, "2:4", axis, *args, compress="cslt", num_warps=num_warps)


def _prune(dy, method, pattern, axis, seed, generator, uniforms, transpose_out, out_dtype, tile, compress, num_warps):
    n, m = _parse(method, pattern)
    if dy.dim() != 2:
        raise NmgradError(f"prune_2d takes a 2-D tensor [T, F], got shape {tuple(dy.shape)}: reshape it first")
    out_dtype = out_dtype or dy.dtype
    if dy.dtype not in _DTYPES or out_dtype not in _DTYPES:
        raise NmgradError(f"prune_2d takes and returns float32, float16 or bfloat16, got {dy.dtype} -> {out_dtype}")
    if axis not in ("features", "tokens"):
        raise NmgradError(f"axis must be 'features' or 'tokens', got {axis!r}")
    t, f = dy.shape
    tokens = axis == "tokens"
    if transpose_out is None:
        transpose_out = tokens
    if compress is not None:
        transpose_out = tokens  # the sparse operand: [T, F] (features) or [F, T] (tokens)
    rows, length = (f, t) if tokens else (t, f)
    sx = (dy.stride(1), dy.stride(0)) if tokens else (dy.stride(0), dy.stride(1))
    out_shape = (f, t) if transpose_out else (t, f)
    out = torch.empty((0, 0) if compress == "cslt" else out_shape, dtype=out_dtype, device=dy.device)
    # Y[r, l]: r = f, l = t (tokens) or r = t, l = f (features)
    if tokens:
        sy = (out.stride(0), out.stride(1)) if transpose_out else (out.stride(1), out.stride(0))
    else:
        sy = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    k = rows * _cdiv(length, m)
    if uniforms is not None:
        uniforms = _check_uniforms(uniforms, k, method, m, dy.device)
    tile = tile or _DEFAULT_TILE[axis]
    share = {1: 4, 2: 2}.get(n_uniforms(method, m), 1)  # blocks per Philox call (the kernel's keying)
    if uniforms is None and tile[1] % share:
        raise NmgradError(
            f"tile {tile}: with in-kernel Philox, {method} {n}:{m} needs blocks per program a multiple of {share}"
        )
    packed = meta = None
    if compress is not None and ((n, m) != (2, 4) or out_dtype == torch.float32):
        raise NmgradError("the compressed format is for 2:4 in float16 or bfloat16 (float32 sparse is 1:2 tf32)")
    if compress == "cslt":
        from . import cslt_layout

        why = cslt_layout.layout_reason(rows, length, out_dtype)
        if why is not None:
            raise NmgradError(why)
        if tile[0] % 16:
            raise NmgradError(
                f"tile {tile}: cuSPARSELt's metadata pairs rows r and r + 8: rows per program must be a multiple of 16"
            )
        out = torch.empty(cslt_layout.buffer_shape(rows, length), dtype=out_dtype, device=dy.device)
        packed = out.view(-1)[: rows * length // 2]
        meta = out.view(-1).view(torch.uint8)[rows * length :]
    elif compress == "cutlass":
        if rows % 32 or length % 64:
            raise NmgradError(
                f"the compressed sparse operand is {rows} x {length}: CUTLASS needs rows a multiple of 32 and "
                "columns a multiple of 64; pad it or use prune_2d and a dense GEMM"
            )
        if tile[1] % 4:
            raise NmgradError(f"tile {tile}: the block count per program must be a multiple of 4 to pack metadata")
        packed = torch.empty((rows, length // 2), dtype=out_dtype, device=dy.device)
        meta = torch.empty((rows, length // 16), dtype=torch.int16, device=dy.device)
    if k:  # (nothing to launch for an empty tensor)
        seed = _seed(seed, generator)
        cslt = compress == "cslt"
        _launch(dy, out, rows, length, sx, sy, method, n, m, uniforms, seed, tile, packed, meta, num_warps, cslt)
    if compress != "cutlass":
        return out
    return Compressed(out, packed, meta)


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Variant(NamedTuple):
    """One compiled form of the kernel: everything that is a compile-time constant or a pointer type."""

    method: str
    pattern: tuple[int, int]
    dtype: torch.dtype
    out_dtype: torch.dtype
    philox: bool
    layout: str  # none, cutlass (values + CUTLASS metadata beside the pruned tensor) or cslt (the buffer only)
    arch: int  # compute capability as 80, 90


def kernel_variants(archs: tuple[int, ...] = (80, 90)) -> list[Variant]:
    """Every variant: methods x patterns x dtypes x Philox/uniforms x layout x arch (output dtype =
    input dtype; a float32 input with a half output differs from these only in its load type). The
    cuSPARSELt layout is modelled for sm90 only (sm8x runs the CUTLASS one)."""
    out = []
    for method in _METHOD_CODES:
        for n, m in sorted(_PATTERNS):
            for dtype in _DTYPES:
                for philox in (True, False):
                    for layout in ("none", "cutlass", "cslt"):
                        if layout != "none" and ((n, m) != (2, 4) or dtype == torch.float32):
                            continue
                        arches = [a for a in archs if layout != "cslt" or a >= 90]
                        out += [Variant(method, (n, m), dtype, dtype, philox, layout, a) for a in arches]
    return out


def compile_ahead(
    v: Variant,
    tile: tuple[int, int] = (16, 64),
    num_warps: int = DEFAULT_WARPS,
    seed_type: str = "i64",
    asm: str = "cubin",
) -> bytes | str:
    """Compile one variant for ``v.arch`` without a GPU (Triton -> PTX -> cubin with Triton's bundled
    ptxas) and return the cubin (``asm="ptx"``: the PTX text): catches what the interpreter accepts
    but the compiler rejects. ``seed_type``: Triton passes a seed below 2^31 (e.g. ``seed=1``) as
    i32, larger ones as i64."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n, m = v.pattern
    fn = _jit_module(False).prune_kernel
    t_in, t_out = _TRITON_DTYPES[v.dtype], _TRITON_DTYPES[v.out_dtype]
    meta = "*u8" if v.layout == "cslt" else "*i16"
    sig = {"x_ptr": f"*{t_in}", "y_ptr": f"*{t_out}", "u_ptr": "*fp32", "vals_ptr": f"*{t_out}", "meta_ptr": meta}
    sig |= {name: "i32" for name in ("R", "L", "G", "sxr", "sxl", "syr", "syl")} | {"seed": seed_type}
    const = dict(METHOD=_METHOD_CODES[v.method], N=n, M=m, U=n_uniforms(v.method, m), PHILOX=v.philox,
                 COMPRESS=v.layout != "none", CSLT=v.layout == "cslt", OUT_BF16=v.out_dtype == torch.bfloat16,
                 BLOCK_R=tile[0], BLOCK_G=tile[1])
    sig |= {name: "constexpr" for name in const}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): c for k, c in const.items()})
    options = {"num_warps": num_warps, "enable_fp_fusion": False}  # as _launch
    return triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=options).asm[asm]


def triton_sample_blocks(blocks: torch.Tensor, u: torch.Tensor, method: str, n: int) -> torch.Tensor:
    """The method's draw on blocks (K, M) with uniforms (K, U): ``prune()``'s triton backend."""
    k, m = blocks.shape
    if not supports(method, n, m):
        raise NmgradError(f"no Triton kernel for {method} {n}:{m}: use backend='reference'")
    if blocks.dtype not in _DTYPES:  # backend.resolve_backend sends float64 to the reference
        raise NmgradError(f"the Triton kernels compute in float32, got {blocks.dtype} blocks: use backend='reference'")
    # view the contiguous blocks as rows of up to 32 blocks: same block order, wider tiles
    per_row = min(32, k & -k) if k else 1
    x = blocks.contiguous().view(k // per_row, per_row * m)
    out = prune_2d(x, method, (n, m), "features", uniforms=u, tile=(16, per_row))
    return out.view(k, m)
