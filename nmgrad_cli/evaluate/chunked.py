"""A record evaluated in pieces, in the memory ``--memory-budget`` allows, with the whole record's results.

A piece is a run of blocks: rows of the (T, F) view for axis ``features`` (blocks along F), columns
for ``tokens`` (blocks along T), read from the dump as an h5py selection, so the record is never in
memory whole. Every result is a sum over blocks (the exact moments, ||g||^2, the GEMM moments over
rows of the product) or is built from such sums at the end (each draw's <g^, g> and ||g^||^2 give
its angle once ||g||^2 is known), so the pieces add up to the whole record's numbers, up to float64
rounding (:func:`tests.test_evaluate_chunked`).

The draws are the whole record's draws too: one draw of K blocks consumes K x n_uniforms
``torch.rand`` numbers from the (axis, method) generator, draw after draw, and ``torch.rand`` on the
CPU gives the same numbers in one call or in several. A first pass records the generator's state
where each (draw, piece) starts, advancing it by the piece's count (it costs as many random
numbers as the draws); then each piece is read once and all its draws are made from those states.

What stays whole: the GEMM's right operand (the weight, or the input for ``tokens``), which is
counted against the budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch

from ..dump import DumpReader, LayerInfo, Record
from ..errors import NmgradError
from ..metrics import (
    DRAW_CHUNK,
    REDUCED_ANGLES,
    GemmMoments,
    Metrics,
    _angle_stats,
    _AngleTerms,
    _cos_to_degrees,
    exact_moments,
    gemm_moments,
)
from ..patterns import BlockView, from_blocks, to_blocks
from ..prune import draw_uniforms, prune, resolve
from .config import AXIS_DIM, EvalConfig

WHOLE_BYTES_PER_FLOAT = 112
"""Peak working set of one (axis, method) job on a whole record, in bytes per dY float (the float64
copies and marginals of the exact moments, the draws' law, the angle weights and masks): the
GPT-2-small dump's 12.9 M-float lm_head record took a peak RSS of 1822 MB, ~350 MB of it the
process (BENCHMARKS.md)."""

PIECE_BYTES_PER_FLOAT = 96
"""The same for a piece here (its float64 copy, the law, a batch of draws and masks in float64)."""

OPERAND_BYTES_PER_FLOAT = 5
"""Bytes per float32 element of a GEMM operand held whole (itself, its float64 copy, zero-padded)."""


def _token_dims(layer: LayerInfo, shape: tuple[int, ...]) -> tuple[int, list[int]]:
    fa = layer.feature_axis % len(shape)
    return fa, [i for i in range(len(shape)) if i != fa]


def pieces(rec: Record, axis: str, max_floats: int) -> list[tuple]:
    """h5py selections (tuples of slices over the stored dims) of the record's pieces for ``axis``,
    in block order, each at most ``max_floats`` floats where one row (column) allows."""
    shape = tuple(rec.shape)
    if len(shape) < 2:
        return [tuple(slice(None) for _ in shape)]
    fa, tok = _token_dims(rec.layer, shape)
    full = [slice(None)] * len(shape)
    if axis == "tokens":  # columns f0:f1 of (T, F): blocks along T, column after column
        t = math.prod(shape[i] for i in tok)
        step = max(1, max_floats // max(1, t))
        out = []
        for f0 in range(0, shape[fa], step):
            idx = list(full)
            idx[fa] = slice(f0, min(f0 + step, shape[fa]))
            out.append(tuple(idx))
        return out
    rows = max(1, max_floats // max(1, shape[fa]))  # rows of (T, F) per piece
    level = 0  # the outermost token dim whose slices of whole inner rows fit
    while level < len(tok) - 1 and math.prod(shape[i] for i in tok[level + 1 :]) > rows:
        level += 1
    inner = math.prod(shape[i] for i in tok[level + 1 :])
    step = max(1, rows // inner)
    out = []
    for prefix in itertools.product(*(range(shape[i]) for i in tok[:level])):
        for a in range(0, shape[tok[level]], step):
            idx = list(full)
            for d, i in zip(tok[:level], prefix):
                idx[d] = slice(i, i + 1)
            idx[tok[level]] = slice(a, min(a + step, shape[tok[level]]))
            out.append(tuple(idx))
    return out


def _piece_shape(rec: Record, idx: tuple) -> tuple[int, int]:
    """(rows, cols) of a piece's (T, F) view, from its selection."""
    shape = tuple(rec.shape)
    sizes = [len(range(*s.indices(n))) for s, n in zip(idx, shape)]
    if len(shape) < 2:
        return 1, sizes[0] if sizes else 1
    fa, tok = _token_dims(rec.layer, shape)
    return math.prod(sizes[i] for i in tok), sizes[fa]


def operand_floats(reader: DumpReader, rec: Record, axes: tuple[str, ...]) -> int:
    """Elements of the GEMM operands of ``rec`` the dump holds for ``axes`` (held whole)."""
    kinds = {"features": "weight", "tokens": "input"}
    total = 0
    for kind in {kinds[a] for a in axes}:
        if rec.name in rec.layer.records.get(kind, []):
            (other,) = [r for r in reader.records(kind, [rec.layer]) if r.name == rec.name]
            total += math.prod(other.shape)
    return total


def piece_floats(rec: Record, config: EvalConfig, operands: int, device=None, jobs: int = 1) -> int | None:
    """Floats per piece under the budget (None: the record is evaluated whole), ``jobs`` jobs on
    pieces at once sharing it when one row (column) each still fits. Raises NmgradError when not
    even one job's row fits, naming the budget that would."""
    budget = config.budget_for(device)
    numel = math.prod(rec.shape)
    if budget is None or numel * WHOLE_BYTES_PER_FLOAT + operands * OPERAND_BYTES_PER_FLOAT <= budget:
        return None
    left = budget - operands * OPERAND_BYTES_PER_FLOAT
    shape = tuple(rec.shape)
    fa, tok = _token_dims(rec.layer, shape) if len(shape) > 1 else (0, [])
    unit = max(shape[fa] if "features" in config.axes else 1,
               math.prod(shape[i] for i in tok) if "tokens" in config.axes else 1)
    if left < unit * PIECE_BYTES_PER_FLOAT:
        need = unit * PIECE_BYTES_PER_FLOAT + operands * OPERAND_BYTES_PER_FLOAT
        raise NmgradError(
            f"--memory-budget {config.memory_budget} cannot hold layer {rec.layer.name} record {rec.name} "
            f"{shape}: one row and the GEMM operands need {need / 1e6:.1f} MB; raise it to at least "
            f"{math.ceil(need / 1e6)}MB"
        )
    per_job = left // PIECE_BYTES_PER_FLOAT
    return per_job // jobs if per_job // jobs >= unit else per_job


def check_budget(opened, chosen, config: EvalConfig, device=None) -> None:
    """Refuse a budget that some selected record cannot be evaluated in, before anything runs."""
    if config.budget_for(device) is None:
        return
    for (reader, _), records in zip(opened, chosen):
        for rec in records:
            piece_floats(rec, config, operand_floats(reader, rec, config.axes), device)


class _Pieces:
    """A record's pieces for one axis, read from the dump one at a time."""

    def __init__(self, rec: Record, axis: str, floats: int, device: torch.device):
        self.rec, self.axis, self.device = rec, axis, device
        self.index = pieces(rec, axis, floats)
        self.shapes = [_piece_shape(rec, i) for i in self.index]

    def load(self, i: int) -> torch.Tensor:
        from .record import as_matrix

        part = self.rec.load(self.index[i])
        if part.dim() < 2:
            part = part.reshape(1, -1) if part.dim() else part.reshape(1, 1)
            return part.to(self.device)
        return as_matrix(part, self.rec.layer).to(self.device)

    def blocks(self, i: int, m: int) -> int:
        rows, cols = self.shapes[i]
        return rows * -(-cols // m) if self.axis == "features" else cols * -(-rows // m)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(len(self.index)):
            yield i, self.load(i)


def scan(rec: Record, axis: str, floats: int, device) -> dict:
    """One pass over the record: non-finite count, elements, max |g|, whether any is non-zero."""
    bad = numel = 0
    top, nonzero = 0.0, False
    for _, x in _Pieces(rec, axis, floats, device):
        fin = torch.isfinite(x)
        bad += int((~fin).sum())
        numel += x.numel()
        if x.numel():
            top = max(top, float(torch.where(fin, x.abs(), 0).max()))
            nonzero = nonzero or bool(x.any())
    return {"bad": bad, "numel": numel, "top": top, "zero": not nonzero}


def _pow2(top: float) -> float:
    """:func:`nmgrad_cli.metrics._pow2_scale` from the whole record's max |g|."""
    if top == 0.0 or 1e-100 < top < 1e100:
        return 1.0
    return 2.0 ** math.frexp(top)[1]


def _rows_product(a: torch.Tensor, b: torch.Tensor, row0: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows of a, right operand) pairs of a's rows row0.. of a GEMM with ``rows`` rows; a 3-D b is a
    grouped GEMM (rows j*rows/G .. of a times b[j]), split where the piece crosses a group."""
    if b.dim() == 2:
        return [(a, b)]
    per = rows // b.shape[0]
    out, lo = [], row0
    while lo < row0 + len(a):
        j = lo // per
        hi = min(row0 + len(a), (j + 1) * per)
        out.append((a[lo - row0 : hi - row0], b[j]))
        lo = hi
    return out


def evaluate_pieces(
    rec: Record, axis: str, method: str, config: EvalConfig, floats: int, operand: torch.Tensor | None,
    gen: torch.Generator, top: float, device: torch.device, backend: str,
) -> tuple[Metrics, dict | None]:
    """:func:`nmgrad_cli.metrics.evaluate_tensor` (and the GEMM moments / Monte-Carlo GEMM error) of
    the record along ``axis``, piece by piece, with the draws of the whole record."""
    meth, pat = resolve(method, config.parsed_pattern)
    dim, samples, moments = AXIS_DIM[axis], config.samples, config.mc_check
    src = _Pieces(rec, axis, floats, device)
    scale = _pow2(top)
    nu = meth.n_uniforms(pat)
    states: list[list[torch.Tensor]] = [[] for _ in range(samples)]
    if samples and nu:  # where each (draw, piece) starts in the generator's stream
        for s in range(samples):
            for i in range(len(src.index)):
                states[s].append(gen.get_state())
                torch.rand(src.blocks(i, pat.m), nu, generator=gen, device=device)
    bias = var = norm2 = err2 = mc_bias = mc_var = 0.0
    dots = torch.zeros(samples, dtype=torch.float64, device=device)
    sumsq = torch.zeros_like(dots)
    gemm_parts: list[GemmMoments] = []
    gemm_errs = [0.0] * samples
    gemm_norm2 = 0.0
    mc_gemm = operand is not None and moments and samples > 0
    reduced = REDUCED_ANGLES and not moments and not mc_gemm
    total_rows = rec.shape[rec.layer.feature_axis] if axis == "tokens" else 0
    row0 = 0
    for i, x in src:
        xs = x / scale if scale != 1.0 else x
        b_, v_, n_ = exact_moments(xs, meth, pat, dim)
        bias, var, norm2 = bias + b_, var + v_, norm2 + n_
        a = x if axis == "features" else x.T  # the GEMM's left operand, rows of the product
        pairs = _rows_product(a, operand, row0, total_rows) if operand is not None else []
        for ap, bp in pairs:
            gemm_parts.append(gemm_moments(ap, bp, meth, pat))
        if mc_gemm:
            cdt = torch.float64 if torch.float64 in (x.dtype, operand.dtype) else torch.float32
            gemm_norm2 += sum(float(torch.sum((ap.to(cdt) @ bp.to(cdt)).double() ** 2)) for ap, bp in pairs)
        if samples:
            blocks, view = to_blocks(xs, pat.m, dim)
            b64 = blocks.to(torch.float64).flatten()
            total = torch.zeros_like(b64) if moments else None
            total2 = torch.zeros_like(b64) if moments else None
            state = meth.prepare(blocks, pat.n) if nu else None
            terms = None
            fixed = None if nu else to_blocks(prune(xs, meth, pat, dim, backend=backend), pat.m, dim)[0]
            per = max(1, min(samples, DRAW_CHUNK // max(1, x.numel())))
            for s0 in range(0, samples, per):
                c = min(per, samples - s0)
                if fixed is not None:
                    out = fixed.unsqueeze(0).expand(c, *fixed.shape)
                else:
                    us = []
                    for s in range(s0, s0 + c):
                        gen.set_state(states[s][i])
                        us.append(draw_uniforms(len(blocks), meth, pat, device, gen))
                    u = (us[0].unsqueeze(0) if c == 1 else torch.stack(us)).to(blocks.dtype)  # (c, K, nu)
                    if reduced:  # the angle's terms from the keep-masks, as the whole record's draws
                        keep, v = meth.kept(state, u)
                        if terms is None:  # v is the law's: one set of weights for every draw of the piece
                            terms = _AngleTerms(blocks, v, 1.0)
                        if terms.ok:
                            k64 = keep.reshape(c, -1).to(torch.float64)
                            dots[s0 : s0 + c] += k64 @ terms.w[0]
                            sumsq[s0 : s0 + c] += k64 @ terms.w[1]
                            continue
                    out = meth.draw(state, u)  # (c, K, M)
                est = out.reshape(c, -1).to(torch.float64)
                dots[s0 : s0 + c] += est @ b64
                sumsq[s0 : s0 + c] += torch.sum(est * est, dim=1)
                if moments:
                    total += est.sum(0)
                    total2 += (est * est).sum(0)
                    err2 += torch.sum((est - b64) ** 2).item()
                if mc_gemm:
                    draws = from_blocks(out, BlockView((c, *xs.shape), xs.dtype, dim % 2 + 1, view.length))
                    for k, d in enumerate(draws):
                        diff = (d * scale - x) if axis == "features" else (d * scale - x).T
                        for dp, bp in _rows_product(diff, operand, row0, total_rows):
                            cdt = torch.float64 if torch.float64 in (dp.dtype, bp.dtype) else torch.float32
                            gemm_errs[s0 + k] += float(torch.sum((dp.to(cdt) @ bp.to(cdt)).double() ** 2))
            if moments:
                mean = total / samples
                mc_bias += torch.sum((mean - b64) ** 2).item()
                mc_var += torch.sum(total2 - samples * mean * mean).item()
        row0 += len(a)
    gemm = None
    if operand is not None:
        from .config import GEMM_OF_AXIS
        from .gemm import GemmError

        gemm = {"target": GEMM_OF_AXIS[axis], **GemmMoments.combine(gemm_parts).relative()}
        if mc_gemm:
            r = GemmError.from_sums(axis, gemm_norm2, gemm_errs).result()
            gemm["mc_mse"], gemm["mc_mse_se"] = r["err"], r["err_se"]
    if norm2 == 0.0:  # all-zero gradient: every method returns zeros exactly (as evaluate_tensor)
        mc = 3 * [0.0] if moments else 3 * [math.nan]
        return Metrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, samples, *mc), gemm
    m = Metrics(mse=(bias + var) / norm2, bias=bias / norm2, variance=var / norm2, norm2=norm2, mse_abs=bias + var)
    if samples:
        stats = _angle_stats(_cos_to_degrees(dots, sumsq, norm2), samples)
        m.angle, m.angle_se, m.samples = stats["angle"], stats["angle_se"], samples
        if moments:
            m.mc_mse, m.mc_bias = err2 / samples / norm2, mc_bias / norm2
            m.mc_variance = mc_var / (samples - 1) / norm2 if samples > 1 else math.nan
    m.norm2, m.mse_abs = m.norm2 * scale * scale, m.mse_abs * scale * scale
    return m, gemm
