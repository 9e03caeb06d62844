"""From measurement to decision: a per-layer N:M plan (the library behind ``nmgrad evaluate --recommend``).

For every layer (GEMM site) of the dumps and each of its two backward GEMMs (dX: blocks along
features, dW: blocks along tokens), :func:`recommend` evaluates every candidate pattern with every
candidate method (one evaluate pass per pattern), takes **per pattern the method with the smallest
exact error of that GEMM** (its variance; under an mse budget that admits biased methods, its mse),
and keeps the **sparsest** pattern whose error stays within the budget (ties: the smaller error); a
GEMM where no candidate fits stays dense. mvue is the minimum-variance unbiased pruning of each
block of dY, not of the GEMM: approx-mvue or random can give dX or dW a smaller variance
(docs/methods.md, "Per element is not per GEMM"), so the method is chosen per GEMM. The errors are
evaluate's exact ones:

- ``variance``, ``mse``: of the backward GEMM fed with the pruned dY, relative to ||dX||^2 (||dW||^2),
  when the dump holds X and W (``capture --with-inputs``); else of dY itself, relative to ||dY||^2
  (the plan says which, per GEMM);
- ``angle``: the Monte-Carlo angle in degrees between the pruned and the dense dY.

A variance (or angle) budget is met only by unbiased methods: a biased one (greedy: all its error is
bias, its variance 0) enters a plan only under an mse budget, which counts the bias (:func:`admit_methods`).

The saving is counted in multiply-adds of the two backward GEMMs: dX = dY W and dW = dY^T X each
cost T·F·I, and a pruned dY costs its kept fraction of that, with padding: a length L (F for dX, T
for dW) that is not a multiple of M keeps ``(L // M) N + min(N, L % M)`` of L (:func:`kept_fraction`;
F = 10 at 2:8 keeps 0.4, not 0.25). A GEMM that never runs in training (dX of a layer whose input needs
no gradient, the first layer's; dW of a frozen weight; the dump records which, ``needs_grad``) is
neither pruned nor counted. A layer saves the T·F·I-weighted mean over its GEMMs that run, the model
the same over every layer.

The plan (:class:`Plan`, JSON) records the budget, the candidates, the methods, the dumps with their
sha256, the evaluate config, and per layer the choice, its error and its shapes. ``nmgrad train
--plan`` applies it per site and GEMM (:meth:`Plan.site_configs`).
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
DEFAULT_METHODS = ("mvue", "approx-mvue", "mvue12", "random")
"""The unbiased candidates: per pattern and GEMM the one with the smallest exact variance among those
defined for the pattern (with a GPU kernel for it, when planning for CUDA)."""
BUDGET_METRICS = {
    "variance": "relative variance of the backward GEMM (of dY without X and W in the dump)",
    "mse": "relative mse of the backward GEMM (of dY without X and W in the dump)",
    "angle": "angle in degrees between the pruned and the dense dY (Monte Carlo)",
}
GEMM_AXIS = {"dx": "features", "dw": "tokens"}
TIE = 1e-9
"""Two methods' errors this close (relative) are a tie: the order of ``--methods`` decides."""
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


def methods_for(pattern: Pattern, methods: tuple[str, ...], gpu: bool = False) -> tuple[str, ...]:
    """Those of ``methods`` defined for ``pattern`` (on a GPU: that also have a Triton kernel for it)."""
    from .kernels import triton_prune

    out = []
    for name in methods:
        try:
            get_method(name).check(pattern)
        except PatternError:
            continue
        if gpu and not triton_prune.supports(name, pattern.n, pattern.m):
            continue
        out.append(name)
    return tuple(out)


def method_for(pattern: Pattern, methods: tuple[str, ...], gpu: bool = False) -> str | None:
    """The first of ``methods`` defined for ``pattern`` (on a GPU: that also has a Triton kernel for it)."""
    found = methods_for(pattern, methods, gpu)
    return found[0] if found else None


def admits_biased(bounds: tuple[Bound, ...]) -> bool:
    """Whether a biased method may enter a plan under ``bounds``: only an mse budget counts the bias;
    a variance bound (a biased method's variance can be 0) or an angle bound alone does not."""
    metrics = {b.metric for b in bounds}
    return "mse" in metrics and "variance" not in metrics


