"""From measurement to decision: a per-layer N:M plan (the library behind ``nmgrad evaluate --recommend``).

For every layer (GEMM site) of the dumps and each of its two backward GEMMs (dX: blocks along
features, dW: blocks along tokens), :func:`recommend` evaluates every candidate pattern with the
plan's method and keeps the **sparsest** pattern whose error stays within the budget (ties: the
smaller error); a GEMM where no candidate fits stays dense. The errors are evaluate's exact ones:

- ``variance``, ``mse``: of the backward GEMM fed with the pruned dY, relative to ||dX||^2 (||dW||^2),
  when the dump holds X and W (``capture --with-inputs``); else of dY itself, relative to ||dY||^2
  (the plan says which, per GEMM);
- ``angle``: the Monte-Carlo angle in degrees between the pruned and the dense dY.

The saving is counted in multiply-adds of the two backward GEMMs: dX = dY W and dW = dY^T X each
cost T·F·I, and an N:M-sparse dY costs N/M of that, so a layer saves
(1 - N_dX/M_dX + 1 - N_dW/M_dW) / 2 of its backward GEMM FLOPs, and the model the T·F·I-weighted
mean of its layers.

The plan (:class:`Plan`, JSON) records the budget, the candidates, the method, the dumps with their
sha256, the evaluate config, and per layer the choice, its error and its shapes. ``nmgrad train
--plan`` applies it per site (:func:`Plan.gemm_choice`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__
from . import results as res
from .errors import NmgradError, PatternError
from .methods import get_method
from .outputs import write_text
from .patterns import Pattern, parse_pattern
from .progress import ProgressLike

PLAN_KIND = "nmgrad-plan"
PLAN_VERSION = 1
DEFAULT_CANDIDATES = "1:2,2:4,2:8,1:4"
DEFAULT_BUDGET = "variance<=0.5"
DEFAULT_METHODS = ("mvue", "approx-mvue")
"""Per pattern the first of these defined for it (with a GPU kernel for it, when planning for CUDA)."""
BUDGET_METRICS = {
    "variance": "relative variance of the backward GEMM (of dY without X and W in the dump)",
    "mse": "relative mse of the backward GEMM (of dY without X and W in the dump)",
    "angle": "angle in degrees between the pruned and the dense dY (Monte Carlo)",
}
GEMM_AXIS = {"dx": "features", "dw": "tokens"}
DENSE = "dense"


class PlanError(NmgradError):
    """A bad budget, candidate list or plan file, or a plan that does not fit the model."""


@dataclass(frozen=True)
class Bound:
    """One term of a budget: ``metric op value`` (an upper bound)."""

    metric: str
    op: str
    value: float

    def holds(self, x: float | None) -> bool:
        if x is None or math.isnan(x):
            return False
        return x <= self.value if self.op == "<=" else x < self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


_BOUND = re.compile(r"^\s*([a-z_]+)\s*(<=|<|>=|>|==|=)\s*([^\s]+)\s*$")


def parse_budget(spec: str) -> tuple[Bound, ...]:
    """``"variance<=0.5"``, ``"angle<=35"`` or both comma-separated (all must hold)."""
    terms = [t for t in (spec or "").split(",") if t.strip()]
    if not terms:
        raise PlanError(f"budget '{spec}' is empty: give e.g. 'variance<=0.5' or 'angle<=35'")
    out = []
    for term in terms:
        m = _BOUND.match(term)
        if m is None:
            raise PlanError(f"budget '{term.strip()}' is not METRIC<=NUMBER: e.g. 'variance<=0.5' or 'angle<=35'")
        metric, op, raw = m.groups()
        if metric not in BUDGET_METRICS:
            raise PlanError(f"budget metric '{metric}' is unknown: choose {', '.join(BUDGET_METRICS)}")
        if op not in ("<=", "<"):
            raise PlanError(f"budget '{term.strip()}' is not an upper bound: use <= or <, e.g. '{metric}<=0.5'")
        try:
            value = float(raw)
        except ValueError:
            raise PlanError(f"budget '{term.strip()}': '{raw}' is not a number, e.g. '{metric}<=0.5'") from None
        if not math.isfinite(value) or value <= 0 or (metric == "angle" and value > 180):
            hint = "an angle in (0, 180] degrees" if metric == "angle" else "a number above 0, e.g. 0.5"
            raise PlanError(f"budget '{term.strip()}' is impossible: no sparse pattern can meet it; give {hint}")
        out.append(Bound(metric, op, value))
    return tuple(out)


def parse_candidates(spec: str) -> tuple[Pattern, ...]:
    """``"1:2,2:4,2:8,1:4"`` -> patterns sparsest first (by N/M; ties in the order given)."""
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not items:
        raise PlanError(f"--candidates '{spec}' is empty: give N:M patterns, e.g. {DEFAULT_CANDIDATES}")
    pats = []
    for item in items:
        try:
            pats.append(parse_pattern(item))
        except PatternError as exc:
            raise PlanError(f"--candidates: {exc}") from None
    pats = list(dict.fromkeys(pats))
    return tuple(sorted(pats, key=lambda p: p.n / p.m))


def method_for(pattern: Pattern, methods: tuple[str, ...], gpu: bool = False) -> str | None:
    """The first of ``methods`` defined for ``pattern`` (on a GPU: that also has a Triton kernel)."""
    from .kernels import triton_prune

    for name in methods:
        try:
            get_method(name).check(pattern)
        except PatternError:
            continue
        if gpu and not triton_prune.supports(name, pattern.n, pattern.m):
            continue
        return name
    return None


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Plan:
    """A per-layer N:M plan (``nmgrad evaluate --recommend``); :meth:`to_dict` is its JSON."""

    budget: str
    candidates: list[str]
    methods: list[str]
    sources: list[dict]
    """The dumps it came from: {path, sha256, bytes, model}."""
    evaluate: dict
    """The :class:`EvalConfig` of the evaluations (pattern and methods vary per candidate)."""
    layers: dict[str, dict]
    """name -> {module_type, T, F, I, flops_saved, dx: choice, dw: choice}; a choice is {pattern (None:
    dense), method, density, level ("gemm"|"dY"), errors {metric: value}, tried [{pattern, method,
    errors, fits}]}."""
    flops_saved: float | None = None
    """Fraction of the model's backward GEMM FLOPs (the layers in the plan) saved; None without shapes."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "kind": PLAN_KIND, "version": PLAN_VERSION, "nmgrad_version": __version__,
            "budget": self.budget, "candidates": self.candidates, "methods": self.methods,
            "sources": self.sources, "evaluate": self.evaluate, "flops_saved": self.flops_saved,
            "layers": self.layers, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d, source: str = "<dict>") -> Plan:
        if not isinstance(d, dict) or d.get("kind") != PLAN_KIND or not isinstance(d.get("layers"), dict):
            raise PlanError(f"{source} is not a plan: write one with `nmgrad evaluate --recommend --plan-out FILE`")
        if d.get("version", 0) > PLAN_VERSION:
            raise PlanError(f"{source} is a plan of version {d['version']}: this nmgrad reads {PLAN_VERSION}; upgrade")
        try:
            plan = cls(d["budget"], list(d["candidates"]), list(d["methods"]), list(d["sources"]), dict(d["evaluate"]),
                       dict(d["layers"]), d.get("flops_saved"), list(d.get("notes") or []))
            for name, entry in plan.layers.items():
                for gemm in GEMM_AXIS:
                    c = entry[gemm]
                    if c["pattern"] is not None:
                        get_method(c["method"]).check(parse_pattern(c["pattern"]))
                    elif c["method"] != DENSE:
                        raise KeyError(name)
        except (KeyError, TypeError, NmgradError) as exc:
            raise PlanError(f"{source} is a damaged plan ({type(exc).__name__}: {exc}): write it again with "
                            "`nmgrad evaluate --recommend`") from None
        return plan

    def gemm_choice(self, layer: str, gemm: str) -> tuple[str, str | None]:
        """(method, pattern) of ``gemm`` ("dx" or "dw") of ``layer``: ("dense", None) when it stays dense."""
        c = self.layers[layer][gemm]
        return (DENSE, None) if c["pattern"] is None else (c["method"], c["pattern"])

    def site_configs(self, base):
        """Site name -> its :class:`~nmgrad_cli.train.config.SparseGradConfig`: ``base`` (seed, backend,
        weight pattern) with the plan's dX method and pattern, and the dW ones as ``dw_method``/``dw_pattern``."""
        from .train.config import SparseGradConfig

        out = {}
        for name in self.layers:
            (mx, px), (mw, pw) = self.gemm_choice(name, "dx"), self.gemm_choice(name, "dw")
            out[name] = SparseGradConfig(
                method=mx, pattern=px or pw or base.pattern, grad_gemms=("dx", "dw"), dw_method=mw,
                dw_pattern=pw or px or base.pattern, weight_pattern=base.weight_pattern,
                weight_every=base.weight_every, seed=base.seed, backend=base.backend,
            )
        return out

    def missing_error(self, site: str) -> PlanError:
        """The error for a site of the model that the plan does not cover."""
        return PlanError(
            f"the plan has no entry for the site {site}: make it from a capture of every layer of this model, "
            "or leave the site out with --layers"
        )

    def check_model(self, params: list[str]) -> None:
        """The plan's layers must be sites of the model whose parameter names are ``params``."""
        from .sites.site import site_name

        names = {site_name(p) for p in params}
        names |= {f"{n}.{part}" for n in names if n.endswith("in_proj") for part in "qkv"}
        foreign = sorted(set(self.layers) - names)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
            model = ", ".join(sorted({s.get("model") or "?" for s in self.sources}))
            raise PlanError(
                f"the plan is for another model ({model}): its layers {shown} are not in this model; make a plan "
                "from a capture of this model"
            )

    def record(self, path: str) -> dict:
        """What config.json keeps of the plan."""
        return {"path": str(path), "sha256": sha256(path), "budget": self.budget, "flops_saved": self.flops_saved,
                "sources": self.sources}

    def check_layers(self, names: list[str]) -> None:
        """Every name (the model's selected sites) must be in the plan, and every plan layer in ``names``."""
        have, want = set(self.layers), set(names)
        foreign = sorted(have - want)
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" (+{len(foreign) - 4} more)" if len(foreign) > 4 else "")
            raise PlanError(
                f"the plan is for another model: its layers {shown} are not sites of this model "
                f"(sites: {', '.join(sorted(want)[:6])}{' ...' if len(want) > 6 else ''}); make a plan from a "
                "capture of this model"
            )
        missing = sorted(want - have)
        if missing:
            shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
            raise PlanError(
                f"the plan has no entry for the sites {shown}: make it from a capture of every layer, or "
                "leave them out with --layers"
            )


