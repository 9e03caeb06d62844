"""Dumps of every GEMM site kind read back (issue 20): Linears on N-D activations (ConvNeXt's
pointwise Linears on channels-last (B, H, W, C)), Conv1d, Conv2d (grouped), Conv3d, stored with X
and W, validate, inspect and evaluate with the GEMM-level errors of both axes; and a writer never
calls a file complete that its own reader refuses."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from _cli import invoke
from torch import nn

from nmgrad_cli.dump import DumpReader, DumpWriter
from nmgrad_cli.errors import DumpError
from nmgrad_cli.evaluate.gemm import conv_input_matrix, unfold_nd

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = ["--model", "tests.user_models:channels_last_block", "--data", "tests.user_models:images"]
KINDS = {"stem": "Conv2d", "dw": "Conv2d", "pw1": "Linear", "pw2": "Linear", "rows": "Conv1d", "vol": "Conv3d",
         "head": "Linear"}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # tests.user_models importable like a user's own module


def _inspect_and_evaluate(path: Path) -> None:
    r = invoke("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["complete"]
    assert {li["name"]: li["module_type"] for li in info["layers"]} == KINDS
    pw1 = next(li for li in info["layers"] if li["name"] == "pw1")
    assert pw1["grad_shapes"] == [[4, 8, 8, 16]] and pw1["features"] == 16 and pw1["tokens"] == 4 * 8 * 8
    out = path.with_suffix(".json")
    r = invoke("evaluate", path, "--axis", "both", "--samples", "2", "--methods", "greedy,mvue", "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["notes"] == [] and report["errors"] == []
    for row in report["layers"]:  # every site kind has its dX and dW error
        want = "dX" if row["axis"] == "features" else "dW"
        assert row["gemm"] is not None and row["gemm"]["target"] == want, row
        assert row["gemm"]["norm2"] > 0
        if row["method"] == "greedy" and row["layer"] != "head":  # head's F = 3 is padded: may be exact
            assert row["gemm"]["mse"] > 0, row


def test_capture_with_inputs_of_every_site_kind_reads_back(tmp_path):
    path = tmp_path / "c.h5"
    r = invoke("capture", *MODEL, "--steps", "1", "--with-inputs", "--batch-size", "4", "--quiet", "--out", path)
    assert r.exit_code == 0, r.output
    assert "complete" in r.stdout
    _inspect_and_evaluate(path)


def test_train_capture_with_inputs_of_every_site_kind_reads_back(tmp_path):
    path = tmp_path / "t.h5"
    r = invoke("train", *MODEL, "--steps", "1", "--batch-size", "4", "--method", "dense", "--capture", path,
               "--capture-with-inputs", "--no-plot", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    _inspect_and_evaluate(path)


def _grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    return dy


@pytest.mark.parametrize(
    ("make", "shape", "conv"),
    [
        (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 11),
         {"stride": [2], "padding": [1], "dilation": [2], "groups": 2}),
        (lambda: nn.Conv1d(3, 4, 4, padding="same"), (2, 3, 9), {"stride": 1, "padding": "same", "dilation": 1,
                                                                 "groups": 1}),
        (lambda: nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)), (2, 2, 3, 5, 4),
         {"stride": [1, 2, 1], "padding": [0, 1, 1], "dilation": [1, 1, 1], "groups": 1}),
        (lambda: nn.Conv3d(4, 4, 3, padding="same", dilation=(1, 2, 1), groups=4), (1, 4, 4, 5, 3),
         {"stride": 1, "padding": "same", "dilation": [1, 2, 1], "groups": 4}),
    ],
)
def test_conv1d_and_conv3d_dw_operands_are_torchs_weight_gradient(make, shape, conv):
    """dY^T @ the unfolded input (per feature group) is exactly torch's weight gradient of Conv1d and
    Conv3d, for strides, dilations, groups and 'same' padding with an even kernel."""
    torch.manual_seed(7)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    dy = _grad(layer, x)
    xu = conv_input_matrix(x, conv, tuple(layer.weight.shape), dy.shape)
    assert isinstance(xu, torch.Tensor), xu
    f, groups = layer.weight.shape[0], conv["groups"]
    g2 = dy.movedim(1, -1).reshape(-1, f)  # evaluate's as_matrix: (T, F)
    if groups == 1:
        got = g2.T @ xu
    else:
        rows = f // groups
        got = torch.cat([g2.T[j * rows:(j + 1) * rows] @ xu[j] for j in range(groups)])
    assert torch.allclose(got.reshape(layer.weight.shape), layer.weight.grad, atol=1e-10)


def test_unfold_nd_is_torchs_unfold_in_2d():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    got = unfold_nd(x, (3, 2), (2, 1), [(1, 1), (0, 0)], (1, 2))
    want = nn.functional.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))
    assert torch.equal(got, want)


def test_a_writer_never_calls_complete_a_file_its_reader_refuses(tmp_path):
    """A layer whose weight record does not have its weight_shape: close raises, the file is kept
    (every record in it) and marked interrupted, not complete; what a reader says is the same."""
    path = tmp_path / "bad.h5"
    w = DumpWriter(path)
    w.add_layer("fc", "Linear", -1, [0], weight_shape=(4, 3))
    w.write("fc", "grad", 0, 0, torch.ones(2, 4))
    w.write("fc", "weight", 0, 0, torch.ones(3, 4))  # transposed: what a buggy site handler might store
    w.step_done(0)
    with pytest.raises(DumpError, match=r"own reader refuses it \(/layers/fc/weight/s0000000c000: a weight of "
                                        r"shape \(3, 4\), not the layer's weight_shape \(4, 3\)\): a bug"):
        w.close()
    with h5py.File(path, "r") as f:
        assert not f.attrs["complete"] and f.attrs["interrupted"]
        assert "reader refuses" in f.attrs["interrupt_reason"]
        assert sorted(f["layers/fc"]) == ["grad", "weight"]
    with DumpReader(path) as d, pytest.raises(DumpError, match="not the layer's weight_shape"):
        list(d.records("weight"))


def test_a_clean_file_is_complete(tmp_path):
    path = tmp_path / "ok.h5"
    with DumpWriter(path) as w:
        w.add_layer("pw", "Linear", -1, [0, 1, 2], weight_shape=(4, 3))
        w.write("pw", "grad", 0, 0, torch.ones(2, 5, 5, 4))
        w.write("pw", "input", 0, 0, torch.ones(2, 5, 5, 3))
        w.write("pw", "weight", 0, 0, torch.ones(4, 3))  # 2-D beside a 4-D dY: not checked on dY's axes
        w.step_done(0)
    with DumpReader(path) as d:
        assert d.attrs["complete"]
        assert [r.shape for r in d.records("weight")] == [(4, 3)]
        assert d.load("pw", "input", "s0000000c000").shape == (2, 5, 5, 3)
