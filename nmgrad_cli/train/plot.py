"""Loss curves as a PNG, when matplotlib is installed (the ``plot`` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, s_t = (1 - alpha) s_{t-1} + alpha v_t, started at v_0."""
    out, s = [], None
    for v in values:
        s = v if s is None else (1 - alpha) * s + alpha * v
        out.append(s)
    return out


def plot_loss_curves(curves: dict[str, dict], path: Path, title: str = "") -> Path | None:
    """Plot each run's train loss (raw, faint, and smoothed) and eval loss points into ``path``.

    ``curves[label] = {"step": [...], "loss": [...], "eval_step": [...], "eval_loss": [...]}``.
    Returns ``path``, or None when matplotlib is not installed (``pip install 'nmgrad[plot]'``).
    """
    if not plot_available():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(c["step"], c["loss"], color=color, alpha=0.2, linewidth=0.8)
        ax.plot(c["step"], ema(c["loss"]), color=color, linewidth=1.6, label=f"{label} (train, EMA)")
        if c.get("eval_step"):
            ax.plot(c["eval_step"], c["eval_loss"], "o--", color=color, markersize=4, label=f"{label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
