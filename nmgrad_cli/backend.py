"""Which backend prunes a tensor, and where its random numbers come from: decided here only.

:func:`resolve_backend` takes (method, pattern, dtype, device, size, the user's choice, with the
``NMGRAD_BACKEND`` environment variable standing in for ``auto``) and returns a
:class:`BackendChoice`: the backend that runs, the source of its uniforms and why. ``prune()``,
training (``train/gemm.py``) and the Triton path all call it; outputs record what it returned
(:func:`backend_record`).

Backends: ``reference`` (plain torch, the spec), ``fused`` (``torch.compile`` on the CPU, 1:2 and
2:4 in float32), ``triton`` (GPU kernels, or the interpreter with ``TRITON_INTERPRET=1``).
Uniform sources: ``none`` (the method draws nothing), ``given`` (the caller's uniforms),
``generator`` (``torch.rand`` on the caller's generator: the same numbers on every backend),
``hash`` (the fused backend's in-kernel counter-based hash keyed by a seed from the generator).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch

from .errors import NmgradError
from .methods import PruningMethod, get_method
from .patterns import Pattern, parse_pattern

BACKENDS = ("auto", "reference", "fused", "triton")
ENV_VAR = "NMGRAD_BACKEND"
log = logging.getLogger(__name__)
FUSED_MIN_NUMEL = 1 << 20
"""Below this many elements ``auto`` runs the reference on CPU: compiling costs more than it saves."""
FUSED_TRAIN_MIN_NUMEL = 1 << 16
"""In training (a kernel compiled once, called every step) the fused kernel pays off from this size."""

Stream = Literal["auto", "generator", "given"]


@dataclass(frozen=True)
class BackendChoice:
    """What :func:`resolve_backend` decided."""

    name: str
    """reference, fused or triton: the backend that runs."""
    uniforms: str
    """Where the draw's uniforms come from: none, given, generator or hash."""
    reason: str
    """Why, in a few words (e.g. "auto: CPU float32 tensor of 2^20+ elements, compiler found")."""

    def to_dict(self) -> dict:
        return asdict(self)


def user_choice(choice: str = "auto") -> tuple[str, str]:
    """(backend asked for, where that came from): ``choice``, or ``$NMGRAD_BACKEND`` for ``auto``."""
    if choice == "auto" and os.environ.get(ENV_VAR):
        env = os.environ[ENV_VAR].strip()
        if env not in BACKENDS:
            raise NmgradError(f"{ENV_VAR}={env!r} is unknown: choose one of {', '.join(BACKENDS)}, or unset it")
        return env, ENV_VAR
    if choice not in BACKENDS:
        raise NmgradError(f"unknown backend '{choice}': choose one of {', '.join(BACKENDS)}")
    return choice, "argument"


