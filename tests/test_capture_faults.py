"""Faults during a capture, each in a real subprocess: two captures on one --out, a file-size limit
(RLIMIT_FSIZE, like a full disk), and SIGINT/SIGTERM at the awkward moments. Nothing completed is
lost, nothing hangs, no traceback.

Timing is made deterministic by waiting for what the file says (steps flushed) or for the child's
``DRAIN`` line (tests/_capture_child.py: it then waits on stdin while the test sends signals).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from nmgrad_cli.dump import DumpReader
from nmgrad_cli.errors import DumpError

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
CAPTURE = [sys.executable, "-m", "nmgrad_cli", "capture", "--model", "mlp", "--quiet", "--device", "cpu"]
ENDLESS = [*CAPTURE, "--steps", "100000", "--every", "10"]  # records 1 step in 10: the writer keeps up


def spawn(cmd: list, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def steps_on_disk(partial: Path) -> int:
    """steps_completed of a file still being written (0 while it cannot be read yet)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["steps_completed"])
    except (OSError, KeyError, RuntimeError):
        return 0


def wait_for_steps(partial: Path, proc: subprocess.Popen, n: int, seconds: float = 120) -> int:
    t0 = time.time()
    while (k := steps_on_disk(partial)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < seconds, f"fewer than {n} steps after {seconds} s"
        time.sleep(0.05)
    return k


def assert_whole_steps(path: Path, reason: str | None) -> int:
    """A closed dump whose every counted step has every layer's record, all finite."""
    with DumpReader(path) as d:
        n = d.attrs["steps_completed"]
        assert d.attrs["interrupted"] == (reason is not None) and d.attrs["complete"] == (reason is None)
        if reason is not None:
            assert d.attrs["interrupt_reason"] == reason
        for li in d.layers.values():
            assert len(li.records["grad"]) >= n
        for rec in d.records("grad"):
            assert torch.isfinite(rec.load()).all()
    return n


def one_error_line(stderr: str, match: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], stderr


def test_second_capture_to_the_same_out_is_refused_and_the_first_loses_nothing(tmp_path):
    out = tmp_path / "m.h5"
    first = spawn([*ENDLESS, "--out", str(out)])
    n0 = wait_for_steps(tmp_path / "m.h5.partial", first, 2)
    with pytest.raises(DumpError, match="open for writing by another process"):  # readers are told, too
        DumpReader(tmp_path / "m.h5.partial")
    second = subprocess.run([*CAPTURE, "--steps", "3", "--out", str(out)], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2
    one_error_line(second.stderr, f"another capture is writing {out}.partial")
    wait_for_steps(tmp_path / "m.h5.partial", first, n0 + 2)  # the first one goes on writing
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert assert_whole_steps(out, "SIGTERM") >= n0 + 2
    assert not (tmp_path / "m.h5.partial").exists()


def _limit_file_size(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_file_size_limit_keeps_every_completed_step(tmp_path):
    """Like a full disk: one line, exit 2, and the steps that fitted are a readable dump."""
    out = tmp_path / "f.h5"
    p = subprocess.run([*CAPTURE, "--steps", "30", "--out", str(out)], env=ENV, capture_output=True, text=True,
                       timeout=120, preexec_fn=_limit_file_size(700_000))
    assert p.returncode == 2, p.stderr
    one_error_line(p.stderr, "no space for the next record")
    assert "under the file-size limit" in p.stderr and f"completed steps are kept in {out}" in p.stderr
    n = assert_whole_steps(out, "DiskFullError")
    assert 1 <= n < 30 and f"the {n} completed steps" in p.stderr
    assert not (tmp_path / "f.h5.partial").exists()
    # below one step: nothing kept, nothing left behind
    p = subprocess.run([*CAPTURE, "--steps", "5", "--out", str(tmp_path / "g.h5")], env=ENV, capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit_file_size(200_000))
    assert p.returncode == 2
    one_error_line(p.stderr, "no space for the next record")
    assert list(tmp_path.glob("g.h5*")) == []


def _drain(tmp_path: Path, steps: int = 3) -> tuple[subprocess.Popen, Path]:
    """A child that has done its last step and waits, its writer still busy, for a line on stdin."""
    out = tmp_path / "w.h5"
    proc = spawn([sys.executable, str(REPO / "tests" / "_capture_child.py"), str(out), str(steps), "lzf"],
                 stdin=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line.startswith("DRAIN "), (line, proc.communicate())
    assert int(line.split()[1]) > 0
    return proc, out


def test_one_signal_while_the_last_steps_are_written_keeps_them_all(tmp_path):
    proc, out = _drain(tmp_path)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, stderr
    assert "DONE done 3" in stdout and "Traceback" not in stderr
    assert assert_whole_steps(out, None) == 3
    assert not out.with_name("w.h5.partial").exists()


def test_a_second_signal_while_finishing_drops_the_queue_and_never_hangs(tmp_path):
    proc, out = _drain(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # two different signals: never merged into one
    stdout, stderr = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert not out.with_name("w.h5.partial").exists()
    if "ERROR" in stdout:  # the writer had not finished one step: nothing to keep
        assert f"interrupted (SIGTERM) before a recorded step was completed: nothing was written to {out}" in stdout
        assert not out.exists()
    else:
        n = assert_whole_steps(out, "SIGTERM")
        assert 1 <= n <= 3 and f"DONE SIGTERM {n}" in stdout


def test_second_signal_during_training_abandons_the_step_and_keeps_the_rest(tmp_path):
    out = tmp_path / "t.h5"
    proc = spawn([*ENDLESS, "--out", str(out)])
    n0 = wait_for_steps(tmp_path / "t.h5.partial", proc, 2)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stdout
    with DumpReader(out) as d:  # the first signal handled names the run's end
        reason = d.attrs["interrupt_reason"]
    assert reason in ("SIGINT", "SIGTERM") and assert_whole_steps(out, reason) >= n0


def test_sigterm_right_after_the_partial_appears_leaves_no_corrupt_file(tmp_path):
    out = tmp_path / "s.h5"
    partial = tmp_path / "s.h5.partial"
    proc = spawn([*ENDLESS, "--out", str(out)])
    t0 = time.time()
    while not partial.exists():
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and not partial.exists()
    if out.exists():  # the first step finished before the signal was seen
        assert assert_whole_steps(out, "SIGTERM") >= 1
    else:
        one_error_line(stderr, "interrupted (SIGTERM)")
        assert "nothing was written" in stderr
