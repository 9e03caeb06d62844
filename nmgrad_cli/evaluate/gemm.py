"""The backward GEMMs a pruned dY feeds, and their operands from the dump (docs/methods.md):

- axis ``features``: dX = dY W    (T, F) @ (F, I), the right operand the layer's weight;
- axis ``tokens``:   dW = dY^T X  (F, T) @ (T, I), the right operand the layer's input.

A Conv2d's operands are the implicit GEMM's: the weight as a (block-diagonal over groups) matrix,
the input unfolded with the conv's stride/padding/dilation. :class:`GemmError` is the Monte-Carlo
cross-check of :func:`nmgrad_cli.metrics.gemm_moments`'s exact error.
"""

from __future__ import annotations

import math

import torch

from ..dump import DumpReader, Record
from ..patterns import Pattern
from ..prune import prune
from .config import AXIS_DIM, GEMM_OF_AXIS


class GemmError:
    """Monte-Carlo relative error of the backward GEMM fed with pruned g (docs/methods.md):

    - axis ``features``: dX = g @ W with ``other`` = W (F, I), blocks along F;
    - axis ``tokens``:   dW = g^T @ X with ``other`` = X (T, I), blocks along T.

    :meth:`add` takes one draw g^ (T, F); :meth:`result` gives err = mean_s ||G^_s - G||^2 / ||G||^2
    with its standard error (and the absolute values). Computed in float32 (float64 for float64 input)
    as (g^ - g) @ W, one GEMM per draw.
    """

    def __init__(self, g: torch.Tensor, other: torch.Tensor, axis: str):
        self.axis = axis
        self.cdt = torch.float64 if torch.float64 in (g.dtype, other.dtype) else torch.float32
        self.g, self.other = g.to(self.cdt), other.to(self.cdt)
        self.norm2 = float(torch.sum(self._gemm(self.g).double() ** 2))
        self.errs: list[float] = []

    def _gemm(self, a: torch.Tensor) -> torch.Tensor:
        if self.axis == "features":
            return a @ self.other
        if self.other.dim() == 3:  # grouped (a grouped conv's dW): feature group j times other[j]
            groups = self.other.shape[0]
            return (a.T.reshape(groups, -1, a.shape[0]) @ self.other).reshape(a.shape[1], -1)
        return a.T @ self.other

    def add(self, draw: torch.Tensor) -> None:
        self.errs.append(float(torch.sum(self._gemm(draw.to(self.cdt) - self.g).double() ** 2)))

    @classmethod
    def from_sums(cls, axis: str, norm2: float, errs: list[float]) -> GemmError:
        """The accumulator of a record evaluated in pieces (:mod:`.chunked`): ||G||^2 and every draw's
        ||G^_s - G||^2 summed over the pieces' rows of the product."""
        acc = cls.__new__(cls)
        acc.axis, acc.norm2, acc.errs = axis, norm2, list(errs)
        return acc

    def result(self) -> dict:
        n = len(self.errs)
        e = torch.tensor(self.errs, dtype=torch.float64)
        err_abs = e.mean().item() if n else 0.0  # no draws: g is all zero, so is the error
        err_abs_se = e.std(unbiased=True).item() / math.sqrt(n) if n > 1 else (0.0 if n == 0 else None)
        rel = (lambda x: x / self.norm2) if self.norm2 > 0 else (lambda x: 0.0)
        return {
            "target": GEMM_OF_AXIS[self.axis],
            "err": rel(err_abs),
            "err_se": None if err_abs_se is None else rel(err_abs_se),
            "err_abs": err_abs,
            "err_abs_se": err_abs_se,
            "norm2": self.norm2,
        }


def gemm_error(
    g: torch.Tensor, other: torch.Tensor, method: str, pattern: Pattern, axis: str, samples: int, generator=None
) -> dict:
    """:class:`GemmError` of ``samples`` draws of ``method`` on g (T, F) along ``axis``."""
    acc = GemmError(g, other, axis)
    for _ in range(samples):
        acc.add(prune(g, method, pattern, AXIS_DIM[axis], generator, stream="generator"))
    return acc.result()