def resolve_backend(
    method: str | PruningMethod,
    pattern: str | Pattern,
    dtype: torch.dtype,
    device: torch.device | str,
    numel: int,
    choice: str = "auto",
    *,
    stream: Stream = "auto",
    training: bool = False,
) -> BackendChoice:
    """The backend that prunes a ``numel``-element tensor computed in ``dtype`` on ``device``.

    ``choice``: auto, reference, fused or triton (``auto`` defers to ``$NMGRAD_BACKEND`` when set).
    An explicit backend that cannot run this (method, pattern, dtype) raises :class:`NmgradError`,
    except that in ``training`` ``fused`` is a preference (else what ``auto`` picks) and both run
    the fused kernel from :data:`FUSED_TRAIN_MIN_NUMEL` elements. Triton with float64 runs the
    reference (the kernels compute in float32). ``stream``: ``given`` when the caller supplies the
    uniforms, ``generator`` to draw them with ``torch.rand`` on every backend (the same numbers
    whatever runs), ``auto`` to let the fused backend make its own (``hash``).
    """
    from .kernels import cpu_fused, triton_prune

    meth, pat = get_method(method), parse_pattern(pattern)
    device = torch.device(device)
    asked, origin = user_choice(choice)
    kernel = (pat.n, pat.m)
    fusable = cpu_fused.supports(meth.name, *kernel) and dtype == torch.float32 and device.type == "cpu"
    tritonable = triton_prune.supports(meth.name, *kernel)
    what = f"{meth.name} {pat} {str(dtype).removeprefix('torch.')} on {device.type}"

    if asked == "reference":
        name, reason = "reference", f"reference asked for ({origin})"
    elif asked == "triton":
        if not tritonable:
            raise NmgradError(f"no Triton kernel for {meth.name} {pat}: use backend='reference'")
        if dtype == torch.float64:
            name, reason = "reference", "triton asked for; its kernels compute in float32: float64 runs the reference"
        else:
            name, reason = "triton", f"triton asked for ({origin})"
    elif asked == "fused" and not training:
        if not fusable:
            raise NmgradError(
                f"no fused kernel for {what}: it runs 1:2 and 2:4 on CPU float32 tensors; use backend='reference'"
            )
        name, reason = "fused", f"fused asked for ({origin})"
    else:  # auto (in training, fused is a preference and means the same)
        min_numel = FUSED_TRAIN_MIN_NUMEL if training else FUSED_MIN_NUMEL
        if device.type == "cuda":
            ok = tritonable and dtype != torch.float64 and triton_prune.available()
            name = "triton" if ok else "reference"
            reason = "auto: CUDA tensor, Triton kernel" if ok else f"auto: no Triton kernel for {what}"
        elif fusable and numel >= min_numel and cpu_fused.compile_available():
            name, reason = "fused", f"auto: CPU float32 tensor of at least {min_numel} elements"
        elif not fusable:
            name, reason = "reference", f"auto: no fused kernel for {what}"
        elif numel < min_numel:
            name, reason = "reference", f"auto: {numel} elements, below {min_numel} (compiling costs more)"
        else:
            name, reason = "reference", "auto: no C compiler found for torch.compile"

    if meth.n_uniforms(pat) == 0:
        uniforms = "none"
    elif stream == "given":
        uniforms = "given"
    elif name == "fused" and stream == "auto":
        uniforms = "hash"
    else:
        uniforms = "generator"
    return BackendChoice(name, uniforms, reason)


def draw_backend(choice: str, device: torch.device | str) -> str:
    """The backend of evaluate's Monte-Carlo draws: ``choice``, or for ``auto`` the Triton kernels on
    CUDA (:func:`resolve_backend`'s auto) and the plain-torch reference on the CPU. The compiled CPU
    kernel costs ~20 s of tracing in every process and minutes to compile on a cold cache, more than
    it saves on evaluate's record sizes (BENCHMARKS.md: 29.5 s vs 9.2 s warm on 6 gpt records); the
    reference also makes the draws independent of the machine's C compiler."""
    asked, _ = user_choice(choice)
    if asked != "auto":
        return asked
    return "auto" if torch.device(device).type == "cuda" else "reference"


def backend_record(
    method: str | PruningMethod,
    pattern: str | Pattern,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    choice: str = "auto",
    *,
    stream: Stream = "auto",
    training: bool = False,
) -> dict:
    """What runs for a large tensor and for a small one under these settings, for an output's
    metadata (train's config.json, evaluate's JSON): ``{"choice", "large": {...}, "small": {...},
    "min_numel"}`` with each entry a :meth:`BackendChoice.to_dict`. A tensor of at least
    ``min_numel`` elements gets ``large``, a smaller one ``small``."""
    min_numel = FUSED_TRAIN_MIN_NUMEL if training else FUSED_MIN_NUMEL
    kw = dict(choice=choice, stream=stream, training=training)
    large = resolve_backend(method, pattern, dtype, device, min_numel, **kw)
    small = resolve_backend(method, pattern, dtype, device, min_numel - 1, **kw)
    asked = user_choice(choice)[0]
    return {"choice": asked, "min_numel": min_numel, "large": large.to_dict(), "small": small.to_dict()}


# --- the backward GEMMs on CUDA: who prunes dY, and which GEMM consumes it ----------------------

SPARSE_FP32_ENV = "NMGRAD_SPARSE_FP32"
GEMM_BACKENDS = ("auto", "cusparselt", "cutlass", "dense")