def admit_methods(methods: tuple[str, ...], bounds: tuple[Bound, ...]) -> tuple[tuple[str, ...], str | None]:
    """(the methods a plan under ``bounds`` may use, one warning line or None). Biased methods (the
    registry's ``unbiased = False``) are left out unless :func:`admits_biased`; an unknown name raises."""
    biased = [m for m in methods if not get_method(m).unbiased]
    if not biased:
        return tuple(methods), None
    names = ", ".join(biased)
    if admits_biased(bounds):
        return tuple(methods), (f"{names} {'is' if len(biased) == 1 else 'are'} biased: admitted under the mse "
                                "budget (bias included), and marked 'biased' in the plan")
    kept = tuple(m for m in methods if m not in biased)
    budget = ",".join(map(str, bounds))
    if not kept:
        raise PlanError(f"--methods {','.join(methods)}: only biased methods, and the budget {budget} is met only "
                        "by unbiased ones: add e.g. mvue,approx-mvue, or give an mse budget (bias included), "
                        "e.g. 'mse<=0.05'")
    return kept, (f"{names} {'is' if len(biased) == 1 else 'are'} biased: left out, since the budget {budget} is "
                  "met only by unbiased methods (an mse budget, bias included, admits biased ones)")


def kept_fraction(length: int, pattern: Pattern) -> float:
    """The fraction of ``length`` elements (a row of dY along the block axis) an N:M pruning keeps:
    full blocks keep N of M, the last block, zero-padded to M, keeps min(N, its length), so
    ((L // M) N + min(N, L % M)) / L: F = 10 keeps 0.4 at 2:8, 0.6 at 2:4, 0.3 at 1:4."""
    if length <= 0:
        return 1.0
    full, rest = divmod(int(length), pattern.m)
    return (full * pattern.n + min(pattern.n, rest)) / length


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
    dense), method, density (N/M; 1 dense), kept (the fraction of dY the GEMM reads, padding included),
    runs (False: the GEMM never runs in training, neither pruned nor counted), biased, level
    ("gemm"|"dY"), errors {metric: value}, tried [{pattern, method, density, kept, biased, errors,
    fits, methods {method: errors} (every candidate method at that pattern)}]}."""
    flops_saved: float | None = None
    """Fraction of the model's backward GEMM FLOPs (the GEMMs that run, of the layers in the plan)
    saved; None without shapes."""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What the user asked for that the plan did not do as asked (a biased method under a variance budget)."""
    evaluations: dict = field(default_factory=dict, repr=False, compare=False)
    """Pattern -> the :class:`~nmgrad_cli.evaluate.EvalReport` the plan was made from (not in the JSON)."""

    def to_dict(self) -> dict:
        return {
            "kind": PLAN_KIND, "version": PLAN_VERSION, "nmgrad_version": __version__,
            "budget": self.budget, "candidates": self.candidates, "methods": self.methods,
            "sources": self.sources, "evaluate": self.evaluate, "flops_saved": self.flops_saved,
            "layers": self.layers, "notes": self.notes, "warnings": self.warnings,
        }

    @classmethod
    def from_dict(cls, d, source: str = "<dict>") -> Plan:
        if not isinstance(d, dict) or d.get("kind") != PLAN_KIND or not isinstance(d.get("layers"), dict):
            raise PlanError(f"{source} is not a plan: write one with `nmgrad evaluate --recommend --plan-out FILE`")
        if d.get("version", 0) > PLAN_VERSION:
            raise PlanError(f"{source} is a plan of version {d['version']}: this nmgrad reads {PLAN_VERSION}; upgrade")
        try:
            plan = cls(d["budget"], list(d["candidates"]), list(d["methods"]), list(d["sources"]), dict(d["evaluate"]),
                       dict(d["layers"]), d.get("flops_saved"), list(d.get("notes") or []),
                       list(d.get("warnings") or []))
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
    """Per layer: mean T over its grad records, F, I (from the stored weight shape), each record's T
    (``tokens``) and whether its dX and dW GEMMs run (``runs``; True where the dump does not say)."""
    from .dump import DumpReader

    weight: dict[str, tuple[int, ...] | None] = {}
    needs: dict[str, dict | None] = {}
    for path in dumps:
        with DumpReader(path) as r:
            for name, info in r.layers.items():
                if info.weight_shape is not None or name not in weight:
                    weight[name] = info.weight_shape
                ng, old = info.needs_grad, needs.get(name)
                if ng is not None:  # a GEMM runs if it ran in any dump
                    needs[name] = ng if old is None else {k: old[k] or ng[k] for k in ng}
                else:
                    needs.setdefault(name, None)
    tokens: dict[str, list[int]] = {}
    feats: dict[str, int] = {}
    for rec in reports[0].records if reports else []:
        if rec.axis == "features":
            tokens.setdefault(rec.layer, []).append(int(rec.shape[0]))
            feats[rec.layer] = int(rec.shape[1])
    out = {}
    for name, ts in tokens.items():
        ws, ng = weight.get(name), needs.get(name)
        out[name] = {"T": sum(ts) / len(ts), "F": feats[name], "I": math.prod(ws[1:]) if ws else None,
                     "tokens": ts, "runs": {"dx": True, "dw": True} if ng is None
                     else {"dx": ng["input"], "dw": ng["weight"]}, "known": ng is not None}
    return out


