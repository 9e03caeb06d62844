"""The backward GEMMs of a sparse-gradient layer, in one place.

This module is the seam between training and the kernels: every sparse-gradient layer computes
its dX and dW through :func:`grad_gemms` (Linear) or :func:`conv_grad_gemms` (Conv2d). On the CPU
they run the reference pruning (``prune()``) and *dense* GEMMs on the pruned tensor, which are the
same numbers an N:M sparse GEMM computes. A CUDA branch (``nmgrad_cli/sparse_backward.py``,
the GPU issue) slots into :func:`grad_gemms` only: it must compute the same function of the same
generator draws, and fall back to this path where the kernel is missing or the shape is too small.
"""

from __future__ import annotations

import torch

from ..backend import resolve_backend
from ..prune import prune_with
from .config import SparseGradConfig


def prune_dy(dy: torch.Tensor, cfg: SparseGradConfig, gemm: str, dim: int, gen: torch.Generator | None):
    """dY pruned N:M along ``dim`` for GEMM ``gemm``, or dY itself when that GEMM stays dense.

    The backend is :func:`nmgrad_cli.backend.resolve_backend`'s, in training mode (``fused`` is a
    preference, and the compiled CPU kernel runs from FUSED_TRAIN_MIN_NUMEL elements)."""
    if not cfg.prunes_gemm(gemm):
        return dy
    out, _ = prune_with(dy, cfg.method, cfg.parsed_pattern, dim, gen, backend=cfg.backend, training=True)
    return out


def _gpu_gemms(dy2d: torch.Tensor, cfg: SparseGradConfig) -> bool:
    """Whether the backward GEMMs run through ``sparse_backward`` (the Triton backend on CUDA)."""
    if not dy2d.is_cuda:
        return False
    pat = cfg.parsed_pattern
    choice = resolve_backend(cfg.method, pat, dy2d.dtype, dy2d.device, dy2d.numel(), cfg.backend, training=True)
    return choice.name == "triton"


def grad_gemms(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    w: torch.Tensor,
    cfg: SparseGradConfig,
    gen: torch.Generator | None,
    need_dx: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The two GEMMs of a Linear layer's backward on N:M-pruned neural gradients.

    With dY2d (T, F), X2d (T, I), W (F, I):
        dX = prune_F(dY) @ W      (T, I)   blocks along F, the reduction axis of this GEMM
        dW = prune_T(dY)^T @ X    (F, I)   blocks along T, the reduction axis of this GEMM
    The two prunings are independent draws from ``gen``, taken in the order dX then dW (a GEMM
    that is not needed draws nothing). A GEMM not in ``cfg.grad_gemms`` uses the dense dY.

    CUDA seam: a sparse-kernel branch replaces the two ``prune`` + ``@`` pairs by
    ``sparse_backward`` calls on the same draws; everything else stays here.
    """
    dx = dw = None
    # CUDA: Triton pruning + 2:4 sparse tensor-core GEMMs (dense GEMM fallback inside, logged once)
    # (each GEMM with its own config: a plan may give dX and dW other patterns, cfg.for_gemm)
    cx, cw = cfg.for_gemm("dx"), cfg.for_gemm("dw")
    if need_dx:
        if cfg.prunes_gemm("dx") and _gpu_gemms(dy2d, cx):
            from .. import sparse_backward

            dx = sparse_backward.grad_input(dy2d, w, cx.method, cx.parsed_pattern, generator=gen)  # (T, I)
        else:
            dx = prune_dy(dy2d, cx, "dx", -1, gen) @ w  # (T, I)
    if need_dw:
        if cfg.prunes_gemm("dw") and _gpu_gemms(dy2d, cw):
            from .. import sparse_backward

            dw = sparse_backward.grad_weight(dy2d, x2d, cw.method, cw.parsed_pattern, generator=gen)  # (F, I)
        else:
            dw = prune_dy(dy2d, cw, "dw", 0, gen).t() @ x2d  # (F, I)
    return dx, dw


def conv_grad_gemms(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    conv: dict,
    cfg: SparseGradConfig,
    gen: torch.Generator | None,
    need_dx: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The two GEMMs of a Conv1d/2d/3d backward on N:M-pruned neural gradients.

    dY (B, C, *S) (shown for Conv2d, S = (H, W)): features = C, tokens = B*H*W (flattened in
    (b, h, w) order). As implicit GEMMs,
    dX reduces over C and dW over the tokens, so
        dX = conv2d_input(prune_C(dY), W)      blocks along C
        dW = conv2d_weight(X, prune_T(dY))     blocks along B*H*W
    with independent draws (dX first), like :func:`grad_gemms`. ``conv`` holds stride, padding,
    dilation and groups.
    """
    dx = dw = None
    conv_input, conv_weight = _CONV_GRADS[dy.dim() - 2]
    if need_dx:
        dx = conv_input(x.shape, w, prune_dy(dy, cfg.for_gemm("dx"), "dx", 1, gen), **conv)
    if need_dw:
        dyw = dy
        if cfg.prunes_gemm("dw"):
            swap = (1, 0, *range(2, dy.dim()))  # (B, C, *S) <-> (C, B, *S)
            tokens = dy.permute(swap).reshape(dy.shape[1], -1)  # (C, T)
            tokens = prune_dy(tokens, cfg.for_gemm("dw"), "dw", 1, gen)
            dyw = tokens.reshape(dy.shape[1], dy.shape[0], *dy.shape[2:]).permute(swap)
        dw = conv_weight(x, w.shape, dyw, **conv)
    return dx, dw


_CONV_GRADS = {
    1: (torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
    2: (torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight),
    3: (torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight),
}
