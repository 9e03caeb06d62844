"""Several gradient-pruning methods side by side from the same seed: :func:`compare`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..errors import Interrupted, NmgradError
from ..progress import ProgressLike, resolve_progress
from .distributed import dist_info, process_group, resolve_device
from .plot import plot_loss_curves
from .records import Hooks, RunSummary
from .run import run_one, title
from .run_config import TrainConfig
from .run_files import check_captures, per_method, read_curves, run_folder, safe_dirname, write_json


def compare(
    cfg: TrainConfig,
    methods: Sequence[str],
    out: Path | str | None = None,
    force: bool = False,
    hooks: Hooks | None = None,
    plot: bool = True,
    progress: ProgressLike = None,
) -> list[RunSummary]:
    """Run ``cfg`` once per method (same seed: same initial weights, data order) into ``out/<method>/``,
    then ``out/summary.json`` (every run) and one ``out/loss.png`` of all curves.

    Every method is validated before the first run. A diverged run is recorded in its summary
    (``diverged``) and the others still run; raise on it yourself if you need to.
    """
    if not methods:
        raise NmgradError("--compare needs at least one method, e.g. dense,greedy,mvue")
    if len(set(methods)) != len(methods):
        raise NmgradError(f"--compare lists a method twice: {','.join(methods)}")
    configs = [  # validates each; with --capture, one dump per method
        dataclasses.replace(cfg, method=m, capture=per_method(cfg.capture, m)) for m in methods
    ]
    out = Path(out) if out is not None else None
    info = dist_info()
    check_captures([c.capture for c in configs], info, force)
    device = resolve_device(cfg.device, info)
    main_out = out if info.is_main else None
    summaries = []
    bar = resolve_progress(progress if info.is_main else None, unit="steps")
    with run_folder(main_out, force), process_group(info, device), bar:
        for c in configs:
            sub = main_out / safe_dirname(c.method) if main_out is not None else None
            with run_folder(sub, force=True):  # a method's own folder
                summaries.append(run_one(c, sub, hooks or Hooks(), info, device, bar))
            if summaries[-1].interrupted:  # Ctrl-C: no further methods
                break
    if main_out is not None:
        write_json(out / "summary.json", [asdict(s) for s in summaries])
        if plot and not summaries[-1].interrupted:
            curves = {s.label: read_curves(out / safe_dirname(s.method)) for s in summaries}
            plot_loss_curves(curves, out / "loss.png", title=title(cfg, compare=True))
    if summaries[-1].interrupted:
        last = summaries[-1]
        raise Interrupted(f"interrupted ({last.interrupted}) during {last.label}: the runs so far are in summary.json")
    return summaries
