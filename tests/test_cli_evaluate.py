"""`nmgrad evaluate` through typer's CliRunner: tables, JSON/CSV outputs, --fail-if, every bad input."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import pytest
import torch
from _cli import assert_user_error, invoke
from _dumps import make_mlp_dump

from nmgrad_cli import METHODS
from nmgrad_cli.dump import SCHEMA_VERSION, DumpWriter


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return make_mlp_dump(tmp_path_factory.mktemp("cli") / "mlp.h5", steps=2)


def run(*args):
    return invoke("evaluate", *args)


# --- the happy path --------------------------------------------------------------------------------


def test_prints_per_layer_and_summary_tables(dump):
    r = run(dump, "--pattern", "2:4", "--samples", "4", "--axis", "both")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "per layer" in out and "summary over layers (weighted by ||g||^2)" in out
    for name in METHODS:
        assert name in out
    assert "features" in out and "tokens" in out
    for col in ("dX|dW mse", "dX|dW bias", "dX|dW var"):
        assert col in out
    assert "n: grad records evaluated" in out  # the column n is explained
    assert "…" not in out  # numbers are not truncated off a terminal
    assert r.stderr.strip() == ""


def test_json_to_stdout_is_parseable_and_tables_go_to_stderr(dump):
    r = run(dump, "--samples", "2", "--methods", "greedy,mvue", "--json", "-")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["config"]["methods"] == ["greedy", "mvue"] and d["config"]["pattern"] == "2:4"
    assert [s["method"] for s in d["summary"]] == ["greedy", "mvue"]
    assert d["summary"][0]["bias"] > 0 and d["summary"][0]["variance"] == 0
    assert d["summary"][1]["bias"] < 1e-10
    assert "summary over layers" in r.stderr


def test_json_and_csv_files_and_no_overwrite_without_force(dump, tmp_path):
    js, cs = tmp_path / "out.json", tmp_path / "out.csv"
    r = run(dump, "--samples", "2", "--json", js, "--csv", cs)
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    with open(cs, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = len(METHODS)
    assert [row["level"] for row in rows] == ["layer"] * 2 * n + ["summary"] * n
    by = {(row["level"], row["layer"], row["method"]): row for row in rows}
    for s in d["summary"]:
        assert float(by[("summary", "", s["method"])]["mse"]) == pytest.approx(s["mse"])
    mv = by[("layer", "0", "mvue")]
    assert mv["gemm"] == "dX" and float(mv["gemm_variance"]) > 0
    assert float(mv["gemm_mse"]) == pytest.approx(float(mv["gemm_bias"]) + float(mv["gemm_variance"]))
    layer0 = [r for r in d["layers"] if (r["layer"], r["method"]) == ("0", "mvue")][0]
    assert float(mv["gemm_mse"]) == pytest.approx(layer0["gemm"]["mse"])

    js.write_text("keep"), cs.write_text("keep")
    for flag, path in (("--json", js), ("--csv", cs)):
        assert_user_error(run(dump, "--samples", "2", flag, path), "exists: pass --force")
        assert path.read_text() == "keep"
    r = run(dump, "--samples", "2", "--json", js, "--csv", cs, "--force")
    assert r.exit_code == 0 and js.read_text() != "keep" and cs.read_text() != "keep"


def test_csv_to_stdout(dump):
    r = run(dump, "--samples", "0", "--methods", "mvue", "--csv", "-")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert [(row["level"], row["layer"]) for row in rows] == [("layer", "0"), ("layer", "2"), ("summary", "")]
    assert "summary over layers" in r.stderr


def test_several_dumps_layer_glob_and_skipped_method_notes(dump, tmp_path):
    other = tmp_path / "copy.h5"
    shutil.copy(dump, other)
    r = run(dump, other, "--samples", "0", "--pattern", "3:8", "--layers", "2", "--json", "-")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["methods"] == ["greedy", "random", "mvue"]
    assert {(row["file"], row["layer"]) for row in d["layers"]} == {(str(dump), "2"), (str(other), "2")}
    assert "note: approx-mvue skipped" in r.stderr and "note: mvue12 skipped" in r.stderr
    assert "copy.h5" in r.stderr  # the file column appears with several dumps


@pytest.mark.parametrize(
    ("expr", "code"),
    [("mvue.bias>1e-6", 0), ("*.bias>1", 0), ("greedy.bias>1e-6", 1), ("*.angle>=1", 1), ("random.mse<=1.5", 1)],
)
def test_fail_if_exit_codes(dump, expr, code):
    r = run(dump, "--samples", "2", "--fail-if", expr, "--fail-if", "mvue.variance>10")
    assert r.exit_code == code, r.output
    assert "summary over layers" in r.stdout  # the table is printed either way
    fired = [line for line in r.stderr.splitlines() if line.startswith("fail-if: ")]
    assert bool(fired) == bool(code)
    assert all("violated" in line for line in fired)


@pytest.mark.parametrize(
    ("expr", "match"),
    [
        ("mvue.bias", "malformed: write METHOD.METRIC OP NUMBER"),
        ("mvue.bias=1e-6", "e.g. --fail-if 'mvue.bias>1e-6'"),
        ("mvue.speed>1", "metric 'speed' is unknown"),
        ("nope.bias>1", "unknown method 'nope'"),
        ("mvue12.bias>1", "not evaluated"),
    ],
)
def test_fail_if_malformed_is_a_user_error(dump, expr, match):
    extra = ["--pattern", "2:8"] if expr.startswith("mvue12") else []
    assert_user_error(run(dump, "--fail-if", expr, *extra), match)


# --- bad input: one line, non-zero exit, no traceback ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--pattern", "2-4"], "pattern '2-4' is malformed"),
        (["--pattern", "3:2"], "pattern '3:2' is invalid: need 1 <= N < M, e.g. 2:4"),
        (["--pattern", "4:4"], "pattern '4:4' is invalid"),
        (["--pattern", "0:4"], "pattern '0:4' is invalid"),
        (["--pattern", "[/x]"], "pattern '[/x]' is malformed"),  # not taken for rich markup
        (["--methods", "mvue,bogus"], "unknown method 'bogus': choose one of greedy"),
        (["--pattern", "3:8", "--methods", "approx-mvue"], "'approx-mvue' is not defined for pattern 3:8"),
        (["--pattern", "2:8", "--methods", "mvue12"], "'mvue12' is not defined for pattern 2:8"),
        (["--methods", ","], "no method given"),
        (["--samples", "-1"], "--samples -1 is invalid"),
        (["--layers", "enc.*"], "no dump layer matches --layers 'enc.*'"),
        (["--layers", ","], "--layers ',' holds no glob"),
        (["--samples", "99999999999999999999"], "--samples 99999999999999999999 is too many: at most 100000"),
        (["--steps", "x:3"], "--steps 'x:3' is malformed"),
        (["--steps", "5:2"], "--steps '5:2' selects no step"),
        (["--steps", "7:"], "no grad record is left after --steps 7:"),
        (["--every", "0"], "--every 0 is invalid"),
        (["--max-records", "0"], "--max-records 0 is invalid"),
        (["--threads", "-1"], "--threads -1 is invalid"),
        (["--workers", "0"], "--workers 0 is invalid"),
        (["--device", "tpu"], "--device 'tpu' is unknown"),
        (["--backend", "gpu"], "--backend 'gpu' is unknown: choose one of auto, reference"),
        (["--json", "-", "--csv", "-"], "both ask for stdout"),
        (["--json", ".", "--force"], "is a directory"),
        (["--csv", "no/such/folder/x.csv"], "folder no/such/folder does not exist"),
    ],
)
def test_bad_options(dump, args, match):
    assert_user_error(run(dump, *args), match)


def _with_attrs(src, dst, **attrs):
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        f.attrs.update(attrs)
    return dst


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _empty(dst, with_layer=False):
    with DumpWriter(dst) as w:
        if with_layer:
            w.add_layer("fc", "Linear", -1, [0])
    return dst


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d, t: t / "missing.h5", "no such file"),
        (lambda d, t: t, "is a directory"),
        (lambda d, t: (t / "x.h5").write_bytes(b"\x00" * 4096) and t / "x.h5", "is not an HDF5 file"),
        (lambda d, t: _with_attrs(d, t / "o.h5", schema="keras"), "not an nmgrad dump"),
        (lambda d, t: _with_attrs(d, t / "n.h5", schema_version=SCHEMA_VERSION + 1), "newer than this nmgrad reads"),
        (lambda d, t: _truncated(d, t / "t.h5"), "truncated or corrupt"),
        (lambda d, t: _empty(t / "e.h5"), "empty dump (no layers)"),
        (lambda d, t: _empty(t / "g.h5", with_layer=True), "holds no gradient records"),
    ],
    ids=["missing", "directory", "not-hdf5", "other-schema", "newer-version", "truncated", "empty", "no-grads"],
)
def test_bad_dumps(dump, tmp_path, make, match):
    path = make(dump, tmp_path)
    assert_user_error(run(path, "--samples", "2"), match)
    # also when it comes after a good dump: checked before any work
    assert_user_error(run(dump, path, "--samples", "2"), match)


def test_nan_layer_is_reported_the_rest_evaluated_exit_1(tmp_path):
    path = tmp_path / "nan.h5"
    with DumpWriter(path) as w:
        for name in ("good", "bad", "zero"):
            w.add_layer(name, "Linear", -1, [0])
        g = torch.randn(8, 8)
        g[3, 3] = float("nan")
        w.write("good", "grad", 0, 0, torch.randn(8, 8))
        w.write("bad", "grad", 0, 0, g)
        w.write("zero", "grad", 0, 0, torch.zeros(8, 8))
    r = run(path, "--samples", "2", "--json", "-")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert {row["layer"] for row in d["layers"]} == {"good", "zero"}
    (err,) = d["errors"]
    assert err["layer"] == "bad" and "1 of 64" in err["message"]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "layer bad" in errors[0] and "NaN/Inf" in errors[0]
    assert "summary over layers" in r.stderr
    assert "all-zero gradient" in r.stderr
    assert all(row["mse"] == 0 and row["angle"] is None for row in d["layers"] if row["layer"] == "zero")


def test_all_zero_dump_gives_zeros_not_nan(tmp_path):
    path = tmp_path / "zero.h5"
    with DumpWriter(path) as w:
        w.add_layer("z", "Linear", -1, [0])
        w.write("z", "grad", 0, 0, torch.zeros(4, 6, dtype=torch.bfloat16))
    r = run(path, "--samples", "2", "--json", "-")
    assert r.exit_code == 0, r.output
    assert "NaN" not in r.stdout and "nan" not in r.stderr.lower()
    d = json.loads(r.stdout)
    assert all(s["mse"] == 0 and s["bias"] == 0 and s["variance"] == 0 for s in d["summary"])


def test_mc_check_column(dump):
    r = run(dump, "--samples", "4", "--methods", "greedy", "--mc-check")
    assert r.exit_code == 0, r.output
    assert "MC mse" in r.stdout
    checked, head = 0, []
    for line in r.stdout.splitlines():
        if "MC mse" in line:  # the header of the table the next rows belong to
            head = [c.strip() for c in line.split("┃")]
        elif "greedy" in line:  # deterministic: the Monte-Carlo mse equals the exact one
            row = [c.strip() for c in line.split("│")]
            assert row[head.index("MC mse")] == row[head.index("mse")] != "-"
            checked += 1
    assert checked == 3  # two layers and the summary


def test_samples_zero_prints_no_angle(dump):
    r = run(dump, "--samples", "0", "--methods", "mvue", "--json", "-")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["summary"][0]["angle"] is None
    assert d["summary"][0]["gemm"]["variance"] > 0  # exact: computed without draws


def test_bad_axis_is_a_usage_error(dump):
    r = run(dump, "--axis", "rows")
    assert r.exit_code == 2 and "rows" in r.output


def test_rounding_noise_bias_is_zero_in_json_and_table(dump, tmp_path):
    js = tmp_path / "r.json"
    r = run(dump, "--samples", "0", "--methods", "mvue,greedy", "--json", js)
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    mvue = [s for s in d["summary"] if s["method"] == "mvue"][0]
    assert mvue["bias"] == 0 and mvue["gemm"]["bias"] == 0  # float64 rounding: 0 (metrics.rounded_bias)
    head, shown = [], {}
    for line in r.stdout.splitlines():
        if "┃" in line:
            head = [c.strip() for c in line.split("┃")]
        elif "│" in line and head:
            row = [c.strip() for c in line.split("│")]
            shown[row[head.index("method")]] = row
    assert shown["mvue"][head.index("bias")] == "0" and shown["mvue"][head.index("dX bias")] == "0"
    assert shown["greedy"][head.index("bias")] not in ("0", "-")  # a real bias is printed
