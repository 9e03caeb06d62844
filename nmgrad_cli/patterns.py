"""N:M patterns and the block view of a tensor.

A pattern ``N:M`` keeps at most N non-zeros in every block of M consecutive elements along one
dimension (the block axis). ``to_blocks`` moves that dimension last, zero-pads it to a multiple of M
and reshapes to ``(K, M)`` blocks; ``from_blocks`` undoes it exactly, so padding never reaches the
caller. Padding with zeros is harmless for every method: a zero is never kept and never changes the
other elements' keep-probabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import PatternError

MAX_M = 64
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """An N:M sparsity pattern."""

    n: int
    """Elements kept per block (1 <= n < m)."""
    m: int
    """Block size along the block axis."""

    def __post_init__(self) -> None:
        if not (1 <= self.n < self.m):
            raise PatternError(
                f"pattern '{self.n}:{self.m}' is invalid: need 1 <= N < M, e.g. 2:4 or 1:2"
            )
        if self.m > MAX_M:
            raise PatternError(f"pattern '{self}' is invalid: M must be at most {MAX_M}, e.g. 2:4")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        """Fraction of elements kept, N/M."""
        return self.n / self.m


def parse_pattern(spec: str | Pattern) -> Pattern:
    """Parse ``"N:M"`` (e.g. ``"2:4"``) into a :class:`Pattern`."""
    if isinstance(spec, Pattern):
        return spec
    match = _PATTERN_RE.match(str(spec))
    if not match:
        raise PatternError(f"pattern '{spec}' is malformed: write it as N:M with 1 <= N < M, e.g. 2:4")
    return Pattern(int(match.group(1)), int(match.group(2)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for half types and float32, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BlockView:
    """How a tensor was turned into blocks, so that :func:`from_blocks` can undo it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    dim: int
    length: int  # size of the block axis before padding


def to_blocks(x: torch.Tensor, m: int, dim: int = -1, dtype: torch.dtype | None = None):
    """Return ``(blocks, view)``: blocks is ``(K, m)`` in the compute dtype, zero-padded."""
    if not x.is_floating_point():
        raise PatternError(f"expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise PatternError("cannot block a 0-d tensor: give a tensor with at least one dimension")
    ndim = x.dim()
    if not -ndim <= dim < ndim:
        raise PatternError(f"dim {dim} is out of range for a tensor with {ndim} dims")
    dim = dim % ndim
    cdt = dtype or compute_dtype(x.dtype)
    moved = x.movedim(dim, -1).to(cdt)
    length = moved.shape[-1]
    pad = (-length) % m
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    blocks = moved.reshape(-1, m)
    return blocks, BlockView(tuple(x.shape), x.dtype, dim, length)


def from_blocks(blocks: torch.Tensor, view: BlockView, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drop padding, restore the shape and (by default) the dtype."""
    shape = list(view.shape)
    moved_shape = shape[: view.dim] + shape[view.dim + 1 :] + [-1]
    moved = blocks.reshape(moved_shape)[..., : view.length]
    out = moved.movedim(-1, view.dim)
    return out.to(dtype or view.dtype).contiguous()
