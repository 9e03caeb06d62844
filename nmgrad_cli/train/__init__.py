"""Training with N:M-sparse neural gradients: sparse-gradient layers and a small trainer.

- :mod:`.sparse_grad`: Linear/Conv2d whose backward prunes dY, and ``sparsify_gradients_``.
- :mod:`.gemm`: the backward GEMMs (the seam for the GPU sparse kernels).
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
