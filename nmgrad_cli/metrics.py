"""Error metrics of a pruning method on a tensor g (docs/methods.md, "Metrics").

All relative to ||g||^2:
  bias     = ||E[g^] - g||^2 / ||g||^2
  variance = E||g^ - E[g^]||^2 / ||g||^2
  mse      = E||g^ - g||^2 / ||g||^2 = bias + variance
  angle    = E[arccos(<g^, g> / (||g^|| ||g||))] in degrees (Monte Carlo, with a standard error that
             has the coverage of one for any number of draws: :func:`angle_se`)
The first three are exact, from each method's per-element marginals (E[g^_i] = p_i v_i,
E[g^_i^2] = p_i v_i^2), accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from .backend import FUSED_MIN_NUMEL, resolve_backend
from .methods import PruningMethod
from .patterns import BlockView, Pattern, compute_dtype, from_blocks, parse_pattern, to_blocks
from .prune import draw_uniforms, marginals, prune, resolve


@dataclass
class Metrics:
    """Metrics of one method on one tensor along one block axis."""

    mse: float
    bias: float
    variance: float
    norm2: float
    """||g||^2, the normaliser (and the weight of this tensor in summaries)."""
    mse_abs: float
    """E||g^ - g||^2, not normalised."""
    angle: float = math.nan
    angle_se: float = math.nan
    samples: int = 0
    mc_mse: float = math.nan
    mc_bias: float = math.nan
    mc_variance: float = math.nan

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


BIAS_ULPS = 8
"""An exactly unbiased method's mean p*v differs from a by float64 rounding only: at most this many
ulps of |a| per element (p*v is a/p*p or S*|a|/S, a few operations)."""


def bias_floor(norm2_a: float, norm2_b: float = 1.0) -> float:
    """The float64 noise floor of a record's absolute bias: (BIAS_ULPS * eps)^2 ||a||^2 for dY itself;
    for a GEMM (E a^ - a) b, (BIAS_ULPS * eps)^2 ||a||^2 ||b||^2 (||e b|| <= ||e|| ||b||). A bias at
    or below it is indistinguishable from 0 in float64."""
    return (BIAS_ULPS * torch.finfo(torch.float64).eps) ** 2 * norm2_a * norm2_b


def rounded_bias(bias_abs: float, floor_abs: float) -> float:
    """The one rounding rule of every report (docs/evaluate.md, "Rounding"): a bias at or below its
    record's noise floor (:func:`bias_floor`) is 0 in the JSON, the tables, ``--fail-if`` and
    ``compare``, which all read the value this returns; above it the value is kept as computed."""
    return 0.0 if bias_abs <= floor_abs else bias_abs


def exact_moments(g: torch.Tensor, method, pattern, dim: int = -1) -> tuple[float, float, float]:
    """(||E g^ - g||^2, E||g^ - E g^||^2, ||g||^2) in float64, exactly from the marginals; the bias
    through :func:`rounded_bias` (float64 rounding alone gives ~1e-33 relative: reported as 0)."""
    g64 = g.detach().to(torch.float64)
    p, v = marginals(g64, method, pattern, dim, dtype=torch.float64)
    mean = p * v
    norm2 = torch.sum(g64 * g64).item()
    bias = rounded_bias(torch.sum((mean - g64) ** 2).item(), bias_floor(norm2))
    var = torch.sum(p * v * v - mean * mean).clamp_min(0).item()
    return bias, var, norm2


def evaluate_tensor(
    g: torch.Tensor,
    method: str | PruningMethod,
    pattern: str | Pattern,
    dim: int = -1,
    samples: int = 16,
    generator: torch.Generator | None = None,
    mc_check: bool = False,
    on_sample: Callable[[torch.Tensor], None] | None = None,
    backend: str = "auto",
) -> Metrics:
    """Exact mse/bias/variance of ``method`` on ``g`` along ``dim``, plus the Monte-Carlo angle
    from ``samples`` draws (and Monte-Carlo mse/bias/variance when ``mc_check``). ``on_sample``
    is called with every draw (shape and dtype of ``g``), so callers can reuse the draws.
    ``backend``: :func:`nmgrad_cli.prune.prune`'s, for the draws."""
    meth, pat = resolve(method, pattern)
    scale = _pow2_scale(g)
    if scale != 1.0:  # squares of |g| > 1e154 overflow float64: evaluate g / 2^k (every method is
        # scale-equivariant), the relative metrics are exact, the absolute ones are scaled back
        m = evaluate_tensor(
            g / scale, meth, pat, dim, samples, generator, mc_check,
            None if on_sample is None else (lambda d: on_sample(d * scale)), backend,
        )
        m.norm2, m.mse_abs = m.norm2 * scale * scale, m.mse_abs * scale * scale
        return m
    bias, var, norm2 = exact_moments(g, meth, pat, dim)
    if norm2 == 0.0:  # all-zero gradient: every method returns zeros exactly
        return Metrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, samples, *(3 * [0.0] if mc_check else 3 * [math.nan]))
    metrics = Metrics(
        mse=(bias + var) / norm2, bias=bias / norm2, variance=var / norm2, norm2=norm2, mse_abs=bias + var
    )
    if samples > 0:
        mc = monte_carlo(g, meth, pat, dim, samples, generator, mc_check, on_sample, backend=backend)
        metrics.angle, metrics.angle_se, metrics.samples = mc["angle"], mc["angle_se"], samples
        if mc_check:
            metrics.mc_mse, metrics.mc_bias, metrics.mc_variance = mc["mse"], mc["bias"], mc["variance"]
    return metrics


