"""Training with N:M-sparse neural gradients: sparse-gradient GEMMs and a small trainer.

- :mod:`.sparse_grad`: linear/conv whose backward prunes dY, the GEMM-site handler
  ``SparseGradSites``, and ``sparsify_gradients_`` (a module swap, a thin alias of the handler).
- :mod:`.gemm`: the backward GEMMs (the seam for the GPU sparse kernels).
- :mod:`.trainer` (``train``), :mod:`.compare`, :mod:`.run` (one run), :mod:`.loop` (the one loop).
"""

from .config import DENSE, SparseGradConfig
from .sparse_grad import (
    SparseGradConv2d,
    SparseGradLinear,
    refresh_weight_masks_,
    sparse_grad_conv2d,
    sparse_grad_layers,
    sparse_grad_linear,
    sparsify_gradients_,
)

__all__ = [
    "DENSE",
    "SparseGradConfig",
    "SparseGradConv2d",
    "SparseGradLinear",
    "refresh_weight_masks_",
    "sparse_grad_conv2d",
    "sparse_grad_layers",
    "sparse_grad_linear",
    "sparsify_gradients_",
]
