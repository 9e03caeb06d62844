"""`nmgrad train` through typer's CliRunner (table, JSON, files, every bad input) and under torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import assert_user_error, invoke

REPO = Path(__file__).resolve().parents[1]

FAST = ["--steps", "3", "--batch-size", "4", "--eval-batches", "1", "--backend", "reference", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    return invoke("train", *args)


def test_compare_prints_a_table_and_writes_every_run(tmp_path):
    out = tmp_path / "run"
    r = run("--model", "mlp", "--compare", "dense,greedy,mvue", "--pattern", "1:2", *FAST, "--out", out,
            "--json", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    for label in ("dense", "greedy 1:2", "mvue 1:2", "train loss", "eval acc", "steps/s"):
        assert label in r.stdout
    d = json.loads((tmp_path / "t.json").read_text())
    assert [x["method"] for x in d["runs"]] == ["dense", "greedy", "mvue"]
    assert d["config"]["pattern"] == "1:2"
    for m in ("dense", "greedy", "mvue"):
        assert (out / m / "metrics.jsonl").exists() and (out / m / "config.json").exists()
    assert json.loads((out / "summary.json").read_text())[2]["label"] == "mvue 1:2"


def test_single_gpt_run_with_json_on_stdout(tmp_path):
    r = run("--model", "gpt", "--method", "approx-mvue", "--grad-gemms", "dw", "--layers", "blocks.*.mlp.*",
            *FAST, "--out", tmp_path / "g", "--json", "-", "--no-plot")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)  # table and progress went to stderr
    (run_,) = d["runs"]
    assert run_["kind"] == "language-model" and run_["eval_ppl"] > 1
    assert run_["layers"] == [f"blocks.{i}.mlp.{n}" for i in range(4) for n in ("fc", "fc_out")]
    assert d["config"]["grad_gemms"] == ["dw"]
    assert "eval ppl" in r.stderr


def test_transformer_encoder_attention_projections_train_with_pruned_gradients(tmp_path, monkeypatch):
    """torch's own nn.TransformerEncoder: in_proj (as q, k, v) and out_proj are pruned (issue 8)."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "enc"
    r = run("--model", "tests.user_models:encoder", "--data", "tests.user_models:tokens", "--layers", "*self_attn*",
            "--compare", "dense,greedy", "--pattern", "1:2", "--steps", "4", "--backend", "reference",
            "--device", "cpu", "--out", out, "--json", tmp_path / "t.json", "--no-plot")
    assert r.exit_code == 0, r.output
    runs = json.loads((tmp_path / "t.json").read_text())["runs"]
    attn = [f"encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj.q", "in_proj.k", "in_proj.v",
                                                                            "out_proj")]
    assert runs[0]["layers"] == [] and runs[1]["layers"] == attn
    dense, greedy = ([json.loads(line)["loss"] for line in (out / m / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)] for m in ("dense", "greedy"))
    assert dense[0] == greedy[0] and dense[1:] != greedy[1:]  # same first forward, then pruning shows
    assert "sparse-gradient sites (8): encoder.layers.0.self_attn.in_proj.q" in " ".join(r.stdout.split())
    assert "emb.weight not intercepted: used by embedding" in " ".join(r.stdout.split())
    config = json.loads((out / "greedy" / "config.json").read_text())["resolved"]
    assert [s["name"] for s in config["sites"]][:4] == attn[:4]
    assert config["not_intercepted"] == {"emb.weight": "used by embedding, not a linear/conv GEMM"}


