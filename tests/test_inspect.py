"""`nmgrad inspect`: tables and JSON of a real capture; bad files in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nmgrad_cli.capture import CaptureConfig, run_capture
from nmgrad_cli.capture.summary import summarize
from nmgrad_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "c.h5"
    run_capture(CaptureConfig(model="cnn", steps=3, every=2, batch_size=4, with_inputs=True, out=str(out)), None, False)
    return out


def test_summary(dump):
    s = summarize(dump)
    assert s["complete"] and not s["interrupted"] and s["steps"] == [0, 2] and s["steps_completed"] == 2
    stem = s["layers"][0]
    assert stem["name"] == "stem.0" and stem["module_type"] == "Conv2d"
    assert stem["grad_shapes"] == [[4, 32, 8, 8]] and stem["features"] == 32 and stem["tokens"] == 4 * 8 * 8
    assert stem["records"] == {"grad": 2, "input": 2, "weight": 2} and stem["dtypes"] == ["float32"]
    assert stem["bytes"] == 2 * 4 * (4 * 32 * 64 + 4 * 1 * 64 + 32 * 9)
    assert s["tensor_bytes"] == sum(li["bytes"] for li in s["layers"]) and s["run"]["model"] == "cnn"


def test_inspect_table_and_json(dump):
    r = runner.invoke(app, ["inspect", str(dump)])
    assert r.exit_code == 0, r.output
    assert "layer2.shortcut.0" in r.stdout and "status: complete; steps completed: 2" in r.stdout
    assert "Conv2d" in r.stdout and "model: cnn" in r.stdout
    r = runner.invoke(app, ["inspect", str(dump), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [li["name"] for li in d["layers"]][-1] == "fc" and d["run"]["every"] == 2


def test_inspect_layers_is_the_shared_selection(dump):
    r = runner.invoke(app, ["inspect", str(dump), "--json", "--layers", "stem.0,layer2.*"])
    assert r.exit_code == 0, r.output
    names = [li["name"] for li in json.loads(r.stdout)["layers"]]
    assert names[0] == "stem.0" and len(names) > 1 and all(n == "stem.0" or n.startswith("layer2.") for n in names)
    r = runner.invoke(app, ["inspect", str(dump), "--layers", "fc1,fc2"])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1
    assert "no dump layer matches --layers 'fc1,fc2': the names are stem.0" in lines[0]


def test_inspect_bad_files(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    for path, match in [(tmp_path / "nope.h5", "no such file"), (tmp_path / "t.txt", "not an HDF5 file"),
                        (tmp_path, "is a directory")]:
        r = runner.invoke(app, ["inspect", str(path)])
        assert r.exit_code == 2 and "Traceback" not in r.output
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_sample_dump_in_the_repo_inspects_and_evaluates():
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"
    s = summarize(sample)
    assert s["complete"] and s["steps"] == [100, 110, 120, 130] and s["run"]["model"] == "mlp"
    assert [li["records"] for li in s["layers"]] == [{"grad": 4, "input": 4, "weight": 4}] * 3
    r = runner.invoke(app, ["evaluate", str(sample), "--pattern", "2:4", "--samples", "2"])
    assert r.exit_code == 0, r.output
    assert "mvue" in r.stdout
