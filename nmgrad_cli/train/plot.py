"""Loss (and accuracy) curves as a PNG, when matplotlib is installed (the ``plot`` extra)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments):
    s_t = (1 - alpha) s_{t-1} + alpha v_t with s_0 = 0, shown as s_t / (1 - (1 - alpha)^t), so the
    first points are not pulled towards 0 and a constant curve stays constant."""
    out, s = [], 0.0
    for t, v in enumerate(values, start=1):
        s = (1 - alpha) * s + alpha * v
        out.append(s / (1 - (1 - alpha) ** t))
    return out


def has_accuracy(curves: dict[str, dict]) -> bool:
    """Some run has a train or eval accuracy value to draw (a list of Nones is no data)."""
    return any(any(a is not None for a in (c.get("acc") or []) + (c.get("eval_acc") or [])) for c in curves.values())


def _finite(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _panel(ax, curves: dict, key: str, eval_key: str, ylabel: str, raw: bool) -> None:
    """One panel: per run the bias-corrected EMA of the train ``key`` (and, with ``raw``, the raw
    values faintly) and the eval points of ``eval_key``; colours follow the run order."""
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        xs, ys = _finite(c["step"], c.get(key) or [])
        if raw:
            ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
        if ys:
            ax.plot(xs, ema(ys), color=color, linewidth=1.6, label=f"{label} (train, EMA)")
        if c.get("eval_step") and c.get(eval_key):
            ex, ey = _finite(c["eval_step"], c[eval_key])
            ax.plot(ex, ey, "o--", color=color, markersize=4, label=f"{label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_loss_curves(curves: dict[str, dict], path: Path, title: str = "") -> Path | None:
    """Plot each run's train loss (raw, faint, and its bias-corrected EMA) and eval loss points into
    ``path``, and beside it the accuracy (train EMA, eval points) when the runs have one.

    ``curves[label] = {"step", "loss", "eval_step", "eval_loss"}`` and optionally ``"acc"``,
    ``"eval_acc"`` (lists; None entries are skipped). Returns ``path``, or None when matplotlib is
    not installed (``pip install 'nmgrad[plot]'``).
    """
    if not plot_available():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    acc = has_accuracy(curves)
    fig, axs = plt.subplots(1, 2 if acc else 1, figsize=(12 if acc else 7, 4.5), dpi=100, squeeze=False)
    _panel(axs[0, 0], curves, "loss", "eval_loss", "loss", raw=True)
    if acc:
        _panel(axs[0, 1], curves, "acc", "eval_acc", "accuracy", raw=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    from ..plot import _save_small

    _save_small(fig, Path(path))
    plt.close(fig)
    return path


def run_curves(run_dir: Path) -> tuple[dict[str, dict], str]:
    """(curves by label, title) of the training run in ``run_dir``: one run (``metrics.jsonl``) or a
    ``--compare`` folder (``summary.json`` listing the runs, each in its own sub-folder)."""
    import json

    from ..errors import NmgradError
    from .run_files import read_curves, safe_dirname

    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if (run_dir / "metrics.jsonl").is_file():
        runs = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
        label = runs.get("label", run_dir.name) if isinstance(runs, dict) else run_dir.name
        curves = {label: read_curves(run_dir)}
    elif summary.is_file() and isinstance(runs := json.loads(summary.read_text(encoding="utf-8")), list):
        curves = {r["label"]: read_curves(run_dir / safe_dirname(r["method"])) for r in runs}
    else:
        raise NmgradError(
            f"{run_dir} is not a training run: it has no metrics.jsonl (one run) nor a summary.json of a --compare;"
            " give the folder `nmgrad train --out` wrote"
        )
    if not any(c["step"] for c in curves.values()):
        raise NmgradError(f"{run_dir} has no training steps recorded yet (metrics.jsonl is empty): nothing to plot")
    config = run_dir / "config.json"
    cfg = json.loads(config.read_text(encoding="utf-8")).get("config", {}) if config.is_file() else {}
    title = " · ".join(str(v) for v in (cfg.get("model"), f"{cfg.get('steps')} steps" if cfg else None) if v)
    return curves, title or run_dir.name


def plot_run(run_dir: Path, path: Path) -> Path:
    """Draw the training run in ``run_dir`` (one run or a ``--compare`` folder) into ``path``."""
    from ..errors import NmgradError

    curves, title = run_curves(run_dir)
    if plot_loss_curves(curves, path, title=title) is None:
        raise NmgradError("matplotlib is not installed: pip install 'nmgrad[plot]'")
    return Path(path)