def test_train_capture_records_a_sparse_run_that_inspect_and_evaluate_read(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ["--model", "tests.user_models:encoder", "--data", "tests.user_models:tokens", "--layers", "*self_attn*",
            "--pattern", "1:2", "--steps", "4", "--backend", "reference", "--device", "cpu", "--no-plot",
            "--capture", tmp_path / "g.h5", "--capture-every", "2", "--capture-with-inputs"]
    r = run(*args, "--compare", "dense,greedy", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    from nmgrad_cli.dump import DumpReader

    grads = {}
    for m in ("dense", "greedy"):
        with DumpReader(tmp_path / f"g.{m}.h5") as d:
            assert d.attrs["complete"] and d.attrs["steps_completed"] == 2  # steps 0 and 2 of 4
            assert list(d.layers)[:4] == [f"encoder.layers.0.self_attn.{p}" for p in
                                          ("in_proj.q", "in_proj.k", "in_proj.v", "out_proj")]
            assert d.attrs["run"]["recorded_by"] == "nmgrad train --capture"
            grads[m] = [d.load(layer, "grad", rec) for rec in ("s0000000c000", "s0000002c000")
                        for layer in ("encoder.layers.1.self_attn.out_proj", "encoder.layers.0.self_attn.in_proj.q")]
    # the last pruned site sees the same dY at step 0 (same init and data, nothing pruned above it), the
    # first one does not (pruned dX from above); by step 2 the weights differ too
    same = [torch.equal(a, b) for a, b in zip(grads["dense"], grads["greedy"])]
    assert same == [True, False, False, False]
    assert invoke("inspect", tmp_path / "g.greedy.h5").exit_code == 0
    r = invoke("evaluate", tmp_path / "g.greedy.h5", "--axis", "both", "--methods", "greedy", "--samples", "2")
    assert r.exit_code == 0 and "encoder.layers.1.self_attn.in_proj.v" in r.stdout, r.output
    assert_user_error(run(*args, "--method", "greedy", "--capture", tmp_path / "g.greedy.h5", "--out", tmp_path / "p"),
                      "exists: pass --force")


def test_weight_pattern_option(tmp_path):
    r = run("--model", "cnn", "--method", "mvue", "--weight-pattern", "2:4", "--weight-every", "2", *FAST,
            "--out", tmp_path / "w", "--no-plot")
    assert r.exit_code == 0, r.output
    assert "mvue 2:4 +W2:4" in r.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["--method", "mvu"], "unknown method 'mvu': choose one of dense, greedy"),
        (["--pattern", "4:2"], "pattern '4:2' is invalid"),
        (["--pattern", "two:four"], "pattern 'two:four' is malformed"),
        (["--method", "approx-mvue", "--pattern", "3:8"], "method 'approx-mvue' is not defined for pattern 3:8"),
        (["--compare", "dense,mvue,bogus"], "unknown method 'bogus'"),
        (["--compare", "mvue12", "--pattern", "1:4"], "method 'mvue12' is not defined for pattern 1:4"),
        (["--grad-gemms", "dx,dy"], "unknown grad GEMM 'dy'"),
        (["--weight-pattern", "5:4"], "pattern '5:4' is invalid"),
        (["--layers", "nothing*"], "no GEMM site matches --layers 'nothing*': the names are fc1"),
        (["--layers", "*", "--model", "tests.user_models:encoder", "--data", "tests.user_models:tokens", "--strict"],
         "--strict: 1 parameter(s) got gradients outside every GEMM site: emb.weight (used by embedding"),
        (["--model", "resnet"], "--model 'resnet' is neither a built-in model"),
        (["--model", "no_such_pkg.mod:make"], "no module named 'no_such_pkg'"),
        (["--data", "imagenet"], "--data 'imagenet' is neither a built-in data set"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--amp", "fp8"], "--amp 'fp8' is unknown: choose one of none, bf16"),
        (["--capture-every", "0", "--capture", "x.h5"], "--capture-every must be >= 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--device", "tpu"], "--device 'tpu' is unknown"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path):
    out = tmp_path / "o"
    r = run("--model", "mlp", *FAST, "--out", out, *args)
    assert_user_error(r, match)
    assert not (out / "metrics.jsonl").exists()


def test_existing_out_without_force_is_refused_and_force_keeps_user_files(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(run(*FAST, "--out", out), "pass --force")
    r = run(*FAST, "--out", out, "--force", "--no-plot")
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").exists()
    assert_user_error(run(*FAST, "--out", tmp_path / "x", "--json", out / "notes.txt"), "pass --force")


def test_nan_loss_exits_1_with_a_message_and_keeps_metrics(tmp_path):
    out = tmp_path / "nan"
    r = run("--model", "mlp", "--lr", "1e6", *FAST[2:], "--steps", "100", "--out", out, "--no-plot")
    assert_user_error(r, "training diverged; lower --lr", code=1)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(lines) < 100
    assert json.loads((out / "summary.json").read_text())["diverged"]
    # the step the message names is the one after the last (finite) line of metrics.jsonl
    bad = int(r.stderr.split(" at step ")[1].split(":")[0])
    assert bad == lines[-1]["step"] + 1 and all(np.isfinite(rec["loss"]) for rec in lines)


def test_nan_in_a_compare_still_prints_the_table_then_exits_1(tmp_path):
    r = run("--compare", "dense,mvue", "--lr", "1e6", *FAST[2:], "--steps", "60", "--out", tmp_path / "c",
            "--no-plot")
    assert r.exit_code == 1
    assert "diverged" in r.stdout and "dense" in r.stdout
    assert r.stderr.startswith("error: dense: loss became")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_cpu_processes(tmp_path):
    """torchrun, 2 ranks, gloo: rank 0 writes one set of outputs and prints one table."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "nmgrad_cli", "train", "--model", "mlp", "--compare", "dense,mvue", *FAST, "--steps", "4",
        "--out", str(out), "--no-plot",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("nmgrad train · mlp") == 1  # rank 1 prints nothing
    runs = json.loads((out / "summary.json").read_text())
    assert [r["world_size"] for r in runs] == [2, 2] and all(r["steps_done"] == 4 for r in runs)
    assert runs[0]["init_checksum"] == runs[1]["init_checksum"]
    assert len((out / "mvue" / "metrics.jsonl").read_text().splitlines()) == 4 + 1


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "tests.user_models:encoder", "--data", "tests.user_models:raising_data"],
         "--data tests.user_models:raising_data raised OSError: disk read failed after 1 batches"),
        (["--model", "tests.user_models:encoder", "--data", "tests.user_models:tokens",
          "--loss", "tests.user_models:vector_loss"], "the loss returned Tensor of shape (24,): --loss must"),
        (["--model", "tests.user_models:frozen_encoder", "--data", "tests.user_models:tokens"],
         "the model has no trainable parameters"),
        (["--model", "tests.user_models:encoder", "--data", "tests.user_models:wrong_shape_batches"],
         "training step 1 failed"),
        (["--out", "/proc/nmgrad-run"], "cannot write into --out /proc/nmgrad-run"),
        (["--json", "/dev/full", "--force"], "cannot write /dev/full: No space left on device"),
    ],
    ids=["data-raises", "vector-loss", "frozen", "bad-batch", "out-unwritable", "json-disk-full"],
)
def test_user_errors_in_training_are_one_line(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = ["--out", str(tmp_path / "o")] if "--out" not in args else []
    assert_user_error(run(*FAST, "--no-plot", *out, *args), match)


def test_ctrl_c_writes_summary_json(tmp_path):
    """A real SIGINT while training: exit 130, one line, and summary.json counts the steps in metrics.jsonl
    (the step in progress finishes: the last metrics line is whole)."""
    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "nmgrad_cli", "train", "--model", "mlp", "--steps", "1000000", "--batch-size", "4",
           "--backend", "reference", "--device", "cpu", "--no-plot", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, t0 = out / "metrics.jsonl", time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and line.startswith("error")]
    assert len(lines) == 1 and "interrupted (SIGINT) after" in lines[0] and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert summary["interrupted"] == "SIGINT" and summary["steps_done"] == len(steps) == steps[-1] >= 3


def test_first_ctrl_c_is_noted_second_interrupts_and_the_handler_is_restored():
    from nmgrad_cli.train.trainer import CtrlC

    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert ctrl_c.seen  # no exception: the step in progress goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before
