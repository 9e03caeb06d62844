"""Evaluation results as data (nmgrad_cli.results) and `nmgrad compare`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from _cli import assert_user_error, invoke

from nmgrad_cli import evaluate as ev
from nmgrad_cli import results
from nmgrad_cli.errors import NmgradError

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"


def _evaluate(dumps, out: Path, pattern: str) -> Path:
    cfg = ev.EvalConfig(pattern=pattern, methods=("greedy", "mvue"), axis="both", samples=2, threads=1)
    out.write_text(json.dumps(ev.evaluate(dumps, cfg).to_dict()))
    return out


@pytest.fixture(scope="module")
def evals(tmp_path_factory, one_thread) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("results")
    copy = d / "copy.h5"
    shutil.copy(SAMPLE, copy)
    return {
        "24": _evaluate([SAMPLE], d / "e24.json", "2:4"),
        "12": _evaluate([SAMPLE], d / "e12.json", "1:2"),
        "two": _evaluate([SAMPLE, copy], d / "two.json", "2:4"),
    }


def test_load_rows_are_the_json_rows_flattened(evals):
    raw = json.loads(evals["24"].read_text())
    r = results.load(evals["24"])
    assert r.pattern == "2:4" and r.methods == ["greedy", "mvue"]
    assert len(r.layers) == len(raw["layers"]) == 3 * 2 * 2  # layers x axes x methods
    assert len(r.records) == len(raw["records"]) == 4 * 3 * 2 * 2  # 4 steps
    for flat, nested in zip(r.layers, raw["layers"]):
        assert flat["variance"] == nested["variance"] and flat["angle"] == nested["angle"]
        assert flat["gemm_variance"] == nested["gemm"]["variance"]
        assert flat["gemm_target"] == {"features": "dX", "tokens": "dW"}[nested["axis"]]
    rec = r.records[0]
    assert rec["step"] == raw["records"][0]["step"]
    assert rec["mse"] == raw["records"][0]["metrics"]["mse"]
    assert rec["gemm_bias"] == raw["records"][0]["gemm"]["bias"]
    assert {row["method"] for row in r.summary} == {"greedy", "mvue"}


def test_frame_is_a_dataframe_or_one_clear_error(evals, monkeypatch):
    r = results.load(evals["24"])
    df = r.frame("records")  # pandas is in the test extra
    assert len(df) == len(r.records) and df["variance"].tolist() == [x["variance"] for x in r.records]
    assert list(r.frame("summary")["method"]) == [row["method"] for row in r.summary]
    with pytest.raises(NmgradError, match="level 'rows' is unknown"):
        r.frame("rows")
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(NmgradError, match="pip install pandas"):
        r.frame("layers")


def test_not_an_evaluation_is_one_error(tmp_path):
    (tmp_path / "x.json").write_text('{"config": {"model": "gpt"}, "runs": []}')
    (tmp_path / "y.json").write_text("not json")
    for name in ("x.json", "y.json", "missing.json"):
        with pytest.raises(results.ResultsError, match="evaluate --json"):
            results.load(tmp_path / name)
    with pytest.raises(results.ResultsError, match="not an evaluation"):
        results.load(SAMPLE)


def test_pooled_layers_weights_two_files(evals):
    r = results.load(evals["two"])
    pooled = results.pooled_layers(r)
    rows = [x for x in r.layers if x["layer"] == "fc2" and x["axis"] == "tokens" and x["method"] == "mvue"]
    assert len(rows) == 2
    p = pooled[("fc2", "tokens", "mvue")]
    w = [x["norm2"] for x in rows]
    assert p["variance"] == pytest.approx(sum(x["variance"] * n for x, n in zip(rows, w)) / sum(w))
    gw = [x["gemm_norm2"] for x in rows]
    assert p["gemm_variance"] == pytest.approx(sum(x["gemm_variance"] * n for x, n in zip(rows, gw)) / sum(gw))
    assert p["records"] == sum(x["records"] for x in rows)


def test_compare_is_b_minus_a(evals):
    a, b = results.load(evals["24"]), results.load(evals["12"])
    rows, notes = results.compare(a, b)
    assert notes == ["the evaluations use different patterns: 2:4 (A) vs 1:2 (B)"]
    assert len(rows) == 12
    raw_a = {(x["layer"], x["axis"], x["method"]): x for x in json.loads(evals["24"].read_text())["layers"]}
    raw_b = {(x["layer"], x["axis"], x["method"]): x for x in json.loads(evals["12"].read_text())["layers"]}
    for row in rows:
        k = (row["layer"], row["axis"], row["method"])
        assert row["variance_diff"] == pytest.approx(raw_b[k]["variance"] - raw_a[k]["variance"])
        assert row["gemm_mse_diff"] == pytest.approx(raw_b[k]["gemm"]["mse"] - raw_a[k]["gemm"]["mse"])
    # 1:2 keeps half of every pair: mvue's variance grows from 2:4 to 1:2 on every layer
    assert all(r["variance_diff"] > 0 for r in rows if r["method"] == "mvue")


def test_compare_cli(evals, tmp_path):
    res = invoke("compare", evals["24"], evals["12"], "--metrics", "variance,gemm_mse")
    assert res.exit_code == 0, res.output
    assert "variance diff" in res.stdout and "fc3" in res.stdout and "different patterns" in res.stdout
    assert_user_error(invoke("compare", evals["24"], SAMPLE), "is not an evaluation")
    assert_user_error(invoke("compare", evals["24"], evals["12"], "--metrics", "speed"), "unknown metric 'speed'")
    other = json.loads(evals["24"].read_text())
    for row in other["layers"]:
        row["layer"] = "other." + row["layer"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert_user_error(invoke("compare", evals["24"], tmp_path / "other.json"), "no (layer, axis, method) in common")