MIN_SPARSE_MNK = 1 << 31
"""Below m*n*k = 2^31 (e.g. 1024^3 * 2) the dense GEMM is used: a 2:4 GEMM saves at most half the
math, and small GEMMs are launch- and memory-bound; tune with ``benchmarks/gpu_bench.py``."""

# (rows of A, K, columns of B) multiples. cuSPARSELt: the fused prune+pack kernel's layout
# (kernels/cslt_layout.py: rows % 64, K % 32); CUTLASS: torch's fp16/bf16 constraints, no padding
ALIGN = {"cusparselt": (64, 32, 8), "cutlass": (32, 64, 8)}
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def sparse_fp32_mode(fp32: str | None = None) -> str:
    """How a float32 sparse GEMM runs: ``dense`` (default) or ``bf16`` (cast the operands);
    ``fp32`` or else ``$NMGRAD_SPARSE_FP32``."""
    mode = fp32 or os.environ.get(SPARSE_FP32_ENV, "dense")
    if mode not in ("dense", "bf16"):
        raise NmgradError(f"fp32 mode must be 'dense' or 'bf16', got {mode!r} (env {SPARSE_FP32_ENV})")
    return mode


def pick_backend(capability: tuple[int, int] | None, cusparselt: bool) -> tuple[str, str | None]:
    """(GEMM backend, reason for dense or None) for a device of compute ``capability`` (None: no CUDA)."""
    if capability is None:
        return "dense", "no CUDA device (the sparse GEMMs need an sm80+ GPU)"
    if capability < (8, 0):
        return "dense", f"sm{capability[0]}{capability[1]} has no sparse tensor cores (needs sm80+)"
    if capability[0] == 8:
        return "cutlass", None  # in-kernel compression; cuSPARSELt works too (backend="cusparselt")
    if cusparselt:
        return "cusparselt", None
    return "dense", (
        f"sm{capability[0]}{capability[1]}: CUTLASS sparse runs only on sm8x and this torch has no cuSPARSELt"
    )


def dense_reason(
    m: int, k: int, n: int, dtype: torch.dtype, backend: str, pattern: str | Pattern, min_mnk: int | None = None
) -> str | None:
    """Why A (m x k, pruned along k) @ B (k x n) must run dense on ``backend``, or None."""
    if backend == "dense":
        return "backend 'dense'"
    pat = parse_pattern(pattern)
    if (pat.n, pat.m) not in ((1, 2), (2, 4)):
        return f"pattern {pat} is not 2:4-compatible (sparse tensor cores run 2:4; 1:2 is a special case)"
    if dtype not in SPARSE_DTYPES:
        return f"{dtype}: semi-structured GEMMs take float16/bfloat16 (fp32='bf16' casts)"
    am, ak, an = ALIGN[backend]
    if m % am or k % ak or n % an:
        return (
            f"shape A {m}x{k} @ B {k}x{n}: {backend} needs A rows a multiple of {am}, K of {ak} and B "
            f"columns of {an}"
        )
    min_mnk = MIN_SPARSE_MNK if min_mnk is None else min_mnk
    if m * n * k < min_mnk:
        return f"m*n*k = {m * n * k} is below {min_mnk} (MIN_SPARSE_MNK: dense is as fast)"
    return None


def unavailable_reason(backend: str, capability: tuple[int, int], cusparselt: bool) -> str | None:
    """Why the sparse ``backend`` cannot run on a GPU of compute ``capability``, or None."""
    sm = f"sm{capability[0]}{capability[1]}"
    if capability < (8, 0):
        return f"{sm} has no sparse tensor cores (needs sm80+)"
    if backend == "cutlass" and capability[0] != 8:
        return f"torch's CUTLASS sparse kernels run only on sm8x, this GPU is {sm}"
    if backend == "cusparselt" and not cusparselt:
        return "this torch build has no cuSPARSELt"
    return None


class GemmPlan(NamedTuple):
    """Which GEMM runs (``cusparselt``, ``cutlass`` or ``dense``) and why it is not the one asked for
    (or why dense); ``reason`` is None when the requested backend runs. ``measured``: ``auto`` takes
    this sparse route only where :data:`GEMM_ROUTES` measured it faster than prune + dense GEMM."""

    backend: str
    reason: str | None
    measured: bool = False


