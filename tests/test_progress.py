"""The one progress abstraction: how each ``progress=`` value renders."""

from __future__ import annotations

import io

import pytest

from nmgrad_cli.progress import (
    CallbackProgress,
    LineProgress,
    Progress,
    TqdmProgress,
    auto_progress,
    format_eta,
    resolve_progress,
)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_prints_every_interval_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(out, interval=5.0, unit="records", clock=clock)
    p.start(100, "evaluate")
    for done in range(1, 11):  # 10 records in 4.5 s: under one interval, nothing printed
        clock.t += 0.45
        p.update(done, "fc1")
    assert out.getvalue() == ""
    clock.t += 0.5  # 10 records in 5 s: 2 records/s, 90 left -> 45 s
    p.update(10, "fc2")
    assert out.getvalue() == "evaluate: 10/100 (10%) 2 records/s ETA 0:45 fc2\n"
    clock.t += 45
    p.update(100, "fc2")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[1] == "evaluate: 100/100 (100%) 2 records/s ETA 0:00 fc2"
    assert lines[2] == "evaluate: 100/100 (100%) 2 records/s ETA 0:00 done in 0:50"


def test_quick_run_prints_nothing_at_all():
    out = io.StringIO()
    with LineProgress(out, interval=5.0) as p:
        p.start(3, "evaluate")
        for i in range(3):
            p.update(i + 1)
    assert out.getvalue() == ""


def test_resolve_progress():
    assert type(resolve_progress(None)) is Progress and type(resolve_progress(False)) is Progress
    calls = []
    p = resolve_progress(lambda *a: calls.append(a))
    assert isinstance(p, CallbackProgress)
    p.start(2, "x")
    p.update(1, "a")
    assert calls == [(0, 2, ""), (1, 2, "a")]
    mine = LineProgress()
    assert resolve_progress(mine) is mine
    with pytest.raises(TypeError):
        resolve_progress(3)


def test_auto_progress_lines_off_a_terminal_tqdm_on_one():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(auto_progress(io.StringIO()), LineProgress)
    tty = Tty()
    p = auto_progress(tty)
    assert isinstance(p, TqdmProgress)
    p.start(4, "evaluate")
    p.update(4, "fc1")
    p.close()
    assert "evaluate:" in tty.getvalue() and "/4 [" in tty.getvalue()  # tqdm drew its bar


def test_format_eta():
    assert format_eta(59.6) == "1:00" and format_eta(3725) == "1:02:05" and format_eta(float("inf")) == "?"