def gemm_operands(
    reader: DumpReader, rec: Record, g: torch.Tensor, g2: torch.Tensor, axes: tuple[str, ...]
) -> tuple[dict, str | None]:
    """{axis: (a, b)} with the backward GEMM a @ b whose left operand a is pruned along its last dim,
    for the axes whose operand the dump holds; else a note on why not.

    - Linear-like (feature axis last): features a = dY (T, F), b = W (F, I); tokens a = dY^T (F, T),
      b = X (T, I).
    - Linear-like on N-D activations (ConvNeXt's pointwise Linears on (B, H, W, C)): the same, with
      every dim but the last flattened into T.
    - Conv1d/2d/3d (dY (B, F, *spatial)): features a = dY as (T = B*prod(spatial), F), b = W as
      (F, C_in*prod(kernel)) (block-diagonal over groups), the implicit GEMM whose output col2im
      folds into dX; tokens a = dY^T (F, T), b = X unfolded with the conv's stride/padding/dilation
      (T, C_in*prod(kernel)), or with G groups (G, T, C_in/G*prod(kernel)), feature group j times
      b[j] (:func:`conv_input_matrix`, from the layer's ``conv`` attribute).
    """
    layer = rec.layer
    kinds = {"features": "weight", "tokens": "input"}
    present = [a for a in axes if rec.name in layer.records.get(kinds[a], [])]
    if not present:
        return {}, None
    last = layer.feature_axis in (-1, g.dim() - 1)
    conv = not last and g.dim() >= 3 and layer.feature_axis == 1 and layer.module_type.startswith("Conv")
    if not last and not conv:
        return {}, (
            f"layer {layer.name} ({layer.module_type}): GEMM-level errors skipped, they are computed for "
            "Linear-like layers (feature axis last) and Conv1d/2d/3d (features on dim 1)"
        )
    f = g2.shape[1]
    out = {}
    conv_note = None
    loaded = {kind: reader.load(layer.key, kind, rec.name) for kind in {kinds[a] for a in present}}
    for kind, v in loaded.items():
        if not bool(torch.isfinite(v).all()):
            return {}, f"layer {layer.name}: the stored {kind} has NaN/Inf values; GEMM skipped"
    for axis in present:
        v = loaded[kinds[axis]]
        if conv:
            if axis == "tokens":
                xu = conv_input_matrix(v, layer.conv, layer.weight_shape, g.shape)
                if isinstance(xu, str):
                    conv_note = (
                        f"layer {layer.name} ({layer.module_type}): dW errors skipped, {xu}; dX errors are computed"
                    )
                else:
                    out[axis] = (g2.T, xu)
                continue
            w = _conv_weight_matrix(v, f, reader, rec)
            if isinstance(w, str):
                return {}, f"layer {layer.name} ({layer.module_type}): {w}; GEMM skipped"
            out[axis] = (g2, w)
        elif axis == "features":
            if v.dim() != 2 or v.shape[0] != f:
                return {}, f"layer {layer.name}: weight of shape {tuple(v.shape)} is not (F={f}, I); GEMM skipped"
            out[axis] = (g2, v)
        else:
            if v.dim() != g.dim() or v.shape[:-1] != g.shape[:-1]:
                return {}, (
                    f"layer {layer.name}: input of shape {tuple(v.shape)} does not have dY's token dims "
                    f"{tuple(g.shape[:-1])}; GEMM skipped"
                )
            out[axis] = (g2.T, v.reshape(-1, v.shape[-1]))
    return out, conv_note