def mc_backend(g: torch.Tensor, method, pattern, dim: int = -1, backend: str = "auto") -> dict:
    """The backend and uniform source the Monte-Carlo draws of :func:`monte_carlo` run on for ``g``
    (:meth:`nmgrad_cli.backend.BackendChoice.to_dict`), for an output's metadata."""
    m = parse_pattern(pattern).m
    length = g.shape[dim] if g.dim() else 1
    padded = g.numel() // max(length, 1) * (-(-length // m) * m)  # the blocks prune() sees
    dtype = compute_dtype(g.dtype)
    return resolve_backend(method, pattern, dtype, g.device, padded, backend, stream="generator").to_dict()


def mc_backends(pattern, methods, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto") -> dict:
    """{method: :func:`nmgrad_cli.backend.backend_record`} of the Monte-Carlo draws (generator
    stream) for ``dtype`` tensors on ``device`` with the user's ``backend``: which backend prunes a
    record of at least / below ``min_numel`` elements, for evaluate's JSON."""
    from .backend import backend_record
    from .errors import NmgradError

    out = {}
    for m in methods:
        try:
            out[m] = backend_record(m, pattern, dtype, device, backend, stream="generator")
        except NmgradError as exc:  # e.g. --backend fused for a pattern without a kernel
            out[m] = {"choice": backend, "error": str(exc)}
    return out


DRAW_CHUNK = FUSED_MIN_NUMEL - 1
"""Elements pruned per call when the draws are batched: draws of a record go in chunks of
max(1, DRAW_CHUNK // numel), so memory stays bounded whatever the record size. Below the size at
which ``prune``'s auto backend switches to the compiled kernel, so batching never changes the
backend (a cold compile cache costs minutes) nor, on the reference backend, the draws."""

GPU_DRAW_CHUNK = 1 << 27
"""The same bound off the CPU (the Triton kernels: no compile-size threshold to stay under). On the
H200 the gpt dump's records (<= 0.8 M floats) went one draw per call under :data:`DRAW_CHUNK`: 777
prune launches for 125 (record, method) pairs, the evaluate bound by launches (BENCHMARKS.md).
2^27: the 16 draws of an 8 M-float record in one call (~3 GB of float32 draws and their float64
copies on the device)."""

PREPARED_DRAWS = True
"""On the reference backend, batched draws prepare the method's law of a record once
(:meth:`nmgrad_cli.methods.PruningMethod.prepare`) and draw every chunk of uniforms against it:
the same draws as pruning g stacked ``c`` times, without recomputing the law for every copy.
False prunes the stacked copies (kept to test that the two are bit for bit the same)."""

REDUCED_ANGLES = True
"""When only the angle is asked for (no ``moments``, no ``on_sample``) and the draws are prepared,
reduce each draw's <g^, g> and ||g^||^2 from its keep-mask (:meth:`PruningMethod.kept`) against
per-record weights, without building the draw or a float64 copy of it (:class:`_AngleTerms`); a
deterministic method's one draw gives every angle. The same angles up to float64 rounding. False
runs the draw-by-draw float64 path (kept to test and time the two side by side)."""


def monte_carlo(
    g, method, pattern, dim=-1, samples=16, generator=None, moments=False, on_sample=None, batch: bool = True,
    backend: str = "auto",
) -> dict:
    """Angle (degrees, mean and standard error) over ``samples`` draws; with ``moments`` also
    Monte-Carlo mse, bias (of the sample mean, which carries variance/samples on top) and
    variance (unbiased per-element sample variance), all relative to ||g||^2.

    ``batch``: prune several draws in one call, g stacked along a new leading dim (chunks of at
    most :data:`DRAW_CHUNK` elements). The draws keep their law; with the reference backend they
    are the very draws of ``batch=False`` (the uniforms are drawn in the same order), and the law is
    prepared once for all of them (:data:`PREPARED_DRAWS`). The draws use
    ``torch.rand`` uniforms from ``generator`` whatever backend runs (:func:`mc_backend` says which),
    so a seed gives the same draws whether or not the fused kernel can be compiled here."""
    g64 = g.detach().to(torch.float64).flatten()
    norm2 = torch.dot(g64, g64).item()
    reduced = REDUCED_ANGLES and not moments and on_sample is None
    angles: list[float] = []
    total = torch.zeros_like(g64) if moments else None
    total2 = torch.zeros_like(g64) if moments else None
    err2 = 0.0
    meth, pat = resolve(method, pattern)
    fixed = prune(g, meth, pat, dim, backend=backend) if meth.n_uniforms(pat) == 0 else None  # deterministic (greedy):
    chunk = DRAW_CHUNK if g.device.type == "cpu" else GPU_DRAW_CHUNK
    per = max(1, min(samples, chunk // max(1, g.numel()))) if batch else 1  # one draw is every draw
    bdim = dim % g.dim() + 1  # the block dim once draws are stacked in front
    if fixed is not None and reduced and batch:  # every draw is the same: one angle
        angles = _angles(fixed.detach().reshape(1, -1).to(torch.float64), g64, norm2) * samples
        return _angle_stats(angles, samples)
    blocks = view = state = terms = None
    if fixed is None and batch and PREPARED_DRAWS:
        blocks, view = to_blocks(g, pat.m, dim)
    done = 0
    while done < samples:
        c = min(per, samples - done)
        if fixed is not None:
            draws = fixed.unsqueeze(0).expand(c, *g.shape)
        elif blocks is not None and _runs_reference(meth, pat, blocks, c, backend):
            # what prune(stacked) runs, without the copies: the law once, c draws of uniforms
            if state is None:
                state = meth.prepare(blocks, pat.n)
            k = len(blocks)
            u = draw_uniforms(c * k, meth, pat, blocks.device, generator).to(blocks.dtype).view(c, k, -1)
            if reduced and state.bad is None:
                keep, v = meth.kept(state, u)  # (c, K, M), (K, M)
                if terms is None:
                    terms = _AngleTerms(blocks, v, norm2)
                if terms.ok:
                    angles += terms.angles(keep)
                    done += c
                    continue
            out = meth.draw(state, u)  # (c, K, M)
            draws = from_blocks(out, BlockView((c, *g.shape), g.dtype, bdim, view.length))
        elif batch:
            stacked = g.unsqueeze(0).expand(c, *g.shape)
            draws = prune(stacked, meth, pat, bdim, generator, backend=backend, stream="generator")
        else:
            draws = prune(g, meth, pat, dim, generator, backend=backend, stream="generator").unsqueeze(0)
        done += c
        if on_sample is not None:
            for d in draws:
                on_sample(d)
        est = draws.detach().reshape(c, -1).to(torch.float64)  # (c, numel)
        angles += _angles(est, g64, norm2)
        if moments:
            total += est.sum(0)
            total2 += (est * est).sum(0)
            err2 += torch.sum((est - g64) ** 2).item()
    out = _angle_stats(angles, samples)
    if moments:
        mean = total / samples
        out["mse"] = err2 / samples / norm2
        out["bias"] = torch.sum((mean - g64) ** 2).item() / norm2
        if samples > 1:
            var = (total2 - samples * mean * mean) / (samples - 1)
            out["variance"] = torch.sum(var).item() / norm2
        else:
            out["variance"] = math.nan
    return out


def _cos_to_degrees(dots: torch.Tensor, sumsq: torch.Tensor, norm2: float) -> list[float]:
    """arccos(<g^, g> / (||g^|| ||g||)) in degrees per draw (90 for a zero draw), float64."""
    denom = torch.sqrt(sumsq * norm2)
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).tolist()


def _angles(est: torch.Tensor, g64: torch.Tensor, norm2: float) -> list[float]:
    """The angle of every draw in ``est`` (c, numel) float64 to g64."""
    return _cos_to_degrees(est @ g64, torch.sum(est * est, dim=1), norm2)


COVERAGE = math.erf(1 / math.sqrt(2))
"""0.6827: the chance that ``angle ± angle_se`` holds the true mean angle, the chance of ±1 standard
deviation of a normal, whatever the number of draws (docs/methods.md, "What ± means")."""


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer ``df`` >= 1 (the closed finite series in
    theta = atan(t / sqrt(df)), exact up to float64 rounding)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    total, term = 1.0, 1.0
    if df % 2:  # odd: 1/2 + (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...)) / pi
        if df == 1:
            return 0.5 + theta / math.pi
        for k in range(1, (df - 3) // 2 + 1):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 0.5 + (theta + math.sin(theta) * math.cos(theta) * total) / math.pi
    for k in range(1, (df - 2) // 2 + 1):  # even: 1/2 + sin/2 (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return 0.5 + 0.5 * math.sin(theta) * total


@lru_cache(maxsize=256)
def t_factor(df: int) -> float:
    """The Student-t quantile at (1 + COVERAGE) / 2 with ``df`` degrees of freedom: 1.837 at df = 1,
    1.321 at 2, 1.142 at 4, 1.034 at 15, -> 1. Beyond df = 2000: 1 + 1/(2 df) (Cornish-Fisher, error
    below 1e-7)."""
    if df > 2000:
        return 1.0 + 1.0 / (2 * df)
    target, lo, hi = (1 + COVERAGE) / 2, 1.0, 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def angle_se(sd: float, n: int) -> float:
    """The ± of a mean of ``n`` draws with sample standard deviation ``sd``: t_factor(n - 1) * sd /
    sqrt(n), the half-width of the Student-t interval with the coverage of ±1 standard error
    (:data:`COVERAGE`); sd / sqrt(n) alone covers 50% at n = 2 and 63% at n = 4. NaN for n < 2: one
    draw has no spread to estimate (JSON null, the tables print no ±)."""
    if n < 2:
        return math.nan
    return t_factor(n - 1) * sd / math.sqrt(n)


def _angle_stats(angles: list[float], samples: int) -> dict:
    at = torch.tensor(angles, dtype=torch.float64)
    return {
        "angle": at.mean().item(),
        "angle_se": angle_se(at.std(unbiased=True).item(), samples) if samples > 1 else math.nan,
    }


class _AngleTerms:
    """<g^, g> and ||g^||^2 of draws given by their keep-masks, in float64 without the draws.

    A draw is g^ = keep * v on the blocks a, so <g^, g> = sum keep * (v a) and ||g^||^2 =
    sum keep * v^2: two float64 matrix-vector products of the 0/1 masks with per-record weights
    (exact products of float32 values), instead of the draw, its float64 copy, its square and the
    dot. ``ok`` is False when a kept value is not finite (the draw-by-draw path then gives the same
    inf/NaN)."""

    def __init__(self, blocks: torch.Tensor, v: torch.Tensor, norm2: float):
        v64 = v.to(torch.float64)
        self.w = torch.empty(2, *v.shape, dtype=torch.float64, device=v.device)
        torch.mul(v64, blocks.to(torch.float64), out=self.w[0])
        torch.mul(v64, v64, out=self.w[1])
        self.w = self.w.view(2, -1)  # (2, K M)
        # a finite sum has no inf/NaN term; the element-wise test only when it is not finite
        finite = math.isfinite(float(self.w.sum())) or bool(torch.isfinite(self.w).all())
        self.ok = finite and math.isfinite(norm2)
        self.norm2 = norm2
        self._masks: torch.Tensor | None = None  # float64 keep-masks, reused chunk after chunk

    def angles(self, keep: torch.Tensor) -> list[float]:
        """The angle in degrees of each of the draws with keep-masks ``keep`` (c, K, M)."""
        c = len(keep)
        if self._masks is None or len(self._masks) < c:
            self._masks = torch.empty(c, self.w.shape[1], dtype=torch.float64, device=self.w.device)
        k64 = self._masks[:c].copy_(keep.reshape(c, -1))  # (c, numel) of 0 and 1
        return _cos_to_degrees(k64 @ self.w[0], k64 @ self.w[1], self.norm2)


def _runs_reference(meth, pat, blocks: torch.Tensor, c: int, backend: str) -> bool:
    """Whether :func:`prune` of ``c`` stacked copies of ``blocks`` runs the reference backend."""
    choice = resolve_backend(meth, pat, blocks.dtype, blocks.device, c * blocks.numel(), backend, stream="generator")
    return choice.name == "reference"


# --- GEMM-level errors ---------------------------------------------------------------------------

GEMM_CHUNK = 1 << 22
"""Elements of the (rows, blocks, M, M) covariance tensor built at a time: memory stays bounded."""


@dataclass
class GemmMoments:
    """Exact error of the GEMM a @ b when a (R, L) is pruned along L (blocks of M), b: (L, I).

    bias_abs = ||(E a^ - a) b||^2, var_abs = E||(a^ - E a^) b||^2 = sum over blocks of
    tr(Cov(a^_block) b_block b_block^T), norm2 = ||a b||^2. Stored in units of ``scale2`` (a power
    of two), so the relative values stay exact where the absolute ones overflow float64."""

    bias: float
    var: float
    norm: float
    scale2: float = 1.0

    @property
    def bias_abs(self) -> float:
        return self.bias * self.scale2 if self.bias else 0.0

    @property
    def var_abs(self) -> float:
        return self.var * self.scale2 if self.var else 0.0

    @property
    def norm2(self) -> float:
        return self.norm * self.scale2

    @property
    def mse_abs(self) -> float:
        return (self.bias + self.var) * self.scale2

    @classmethod
    def combine(cls, parts: list[GemmMoments]) -> GemmMoments:
        """The moments of GEMMs on disjoint rows (blocks are independent, so errors and norms add),
        in units of the largest part's ``scale2``."""
        scale2 = max(p.scale2 for p in parts)

        def total(attr: str) -> float:
            return sum(getattr(p, attr) * (p.scale2 / scale2) for p in parts)

        return cls(total("bias"), total("var"), total("norm"), scale2)

    def relative(self) -> dict:
        """mse, bias, variance relative to ||a b||^2 (0 when the product is 0), and the absolute values."""
        rel = (lambda x: x / self.norm) if self.norm > 0 else (lambda x: 0.0)
        return {
            "mse": rel(self.bias + self.var), "bias": rel(self.bias), "variance": rel(self.var),
            "norm2": self.norm2, "mse_abs": self.mse_abs, "bias_abs": self.bias_abs, "var_abs": self.var_abs,
        }


def gemm_moments(
    a: torch.Tensor, b: torch.Tensor, method: str | PruningMethod, pattern: str | Pattern
) -> GemmMoments:
    """:class:`GemmMoments` of a (R, L) @ b (L, I) with a pruned by ``method`` along L, exactly.

    Blocks are independent, so E||(a^ - a) b||^2 = ||(E a^ - a) b||^2 + sum_blocks sum_ij Cov_ij G_ij
    with G = b_block b_block^T (M, M) and Cov_ij = pi_ij v_i v_j - p_i v_i p_j v_j from the method's
    first- and second-order inclusion probabilities (``marginals``, ``joint_marginals``). In float64;
    L is zero-padded to a multiple of M (padding is never kept and has zero rows of b).
    For dX = dY W: a = dY (T, F), b = W (F, I); for dW = dY^T X: a = dY^T (F, T), b = X (T, I).
    A 3-D b (G, L, I) is a grouped GEMM: rows j*R/G to (j+1)*R/G of a times b[j] (a grouped conv's
    dW, :func:`nmgrad_cli.evaluate.gemm.conv_input_matrix`), the moments summed over the groups.
    """
    meth, pat = resolve(method, pattern)
    if b.dim() == 3:  # a grouped GEMM: row group j of a times b[j] (a grouped conv's dW)
        groups = b.shape[0]
        if a.shape[0] % groups:
            raise ValueError(f"gemm_moments: {a.shape[0]} rows of a do not split into {groups} groups")
        rows_per = a.shape[0] // groups
        return GemmMoments.combine(
            [gemm_moments(a[j * rows_per : (j + 1) * rows_per], b[j], meth, pat) for j in range(groups)]
        )
    m, n = pat.m, pat.n
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    rows, length = a64.shape
    if b64.shape[0] != length:
        raise ValueError(f"gemm_moments: a is {tuple(a.shape)} but b is {tuple(b.shape)}")
    # powers of two: exact, and keep squares of huge or tiny values inside float64's range
    sa, sb = _pow2_scale(a64), _pow2_scale(b64)
    a64, b64 = a64 / sa, b64 / sb
    pad = (-length) % m
    ap = torch.nn.functional.pad(a64, (0, pad))
    bp = torch.nn.functional.pad(b64, (0, 0, 0, pad))
    k = ap.shape[1] // m
    gram = torch.einsum("kmi,kni->kmn", bp.view(k, m, -1), bp.view(k, m, -1))  # (K, M, M)
    norm2 = float(torch.sum((a64 @ b64) ** 2))
    bias = var = 0.0
    step = max(1, GEMM_CHUNK // max(1, k * m * m))
    for r0 in range(0, rows, step):
        blk = ap[r0 : r0 + step].reshape(-1, m)  # (Rc*K, M)
        p, v = meth.marginals(blk, n)
        pi = meth.joint_marginals(blk, n)  # (Rc*K, M, M)
        mean = p * v
        diff = (mean - blk).view(-1, k * m)[:, :length]
        bias += float(torch.sum((diff @ b64) ** 2))
        cov = pi * (v[:, :, None] * v[:, None, :]) - mean[:, :, None] * mean[:, None, :]
        var += float(torch.einsum("rkij,kij->", cov.view(-1, k, m, m), gram))
    s = sa * sb
    bias = rounded_bias(bias, bias_floor(float(torch.sum(a64 * a64)), float(torch.sum(b64 * b64))))
    return GemmMoments(bias, max(var, 0.0), norm2, s * s)  # s * s: inf, never OverflowError


def _pow2_scale(x: torch.Tensor) -> float:
    """A power of two near max|x| when squares of x could leave float64's range, else 1."""
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0 or 1e-100 < top < 1e100:
        return 1.0
    return 2.0 ** math.frexp(top)[1]
