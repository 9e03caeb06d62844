"""Pictures of an evaluation (``nmgrad plot``, ``nmgrad evaluate --plot``); matplotlib only (the ``plot`` extra).

The numbers come from data-prep functions that do not need matplotlib (tested on their own):

- :func:`error_bars`: per layer and method, bias and variance (stacked: a biased method's bar is all
  bias), of the backward GEMM relative to ||dX||^2 (||dW||^2) when the dump held X and W, else of dY;
- :func:`angles`: per layer and method, the angle between the pruned and the dense dY;
- :func:`error_over_steps`: per step and method, the ||g||^2-weighted mse over the layers (when the
  evaluation holds several steps).

:func:`plot_results` draws them into one PNG: a row per block axis (features: dX, tokens: dW) with
the bars and the angles, and a last row with the error over steps.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

from .errors import NmgradError
from .results import Results, parse, pooled_layers

AXIS_GEMM = {"features": "dX", "tokens": "dW"}
INSTALL = "matplotlib is not installed: pip install 'nmgrad[plot]'"


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _results(payload: Results | dict) -> Results:
    return payload if isinstance(payload, Results) else parse(payload)


def error_bars(payload: Results | dict, axis: str) -> dict:
    """{"level": "gemm"|"dY", "layers": [...], "methods": [...], "bias": {m: [...]}, "variance": {m: [...]}}
    for block axis ``axis``, layers in the evaluation's order, pooled over its files."""
    r = _results(payload)
    rows = {k: v for k, v in pooled_layers(r).items() if k[1] == axis}
    layers = list(dict.fromkeys(k[0] for k in rows))
    methods = [m for m in r.methods if any(k[2] == m for k in rows)]
    gemm = bool(rows) and all(v.get("gemm_variance") is not None for v in rows.values())
    pre = "gemm_" if gemm else ""
    out = {"level": "gemm" if gemm else "dY", "layers": layers, "methods": methods, "bias": {}, "variance": {}}
    for m in methods:
        for part in ("bias", "variance"):
            out[part][m] = [_value(rows.get((name, axis, m)), pre + part, m) for name in layers]
    return out


def _value(row: dict | None, key: str, method: str) -> float | None:
    """A metric of a pooled row (a bias at its noise floor is already 0: metrics.rounded_bias)."""
    if row is None or row.get(key) is None:
        return None
    x = max(row[key], 0.0)
    return x


def angles(payload: Results | dict, axis: str) -> dict:
    """{"layers": [...], "methods": [...], "angle": {m: [degrees or None per layer]}} for ``axis``."""
    r = _results(payload)
    rows = {k: v for k, v in pooled_layers(r).items() if k[1] == axis}
    layers = list(dict.fromkeys(k[0] for k in rows))
    methods = [m for m in r.methods if any(k[2] == m for k in rows)]
    return {"layers": layers, "methods": methods,
            "angle": {m: [(rows.get((n, axis, m)) or {}).get("angle") for n in layers] for m in methods}}


def error_over_steps(payload: Results | dict) -> dict:
    """{(axis, method): (steps, mse)}: per step the ||g||^2-weighted relative mse of dY over every layer
    and record of that step (the GEMM's, weighted by ||dX||^2 or ||dW||^2, when every record has it)."""
    r = _results(payload)
    gemm = bool(r.records) and all(x.get("gemm_mse") is not None for x in r.records)
    acc: dict[tuple[str, str], dict[int, list[float]]] = {}
    for x in r.records:
        err, w = (x["gemm_mse"], x["gemm_norm2"]) if gemm else (x["mse"], x["norm2"])
        sums = acc.setdefault((x["axis"], x["method"]), {}).setdefault(x["step"], [0.0, 0.0])
        sums[0] += err * w
        sums[1] += w
    out = {}
    for key, by_step in acc.items():
        steps = sorted(by_step)
        out[key] = (steps, [by_step[s][0] / by_step[s][1] if by_step[s][1] > 0 else 0.0 for s in steps])
    return out


def short_labels(names: list[str], width: int = 22) -> list[str]:
    """Axis labels for layer names: a name longer than ``width`` has its outer path parts
    abbreviated, from the left, until it fits (``encoder.block.0.layer.0.SelfAttention.q`` ->
    ``e.b.0.l.0.SA.q``): block indices and the last part are always kept whole, so the labels stay
    informative. Names whose abbreviations would coincide keep their full names: labels are unique."""
    labels = [_abbreviate(n, width) for n in names]
    count: dict[str, int] = {}
    for label in labels:
        count[label] = count.get(label, 0) + 1
    return [label if count[label] == 1 else name for name, label in zip(names, labels)]


def _abbreviate(name: str, width: int) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= width:
            break
        if not parts[i].isdigit():
            parts[i] = _initials(parts[i])
    return ".".join(parts)


def _initials(part: str) -> str:
    """``SelfAttention`` -> ``SA``, ``c_attn`` -> ``ca``, ``encoder`` -> ``e``."""
    caps = "".join(c for c in part if c.isupper())
    if len(caps) > 1:
        return caps
    return "".join(w[0] for w in part.split("_") if w) or part