def _kept(gemm: str, dims: dict, pat: Pattern) -> float:
    """The kept fraction of dY a GEMM reads: dX along F (every row alike), dW along each record's T
    (weighted by T: the GEMM's cost is proportional to it)."""
    if gemm == "dx":
        return kept_fraction(dims["F"], pat) if dims.get("F") else pat.n / pat.m
    ts = dims.get("tokens") or []
    return sum(kept_fraction(t, pat) * t for t in ts) / sum(ts) if sum(ts) else pat.n / pat.m


def _options(tried: dict, layer: str, gemm: str, pat: Pattern, rows: dict, key: str, bounds, dims: dict) -> None:
    """The option of one (layer, GEMM, pattern): the candidate method with the smallest ``key`` error,
    with every method's errors beside it. Errors within :data:`TIE` (relative) of the smallest are a
    tie, won by the first in the order given (at 1:N approx-mvue is mvue's law: rounding decides nothing)."""
    def err(kv) -> float:
        x = kv[1][0].get(key)
        return math.inf if x is None or math.isnan(x) else x

    low = min(map(err, rows.items()))
    method, (errs, level) = next(kv for kv in rows.items() if err(kv) <= low + TIE * abs(low))
    tried.setdefault((layer, gemm), []).append({
        "pattern": str(pat), "method": method, "density": pat.n / pat.m, "kept": _kept(gemm, dims, pat),
        "biased": not get_method(method).unbiased, "level": level, "errors": errs,
        "fits": all(b.holds(errs.get(b.metric)) for b in bounds),
        "methods": {m: e for m, (e, _) in rows.items()},
    })


