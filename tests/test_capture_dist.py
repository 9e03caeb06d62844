"""Capture and evaluate under torchrun (2 CPU processes, gloo): the run of one process, one dump per
rank, the rank files evaluated as one, and a rank killed mid-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from nmgrad_cli.capture import CaptureConfig, run_capture
from nmgrad_cli.dump import DumpReader
from nmgrad_cli.errors import DumpError
from nmgrad_cli.evaluate import EvalConfig, evaluate

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODEL = ["--model", "_dist_capture:model", "--data", "_dist_capture:data"]


def torchrun(out: Path, steps: int, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "nmgrad_cli", "capture", *MODEL, "--steps", str(steps), "--quiet", "--device", "cpu", "--out", str(out),
           *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def records(path: Path, kind: str) -> dict[tuple[str, str], torch.Tensor]:
    with DumpReader(path) as d:
        return {(r.layer.name, r.name): r.load() for r in d.records(kind)}


def test_two_gloo_ranks_capture_and_evaluate_the_run_of_one_process(tmp_path, monkeypatch):
    """2 ranks at batch 2 train on the rows 1 process sees at batch 4 (tests/_dist_capture.py): DDP
    keeps W that of the one-process run, X is its rows split by rank, and dY is its dY split by rank
    times 2 (each rank's loss is the mean over its own rows). The rank files, evaluated by 2 gloo
    ranks, give the very report of one process evaluating them."""
    p = torchrun(tmp_path / "d.h5", 3, "--with-inputs", "--batch-size", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    ranks = [tmp_path / "d.rank0.h5", tmp_path / "d.rank1.h5"]
    monkeypatch.syspath_prepend(str(TESTS))
    one = run_capture(CaptureConfig(model="_dist_capture:model", data="_dist_capture:data", batch_size=4, steps=3,
                                    with_inputs=True, out=str(tmp_path / "one.h5"), device="cpu"),
                      handle_signals=False).path
    for kind, scale in (("weight", None), ("input", 1.0), ("grad", 2.0)):
        full = records(one, kind)
        parts = [records(r, kind) for r in ranks]
        assert set(full) == set(parts[0]) == set(parts[1]) and len(full) == 2 * 3
        for key, t in full.items():
            if scale is None:  # the replicas' weights: each rank's is the one process' weight
                for part in parts:
                    torch.testing.assert_close(part[key], t, rtol=1e-5, atol=1e-6)
            else:  # rows 0-1 on rank 0, rows 2-3 on rank 1
                torch.testing.assert_close(torch.cat([parts[0][key], parts[1][key]]), t * scale, rtol=1e-5,
                                           atol=1e-7)
        if kind == "grad":  # each rank its own rows
            assert not torch.equal(parts[0][("0", "s0000002c000")], parts[1][("0", "s0000002c000")])

    from _dist_eval import rank_main

    cfg = EvalConfig(methods=("mvue", "greedy"), samples=3, axis="both", seed=5)
    alone = json.loads(json.dumps(evaluate(ranks, cfg).to_dict()))
    assert {r["file"] for r in alone["file_summary"]} == {str(r) for r in ranks}  # pooled, and one per file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "eval")
    mp.spawn(rank_main, args=(2, port, [str(r) for r in ranks], cfg, out), nprocs=2, join=True)
    for rank in (0, 1):
        with open(f"{out}.{rank}") as fh:
            assert json.load(fh) == alone


def test_a_killed_rank_gives_one_line_and_every_written_file_stays_valid(tmp_path):
    """Rank 1 SIGKILLs itself drawing batch 3: rank 0 says so in one line, exits non-zero, and its
    dump (renamed, marked interrupted) holds the 3 completed steps; rank 1 leaves only its .partial."""
    p = torchrun(tmp_path / "d.h5", 6, env={"NMGRAD_TEST_KILL_RANK": "1:3"})
    assert p.returncode != 0
    said = [line for line in (p.stdout + p.stderr).splitlines() if "lost another rank" in line]
    assert len(said) == 1 and "rank 0 of 2" in said[0] and "3 completed steps are kept in" in said[0], p.stdout
    assert "check that --data" not in said[0]  # not blamed on the user's data
    with DumpReader(tmp_path / "d.rank0.h5") as d:
        assert d.attrs["interrupted"] and not d.attrs["complete"]
        assert d.attrs["interrupt_reason"] == "RankLostError" and d.attrs["steps_completed"] == 3
        for li in d.layers.values():
            assert len(li.records["grad"]) == 3
    assert not (tmp_path / "d.rank1.h5").exists()
    partial = tmp_path / "d.rank1.h5.partial"
    assert partial.exists()
    try:  # a SIGKILLed writer: a readable dump of whole steps, or one line saying it is corrupt
        d = DumpReader(partial)
    except DumpError as exc:
        assert "truncated or corrupt" in str(exc) or "not an HDF5 file" in str(exc)
        return
    with d:
        assert not d.attrs["complete"] and d.attrs["steps_completed"] <= 3
