"""Outputs people expect from every command (issue 20): `compare --json/--csv`, `-q` everywhere
(no progress, no tables, errors still printed), tables that keep every column when piped, and a
`--batch-size` help that says what the defaults are."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from _cli import assert_user_error, invoke

from nmgrad_cli import evaluate as ev
from nmgrad_cli.models.hf import HF_BATCH_SIZE
from nmgrad_cli.models.registry import DEFAULT_BATCH_SIZE
from nmgrad_cli.train import run_config

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"


@pytest.fixture(scope="module")
def evals(tmp_path_factory, one_thread) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("outputs")
    out = {}
    for pattern in ("2:4", "1:2"):
        cfg = ev.EvalConfig(pattern=pattern, methods=("greedy", "mvue"), axis="both", samples=2, threads=1,
                            max_records=1)
        out[pattern] = d / f"e{pattern.replace(':', '')}.json"
        out[pattern].write_text(json.dumps(ev.evaluate([SAMPLE], cfg).to_dict()))
    return out


def test_compare_json_and_csv_hold_the_tables_rows(evals, tmp_path):
    a, b = evals["2:4"], evals["1:2"]
    r = invoke("compare", a, b, "--metrics", "variance,bias", "--json", "-", "--csv", tmp_path / "c.csv")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)  # stdout is only the JSON: the table went to stderr
    assert "variance diff" in r.stderr
    assert payload["metrics"] == ["variance", "bias"] and payload["notes"]
    rows = payload["rows"]
    raw_a = {(x["layer"], x["axis"], x["method"]): x for x in json.loads(a.read_text())["layers"]}
    raw_b = {(x["layer"], x["axis"], x["method"]): x for x in json.loads(b.read_text())["layers"]}
    assert {(x["layer"], x["axis"], x["method"]) for x in rows} == set(raw_a)
    for row in rows:
        k = (row["layer"], row["axis"], row["method"])
        assert row["variance_a"] == raw_a[k]["variance"] and row["variance_b"] == raw_b[k]["variance"]
        assert row["variance_diff"] == pytest.approx(raw_b[k]["variance"] - raw_a[k]["variance"])
    with open(tmp_path / "c.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["layer", "axis", "method", "variance_a", "variance_b", "variance_diff", "bias_a",
                              "bias_b", "bias_diff"]
    assert len(table) == len(rows) and float(table[0]["variance_a"]) == rows[0]["variance_a"]


def test_compare_output_errors_are_one_line_and_keep_files(evals, tmp_path):
    a, b = evals["2:4"], evals["1:2"]
    kept = tmp_path / "kept.json"
    kept.write_text("mine")
    assert_user_error(invoke("compare", a, b, "--json", kept), "exists: pass --force")
    assert kept.read_text() == "mine"
    assert_user_error(invoke("compare", a, b, "--json", "-", "--csv", "-"), "both ask for stdout")
    assert_user_error(invoke("compare", a, b, "--csv", a), "is one of the input files")
    assert json.loads(a.read_text())["layers"]  # the input is intact
    r = invoke("compare", a, b, "--json", kept, "--force", "-q")
    assert r.exit_code == 0 and r.output == "" and json.loads(kept.read_text())["rows"]


def test_quiet_prints_nothing_but_errors(evals, tmp_path):
    a, b = evals["2:4"], evals["1:2"]
    for args in (
        ("evaluate", SAMPLE, "--methods", "greedy", "--samples", "0", "--max-records", "1"),
        ("inspect", SAMPLE),
        ("compare", a, b),
        ("plot", a, "-o", tmp_path / "p.png"),
        ("train", "--model", "mlp", "--steps", "2", "--method", "dense", "--no-plot", "--out", tmp_path / "run"),
    ):
        r = invoke(*args, "-q")
        assert r.exit_code == 0, (args, r.output)
        assert r.output == "", (args, r.output)
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "run" / "summary.json").is_file()
    assert_user_error(invoke("inspect", tmp_path / "missing.h5", "-q"), "no such file")
    assert_user_error(invoke("evaluate", SAMPLE, "-q", "--pattern", "3:2"), "3:2")


def test_train_table_keeps_every_column_when_piped(tmp_path):
    """CliRunner's output is not a terminal (as a pipe): rich used to cut the table at 80 columns and
    drop the last ones (steps/s, wall s) when the run labels are long."""
    r = invoke("train", "--model", "mlp", "--steps", "2", "--compare", "dense,approx-mvue", "--pattern", "2:16",
               "--weight-pattern", "12:16", "--layers", "fc1", "--no-plot", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    header = next(line for line in r.stdout.splitlines() if "train loss" in line)
    for col in ("steps", "train loss", "eval loss", "eval acc", "steps/s", "wall s"):
        assert col in header, header
    row = next(line for line in r.stdout.splitlines() if line.lstrip().startswith("approx-mvue 2:16 +W12:16"))
    assert len(row.split()) >= 7, row  # label and every number on one line


def test_batch_size_help_states_the_real_defaults():
    def help_text(cmd: str) -> str:
        return " ".join(io.StringIO(invoke(cmd, "--help").stdout).read().replace("│", " ").split())

    cap = help_text("capture")
    assert f"digits {DEFAULT_BATCH_SIZE['digits']}" in cap and f"text:FILE {DEFAULT_BATCH_SIZE['text']}" in cap
    assert f"hf: model {HF_BATCH_SIZE}" in cap
    tr = help_text("train")
    assert f"mlp/cnn {run_config.TASK_DEFAULTS['mlp'].batch_size}" in tr
    assert f"hf: {run_config.HF_DEFAULTS.batch_size}" in tr
    assert f"gpt {run_config.TASK_DEFAULTS['gpt'].batch_size}" in tr


def test_quiet_keeps_asked_for_json():
    r = invoke("inspect", SAMPLE, "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["layers"]
