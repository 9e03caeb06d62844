"""Configuration of gradient (and weight) sparsity for one model: :class:`SparseGradConfig`."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from ..backend import BACKENDS, backend_record
from ..errors import MethodError, NmgradError
from ..methods import METHODS
from ..patterns import Pattern, parse_pattern
from ..prune import resolve

DENSE = "dense"
"""The method name that means "no gradient pruning" (not a registry method: nothing is pruned)."""

GEMMS = ("dx", "dw")
"""The backward GEMMs that consume the neural gradient dY: dX = dY W and dW = dY^T X."""


def parse_gemms(spec: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"dx,dw"`` (or a sequence) -> ``("dx", "dw")`` in canonical order; ``""``/``"none"`` -> ``()``."""
    if spec is None:
        return ()
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s and s != "none"]
    bad = [s for s in items if s not in GEMMS]
    if bad:
        raise NmgradError(f"unknown grad GEMM '{bad[0]}': choose from dx, dw (e.g. --grad-gemms dx,dw)")
    return tuple(g for g in GEMMS if g in items)


@dataclass(frozen=True)
class SparseGradConfig:
    """How the sparse-gradient layers prune: one config for every swapped layer of a model."""

    method: str
    """Registry method pruning dY (``nmgrad methods``), or ``"dense"`` for no gradient pruning."""
    pattern: str = "2:4"
    """N:M pattern of the pruned dY, along the reduction axis of each GEMM (features for dX, tokens for dW)."""
    grad_gemms: tuple[str, ...] = GEMMS
    """Which backward GEMMs get a pruned dY: a subset of ``("dx", "dw")``; the others use the dense dY."""
    weight_pattern: str | None = None
    """Optional N:M pattern of the *weights* in the forward (magnitude mask along in-features)."""
    weight_every: int = 100
    """Recompute the weight mask every this many optimizer steps (see ``refresh_weight_masks_``)."""
    seed: int = 0
    """Seeds each layer's generator (together with the layer name and the rank offset)."""
    dw_method: str | None = None
    """The dW GEMM's method where it differs from ``method`` (a per-site plan, ``train --plan``);
    None: ``method``. ``method``/``pattern`` are then the dX GEMM's (see :meth:`for_gemm`)."""
    dw_pattern: str | None = None
    """The dW GEMM's pattern where it differs from ``pattern`` (a plan); None: ``pattern``."""
    backend: str = "auto"
    """Pruning backend: auto, reference, triton, or fused; :func:`nmgrad_cli.backend.resolve_backend`
    decides per tensor in training mode (auto and fused: the compiled CPU kernel where it supports
    the method, pattern and size, Triton on CUDA, else the reference)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grad_gemms", parse_gemms(self.grad_gemms))
        object.__setattr__(self, "pattern", str(parse_pattern(self.pattern)))
        if self.method != DENSE and self.method not in METHODS:
            raise MethodError(f"unknown method '{self.method}': choose one of {DENSE}, {', '.join(METHODS)}")
        if self.method != DENSE:
            resolve(self.method, self.pattern)  # unknown method / undefined for the pattern
        if self.dw_method is not None or self.dw_pattern is not None:
            dw = self.for_gemm("dw")
            if dw.method != DENSE:
                resolve(dw.method, dw.pattern)
        if self.weight_pattern is not None:
            object.__setattr__(self, "weight_pattern", str(parse_pattern(self.weight_pattern)))
        if self.weight_every < 1:
            raise NmgradError(f"weight_every must be >= 1 step, got {self.weight_every}")
        if self.backend not in BACKENDS:
            raise NmgradError(f"unknown backend '{self.backend}': choose one of {', '.join(BACKENDS)}")

    @property
    def prunes(self) -> bool:
        """True when some backward GEMM gets a pruned dY."""
        return any(self.prunes_gemm(g) for g in self.grad_gemms)

    def prunes_gemm(self, gemm: str) -> bool:
        """True when GEMM ``gemm`` ("dx" or "dw") gets a pruned dY."""
        return self.for_gemm(gemm).method != DENSE and gemm in self.grad_gemms

    def for_gemm(self, gemm: str) -> SparseGradConfig:
        """The config of GEMM ``gemm`` alone: ``self``, or for "dw" with ``dw_method``/``dw_pattern``
        set, a copy with those as its method and pattern."""
        if gemm == "dx" or (self.dw_method is None and self.dw_pattern is None):
            return self
        return _dw_config(self)

    @functools.cached_property
    def parsed_pattern(self) -> Pattern:
        """``pattern`` parsed once (the string stays the field, for the JSON outputs)."""
        return parse_pattern(self.pattern)

    def backend_record(self, dtype=None, device="cpu") -> dict | None:
        """What the pruning runs on (:func:`nmgrad_cli.backend.backend_record`), None when nothing is
        pruned; for config.json."""
        if not self.prunes:
            return None
        import torch

        return backend_record(
            self.method, self.parsed_pattern, dtype or torch.float32, device, self.backend, training=True
        )

    @functools.cached_property
    def parsed_weight_pattern(self) -> Pattern | None:
        return None if self.weight_pattern is None else parse_pattern(self.weight_pattern)


@functools.lru_cache(maxsize=1024)
def _dw_config(cfg: SparseGradConfig) -> SparseGradConfig:
    """``cfg``'s dW GEMM as a config of its own (cached: called in every backward)."""
    return dataclasses.replace(
        cfg, method=cfg.dw_method or cfg.method, pattern=cfg.dw_pattern or cfg.pattern, dw_method=None, dw_pattern=None
    )