def conv_input_matrix(
    x: torch.Tensor, conv: dict | None, weight_shape: tuple[int, ...] | None, dy_shape: torch.Size
) -> torch.Tensor | str:
    """The input x (B, C_in, *spatial) of a Conv1d/2d/3d unfolded as the (T = B*prod(out), C_in*prod(k))
    operand of dW = dY^T X_unf, rows in dY's token order (b, *out), columns (channel, *kernel) as
    ``F.unfold`` orders them; or why it cannot be built. With G > 1 groups, (G, T, C_in/G*prod(k)):
    group j's channels, whose GEMM with feature group j of dY^T gives those features' rows of dW.

    ``conv`` is the dump's layer attribute (stride, padding, dilation, groups); padding 'same' pads
    dilation*(k-1) per dim, the extra one after, as torch does."""
    if conv is None:
        return "the dump holds no conv parameters (stride, padding): recapture it with this version"
    nd = x.dim() - 2
    if weight_shape is None or len(weight_shape) != x.dim() or nd < 1 or len(dy_shape) != x.dim():
        return f"input {tuple(x.shape)} / weight {weight_shape} are not a convolution's"
    groups = int(conv["groups"])
    if groups < 1 or weight_shape[1] * groups != x.shape[1] or weight_shape[0] % groups:
        return f"weight {tuple(weight_shape)} with groups={groups} does not fit an input with {x.shape[1]} channels"
    k = tuple(weight_shape[2:])

    def per_dim(v) -> tuple[int, ...]:
        return (int(v),) * nd if isinstance(v, int) else tuple(int(i) for i in v) * (nd if len(v) == 1 else 1)

    stride, dilation = per_dim(conv["stride"]), per_dim(conv["dilation"])
    padding = conv["padding"]
    if padding == "valid":
        padding = 0
    if padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in per_dim(padding)]
    cols = unfold_nd(x, k, stride, pads, dilation)  # (B, C*prod(k), L)
    b, _, length = cols.shape
    if b != dy_shape[0] or length != math.prod(dy_shape[2:]):
        return f"the unfolded input ({b} x {length} positions) does not match dY {tuple(dy_shape)}"
    if groups == 1:
        return cols.transpose(1, 2).reshape(b * length, -1)
    # rows are (channel, *kernel) with the channel slowest: group j is a contiguous slice
    return cols.view(b, groups, -1, length).permute(1, 0, 3, 2).reshape(groups, b * length, -1)


def unfold_nd(
    x: torch.Tensor, k: tuple[int, ...], stride: tuple[int, ...], pads: list[tuple[int, int]],
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """``F.unfold`` for any number of spatial dims: x (B, C, *S) -> (B, C*prod(k), prod(out)), the
    patch of output position o at input o*stride + j*dilation (after padding), columns (c, *j)."""
    nd = len(k)
    flat = [p for before, after in reversed(pads) for p in (before, after)]
    x = torch.nn.functional.pad(x, flat) if any(flat) else x
    for i in range(nd):  # each unfold appends a window dim; the spatial dims keep their places
        x = x.unfold(2 + i, dilation[i] * (k[i] - 1) + 1, stride[i])[..., :: dilation[i]]
    b, c, out = x.shape[0], x.shape[1], x.shape[2 : 2 + nd]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))  # (B, C, *k, *out)
    return x.reshape(b, c * math.prod(k), math.prod(out))


def _conv_weight_matrix(w: torch.Tensor, f: int, reader: DumpReader, rec: Record) -> torch.Tensor | str:
    """A convolution weight (F, C_in/groups, *kernel) as the (F, C_in*prod(kernel)) matrix of the dX
    GEMM, block-diagonal over the groups (groups = C_in / w.shape[1], C_in from the stored input)."""
    if w.dim() < 3 or w.shape[0] != f:
        return f"weight of shape {tuple(w.shape)} is not (F={f}, C_in/groups, *kernel)"
    layer = rec.layer
    if rec.name not in layer.records.get("input", []):
        return "the input is needed to know the conv's groups and the dump does not hold it"
    c_in = reader.load(layer.key, "input", rec.name).shape[1]
    per = w.shape[1]
    if c_in % per or f % (c_in // per):
        return f"weight {tuple(w.shape)} does not fit an input with {c_in} channels"
    groups = c_in // per
    if groups == 1:
        return w.reshape(f, -1)
    fo, cols = f // groups, w[0].numel()
    full = torch.zeros(f, groups * cols, dtype=w.dtype)
    for j in range(groups):
        full[j * fo : (j + 1) * fo, j * cols : (j + 1) * cols] = w[j * fo : (j + 1) * fo].reshape(fo, cols)
    return full