def save(plan: Plan, path: str | os.PathLike) -> None:
    """Write the plan JSON through the shared output helper (temporary file, then rename; one-line
    errors that name the file), like every other JSON nmgrad writes."""
    write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")


def load(path: str | os.PathLike) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"{p}: no such plan file (write one with `nmgrad evaluate --recommend --plan-out FILE`)")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PlanError(f"{p} is not a plan: not a JSON file") from None
    return Plan.from_dict(d, str(p))


def _errors(row: dict) -> tuple[dict, str]:
    """The budget metrics of one pooled (layer, axis, method) row, and their level."""
    gemm = row.get("gemm_variance") is not None
    if gemm:
        errs = {"variance": row["gemm_variance"], "mse": row["gemm_mse"], "bias": row["gemm_bias"]}
    else:
        errs = {"variance": row["variance"], "mse": row["mse"], "bias": row["bias"]}
    errs["angle"] = row.get("angle")
    return errs, ("gemm" if gemm else "dY")


def _shapes(dumps: list[Path], reports: list) -> dict[str, dict]:
    """Per layer: mean T over its grad records, F, and I (from the stored weight shape)."""
    from .dump import DumpReader

    weight: dict[str, tuple[int, ...] | None] = {}
    for path in dumps:
        with DumpReader(path) as r:
            for name, info in r.layers.items():
                if info.weight_shape is not None or name not in weight:
                    weight[name] = info.weight_shape
    tokens: dict[str, list[int]] = {}
    feats: dict[str, int] = {}
    for rec in reports[0].records if reports else []:
        if rec.axis == "features":
            tokens.setdefault(rec.layer, []).append(int(rec.shape[0]))
            feats[rec.layer] = int(rec.shape[1])
    out = {}
    for name, ts in tokens.items():
        ws = weight.get(name)
        out[name] = {"T": sum(ts) / len(ts), "F": feats[name], "I": math.prod(ws[1:]) if ws else None}
    return out


