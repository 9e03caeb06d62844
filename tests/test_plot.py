"""Pictures of an evaluation (`nmgrad plot`, `evaluate --plot`) and train's loss.png: the numbers they
are drawn from, and that a PNG is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli import assert_user_error, invoke

from nmgrad_cli import evaluate as ev
from nmgrad_cli import plot as lib
from nmgrad_cli.errors import NmgradError
from nmgrad_cli.train import plot as train_plot

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def payload(one_thread) -> dict:
    cfg = ev.EvalConfig(pattern="2:4", methods=("greedy", "mvue"), axis="both", samples=2, threads=1)
    return json.loads(json.dumps(ev.evaluate([SAMPLE], cfg).to_dict()))


def _row(payload, layer, axis, method):
    return next(r for r in payload["layers"] if (r["layer"], r["axis"], r["method"]) == (layer, axis, method))


def test_error_bars_are_the_gemm_bias_and_variance(payload):
    for axis in ("features", "tokens"):
        bars = lib.error_bars(payload, axis)
        assert bars["level"] == "gemm" and bars["layers"] == ["fc1", "fc2", "fc3"]
        assert bars["methods"] == ["greedy", "mvue"]
        for i, layer in enumerate(bars["layers"]):
            g = _row(payload, layer, axis, "greedy")["gemm"]
            m = _row(payload, layer, axis, "mvue")["gemm"]
            # greedy: all bias, no variance; mvue: all variance, its bias (rounding noise) drawn as 0
            assert bars["bias"]["greedy"][i] == pytest.approx(g["bias"]) and g["bias"] > 0
            assert bars["variance"]["greedy"][i] == 0.0
            assert bars["variance"]["mvue"][i] == pytest.approx(m["variance"]) and m["variance"] > 0
            assert bars["bias"]["mvue"][i] == 0.0


def test_angles_and_error_over_steps(payload):
    ang = lib.angles(payload, "tokens")
    assert ang["angle"]["mvue"][1] == _row(payload, "fc2", "tokens", "mvue")["angle"]
    steps = lib.error_over_steps(payload)
    assert set(steps) == {(a, m) for a in ("features", "tokens") for m in ("greedy", "mvue")}
    xs, ys = steps[("tokens", "mvue")]
    assert xs == [100, 110, 120, 130]
    recs = [r for r in payload["records"] if r["axis"] == "tokens" and r["method"] == "mvue" and r["step"] == 120]
    expected = sum(r["gemm"]["mse"] * r["gemm"]["norm2"] for r in recs) / sum(r["gemm"]["norm2"] for r in recs)
    assert len(recs) == 3 and ys[2] == pytest.approx(expected)


def test_png_written(payload, tmp_path):
    out = lib.plot_results(payload, tmp_path / "e.png")
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 5_000


def test_without_matplotlib_one_line(payload, tmp_path, monkeypatch):
    monkeypatch.setattr(lib, "plot_available", lambda: False)
    with pytest.raises(NmgradError, match=r"pip install 'nmgrad\[plot\]'"):
        lib.plot_results(payload, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_cli(payload, tmp_path):
    (tmp_path / "e.json").write_text(json.dumps(payload))
    res = invoke("plot", tmp_path / "e.json", "-o", tmp_path / "e.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG
    assert_user_error(invoke("plot", tmp_path / "e.json", "-o", tmp_path / "e.png"), "exists")
    assert_user_error(invoke("plot", SAMPLE, "-o", tmp_path / "x.png"), "is not an evaluation")
    res = invoke("evaluate", SAMPLE, "--layers", "fc3", "--samples", "2", "--threads", "1", "--plot",
                 tmp_path / "f.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG


def test_train_smoothing_is_bias_corrected():
    vals = [4.0, 2.0, 3.0]
    a = 0.1
    got = train_plot.ema(vals, alpha=a)
    raw, s = [], 0.0
    for v in vals:
        s = (1 - a) * s + a * v
        raw.append(s)
    assert got == pytest.approx([raw[t] / (1 - (1 - a) ** (t + 1)) for t in range(3)])
    assert got[0] == pytest.approx(4.0)  # the first value is the first point, not a tenth of it
    assert train_plot.ema([2.0] * 50) == pytest.approx([2.0] * 50)  # a constant stays constant


def test_train_png_with_accuracy(tmp_path):
    curves = {"mvue 2:4": {"step": list(range(1, 31)), "loss": [2.0 / s for s in range(1, 31)],
                           "acc": [min(1.0, s / 30) for s in range(1, 31)], "eval_step": [15, 30],
                           "eval_loss": [0.2, 0.1], "eval_acc": [0.6, 0.9]}}
    out = train_plot.plot_loss_curves(curves, tmp_path / "loss.png", title="mlp · mvue 2:4")
    assert out.read_bytes()[:8] == PNG
    assert train_plot.has_accuracy(curves) and not train_plot.has_accuracy({"x": {"step": [1], "loss": [1.0]}})


def test_a_png_that_cannot_be_written_leaves_the_old_one(payload, tmp_path):
    """The picture goes through a temporary file and a rename: a full disk (RLIMIT_FSIZE) keeps the
    old file whole and leaves no temporary."""
    from test_outputs import file_size_limit

    from nmgrad_cli.errors import OutputError

    out = tmp_path / "e.png"
    out.write_bytes(b"old picture")
    with pytest.raises(OutputError, match=f"cannot write {out}: File too large"), file_size_limit(2048):
        lib.plot_results(payload, out)
    assert out.read_bytes() == b"old picture" and [p.name for p in tmp_path.iterdir()] == ["e.png"]


def test_labels_keep_the_block_index_and_the_distinguishing_end():
    """T5's q projections (encoder and decoder, self and cross attention) used to be cut from the left
    to the same `…yer.0.SelfAttention.q`: now every label is unique and keeps both ends that matter."""
    names = [f"{side}.block.{b}.layer.{j}.{att}.{p}" for side in ("encoder", "decoder") for b in (0, 1)
             for j, att in ((0, "SelfAttention"), (1, "EncDecAttention")) for p in ("q", "k")]
    names += ["decoder.block.0.layer.2.DenseReluDense.wi", "lm_head"]
    labels = lib.short_labels(names)
    assert len(set(labels)) == len(names)
    for name, label in zip(names, labels):
        parts = name.split(".")
        assert label.split(".")[-1] == parts[-1]  # the distinguishing end
        assert [p for p in label.split(".") if p.isdigit()] == [p for p in parts if p.isdigit()]  # block indices
    assert labels[0] == "e.b.0.l.0.SA.q" and labels[names.index("lm_head")] == "lm_head"
    assert labels[names.index("decoder.block.0.layer.2.DenseReluDense.wi")] == "d.b.0.l.2.DRD.wi"
    # both would read e.e.0.q: they keep their full names
    assert lib.short_labels(["encoder.embed.0.q", "encoder.ebb.0.q", "mlp.c_fc"], width=8) == [
        "encoder.embed.0.q", "encoder.ebb.0.q", "mlp.c_fc"]
    assert lib.short_labels(["fc1", "fc2"]) == ["fc1", "fc2"]
