"""End-to-end capture runs: file contents, reproducibility, budget, user models, interrupts, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from nmgrad_cli.capture import CaptureConfig, run_capture
from nmgrad_cli.dump import DumpReader, DumpWriter
from nmgrad_cli.errors import DumpError, NmgradError

REPO = Path(__file__).resolve().parents[1]


def contents(path: Path) -> dict:
    """Every dataset (bytes and attrs) and every attribute except the creation time and output path."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: v for k, v in f.attrs.items() if k not in ("created", "run")}
        run = json.loads(f.attrs["run"])
        run.pop("out")
        out["run"] = run

        def visit(name, obj):
            attrs = dict(obj.attrs)
            out[name] = (obj[()].tobytes(), str(obj.dtype), attrs) if isinstance(obj, h5py.Dataset) else attrs

        f.visititems(visit)
    return out


def test_mlp_capture_records_every_kth_step_after_warmup(tmp_path):
    cfg = CaptureConfig(model="mlp", steps=5, every=2, warmup=3, with_inputs=True, out=str(tmp_path / "m.h5"))
    r = run_capture(cfg, handle_signals=False)
    assert (r.steps_run, r.steps_recorded, r.stopped) == (8, 3, "done")
    assert not (tmp_path / "m.h5.partial").exists()
    with DumpReader(r.path) as d:
        assert d.attrs["complete"] and not d.attrs["interrupted"] and d.attrs["steps_completed"] == 3
        assert [li.name for li in d.layers.values()] == ["fc1", "fc2", "fc3"]
        recs = list(d.records("grad"))
        assert sorted({rec.step for rec in recs}) == [3, 5, 7]
        assert all(rec.shape == (64, 256 if rec.layer.name != "fc3" else 10) for rec in recs)
        assert d.n_records("input") == d.n_records("weight") == 9
        assert d.attrs["run"]["task"] == {"data": "digits", "loss": "cross_entropy", "model": "mlp"}
        fc1 = d.layers["fc1"]
        assert (fc1.module_type, fc1.feature_axis, fc1.token_axes, fc1.weight_shape) == ("Linear", -1, (0,), (256, 64))
        # the stored X and W give the weight gradient autograd used: dW = dY^T X (per step, summed)
        g = d.load("fc2", "grad", "s0000003c000")
        x = d.load("fc2", "input", "s0000003c000")
        assert g.shape == (64, 256) and x.shape == (64, 256) and g.abs().sum() > 0


def test_same_seed_same_file_contents(tmp_path):
    def cfg(seed: int, name: str) -> CaptureConfig:
        return CaptureConfig(model="cnn", steps=2, warmup=1, seed=seed, batch_size=8, out=str(tmp_path / name))

    a, b, c = (run_capture(cfg(seed, name), None, False) for seed, name in ((7, "a.h5"), (7, "b.h5"), (8, "c.h5")))
    ca, cb, cc = contents(a.path), contents(b.path), contents(c.path)
    assert ca == cb
    key = "layers/stem.0/grad/s0000001c000"
    assert ca[key][0] != cc[key][0]


def test_max_bytes_stops_before_the_budget(tmp_path):
    one = run_capture(CaptureConfig(model="mlp", steps=1, out=str(tmp_path / "one.h5")), None, False)
    step = one.bytes_recorded
    r = run_capture(
        CaptureConfig(model="mlp", steps=10, max_bytes=int(2.5 * step), out=str(tmp_path / "m.h5")), None, False
    )
    assert (r.steps_recorded, r.bytes_recorded, r.stopped) == (2, 2 * step, "max-bytes")
    with DumpReader(r.path) as d:
        assert d.attrs["complete"] and d.attrs["steps_completed"] == 2 and d.attrs["run"]["stopped"] == "max-bytes"
    with pytest.raises(NmgradError, match="smaller than one recorded step"):
        run_capture(CaptureConfig(model="mlp", steps=3, max_bytes=step - 1, out=str(tmp_path / "s.h5")), None, False)
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()