def plan_gemm(
    capability: tuple[int, int] | None,
    cusparselt: bool,
    dtype: torch.dtype,
    pattern: str | Pattern,
    m: int,
    k: int,
    n: int,
    backend: str = "auto",
    min_mnk: int | None = None,
) -> GemmPlan:
    """The static decision for A (m x k, ``pattern`` along k, in ``dtype``) @ B (k x n): a pure
    function of the device's compute ``capability`` (None: not a CUDA tensor), whether torch has
    cuSPARSELt, the operand, and the user's ``backend``. An explicit backend that cannot run here
    falls back to what ``auto`` picks (e.g. ``cutlass`` on Hopper -> ``cusparselt``), with the
    reason. ``auto`` on cuSPARSELt is ``measured`` (:meth:`RouteTable.decide`)."""
    if backend not in GEMM_BACKENDS:
        raise NmgradError(f"backend must be auto, cusparselt, cutlass or dense, got {backend!r}")
    if capability is None:
        return GemmPlan("dense", "not a CUDA tensor")
    note = None
    chosen = backend
    if backend == "auto":
        chosen, why = pick_backend(capability, cusparselt)
        if why is not None:
            return GemmPlan("dense", why)
    elif backend != "dense":
        why = unavailable_reason(backend, capability, cusparselt)
        if why is not None:
            chosen, auto_why = pick_backend(capability, cusparselt)
            note = f"backend '{backend}' cannot run here ({why})"
            if auto_why is not None:
                return GemmPlan("dense", f"{note}; {auto_why}")
    if chosen == "cutlass" and parse_pattern(pattern).n != 2 and cusparselt:
        chosen = "cusparselt"  # the fused compressor is 2:4-only; 1:2 goes through _cslt_compress
    dense_why = dense_reason(m, k, n, dtype, chosen, pattern, min_mnk)
    if dense_why is not None:
        return GemmPlan("dense", f"{note}; {dense_why}" if note else dense_why)
    return GemmPlan(chosen, note, measured=backend == "auto" and chosen == "cusparselt")


@dataclass(frozen=True)
class GemmChoice:
    """What :func:`resolve_gemm` decided for one sparse operand A (m x k, pruned along k) @ B (k x n)."""

    prune: BackendChoice
    """Who prunes dY into A (triton on CUDA where a kernel exists, else the reference) and its uniforms."""
    gemm: str
    """cusparselt, cutlass or dense: the GEMM that consumes A."""
    reason: str | None
    """Why the GEMM is not the one asked for (or why dense); None when the requested one runs."""
    sparse_dtype: torch.dtype
    """A's dtype: dY's, or bfloat16 when a float32 dY is cast (fp32 mode ``bf16``)."""
    measured: bool = False
    """``auto`` on cuSPARSELt: the sparse route runs only where :data:`GEMM_ROUTES` measured it faster."""


def resolve_gemm(
    method: str | PruningMethod,
    pattern: str | Pattern,
    dtype: torch.dtype,
    device: torch.device | str,
    m: int,
    k: int,
    n: int,
    backend: str = "auto",
    *,
    fp32: str | None = None,
    min_mnk: int | None = None,
    uniforms_given: bool = False,
    seeded: bool = False,
) -> GemmChoice:
    """The pruning backend and the GEMM for A (m x k, ``pattern`` along k, dY in ``dtype``) @ B (k x n).

    The pruning: :func:`resolve_backend` (auto). Its uniforms: ``given``, ``philox`` (Triton's
    in-kernel stream when ``seeded``) or ``generator``. The GEMM: :func:`plan_gemm` (by compute
    capability, cuSPARSELt, dtype, shape and ``backend``: auto, cusparselt, cutlass or dense), on
    the dtype that ``fp32`` / ``$NMGRAD_SPARSE_FP32`` makes of a float32 dY."""
    from .kernels import sparse_gemm

    meth, pat = get_method(method), parse_pattern(pattern)
    device = torch.device(device)
    cuda = device.type == "cuda"
    prune = resolve_backend(meth, pat, dtype, device, m * k, stream="given" if uniforms_given else "generator")
    if seeded and not uniforms_given and prune.name == "triton" and prune.uniforms != "none":
        prune = BackendChoice(prune.name, "philox", prune.reason)
    cast = cuda and dtype == torch.float32 and sparse_fp32_mode(fp32) == "bf16"
    sparse_dtype = torch.bfloat16 if cast else dtype
    if cuda and prune.name != "triton":
        return GemmChoice(prune, "dense", f"no Triton prune kernel for {meth.name} {pat} ({prune.reason})", dtype)
    capability = torch.cuda.get_device_capability(device) if cuda else None
    plan = plan_gemm(capability, sparse_gemm.cusparselt_available(), sparse_dtype, pat, m, k, n, backend, min_mnk)
    dtype_out = sparse_dtype if plan.backend != "dense" else dtype
    return GemmChoice(prune, plan.backend, plan.reason, dtype_out, plan.measured)


