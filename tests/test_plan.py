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
    for name, entry in plan.layers.items():
        for gemm in ("dx", "dw"):
            c = entry[gemm]
            if name == "fc1" and gemm == "dx":  # its input is the data: dX never runs
                assert not c["runs"] and c["pattern"] is None and c["tried"] == []
                continue
            assert c["runs"]
            assert {o["pattern"] for o in c["tried"]} == {"1:2", "2:4", "2:8", "1:4"}
            assert all(o["level"] == "gemm" for o in c["tried"])  # the dump holds X and W
            for o in c["tried"]:  # per pattern the unbiased method with the smallest GEMM variance
                assert set(o["methods"]) <= set(lib.DEFAULT_METHODS) and not o["biased"]
                low = min(e["variance"] for e in o["methods"].values())
                assert o["errors"]["variance"] <= low * (1 + lib.TIE)
                first = next(m for m in o["methods"] if o["methods"][m]["variance"] <= low * (1 + lib.TIE))
                assert o["method"] == first  # a tie (1:N: approx-mvue is mvue's law) goes to the first given
            fitting = [o for o in c["tried"] if bound.holds(o["errors"]["variance"])]
            assert [o["fits"] for o in c["tried"]] == [o in fitting for o in c["tried"]]
            if c["pattern"] is None:
                assert not fitting and c["method"] == "dense" and c["density"] == 1.0 and c["kept"] == 1.0
                continue
            chosen += 1
            assert bound.holds(c["errors"]["variance"]) and c["method"] in lib.DEFAULT_METHODS
            assert c["kept"] == min(o["kept"] for o in fitting)  # sparsest by what is really kept
    # the budget lies inside the range the patterns span: some GEMMs sparse, some dense, some sparser than 1:2
    assert 0 < chosen < 5
    assert any(e[g]["density"] == 0.25 for e in plan.layers.values() for g in ("dx", "dw"))


def test_plan_errors_are_evaluates_errors(plan, one_thread):
    """The 2:4 mvue option of each GEMM is what a plain `evaluate -p 2:4 --axis both` reports for mvue."""
    report = ev.evaluate([SAMPLE], ev.EvalConfig(pattern="2:4", methods=("mvue",), axis="both", samples=0, threads=1))
    rows = results.pooled_layers(results.parse(json.loads(json.dumps(report.to_dict()))))
    for layer, entry in plan.layers.items():
        for gemm, axis in (("dx", "features"), ("dw", "tokens")):
            if not entry[gemm]["runs"]:
                continue
            opt = next(o for o in entry[gemm]["tried"] if o["pattern"] == "2:4")
            want = rows[(layer, axis, "mvue")]["gemm_variance"]
            assert opt["methods"]["mvue"]["variance"] == pytest.approx(want, rel=1e-12)


def test_kept_fraction_counts_the_padding():
    """A row of L elements keeps (L // M) N + min(N, L % M): the digits' fc3 (F = 10) keeps more than N/M."""
    from nmgrad_cli.patterns import parse_pattern

    assert lib.kept_fraction(10, parse_pattern("2:8")) == 0.4
    assert lib.kept_fraction(10, parse_pattern("2:4")) == 0.6
    assert lib.kept_fraction(10, parse_pattern("1:4")) == 0.3
    assert lib.kept_fraction(10, parse_pattern("1:2")) == 0.5
    assert lib.kept_fraction(64, parse_pattern("2:8")) == 0.25
    assert lib.kept_fraction(9, parse_pattern("2:8")) == 3 / 9  # the last block holds 1 element: keeps 1
    assert lib.kept_fraction(1, parse_pattern("2:4")) == 1.0


