"""What a GEMM site is, and how a model's parameters are named as sites.

A site is a weight parameter consumed by a linear or convolution GEMM in the forward pass. It is
named by the parameter's qualified name without its ``.weight`` / ``_weight`` suffix (``fc1``,
``h.0.attn.c_attn``, ``layers.0.self_attn.out_proj``), so a module path glob like ``*self_attn*``
selects it. The packed attention projection ``in_proj_weight`` (3E, E) is three sites ``in_proj.q``,
``in_proj.k`` and ``in_proj.v``, rows [0, E), [E, 2E) and [2E, 3E) of the one parameter.

Layouts, i.e. how the stored weight enters the GEMM:

- ``linear``: ``F.linear(x, W, b)``, W (F, I): Y = X W^T + b
- ``matmul``: ``x @ W`` or ``torch.addmm(b, x, W)``, W (I, F) (Hugging Face ``Conv1D``): Y = X W + b
- ``conv1d``/``conv2d``/``conv3d``: ``F.convNd(x, W, b, ...)``, W (F, I/groups, *kernel)

Every site is computed as one of two canonical GEMMs, ``linear(x, W_FI, b)`` with W_FI (F, I) (the
transpose for ``matmul``, the row block for q/k/v) or a convolution, so capture stores W as (F, I)
for every linear-like site and evaluate's dX = dY W and dW = dY^T X are right for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GEMMS = ("linear", "matmul", "conv1d", "conv2d", "conv3d")
"""How a site's weight enters its GEMM (see the module docstring)."""

MODULE_TYPE = {"linear": "Linear", "matmul": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}
"""The dump's ``module_type`` of a site: the GEMM family (``Linear`` for both linear layouts)."""


@dataclass(frozen=True)
class Site:
    """One GEMM weight of a model."""

    name: str
    """Parameter name without ``.weight``/``_weight``; ``<mha>.in_proj.q`` (``.k``, ``.v``) for packed q/k/v."""
    param: str
    """The parameter's qualified name, e.g. ``layers.0.self_attn.in_proj_weight``."""
    gemm: str
    """linear, matmul, conv1d, conv2d or conv3d (see :data:`GEMMS`)."""
    owner: str
    """Class name of the module that holds the parameter (``Linear``, ``Conv1D``, ``MultiheadAttention``)."""
    rows: tuple[int, int] | None = None
    """Row range [start, stop) of a packed parameter (q, k, v of ``in_proj_weight``); None: all of it."""

    @property
    def module_type(self) -> str:
        return MODULE_TYPE[self.gemm]

    @property
    def is_conv(self) -> bool:
        return self.gemm.startswith("conv")

    def weight_fi(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as it enters the canonical GEMM: (F, I) for linear-like sites (a view)."""
        w = weight.t() if self.gemm == "matmul" else weight
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    def bias_part(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias if bias is None or self.rows is None else bias[self.rows[0]:self.rows[1]]

    def describe(self) -> dict:
        """The site as stored in dumps and config.json."""
        return {"name": self.name, "param": self.param, "gemm": self.gemm, "owner": self.owner,
                "rows": list(self.rows) if self.rows else None}


_GEMM_OWNERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def site_name(param_name: str) -> str:
    """``fc1.weight`` -> ``fc1``; ``attn.in_proj_weight`` -> ``attn.in_proj``; ``blk.w`` -> ``blk.w``."""
    for suffix in (".weight", "_weight"):
        if param_name.endswith(suffix) and len(param_name) > len(suffix):
            return param_name[: -len(suffix)]
    return param_name


class ParamIndex:
    """Every parameter of a model by identity: its qualified name and the class of its owner.

    A tied parameter (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) takes the name under
    a GEMM module (the ``nn.Linear`` or ``Conv1D``) when it has one, so the GEMM is named ``lm_head``.
    """

    def __init__(self, model: nn.Module):
        self.names: dict[int, str] = {}
        self.owners: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.rnn: set[int] = set()
        """Parameters of fused RNN modules (nn.RNN/GRU/LSTM): their GEMMs run inside one kernel."""
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for p_name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.RNNBase):
                    self.rnn.add(id(p))
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                key = id(p)
                gemm_owner = isinstance(module, _GEMM_OWNERS) or type(module).__name__ == "Conv1D"
                if key not in self.names or (gemm_owner and self.owners[key] not in _GEMM_OWNER_NAMES):
                    self.names[key] = full
                    self.owners[key] = type(module).__name__
                self.params[full] = p

    def name(self, t: torch.Tensor) -> str | None:
        return self.names.get(id(t)) if isinstance(t, nn.Parameter) else None

    def unique(self) -> dict[str, nn.Parameter]:
        """Qualified name -> parameter, one name per parameter (the chosen one)."""
        by_id = {id(p): p for p in self.params.values()}
        return {self.names[k]: p for k, p in by_id.items()}


_GEMM_OWNER_NAMES = {c.__name__ for c in _GEMM_OWNERS} | {"Conv1D", "NonDynamicallyQuantizableLinear"}
