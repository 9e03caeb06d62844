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
    assert format_eta(3 * 86400 + 5) == "3d 0:00:05" and format_eta(47 * 3600) == "47:00:00"
    assert format_eta(1.25e22) == "> 99 days"  # never millions of hours


# --- one abstraction for every command: train and capture drive the same Progress ---------------


def test_train_and_compare_report_steps_through_progress(tmp_path):
    from nmgrad_cli.train.trainer import TrainConfig, compare, train

    calls: list[tuple[int, int | None, str]] = []
    cfg = TrainConfig(model="mlp", method="mvue", pattern="2:4", steps=3, batch_size=4, eval_batches=1,
                      backend="reference", device="cpu")
    train(cfg, tmp_path / "one", plot=False, progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 3, "") and [c[0] for c in calls[1:]] == [1, 2, 3]
    assert all(c[1] == 3 and c[2].startswith("loss ") and "steps/s" in c[2] for c in calls[1:])

    calls.clear()
    compare(cfg, ["dense", "greedy"], tmp_path / "cmp", plot=False, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == [0, 1, 2, 3, 0, 1, 2, 3]  # restarted for each method


def test_capture_reports_steps_and_megabytes_through_progress(tmp_path):
    from nmgrad_cli.capture import CaptureConfig, run_capture

    calls: list[tuple[int, int | None, str]] = []
    events = []
    cfg = CaptureConfig(model="mlp", steps=2, batch_size=4, out=str(tmp_path / "p.h5"))
    run_capture(cfg, events.append, False, progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 2, "")
    steps = [c for c in calls[1:] if c[2].startswith("recorded")]
    assert [c[0] for c in steps] == [1, 2] and steps[-1][2].startswith("recorded 2/2, ")
    assert [e.step for e in events if not e.draining] == [1, 2]  # the structured events still arrive


def test_line_progress_off_a_terminal_for_train(tmp_path):
    """Off a terminal a long train prints plain lines (interval 0 here: every step) on the stream."""
    from nmgrad_cli.train.trainer import TrainConfig, train

    buf = io.StringIO()
    cfg = TrainConfig(model="mlp", method="greedy", pattern="1:2", steps=2, batch_size=4, eval_batches=1,
                      backend="reference", device="cpu")
    train(cfg, tmp_path / "r", plot=False, progress=LineProgress(buf, interval=0.0, unit="steps"))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("greedy 1:2: 1/2 (50%)"), lines
    assert any("2/2 (100%)" in ln and "steps/s" in ln for ln in lines)


def test_counts_have_sane_upper_bounds():
    """A count typed with too many zeros: one line, exit 2, before any work (capture and train)."""
    from _cli import assert_user_error, invoke

    assert_user_error(invoke("train", "--model", "mlp", "--steps", "10000000000000"), "--steps must be between 1 and")
    assert_user_error(invoke("train", "--model", "mlp", "--eval-every", "10000000000"), "--eval-every must be")
    assert_user_error(invoke("capture", "--model", "mlp", "--steps", "100000000", "--out", "never.h5"), "--steps must")
    assert_user_error(invoke("capture", "--model", "mlp", "--warmup", "100000000", "--out", "never.h5"), "--warmup")
    assert_user_error(invoke("capture", "--model", "mlp", "--batch-size", "100000000", "--out", "never.h5"),
                      "--batch-size must be between 1 and 1,048,576")
