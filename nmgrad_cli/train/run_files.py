"""A run's files: its folder, metrics.jsonl (and TensorBoard events), config.json, summary.json,
and the ``--capture`` dump names.

Rules (the project's): an existing non-empty run folder needs ``force``, which overwrites run
files and deletes nothing; a run that fails before writing anything leaves no folder behind
(:func:`run_folder` removes the empty folders it made); JSON is written to a temporary file and
renamed over the target.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from ..errors import OutputError, OutputExistsError
from ..outputs import check_output, write_text
from .distributed import DistInfo


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files (the ``tensorboard`` extra)."""
    return importlib.util.find_spec("tensorboard") is not None


@contextlib.contextmanager
def run_folder(out: Path | None, force: bool) -> Iterator[None]:
    """Check and create the run folder ``out`` (None: nothing); if the body raises, remove the
    folders this call created (``out`` and any missing parents) while they are still empty.

    Refuses an existing non-empty ``out`` without ``force`` (its files are overwritten, never deleted)."""
    if out is None:
        yield
        return
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"--out {out} exists: pass --force to overwrite its run files, or choose another folder"
        )
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only file system, a folder we may not write to, /proc
        raise OutputError(f"cannot write into --out {out}: {exc.strerror or exc}; choose another folder") from None
    try:
        yield
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):  # not empty (something was written), or gone
                p.rmdir()
        raise


class MetricsWriter:
    """metrics.jsonl, line by line and flushed (and, when ``tensorboard`` is installed, the same
    scalars as TensorBoard events in the run folder: ``train/loss``, ``eval/loss``, ...), on rank 0
    only. Both are created at the first record, so a run that fails in its first step (e.g. on
    ``--layers``) leaves neither."""

    def __init__(self, out: Path | None, tensorboard: bool | None = None):
        self.path = None if out is None else out / "metrics.jsonl"
        self.tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        self.file = None
        self.events = None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = self.path.open("w", encoding="utf-8")
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:  # e.g. the disk filled up
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if self.tensorboard:
            self._events(record)

    def _events(self, record: dict) -> None:
        if self.events is None:
            from torch.utils.tensorboard import SummaryWriter

            self.events = SummaryWriter(log_dir=str(self.path.parent))
        group = "eval" if "eval_loss" in record else "train"
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.events.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.events is not None:
            self.events.close()


def write_json(path: Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")  # temporary file, then rename


def write_config(out: Path, cfg, resolved: dict) -> None:
    """``out/config.json``: the TrainConfig as given and what it resolved to (see the trainer's
    ``_Run.resolved``, the one place that fills ``resolved``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config": asdict(cfg), "resolved": resolved})


def read_curves(out: Path) -> dict:
    """Train and eval loss curves from ``out/metrics.jsonl`` (for plots)."""
    curves = {"step": [], "loss": [], "acc": [], "eval_step": [], "eval_loss": [], "eval_acc": []}
    path = out / "metrics.jsonl"
    if not path.exists():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            curves["step"].append(rec["step"])
            curves["loss"].append(rec["loss"])
            curves["acc"].append(rec.get("acc"))
        elif rec.get("eval_loss") is not None:
            curves["eval_step"].append(rec["step"])
            curves["eval_loss"].append(rec["eval_loss"])
            curves["eval_acc"].append(rec.get("eval_acc"))
    return curves


def safe_dirname(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-")


def capture_path(capture: str, info: DistInfo) -> Path:
    """The dump ``--capture`` writes for this rank (``<stem>.rank<r><suffix>`` under several)."""
    p = Path(capture)
    return p if info.world_size <= 1 else p.with_name(f"{p.stem}.rank{info.rank}{p.suffix}")


def per_method(capture: str | None, method: str) -> str | None:
    """``--compare``'s dump for ``method``: ``<stem>.<method><suffix>``."""
    if capture is None:
        return None
    p = Path(capture)
    return str(p.with_name(f"{p.stem}.{safe_dirname(method)}{p.suffix}"))


def check_captures(captures: list[str | None], info: DistInfo, force: bool) -> None:
    """Refuse existing --capture dumps (without --force) before anything runs."""
    for c in captures:
        if c:
            check_output(capture_path(c, info), force)
