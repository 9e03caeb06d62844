"""The per-layer N:M plan: `nmgrad evaluate --recommend` (nmgrad_cli.plan) on the shipped dump."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from _cli import assert_user_error, invoke

from nmgrad_cli import evaluate as ev
from nmgrad_cli import plan as lib
from nmgrad_cli import results
from nmgrad_cli.dump import DumpReader

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"
CFG = ev.EvalConfig(threads=1)
BUDGET = "variance<=0.05"


@pytest.fixture(scope="module")
def plan(one_thread) -> lib.Plan:
    return lib.recommend([SAMPLE], BUDGET, "1:2,2:4,2:8,1:4", config=CFG)


def test_parse_budget_and_candidates():
    assert lib.parse_budget("variance<=0.5") == (lib.Bound("variance", "<=", 0.5),)
    assert lib.parse_budget(" angle < 35 , mse<=1e-2") == (lib.Bound("angle", "<", 35.0), lib.Bound("mse", "<=", 0.01))
    assert lib.Bound("angle", "<", 35).holds(34.9) and not lib.Bound("angle", "<", 35).holds(35.0)
    assert lib.Bound("variance", "<=", 0.5).holds(0.5) and not lib.Bound("variance", "<=", 0.5).holds(None)
    for bad, msg in [("", "empty"), ("variance", "not METRIC<=NUMBER"), ("speed<=1", "metric 'speed' is unknown"),
                     ("variance>=0.5", "not an upper bound"), ("variance<=0", "impossible"),
                     ("angle<=181", "impossible"), ("variance<=nan", "impossible"), ("mse<=x", "not a number")]:
        with pytest.raises(lib.PlanError, match=msg):
            lib.parse_budget(bad)
    assert [str(p) for p in lib.parse_candidates("1:2,2:4,2:8,1:4,2:4")] == ["2:8", "1:4", "1:2", "2:4"]
    for bad in ("", "2:4,4:2", "x"):
        with pytest.raises(lib.PlanError):
            lib.parse_candidates(bad)


def test_each_gemm_gets_the_sparsest_pattern_within_budget(plan):
    bound = lib.parse_budget(BUDGET)[0]
    assert set(plan.layers) == {"fc1", "fc2", "fc3"}
    chosen = 0
    for entry in plan.layers.values():
        for gemm in ("dx", "dw"):
            c = entry[gemm]
            assert {o["pattern"] for o in c["tried"]} == {"1:2", "2:4", "2:8", "1:4"}
            assert all(o["level"] == "gemm" for o in c["tried"])  # the dump holds X and W
            fitting = [o for o in c["tried"] if bound.holds(o["errors"]["variance"])]
            assert [o["fits"] for o in c["tried"]] == [o in fitting for o in c["tried"]]
            if c["pattern"] is None:
                assert not fitting and c["method"] == "dense" and c["density"] == 1.0
                continue
            chosen += 1
            assert bound.holds(c["errors"]["variance"]) and c["method"] == "mvue"
            assert c["density"] == min(o["density"] for o in fitting)
    # the budget lies inside the range the patterns span: some GEMMs sparse, some dense, some sparser than 1:2
    assert 0 < chosen < 6
    assert any(e[g]["density"] == 0.25 for e in plan.layers.values() for g in ("dx", "dw"))


def test_plan_errors_are_evaluates_errors(plan, one_thread):
    """The 2:4 option of each GEMM is what a plain `evaluate -p 2:4 --axis both` reports for mvue."""
    report = ev.evaluate([SAMPLE], ev.EvalConfig(pattern="2:4", methods=("mvue",), axis="both", samples=0, threads=1))
    rows = results.pooled_layers(results.parse(json.loads(json.dumps(report.to_dict()))))
    for layer, entry in plan.layers.items():
        for gemm, axis in (("dx", "features"), ("dw", "tokens")):
            opt = next(o for o in entry[gemm]["tried"] if o["pattern"] == "2:4")
            assert opt["errors"]["variance"] == pytest.approx(rows[(layer, axis, "mvue")]["gemm_variance"], rel=1e-12)


def test_flops_saved_from_the_layer_shapes(plan):
    with DumpReader(SAMPLE) as r:
        shapes = {n: info.weight_shape for n, info in r.layers.items()}
    total = saved = 0.0
    for name, e in plan.layers.items():
        f, i = shapes[name]
        assert (e["T"], e["F"], e["I"]) == (64, f, i)  # the sample's batch is 64
        frac = ((1 - e["dx"]["density"]) + (1 - e["dw"]["density"])) / 2
        assert e["flops_saved"] == pytest.approx(frac)
        total += 64 * f * i
        saved += 64 * f * i * frac
    assert plan.flops_saved == pytest.approx(saved / total)


def test_budget_nothing_meets_is_all_dense(one_thread):
    p = lib.recommend([SAMPLE], "variance<=1e-9", "2:4", config=CFG)
    assert all(e[g]["pattern"] is None for e in p.layers.values() for g in ("dx", "dw"))
    assert p.flops_saved == 0.0 and any("all dense" in n for n in p.notes)


def test_cli_round_trip_and_bad_inputs(tmp_path, plan):
    out = tmp_path / "plan.json"
    res = invoke("evaluate", SAMPLE, "--recommend", "--budget", BUDGET, "--plan-out", out, "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "bwd FLOPs saved" in res.stdout and "fc2" in res.stdout
    loaded = lib.load(out)
    assert loaded.layers.keys() == plan.layers.keys()
    for name in plan.layers:
        for g in ("dx", "dw"):
            assert loaded.gemm_choice(name, g) == plan.gemm_choice(name, g)
    raw = json.loads(out.read_text())
    assert raw["budget"] == BUDGET and raw["candidates"] == ["2:8", "1:4", "1:2", "2:4"]
    assert raw["sources"][0]["sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert raw["sources"][0]["model"] == "mlp"
    assert f"{100 * raw['flops_saved']:.1f}%" in res.stdout
    assert_user_error(invoke("evaluate", SAMPLE, "--recommend", "--plan-out", out), "exists")
    assert_user_error(invoke("evaluate", SAMPLE, "--recommend", "--budget", "angle<=0"), "impossible")
    assert_user_error(invoke("evaluate", SAMPLE, "--recommend", "--budget", "loss<=1"), "metric 'loss' is unknown")
    assert_user_error(invoke("evaluate", SAMPLE, "--recommend", "--candidates", "2:4,five"), "--candidates")
    assert_user_error(invoke("evaluate", SAMPLE, "--plan-out", tmp_path / "p2.json"), "needs --recommend")
    assert_user_error(invoke("evaluate", SAMPLE, "--recommend", "--budget", "angle<=30", "--samples", "0"),
                      "needs Monte-Carlo draws")


def test_plan_file_checks(tmp_path, plan):
    lib.save(plan, tmp_path / "p.json")
    p = lib.load(tmp_path / "p.json")
    p.check_layers(["fc1", "fc2", "fc3"])
    with pytest.raises(lib.PlanError, match="another model: its layers fc3"):
        p.check_layers(["fc1", "fc2", "head"])
    with pytest.raises(lib.PlanError, match="another model"):
        p.check_layers(["h.0.attn.c_attn"])
    with pytest.raises(lib.PlanError, match="no entry for the sites fc4"):
        p.check_layers(["fc1", "fc2", "fc3", "fc4"])
    (tmp_path / "e.json").write_text(json.dumps({"config": {"pattern": "2:4"}, "layers": []}))
    with pytest.raises(lib.PlanError, match="is not a plan"):
        lib.load(tmp_path / "e.json")
    d = plan.to_dict()
    d["layers"]["fc1"]["dx"] = {"pattern": "2:4", "method": "no-such-method"}
    (tmp_path / "d.json").write_text(json.dumps(d))
    with pytest.raises(lib.PlanError, match="damaged plan"):
        lib.load(tmp_path / "d.json")


def test_method_per_pattern():
    """The first preferred method defined for the pattern; for a GPU, the first with a Triton kernel."""
    from nmgrad_cli.patterns import parse_pattern

    assert lib.method_for(parse_pattern("1:4"), ("mvue12", "mvue")) == "mvue"  # mvue12 needs M = 2N
    assert lib.method_for(parse_pattern("4:8"), ("approx-mvue", "mvue")) == "mvue"  # approx-mvue: N <= M/2
    assert lib.method_for(parse_pattern("2:4"), ("mvue", "approx-mvue"), gpu=True) == "mvue"
    assert lib.method_for(parse_pattern("2:8"), ("mvue", "approx-mvue"), gpu=True) is None  # Triton: 1:2, 2:4