def test_flops_saved_from_the_layer_shapes(plan):
    """Per GEMM that runs, T·F·I times 1 - its kept fraction (padding included); fc1's dX never runs."""
    with DumpReader(SAMPLE) as r:
        shapes = {n: info.weight_shape for n, info in r.layers.items()}
        assert r.layers["fc1"].needs_grad == {"input": False, "weight": True}
        assert r.layers["fc3"].needs_grad == {"input": True, "weight": True}
    total = saved = 0.0
    for name, e in plan.layers.items():
        f, i = shapes[name]
        assert (e["T"], e["F"], e["I"]) == (64, f, i)  # the sample's batch is 64
        running = [g for g in ("dx", "dw") if e[g]["runs"]]
        assert running == (["dw"] if name == "fc1" else ["dx", "dw"])
        for g in running:
            c = e[g]
            if c["pattern"] is not None:
                n, m = map(int, c["pattern"].split(":"))
                length = f if g == "dx" else 64
                assert c["kept"] == pytest.approx(((length // m) * n + min(n, length % m)) / length, rel=1e-15)
        frac = sum(1 - e[g]["kept"] for g in running) / len(running)
        assert e["flops_saved"] == pytest.approx(frac)
        total += 64 * f * i * len(running)
        saved += 64 * f * i * frac * len(running)
    assert plan.flops_saved == pytest.approx(saved / total)


def test_the_digits_figure(plan, one_thread):
    """docs/plan.md's figure: 44.8% of the backward GEMM FLOPs (not 45.5%: fc3's F = 10 keeps 0.4 at
    2:8, and fc1's dX, which never runs, is not counted), with mvue alone as with every method."""
    only_mvue = lib.recommend([SAMPLE], BUDGET, "1:2,2:4,2:8,1:4", ("mvue",), config=CFG)
    for p in (plan, only_mvue):
        assert round(100 * p.flops_saved, 1) == 44.8
        fc3 = p.layers["fc3"]
        assert (fc3["dx"]["pattern"], fc3["dx"]["kept"]) == ("2:8", 0.4)
        assert fc3["flops_saved"] == pytest.approx(0.55)
        assert any("fc1 dX" in n for n in p.notes)


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
    """The methods defined for the pattern; for a GPU, those with a Triton kernel."""
    from nmgrad_cli.patterns import parse_pattern

    assert lib.method_for(parse_pattern("1:4"), ("mvue12", "mvue")) == "mvue"  # mvue12 needs M = 2N
    assert lib.method_for(parse_pattern("4:8"), ("approx-mvue", "mvue")) == "mvue"  # approx-mvue: N <= M/2
    assert lib.method_for(parse_pattern("2:4"), ("mvue", "approx-mvue"), gpu=True) == "mvue"
    assert lib.method_for(parse_pattern("2:8"), ("mvue", "approx-mvue"), gpu=True) is None  # Triton: 1:2, 2:4
    assert lib.methods_for(parse_pattern("2:4"), lib.DEFAULT_METHODS) == ("mvue", "approx-mvue", "mvue12", "random")
    assert lib.methods_for(parse_pattern("2:8"), lib.DEFAULT_METHODS) == ("mvue", "approx-mvue", "random")
    assert lib.methods_for(parse_pattern("4:8"), lib.DEFAULT_METHODS) == ("mvue", "mvue12", "random")
    assert lib.methods_for(parse_pattern("2:4"), lib.DEFAULT_METHODS, gpu=True) == lib.DEFAULT_METHODS
    assert lib.methods_for(parse_pattern("2:8"), lib.DEFAULT_METHODS, gpu=True) == ()  # no Triton kernel at 2:8


def test_a_variance_budget_is_met_only_by_unbiased_methods(tmp_path):
    """The issue's reproduction: greedy under a variance budget is not picked (its variance is 0, its
    error all bias); under an mse budget it may enter, marked biased, with one warning line."""
    r = invoke("evaluate", SAMPLE, "--recommend", "--budget", "variance<=0.05", "--candidates", "1:4,2:8",
               "--methods", "greedy", "--threads", "1")
    assert_user_error(r, "only biased methods")
    r = invoke("evaluate", SAMPLE, "--recommend", "--budget", "variance<=0.05", "--candidates", "1:4,2:8",
               "--methods", "greedy,mvue", "--threads", "1", "--plan-out", tmp_path / "v.json")
    assert r.exit_code == 0, r.output
    assert [line for line in r.output.splitlines() if line.startswith("warning:")] == [
        "warning: greedy is biased: left out, since the budget variance<=0.05 is met only by unbiased methods "
        "(an mse budget, bias included, admits biased ones)"]
    v = lib.load(tmp_path / "v.json")
    assert v.methods == ["mvue"] and "greedy" not in r.stdout.split("warning:")[0]
    assert all(o["method"] == "mvue" for e in v.layers.values() for g in ("dx", "dw") for o in e[g]["tried"])
    p = lib.recommend([SAMPLE], "mse<=0.05", "1:4,2:8", ("greedy", "mvue"), config=CFG)
    assert p.warnings and "admitted under the mse budget" in p.warnings[0]
    picked = [e[g] for e in p.layers.values() for g in ("dx", "dw") if e[g]["pattern"] is not None]
    assert any(c["method"] == "greedy" and c["biased"] for c in picked)
    for c in picked:  # the bias counts: the mse of the choice, bias included, is within budget
        assert c["errors"]["mse"] <= 0.05 and c["errors"]["mse"] >= c["errors"]["bias"]
    r = invoke("evaluate", SAMPLE, "--recommend", "--budget", "mse<=0.05", "--candidates", "1:4,2:8",
               "--methods", "greedy,mvue", "--threads", "1")
    assert r.exit_code == 0 and "greedy (biased)" in r.stdout
    assert not lib.admits_biased(lib.parse_budget("mse<=0.1,variance<=0.1"))
    assert not lib.admits_biased(lib.parse_budget("angle<=30"))


def test_per_element_optimal_is_not_per_gemm_optimal():
    """docs/methods.md's example: a = [1, -1, 1, -1], B = ones(4, 1). mvue keeps {0, 2} or {1, 3}
    (systematic sampling), so a^ B is +-4: variance 16; approx-mvue and random keep each of the 6 pairs
    with probability 1/6, variance 16/3; mvue12 (1:2 on each pair) 8."""
    import torch

    from nmgrad_cli.metrics import gemm_moments

    a, b = torch.tensor([[1.0, -1.0, 1.0, -1.0]]), torch.ones(4, 1)
    var = {m: gemm_moments(a, b, m, "2:4").var_abs for m in ("mvue", "approx-mvue", "mvue12", "random")}
    assert var["mvue"] == 16.0 and var["mvue12"] == 8.0
    assert var["approx-mvue"] == pytest.approx(16 / 3, rel=1e-15) and var["random"] == pytest.approx(16 / 3, rel=1e-15)


def test_the_plan_takes_the_method_with_the_smallest_gemm_variance(tmp_path):
    """A layer whose dX GEMM is the example above (with a second column of W, so ||dX|| > 0): at 2:4
    mvue's relative dX variance is 17, approx-mvue's 19/3; under variance<=10 the plan takes approx-mvue
    (mvue alone: dense)."""
    import torch

    from nmgrad_cli.dump import DumpWriter

    dy = torch.tensor([[1.0, -1.0, 1.0, -1.0]]).repeat(4, 1)  # (T, F)
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # (F, I)
    x = torch.eye(4, 2)  # (T, I)
    path = tmp_path / "ex.h5"
    with DumpWriter(path, run={"model": "example", "seed": 0}) as wr:
        wr.add_layer("lin", "Linear", feature_axis=-1, token_axes=[0], weight_shape=(4, 2),
                     needs_grad={"input": True, "weight": False})
        for kind, t in (("input", x), ("weight", w), ("grad", dy)):
            wr.write("lin", kind, 0, 0, t)
        wr.step_done(0)
    p = lib.recommend([path], "variance<=10", "2:4", config=CFG)
    c = p.layers["lin"]["dx"]
    opt = c["tried"][0]
    assert opt["methods"]["mvue"]["variance"] == pytest.approx(17.0, rel=1e-12)
    assert opt["methods"]["approx-mvue"]["variance"] == pytest.approx(19 / 3, rel=1e-12)
    assert opt["methods"]["mvue12"]["variance"] == pytest.approx(9.0, rel=1e-12)
    assert (c["pattern"], c["method"]) == ("2:4", "approx-mvue")  # random ties it; the order given decides
    assert p.gemm_choice("lin", "dx") == ("approx-mvue", "2:4")
    assert not p.layers["lin"]["dw"]["runs"] and p.gemm_choice("lin", "dw") == ("dense", None)  # a frozen weight
    assert p.layers["lin"]["flops_saved"] == 0.5 and p.flops_saved == 0.5  # dX only: dW is not counted
    only_mvue = lib.recommend([path], "variance<=10", "2:4", ("mvue",), config=CFG)
    assert only_mvue.gemm_choice("lin", "dx") == ("dense", None)


def test_recommend_also_writes_the_evaluations_it_ran(tmp_path, monkeypatch):
    """--json/--csv with --recommend: the evaluations the plan was made from, one pass per pattern
    (not a second run), and their numbers are the plan's."""
    calls = []
    real = ev.evaluate

    def counting(paths, config, progress=None):
        calls.append(config.pattern)
        return real(paths, config, progress)

    monkeypatch.setattr(ev, "evaluate", counting)
    out, js, cs = tmp_path / "p.json", tmp_path / "e.json", tmp_path / "e.csv"
    r = invoke("evaluate", SAMPLE, "--recommend", "--budget", BUDGET, "--candidates", "2:4,2:8", "--threads", "1",
               "--plan-out", out, "--json", js, "--csv", cs)
    assert r.exit_code == 0, r.output
    assert sorted(calls) == ["2:4", "2:8"]  # one evaluate pass per candidate pattern, shared by all outputs
    d = json.loads(js.read_text())
    assert d["kind"] == "nmgrad-recommend-evaluations" and list(d["evaluations"]) == ["2:8", "2:4"]
    rows = results.pooled_layers(results.parse(d["evaluations"]["2:4"]))
    plan = lib.load(out)
    opt = next(o for o in plan.layers["fc2"]["dx"]["tried"] if o["pattern"] == "2:4")
    assert opt["methods"]["approx-mvue"]["variance"] == rows[("fc2", "features", "approx-mvue")]["gemm_variance"]
    lines = cs.read_text().splitlines()
    assert lines[0].startswith("pattern,level,file,layer")
    assert {line.split(",")[0] for line in lines[1:]} == {"2:4", "2:8"}
    assert_user_error(invoke("evaluate", SAMPLE, "--recommend", "--fail-if", "mvue.bias>1"), "--fail-if")


def test_a_dump_with_no_features_is_one_line(tmp_path):
    """F = 0 (a gradient of shape (T, 0)): one line and exit 2, for evaluate and --recommend."""
    import torch

    from nmgrad_cli.dump import DumpWriter

    path = tmp_path / "f0.h5"
    with DumpWriter(path, run={"model": "empty", "seed": 0}) as w:
        w.add_layer("lin", "Linear", feature_axis=-1, token_axes=[0], weight_shape=(0, 3))
        w.write("lin", "grad", 0, 0, torch.zeros(4, 0))
        w.step_done(0)
    for extra in ([], ["--recommend"], ["--axis", "tokens"]):
        assert_user_error(invoke("evaluate", path, *extra), "layer lin has 0 features")
