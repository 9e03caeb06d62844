"""A plain-torch model of cuSPARSELt's compressed 2:4 operand for 16-bit dtypes on sm90.

**Unverified on a GPU.** This is the starting hypothesis of issue 18, read from public sources
(torchao's sm90 sparsify kernel and its ``MetadataCusparseLt16bits``, xformers'
``store_metadata_reordered``), not yet compared with ``torch._cslt_compress``. The first step of
``benchmarks/gpu_session.sh`` compares :func:`pack`'s bytes with ``_cslt_compress``'s (values and
metadata regions counted apart) and, where they differ, ``benchmarks/compress_probe.py`` recovers
the real mapping so this file can be corrected on a CPU. Until that check has passed, nothing
routes a GEMM through these bytes without first checking its product against a dense GEMM
(``kernels.sparse_gemm``).

The model, for A (R, C) 2:4-sparse along C (blocks of 4 columns), bf16 or fp16, one buffer of
(R, C/2 + C/16) elements (``_cslt_compress``'s size: R*C bytes of values, R*C/8 of metadata):

- values: elements [0, R*C/2), row-major (R, C/2); block b of row r holds its two kept values at
  (r, 2b) and (r, 2b + 1), in ascending column order;
- metadata: bytes [R*C, R*C + R*C/8), one nibble ``i0 | i1 << 2`` per block (i0 < i1 the kept
  positions in 0..3). Block (r, c) (c its first column, q = (c % 32) // 4) is in byte
  ``(r // 64) * 8 * C + (c // 32) * 256 + ((r % 64) // 16) * 64 + 8 * (r % 8) + 2 * (q % 4) + q // 4``,
  the low nibble for ``r % 16 < 8``, the high one otherwise.

A block with fewer than 2 non-zeros keeps zeros at the positions torch's CUTLASS compressor
picks (:func:`kept_indices`), so i0 < i1 always. -0.0 counts as zero. R must be a multiple of 64
and C of 32 (:func:`layout_reason`); the GEMM dispatch sends other shapes to the dense GEMM.
"""

from __future__ import annotations

import torch

from ..errors import NmgradError

ROW_ALIGN = 64
COL_ALIGN = 32
DTYPES = (torch.float16, torch.bfloat16)
VERIFIED_ON_GPU = False
"""Set True only after gpu_session.sh's byte check matched ``_cslt_compress`` on a GPU (say which)."""


def layout_reason(rows: int, cols: int, dtype: torch.dtype) -> str | None:
    """Why an (rows, cols) ``dtype`` operand cannot take this layout, or None when it can."""
    if dtype not in DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"the cuSPARSELt 2:4 layout modelled here is for float16/bfloat16, got {name}"
    if rows % ROW_ALIGN or cols % COL_ALIGN:
        return (
            f"the compressed 2:4 operand is {rows} x {cols}: rows must be a multiple of {ROW_ALIGN} and columns "
            f"of {COL_ALIGN} (pad it, or use the dense GEMM)"
        )
    return None


def buffer_shape(rows: int, cols: int) -> tuple[int, int]:
    """(R, C/2 + C/16): the compressed buffer's shape in 16-bit elements."""
    return rows, cols // 2 + cols // 16


def kept_indices(nz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i0, i1), i0 < i1, the positions stored for blocks whose non-zero flags are ``nz`` (..., 4):
    the non-zeros, completed with zero positions as torch's CUTLASS compressor completes them."""
    nz0, nz1, nz3 = nz[..., 0], nz[..., 1], nz[..., 3]
    e0 = nz0 & nz1
    e1 = ~nz0 & nz1
    e2 = ~nz0 & ~nz1
    i0 = e1.long() | (e2.long() << 1)
    i1 = (e0 | e2 | nz3).long() | ((e1 | ~nz1).long() << 1)
    return i0, i1


def meta_offsets(rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte, shift) of every block's nibble, each (rows, cols / 4): byte from the start of the
    metadata region, shift 0 (low nibble) or 4."""
    r = torch.arange(rows, device=device).view(-1, 1)
    c = torch.arange(0, cols, 4, device=device).view(1, -1)
    q = (c % 32) // 4
    byte = (r // 64) * 8 * cols + (c // 32) * 256 + ((r % 64) // 16) * 64 + 8 * (r % 8) + 2 * (q % 4) + q // 4
    shift = torch.where(r % 16 < 8, 0, 4).expand_as(byte)
    return byte, shift


def _check(rows: int, cols: int, dtype: torch.dtype) -> None:
    why = layout_reason(rows, cols, dtype)
    if why is not None:
        raise NmgradError(why)


def pack(a: torch.Tensor) -> torch.Tensor:
    """The compressed buffer (R, C/2 + C/16) of a 2:4-sparse (R, C) float16/bfloat16 ``a``."""
    if a.dim() != 2:
        raise NmgradError(f"pack takes a 2-D (R, C) operand, got shape {tuple(a.shape)}")
    rows, cols = a.shape
    _check(rows, cols, a.dtype)
    blocks = a.reshape(rows, cols // 4, 4)
    nz = blocks != 0
    if bool((nz.sum(-1) > 2).any()):
        raise NmgradError("pack takes a 2:4-sparse operand (at most 2 non-zeros per 4 columns): prune it first")
    i0, i1 = kept_indices(nz)
    values = torch.stack([blocks.gather(-1, i0[..., None]), blocks.gather(-1, i1[..., None])], -1)
    byte, shift = meta_offsets(rows, cols, a.device)
    nibble = (i0 | (i1 << 2)) << shift
    meta = torch.zeros(rows * cols // 8, dtype=torch.int64, device=a.device)
    meta.index_add_(0, byte.reshape(-1), nibble.reshape(-1))  # disjoint nibbles: the sum is the OR
    buf = torch.empty(buffer_shape(rows, cols), dtype=a.dtype, device=a.device)
    flat = buf.view(-1)
    flat[: rows * cols // 2] = values.reshape(-1)
    flat.view(torch.uint8)[rows * cols :] = meta.to(torch.uint8)
    return buf


def split(buf: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (R, C/2), metadata bytes (R*C/8,) uint8): the two regions of a buffer, as views."""
    rows, cols = shape
    _check(rows, cols, buf.dtype)
    if buf.numel() != rows * (cols // 2 + cols // 16):
        raise NmgradError(
            f"a compressed {rows} x {cols} operand has {rows * (cols // 2 + cols // 16)} elements, got {buf.numel()}"
        )
    flat = buf.reshape(-1)
    return flat[: rows * cols // 2].view(rows, cols // 2), flat.view(torch.uint8)[rows * cols :]


def unpack(buf: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense (R, C) operand a compressed buffer stands for (:func:`pack`'s inverse)."""
    rows, cols = shape
    values, meta = split(buf, shape)
    byte, shift = meta_offsets(rows, cols, buf.device)
    nibble = (meta.long()[byte] >> shift) & 0xF
    i0, i1 = nibble & 3, nibble >> 2
    v = values.reshape(rows, cols // 4, 2)
    out = torch.zeros(rows, cols // 4, 4, dtype=buf.dtype, device=buf.device)
    out.scatter_(-1, i0[..., None], v[..., :1])
    out.scatter_(-1, i1[..., None], v[..., 1:])
    return out.reshape(rows, cols)