def test_torch_transformer_encoder_through_the_import_path(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = run_capture(
        CaptureConfig(
            model="tests.user_models:encoder", data="tests.user_models:tokens", steps=2, out=str(tmp_path / "e.h5")
        ),
        None, False,
    )
    assert r.skipped == [("emb.weight", "used by embedding, not a linear/conv GEMM")]
    assert r.silent == []
    for i in (0, 1):  # the packed in_proj as three sites, and out_proj, of every layer
        attn = f"encoder.layers.{i}.self_attn"
        expected = [f"{attn}.in_proj.{p}" for p in "qkv"] + [f"{attn}.out_proj"]
        assert [n for n in r.layers if n.startswith(attn)] == expected
    with DumpReader(r.path) as d:
        names = [li.name for li in d.layers.values()]
        assert "encoder.layers.1.self_attn.out_proj" in names and "encoder.layers.0.linear1" in names
        op = d.layers["encoder.layers.0.self_attn.out_proj"]
        rec = next(d.records("grad", [op]))
        assert rec.shape == (6 * 4, 16) and op.token_axes == (0,)  # out_proj's GEMM is on (T*B, E)
        run = d.attrs["run"]
        assert run["not_intercepted"] == {"emb.weight": "used by embedding, not a linear/conv GEMM"}
        q = next(s for s in run["sites"] if s["name"] == "encoder.layers.0.self_attn.in_proj.k")
        assert q["param"] == "encoder.layers.0.self_attn.in_proj_weight" and q["rows"] == [16, 32]


def test_bf16_autocast_run_and_round_trip(tmp_path):
    r = run_capture(CaptureConfig(model="mlp", steps=1, amp="bf16", out=str(tmp_path / "b.h5")), None, False)
    with DumpReader(r.path) as d:
        recs = list(d.records("grad"))
        assert {rec.dtype for rec in recs} == {"bfloat16"}
        assert d.load("fc1", "grad", recs[0].name).dtype == torch.bfloat16
    t = torch.randn(5, 7).to(torch.bfloat16)
    t[0, 0] = float("-inf")
    with DumpWriter(tmp_path / "rt.h5") as w:
        w.add_layer("x", "Linear", -1, [0])
        w.write("x", "grad", 0, 0, t)
    with DumpReader(tmp_path / "rt.h5") as d:
        back = d.load("x", "grad", "s0000000c000")
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_one_shot_generator_data_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = CaptureConfig(
        model="tests.user_models:encoder", data="tests.user_models:one_shot_data", steps=3, out=str(tmp_path / "o.h5")
    )
    with pytest.raises(NmgradError, match="used-up iterator"):
        run_capture(cfg, None, False)
    # the completed step is kept, marked interrupted
    with DumpReader(tmp_path / "o.h5") as d:
        assert d.attrs["interrupted"] and d.attrs["steps_completed"] == 1


def test_a_leftover_partial_of_a_dead_capture_is_reused(tmp_path):
    (tmp_path / "m.h5.partial").write_bytes(b"left by a capture killed with -9")
    r = run_capture(CaptureConfig(model="mlp", steps=1, out=str(tmp_path / "m.h5")), None, False)
    with DumpReader(r.path) as d:
        assert d.attrs["complete"] and d.attrs["steps_completed"] == 1
    assert not (tmp_path / "m.h5.partial").exists()


def _spawn(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # --every 10: the writer keeps up, so a SIGTERM does not wait for a long queue to be written
    cmd = [sys.executable, "-m", "nmgrad_cli", "capture", "--model", "mlp", "--steps", "100000", "--every", "10",
           "--quiet", "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until the .partial file holds two flushed steps (read without HDF5's lock)."""
    t0 = time.time()
    while True:
        try:
            with h5py.File(path, "r", locking=False) as f:
                if int(f.attrs["steps_completed"]) >= 2:
                    return
        except (OSError, KeyError, RuntimeError):
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < seconds, "capture did not start"
        time.sleep(0.05)


def test_sigterm_and_sigkill(tmp_path):
    """Two captures at once: SIGTERM leaves a valid interrupted file with whole steps; SIGKILL never
    leaves a half-written final file (only ``.partial``)."""
    term, kill = tmp_path / "t.h5", tmp_path / "k.h5"
    procs = {term: _spawn(term), kill: _spawn(kill)}
    for out, proc in procs.items():
        _wait_for_steps(out.with_name(out.name + ".partial"), proc)
    procs[term].send_signal(signal.SIGTERM)
    procs[kill].kill()
    stdout, stderr = procs[term].communicate(timeout=60)
    procs[kill].communicate(timeout=60)

    assert procs[term].returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted (SIGTERM)" in " ".join(stdout.split())
    assert term.exists() and not (tmp_path / "t.h5.partial").exists()
    with DumpReader(term) as d:
        n = d.attrs["steps_completed"]
        assert d.attrs["interrupted"] and not d.attrs["complete"] and d.attrs["interrupt_reason"] == "SIGTERM"
        assert n >= 1 and d.attrs["run"]["stopped"] == "SIGTERM"
        for li in d.layers.values():  # every completed step is whole: each layer has every step
            assert len(li.records["grad"]) == n
        for rec in d.records("grad"):
            assert torch.isfinite(rec.load()).all()

    assert procs[kill].returncode == -signal.SIGKILL
    partial = tmp_path / "k.h5.partial"
    assert not kill.exists() and partial.exists()
    # no guarantee for the .partial file (HDF5 without SWMR): either a readable dump whose counted
    # steps are whole, or the reader says in one line that it is corrupt
    try:
        d = DumpReader(partial)
    except DumpError as exc:
        assert "truncated or corrupt" in str(exc) or "not an HDF5 file" in str(exc)
        return
    with d:
        n = d.attrs["steps_completed"]
        assert not d.attrs["complete"]
        for li in d.layers.values():
            assert len(li.records["grad"]) >= n


def test_torchrun_two_ranks_write_one_file_each(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "d.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "nmgrad_cli", "capture", "--model", "mlp", "--steps", "3", "--with-inputs", "--quiet",
           "--device", "cpu", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not out.exists()
    files = [tmp_path / "d.rank0.h5", tmp_path / "d.rank1.h5"]
    grads, weights = [], []
    for rank, f in enumerate(files):
        with DumpReader(f) as d:
            assert d.attrs["complete"] and d.attrs["steps_completed"] == 3
            assert (d.attrs["run"]["rank"], d.attrs["run"]["world_size"]) == (rank, 2)
            grads.append(d.load("fc1", "grad", "s0000002c000"))
            weights.append(d.load("fc1", "weight", "s0000002c000"))
    assert not torch.equal(grads[0], grads[1])  # each rank its own data shard
    assert torch.equal(weights[0], weights[1])  # DDP keeps the replicas identical


def test_config_validation():
    for kwargs, match in [
        ({"steps": 0}, "--steps must be >= 1"),
        ({"every": 0}, "--every must be >= 1"),
        ({"warmup": -1}, "--warmup must be >= 0"),
        ({"compression": "zip"}, "choose one of lzf, gzip, none"),
        ({"module_types": "Linear,Dense"}, "unknown module type 'Dense'"),
        ({"max_bytes": 0}, "--max-bytes must be >= 1"),
        ({"layers": " , "}, "--layers . , . holds no glob"),
    ]:
        with pytest.raises(NmgradError, match=match):
            CaptureConfig(**kwargs)
    assert CaptureConfig(module_types="conv2d, linear").module_types == ("Linear", "Conv2d")
    assert CaptureConfig(steps=10, every=3).recorded_steps == 4
    assert np.isclose(CaptureConfig().lr, 1e-3)