def plot_results(payload: Results | dict, path: str | os.PathLike) -> Path:
    """Draw the evaluation into the PNG ``path`` (see the module docstring); returns ``path``."""
    if not plot_available():
        raise NmgradError(INSTALL)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator, NullFormatter

    r = _results(payload)
    axes_present = [a for a in ("features", "tokens") if any(x["axis"] == a for x in r.layers)]
    if not axes_present:
        raise NmgradError(f"{r.path} has no per-layer rows to draw: evaluate at least one layer")
    over_steps = error_over_steps(r)
    several_steps = any(len(s) > 1 for s, _ in over_steps.values())
    n_layers = len(error_bars(r, axes_present[0])["layers"])
    rotate = n_layers > 4
    side = n_layers <= 12  # the angles beside the bars; with many layers below them, full width
    width = min(max(10.0, 0.13 * n_layers * max(1, len(r.methods)) + (5 if side else 2)), 18.0)
    per_axis = [3.4] if side else [3.4, 2.6]
    heights = per_axis * len(axes_present) + [2.6] * several_steps
    labels_h = (0.9 if side else 1.6) * rotate * len(per_axis) * len(axes_present)
    fig = plt.figure(figsize=(width, sum(heights) + 1.0 + labels_h), dpi=72)
    grid = fig.add_gridspec(len(heights), 2 if side else 1, width_ratios=[2.2, 1] if side else None,
                            height_ratios=heights)
    colors = {m: f"C{i}" for i, m in enumerate(r.methods)}
    cfg = r.config
    fig.suptitle(f"nmgrad evaluate: pattern {cfg.get('pattern')}, {len(r.files)} dump(s), "
                 f"{cfg.get('samples')} samples per record", fontsize=12)

    def ticks(ax, names):
        ax.set_xticks(list(range(len(names))))
        ax.set_xticklabels(short_labels(names), rotation=60 if rotate else 0,
                           ha="right" if rotate else "center", fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)

    for i, axis in enumerate(axes_present):
        bars = error_bars(r, axis)
        row = i if side else 2 * i
        ax = fig.add_subplot(grid[row, 0])
        k = len(bars["methods"])
        w = 0.8 / max(k, 1)
        values = [y for part in ("bias", "variance") for m in bars["methods"] for y in bars[part][m] if y]
        for j, m in enumerate(bars["methods"]):
            pos = [x - 0.4 + w * (j + 0.5) for x in range(len(bars["layers"]))]
            b = [v or 0.0 for v in bars["bias"][m]]
            v = [val or 0.0 for val in bars["variance"][m]]
            ax.bar(pos, b, w, color=colors[m], edgecolor="black", linewidth=0.3, hatch="////")
            ax.bar(pos, v, w, bottom=b, color=colors[m], alpha=0.5, edgecolor="black", linewidth=0.3)
        ax.set_yscale("log")
        if values:
            ax.set_ylim(min(values) / 3, max(values) * 2)
        target = f"the {AXIS_GEMM[axis]} GEMM, relative to ||{AXIS_GEMM[axis]}||²" if bars["level"] == "gemm" \
            else "dY, relative to ||dY||²"
        ax.set_title(f"{axis} blocks: bias (hatched) + variance of {target}", fontsize=10)
        ax.set_ylabel("relative error (log)")
        ticks(ax, bars["layers"])
        ax.grid(axis="y", alpha=0.3)
        ang = angles(r, axis)
        ax = fig.add_subplot(grid[row, 1] if side else grid[row + 1, 0])
        for m in ang["methods"]:
            ys = [float("nan") if a is None else a for a in ang["angle"][m]]
            ax.plot(range(len(ang["layers"])), ys, "o-", color=colors[m], markersize=3, linewidth=1)
        ax.set_ylabel("angle (deg)")
        ax.set_title(f"{axis}: angle to the dense dY", fontsize=10)
        ticks(ax, ang["layers"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if all(a is None for m in ang["methods"] for a in ang["angle"][m]):
            ax.text(0.5, 0.5, "no angle: evaluated with --samples 0", transform=ax.transAxes, ha="center")
    if several_steps:
        ax = fig.add_subplot(grid[len(heights) - 1, :])
        for (axis, m), (steps, mse) in sorted(over_steps.items()):
            ax.plot(steps, mse, "-" if axis == "features" else "--", marker="o", markersize=3, color=colors[m])
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        all_steps = sorted({x for steps, _ in over_steps.values() for x in steps})
        if len(all_steps) <= 12:
            ax.set_xticks(all_steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel("mse (log)")
        ax.set_title("error over training steps, weighted over layers (solid: features/dX, dashed: tokens/dW)",
                     fontsize=10)
        ax.grid(alpha=0.3)
    handles = [Patch(color=colors[m], label=m) for m in r.methods]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="////", label="bias"),
                Patch(facecolor="lightgray", edgecolor="black", label="variance")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.965))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(path)
    _save_small(fig, out)
    plt.close(fig)
    return out


def _save_small(fig, out: Path) -> None:
    """Save as a PNG with a 64-colour palette when Pillow is there (plots have few colours: ~3x
    smaller), through a temporary file renamed over ``out`` (:func:`nmgrad_cli.outputs.atomic_open`):
    a failed write leaves what was there."""
    from .outputs import atomic_open

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    try:
        from PIL import Image
    except ImportError:
        data = buf.getvalue()
    else:
        buf.seek(0)
        small = io.BytesIO()
        with Image.open(buf) as img:
            img.convert("RGB").quantize(colors=64).save(small, format="PNG", optimize=True)
        data = small.getvalue()
    with atomic_open(out, binary=True) as fh:
        fh.write(data)


def plot_file(results_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``nmgrad plot``: read an evaluate JSON and draw it."""
    from .results import load

    return plot_results(load(results_path), out)