def recommend(
    dumps: list[str | os.PathLike],
    budget: str = DEFAULT_BUDGET,
    candidates: str = DEFAULT_CANDIDATES,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    config=None,
    progress: ProgressLike = None,
) -> Plan:
    """Evaluate each candidate pattern (one evaluate pass per pattern, both axes) and pick per layer and
    GEMM the sparsest one within ``budget``. ``config`` gives everything else evaluate needs (layers,
    steps, samples, seed, device...: an :class:`~nmgrad_cli.evaluate.EvalConfig`); its pattern, methods
    and axis are set here. Without an angle
    term in the budget the passes draw no Monte-Carlo samples (the exact errors need none)."""
    from .evaluate import EvalConfig
    from .evaluate import evaluate as run_evaluate

    bounds = parse_budget(budget)
    pats = parse_candidates(candidates)
    config = config or EvalConfig()
    paths = [Path(p) for p in dumps]
    gpu = config.device.startswith("cuda")
    wants_angle = any(b.metric == "angle" for b in bounds)
    base = replace(config, axis="both", samples=config.samples if wants_angle else 0)
    if wants_angle and base.samples == 0:
        raise PlanError("an angle budget needs Monte-Carlo draws: give --samples 1 or more, e.g. 16")
    notes: list[str] = []
    tried: dict[tuple[str, str], list[dict]] = {}  # (layer, gemm) -> options
    reports = []
    module_types: dict[str, str] = {}
    for pat in pats:
        method = method_for(pat, tuple(methods), gpu)
        if method is None:
            notes.append(f"candidate {pat} skipped: none of {', '.join(methods)} is defined for it"
                         + (" with a GPU kernel" if gpu else ""))
            continue
        report = run_evaluate(paths, replace(base, pattern=str(pat), methods=(method,)), progress)
        if report.errors:
            raise PlanError(f"{report.errors[0].file}: {report.errors[0].message}; the plan needs every record")
        reports.append(report)
        parsed = res.Results("", base.to_dict(), [method], report.files,
                             layers=[res.flat_row(r) for r in report.layers])
        for (layer, axis, _), row in res.pooled_layers(parsed).items():
            module_types[layer] = row.get("module_type") or ""
            errs, level = _errors(row)
            gemm = "dx" if axis == "features" else "dw"
            tried.setdefault((layer, gemm), []).append({
                "pattern": str(pat), "method": method, "density": pat.n / pat.m, "level": level,
                "errors": errs, "fits": all(b.holds(errs.get(b.metric)) for b in bounds),
            })
    if not reports:
        raise PlanError(f"no candidate pattern could be evaluated ({'; '.join(notes)})")
    shapes = _shapes(paths, reports)
    first = bounds[0].metric
    layers: dict[str, dict] = {}
    total = saved = 0.0
    for layer in dict.fromkeys(k[0] for k in tried):
        dims = shapes.get(layer, {"T": None, "F": None, "I": None})
        entry: dict = {"module_type": module_types.get(layer, ""), **dims}
        fraction = 0.0
        for gemm in GEMM_AXIS:
            options = tried.get((layer, gemm), [])
            fits = [o for o in options if o["fits"]]
            best = min(fits, key=lambda o: (o["density"], o["errors"].get(first) or 0.0)) if fits else None
            entry[gemm] = {
                "pattern": best["pattern"] if best else None,
                "method": best["method"] if best else DENSE,
                "density": best["density"] if best else 1.0,
                "level": best["level"] if best else (options[0]["level"] if options else None),
                "errors": best["errors"] if best else None,
                "tried": options,
            }
            fraction += (1.0 - entry[gemm]["density"]) / 2
        entry["flops_saved"] = fraction
        if entry.get("I") is not None:
            macs = entry["T"] * entry["F"] * entry["I"]
            total += 2 * macs
            saved += 2 * macs * fraction
        layers[layer] = entry
    if all(e[g]["pattern"] is None for e in layers.values() for g in GEMM_AXIS):
        notes.append(f"no candidate meets {budget} on any layer: the plan is all dense (loosen the budget)")
    missing_shape = [n for n, e in layers.items() if e.get("I") is None]
    if missing_shape:
        notes.append(f"no weight shape in the dump for {', '.join(missing_shape)}: not in the model's FLOPs total")
    sources = []
    for p in paths:
        run = next((f.get("run") or {} for f in reports[0].files if Path(f["path"]) == p), {})
        sources.append({"path": str(p), "sha256": sha256(p), "bytes": p.stat().st_size, "model": run.get("model")})
    return Plan(
        budget=",".join(map(str, bounds)), candidates=[str(p) for p in pats], methods=list(methods),
        sources=sources, evaluate={k: v for k, v in base.to_dict().items() if k not in ("pattern", "methods", "axis")},
        layers=layers, flops_saved=(saved / total if total else None), notes=notes,
    )