def recommend(
    dumps: list[str | os.PathLike],
    budget: str = DEFAULT_BUDGET,
    candidates: str = DEFAULT_CANDIDATES,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    config=None,
    progress: ProgressLike = None,
) -> Plan:
    """Evaluate each candidate pattern with every admitted candidate method (one evaluate pass per
    pattern, both axes), take per layer, GEMM and pattern the method with the smallest exact error,
    and pick per layer and GEMM the sparsest pattern (by the kept fraction, padding included) within
    ``budget``. ``config`` gives everything else evaluate needs (layers, steps, samples, seed,
    device...: an :class:`~nmgrad_cli.evaluate.EvalConfig`); its pattern, methods and axis are set
    here. Without an angle term in the budget the passes draw no Monte-Carlo samples (the exact
    errors need none)."""
    from .evaluate import EvalConfig
    from .evaluate import evaluate as run_evaluate

    bounds = parse_budget(budget)
    pats = parse_candidates(candidates)
    admitted, warning = admit_methods(tuple(methods), bounds)
    key = "mse" if admits_biased(bounds) else "variance"  # mse == variance for an unbiased method
    config = config or EvalConfig()
    paths = [Path(p) for p in dumps]
    gpu = config.device.startswith("cuda")
    wants_angle = any(b.metric == "angle" for b in bounds)
    base = replace(config, axis="both", samples=config.samples if wants_angle else 0)
    if wants_angle and base.samples == 0:
        raise PlanError("an angle budget needs Monte-Carlo draws: give --samples 1 or more, e.g. 16")
    notes: list[str] = []
    per_pattern: list[tuple[Pattern, dict]] = []  # (pattern, {(layer, gemm): {method: (errors, level)}})
    reports = {}
    module_types: dict[str, str] = {}
    for pat in pats:
        usable = methods_for(pat, admitted, gpu)
        if not usable:
            notes.append(f"candidate {pat} skipped: none of {', '.join(admitted)} is defined for it"
                         + (" with a GPU kernel" if gpu else ""))
            continue
        report = run_evaluate(paths, replace(base, pattern=str(pat), methods=usable), progress)
        if report.errors:
            raise PlanError(f"{report.errors[0].file}: {report.errors[0].message}; the plan needs every record")
        reports[str(pat)] = report
        parsed = res.Results("", base.to_dict(), list(usable), report.files,
                             layers=[res.flat_row(r) for r in report.layers])
        rows: dict = {}
        for (layer, axis, method), row in res.pooled_layers(parsed).items():
            module_types[layer] = row.get("module_type") or ""
            gemm = "dx" if axis == "features" else "dw"
            rows.setdefault((layer, gemm), {})[method] = _errors(row)
        per_pattern.append((pat, rows))
    if not reports:
        raise PlanError(f"no candidate pattern could be evaluated ({'; '.join(notes)})")
    shapes = _shapes(paths, list(reports.values()))
    layer_names = list(dict.fromkeys(layer for _, rows in per_pattern for layer, _ in rows))
    tried: dict[tuple[str, str], list[dict]] = {}
    for pat, rows in per_pattern:
        for (layer, gemm), by_method in rows.items():
            dims = shapes.get(layer, {})
            if dims.get("runs", {}).get(gemm, True):
                _options(tried, layer, gemm, pat, {m: by_method[m] for m in admitted if m in by_method}, key,
                         bounds, dims)
    first = bounds[0].metric
    layers: dict[str, dict] = {}
    total = saved = 0.0
    not_run = []
    for layer in layer_names:
        dims = shapes.get(layer, {"T": None, "F": None, "I": None})
        runs = dims.get("runs", {"dx": True, "dw": True})
        entry: dict = {"module_type": module_types.get(layer, ""), **{k: dims.get(k) for k in ("T", "F", "I")}}
        macs = entry["T"] * entry["F"] * entry["I"] if entry.get("I") is not None else None
        cost = gain = 0.0
        for gemm in GEMM_AXIS:
            options = tried.get((layer, gemm), [])
            fits = [o for o in options if o["fits"]]
            best = min(fits, key=lambda o: (o["kept"], o["errors"].get(first) or 0.0)) if fits else None
            entry[gemm] = {
                "pattern": best["pattern"] if best else None,
                "method": best["method"] if best else DENSE,
                "density": best["density"] if best else 1.0,
                "kept": best["kept"] if best else 1.0,
                "runs": runs[gemm],
                "biased": bool(best and best["biased"]),
                "level": best["level"] if best else (options[0]["level"] if options else None),
                "errors": best["errors"] if best else None,
                "tried": options,
            }
            if not runs[gemm]:
                not_run.append(f"{layer} {'dX' if gemm == 'dx' else 'dW'}")
                continue
            cost += 1.0
            gain += 1.0 - entry[gemm]["kept"]
        entry["flops_saved"] = gain / cost if cost else 0.0
        if macs is not None:  # dX and dW each cost T·F·I
            total += macs * cost
            saved += macs * gain
        layers[layer] = entry
    if not_run:
        notes.append(f"never run in training, so neither pruned nor counted: {', '.join(not_run)} "
                     "(dX: the layer's input needs no gradient; dW: a frozen weight)")
    unknown = [n for n in layers if not shapes.get(n, {}).get("known", False)]
    if unknown:
        notes.append(f"the dump does not record whether the backward GEMMs of {', '.join(unknown[:4])}"
                     f"{' ...' if len(unknown) > 4 else ''} run (made before nmgrad recorded needs_grad): "
                     "both counted; capture again to count only those that run")
    if all(e[g]["pattern"] is None for e in layers.values() for g in GEMM_AXIS):
        notes.append(f"no candidate meets {budget} on any layer: the plan is all dense (loosen the budget)")
    missing_shape = [n for n, e in layers.items() if e.get("I") is None]
    if missing_shape:
        notes.append(f"no weight shape in the dump for {', '.join(missing_shape)}: not in the model's FLOPs total")
    first_report = next(iter(reports.values()))
    sources = []
    for p in paths:
        run = next((f.get("run") or {} for f in first_report.files if Path(f["path"]) == p), {})
        sources.append({"path": str(p), "sha256": sha256(p), "bytes": p.stat().st_size, "model": run.get("model")})
    return Plan(
        budget=",".join(map(str, bounds)), candidates=[str(p) for p in pats], methods=list(admitted),
        sources=sources, evaluate={k: v for k, v in base.to_dict().items() if k not in ("pattern", "methods", "axis")},
        layers=layers, flops_saved=(saved / total if total else None), notes=notes,
        warnings=[warning] if warning else [], evaluations=reports,
    )