# --- auto's measured sparse-vs-dense route, per GEMM shape -------------------------------------


@dataclass(frozen=True)
class RouteDecision:
    """One GEMM shape's route: what ran and why, with the timings that decided it (ms, or None)."""

    m: int
    k: int
    n: int
    dtype: str
    route: str
    """sparse (the 2:4 GEMM on the fused prune+pack buffer) or dense."""
    reason: str
    sparse_ms: float | None = None
    dense_ms: float | None = None

    def to_dict(self) -> dict:
        rest = {k: v for k, v in asdict(self).items() if k not in ("m", "k", "n")}
        return {"shape": [self.m, self.k, self.n], **rest}


class RouteTable:
    """The GEMM routes this process decided, one per (m, k, n, dtype, device): measured once, then
    reused; every dense fallback with its reason is recorded too (and logged once)."""

    def __init__(self) -> None:
        self._routes: dict[tuple, RouteDecision] = {}

    def get(self, key: tuple) -> RouteDecision | None:
        return self._routes.get(key)

    def record(self, key: tuple, route: str, reason: str, sparse_ms=None, dense_ms=None) -> RouteDecision:
        """Store (and log, the first time) the route of ``key`` = (m, k, n, dtype, device)."""
        m, k, n, dtype, _device = key
        decision = RouteDecision(m, k, n, str(dtype).removeprefix("torch."), route, reason, sparse_ms, dense_ms)
        if self._routes.get(key) != decision:
            log.info("GEMM A %dx%d @ B %dx%d %s -> %s: %s", m, k, k, n, decision.dtype, route, reason)
        self._routes[key] = decision
        return decision

    def decide(self, key: tuple, measure) -> RouteDecision:
        """``auto``'s route for ``key``: the cached one, else ``measure()`` -> (sparse ms, dense ms,
        or a reason the sparse route cannot run) decides once: sparse only where it was faster.
        ``measure`` None (e.g. during CUDA-graph capture): dense, not cached."""
        known = self._routes.get(key)
        if known is not None:
            return known
        if measure is None:
            m, k, n, dtype, _ = key
            return RouteDecision(m, k, n, str(dtype).removeprefix("torch."), "dense", "auto: not measured yet")
        got = measure()
        if isinstance(got, str):
            return self.record(key, "dense", f"auto: the sparse route failed its check ({got})")
        sparse_ms, dense_ms = got
        if sparse_ms < dense_ms:
            why = f"auto: measured faster sparse ({sparse_ms:.3f} ms vs {dense_ms:.3f} ms prune + dense GEMM)"
            return self.record(key, "sparse", why, sparse_ms, dense_ms)
        why = f"auto: measured slower sparse ({sparse_ms:.3f} ms vs {dense_ms:.3f} ms prune + dense GEMM)"
        return self.record(key, "dense", why, sparse_ms, dense_ms)

    def decisions(self) -> list[dict]:
        return [d.to_dict() for d in self._routes.values()]

    def clear(self) -> None:
        self._routes.clear()


GEMM_ROUTES = RouteTable()
"""This process's route table (what :func:`gemm_route_decisions` reports)."""


def gemm_route_decisions() -> list[dict]:
    """Every GEMM route decided in this process, for a run's config.json: a list of ``{"shape": [m, k, n],
    "dtype", "route" (sparse or dense), "reason", "sparse_ms", "dense_ms"}`` (ms None where not measured)."""
    return GEMM_ROUTES.decisions()
