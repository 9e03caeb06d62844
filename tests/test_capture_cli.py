"""`nmgrad capture` through typer's CliRunner: the happy path and every bad input (one line, no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _cli import assert_user_error, invoke

from nmgrad_cli.cli.capture import parse_bytes
from nmgrad_cli.dump import DumpReader
from nmgrad_cli.errors import NmgradError

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return invoke("capture", *args)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # so tests.user_models is importable like a user's own module


def test_capture_then_inspect_and_force(tmp_path):
    out = tmp_path / "m.h5"
    r = run("--model", "mlp", "--steps", "2", "--layers", "fc1,fc3", "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 layers, 2 recorded steps of 2" in " ".join(r.stdout.split()) and "complete" in r.stdout
    with DumpReader(out) as d:
        assert [li.name for li in d.layers.values()] == ["fc1", "fc3"]
    assert_user_error(run("--model", "mlp", "--steps", "1", "--out", out), "exists: pass --force")
    r = run("--model", "mlp", "--steps", "1", "--out", out, "--force", "--quiet")
    assert r.exit_code == 0, r.output


def test_not_intercepted_is_reported_and_strict_fails(tmp_path):
    args = ["--model", "tests.user_models:encoder", "--data", "tests.user_models:tokens", "--steps", "1", "--quiet"]
    r = run(*args, "--out", tmp_path / "e.h5")
    assert r.exit_code == 0, r.output
    assert "emb.weight not intercepted: used by embedding" in " ".join(r.stderr.split())
    assert "encoder.layers.0.self_attn.in_proj.q, encoder.layers.0.self_attn.in_proj.k" in " ".join(r.stdout.split())
    assert_user_error(run(*args, "--strict", "--out", tmp_path / "s.h5"), "--strict: 1 parameter(s) got gradients")
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model", "nosuchpkg.models:make"], "no module named 'nosuchpkg'"),
        (["--model", "tests.user_models:missing", "--data", "digits"], "has no attribute 'missing'"),
        (["--model", "tests.user_models:raising_factory", "--data", "digits"],
         "raised ValueError: bad hyper-parameter: width must be even"),
        (["--model", "tests.user_models:not_a_module", "--data", "digits"], "returned a int, not a torch.nn.Module"),
        (["--model", "tests.user_models:NOT_CALLABLE", "--data", "digits"], "is a int, not a callable factory"),
        (["--model", "tests.user_models:encoder"], "needs --data"),
        (["--model", "resnet50"], "neither a built-in model (mlp, cnn, gpt) nor package.module:factory"),
        (["--model", "mlp", "--data", "imagenet"], "neither a built-in data set"),
        (["--model", "mlp", "--data", "tests.user_models:NOT_CALLABLE"], "not a callable factory"),
        (["--model", "mlp", "--loss", "nosuch:fn"], "no module named 'nosuch'"),
        (["--model", "mlp", "--loss", "hinge"], "neither a built-in loss"),
        (["--model", "tests.user_models:encoder", "--data", "tests.user_models:tokens",
          "--loss", "tests.user_models:vector_loss"], "must return a scalar tensor"),
        (["--model", "tests.user_models:encoder", "--data", "tests.user_models:triple_batches"],
         "must yield (input, target) pairs"),
        (["--model", "tests.user_models:encoder", "--data", "tests.user_models:wrong_shape_batches"],
         "training step 0 failed"),
        (["--model", "tests.user_models:no_layers", "--data", "tests.user_models:tokens"],
         "made no linear or convolution GEMM"),
        (["--model", "mlp", "--layers", "conv*"],
         "no Linear/Conv1d/Conv2d/Conv3d GEMM site matches --layers 'conv*': the names are fc1"),
        (["--model", "mlp", "--layers", ","], "--layers ',' holds no glob"),
        (["--model", "mlp", "--module-types", "Conv2d"], "the model has no Conv2d GEMM site: its GEMM sites are fc1"),
        (["--model", "mlp", "--module-types", "Dense"], "unknown module type 'Dense'"),
        (["--model", "mlp", "--steps", "0"], "--steps must be >= 1"),
        (["--model", "mlp", "--every", "0"], "--every must be >= 1"),
        (["--model", "mlp", "--warmup", "-2"], "--warmup must be >= 0"),
        (["--model", "mlp", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--model", "mlp", "--compression", "zstd"], "--compression 'zstd' is unknown"),
        (["--model", "mlp", "--optimizer", "lion"], "--optimizer 'lion' is unknown"),
        (["--model", "mlp", "--amp", "fp8"], "--amp 'fp8' is unknown"),
        (["--model", "mlp", "--max-bytes", "lots"], "--max-bytes 'lots' is not a size"),
        (["--model", "mlp", "--max-bytes", "10"], "smaller than one recorded step"),
        (["--model", "mlp", "--device", "tpu9"], "--device 'tpu9' is unknown: use auto, cpu, cuda or cuda:N"),
        (["--model", "mlp", "--lr", "0"], "--lr must be a positive finite number"),
        (["--model", "mlp", "--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["--model", "mlp", "--max-bytes", "nan"], "--max-bytes 'nan' is not a size"),
        (["--model", "mlp", "--max-bytes", "inf"], "--max-bytes 'inf' is not a size"),
        (["--model", "mlp", "--threads", "-1"], "--threads must be >= 0"),
        (["--model", "mlp", "--data-dir", "/nonexistent/folder"], "sample data file /nonexistent/folder/digits.npz"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, match):
    out = tmp_path / "x.h5"
    assert_user_error(run(*args, "--steps" if "--steps" not in args else "--seed", "1", "--out", out), match)
    assert not out.exists() and not (tmp_path / "x.h5.partial").exists()


def test_bad_output_paths(tmp_path):
    assert_user_error(run("--model", "mlp", "--out", tmp_path / "no" / "dir" / "x.h5"), "does not exist; create it")
    assert_user_error(run("--model", "mlp", "--out", tmp_path, "--force"), "is a directory")
    assert_user_error(run("--model", "mlp", "--steps", "1", "--out", "/proc/x.h5"), "cannot create /proc/x.h5.partial")


def test_data_iterator_that_raises_is_one_line_and_keeps_the_steps_done(tmp_path):
    out = tmp_path / "r.h5"
    r = run("--model", "tests.user_models:encoder", "--data", "tests.user_models:raising_data", "--steps", "3",
            "--quiet", "--out", out)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "--data tests.user_models:raising_data raised OSError: disk read failed after 1 batches" in lines[0]
    with DumpReader(out) as d:
        assert d.attrs["steps_completed"] == 1 and d.attrs["interrupt_reason"] == "NmgradError"


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04 not really a zip", None])
def test_damaged_digits_file_is_one_line(tmp_path, content):
    data = tmp_path / "data"
    data.mkdir()
    if content is None:  # a valid .npz with the wrong arrays
        import numpy as np

        np.savez(data / "digits.npz", images=np.zeros((3, 4)), labels=np.zeros(3))
    else:
        (data / "digits.npz").write_bytes(content)
    r = run("--model", "mlp", "--steps", "1", "--data-dir", data, "--out", tmp_path / "x.h5")
    assert_user_error(r, f"{data / 'digits.npz'}")
    assert "restore it from the repository's sample_data/" in r.stderr
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


def test_parse_bytes():
    assert parse_bytes("500M") == 500_000_000 and parse_bytes("1Gi") == 2**30 and parse_bytes("1234") == 1234
    assert parse_bytes("2gb") == 2 * 10**9 and parse_bytes(None) is None
    with pytest.raises(NmgradError):
        parse_bytes("-1M")


def test_the_dump_records_which_backward_gemms_run(tmp_path):
    """needs_grad per layer: the first attention's input comes from a frozen embedding (its dX never
    runs), the head's weight is frozen (its dW never runs); `evaluate --recommend` counts neither."""
    out = tmp_path / "f.h5"
    r = run("--model", "tests.user_models:partly_frozen_encoder", "--data", "tests.user_models:tokens",
            "--steps", "1", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    with DumpReader(out) as d:
        by = {li.name: li.needs_grad for li in d.layers.values()}
    assert by["head"] == {"input": True, "weight": False}
    assert by["encoder.layers.0.self_attn.in_proj.q"] == {"input": False, "weight": True}
    assert by["encoder.layers.1.self_attn.in_proj.q"] == {"input": True, "weight": True}
