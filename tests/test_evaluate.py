"""The evaluate library on dumps of a real tiny model's backward pass.

Reference values are computed independently of the library where possible: greedy and mvue 2:4
errors block by block in plain Python from docs/methods.md's closed forms, and the expected GEMM error of
random pruning from its pairwise inclusion probabilities.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _dumps import OUT, make_conv_dump, mlp_steps, write_dump

from nmgrad_cli import METHODS, prune
from nmgrad_cli.dump import DumpWriter
from nmgrad_cli.errors import DumpError, MethodError, NmgradError, PatternError
from nmgrad_cli.evaluate import (
    EvalConfig,
    as_matrix,
    check_threshold_applies,
    evaluate,
    gemm_error,
    parse_threshold,
    violations,
)
from nmgrad_cli.metrics import evaluate_tensor, exact_moments

UNBIASED = [m for m in METHODS if METHODS[m].unbiased]


@pytest.fixture(scope="module")
def steps():
    """Two SGD steps of a 2-layer MLP: per step {layer: {"grad", "input", "weight", "module"}}."""
    return mlp_steps(2)


@pytest.fixture(scope="module")
def dump(tmp_path_factory, steps):
    return write_dump(tmp_path_factory.mktemp("d") / "mlp.h5", steps)


@pytest.fixture(scope="module")
def report(dump):
    return evaluate([dump], EvalConfig(pattern="2:4", axis="both", samples=8))


def matrices(steps, layer):
    """The (T, F) view of each step's dY of ``layer``."""
    return [s[layer]["grad"].reshape(-1, s[layer]["grad"].shape[-1]) for s in steps]


def rows(report, **match):
    return [r for r in report.layers if all(r[k] == v for k, v in match.items())]


# --- independent references ------------------------------------------------------------------


def blocks_of(g: torch.Tensor, dim: int, m: int):
    """Python lists of the (unpadded) blocks of the 2-D g along ``dim``: the last one may be short."""
    lines = g.tolist() if dim in (-1, 1) else g.T.tolist()
    return [line[i : i + m] for line in lines for i in range(0, len(line), m)]


def greedy_bias_abs(g, dim, n=2, m=4) -> float:
    """Sum of squares of all but the n largest |a_i| of each block."""
    return sum(sum(sorted(x * x for x in b)[: max(len(b) - n, 0)]) for b in blocks_of(g, dim, m))


def mvue24_var_abs(g, dim) -> float:
    """docs/methods.md's closed form of the 2:4 MVUE variance, block by block (short blocks padded by 0)."""
    total = 0.0
    for b in blocks_of(g, dim, 4):
        a = sorted(abs(x) for x in b + [0.0] * (4 - len(b)))
        s, r = sum(a), a[0] + a[1] + a[2]
        if a[3] <= r:
            total += s * s / 2 - sum(x * x for x in a)
        else:
            total += 2 * (a[0] * a[1] + a[0] * a[2] + a[1] * a[2])
    return total


def random_gemm_err_abs(g: torch.Tensor, b: torch.Tensor, n: int, m: int) -> float:
    """E||(g^ - g) @ b||^2 for random N:M pruning of g (R, L) along L, b: (L, I).

    Per block, Var g^_i = c a_i^2 and Cov(g^_i, g^_j) = -c a_i a_j / (M - 1) with c = (M - N)/N
    (pairwise inclusion N(N-1)/(M(M-1))), so the block contributes
    c (M/(M-1) sum_i a_i^2 ||b_i||^2 - 1/(M-1) ||sum_i a_i b_i||^2); blocks are independent."""
    g, b = g.double(), b.double()
    pad = (-g.shape[1]) % m
    gp = torch.nn.functional.pad(g, (0, pad)).reshape(g.shape[0], -1, m)  # (R, K, M)
    bp = torch.nn.functional.pad(b, (0, 0, 0, pad)).reshape(-1, m, b.shape[1])  # (K, M, I)
    c = (m - n) / n
    diag = torch.sum(gp**2 * (bp**2).sum(-1)[None])
    full = torch.sum(torch.einsum("rkm,kmi->rki", gp, bp) ** 2)
    return c * (m / (m - 1) * diag - full / (m - 1)).item()


# --- the acceptance criteria ------------------------------------------------------------------


def test_greedy_biased_unbiased_methods_not_and_variance_ordered(report):
    assert {(r["layer"], r["axis"]) for r in report.layers} == {(la, a) for la in "02" for a in ("features", "tokens")}
    for layer in ("0", "2"):
        for axis in ("features", "tokens"):
            by = {r["method"]: r for r in rows(report, layer=layer, axis=axis)}
            assert set(by) == set(METHODS)
            assert by["greedy"]["bias"] > 1e-3 and by["greedy"]["variance"] == 0.0
            for m in UNBIASED:
                assert by[m]["bias"] < 1e-10 and by[m]["variance"] > 0
            assert by["mvue"]["variance"] <= by["approx-mvue"]["variance"] <= by["random"]["variance"]
            assert by["random"]["variance"] == pytest.approx(1.0, rel=1e-9)  # M/N - 1 at 2:4


@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_exact_errors_match_blockwise_hand_computation_with_padding(report, steps, axis):
    """T = 15 and F = 10 or 6 are not multiples of 4: a padding leak would change these sums."""
    dim = -1 if axis == "features" else 0
    for layer in ("0", "2"):
        gs = matrices(steps, layer)
        assert gs[0].shape[0] % 4 and gs[0].shape[1] % 4  # T = 15, F = 10 or 6
        norm2 = sum(float((g.double() ** 2).sum()) for g in gs)
        greedy = rows(report, layer=layer, axis=axis, method="greedy")[0]
        mvue = rows(report, layer=layer, axis=axis, method="mvue")[0]
        assert greedy["norm2"] == pytest.approx(norm2, rel=1e-12)
        assert greedy["bias"] == pytest.approx(sum(greedy_bias_abs(g.double(), dim) for g in gs) / norm2, rel=1e-9)
        assert mvue["variance"] == pytest.approx(sum(mvue24_var_abs(g.double(), dim) for g in gs) / norm2, rel=1e-9)


def test_summary_is_the_norm_weighted_mean_over_layers(report, steps):
    for axis, dim in (("features", -1), ("tokens", 0)):
        for method in METHODS:
            bias = var = norm2 = 0.0
            for layer in ("0", "2"):
                for g in matrices(steps, layer):
                    b, v, n2 = exact_moments(g, method, "2:4", dim)
                    bias, var, norm2 = bias + b, var + v, norm2 + n2
            (s,) = [r for r in report.summary if r["axis"] == axis and r["method"] == method]
            assert s["norm2"] == pytest.approx(norm2, rel=1e-12)
            assert s["bias"] == pytest.approx(bias / norm2, rel=1e-9, abs=1e-300)
            assert s["variance"] == pytest.approx(var / norm2, rel=1e-9)
            assert s["mse"] == pytest.approx((bias + var) / norm2, rel=1e-9)
            # the same as weighting the per-layer values by each layer's ||g||^2
            lay = rows(report, axis=axis, method=method)
            assert s["mse"] == pytest.approx(sum(r["mse"] * r["norm2"] for r in lay) / s["norm2"], rel=1e-9)
            # angle: layer = mean over records; summary = ||g||^2-weighted mean of layers
            for r in lay:
                rec = [x.metrics for x in report.records if (x.layer, x.axis, x.method) == (r["layer"], axis, method)]
                assert r["angle"] == pytest.approx(sum(x["angle"] for x in rec) / len(rec))
                assert r["angle_se"] == pytest.approx(math.sqrt(sum(x["angle_se"] ** 2 for x in rec)) / len(rec))
            assert s["angle"] == pytest.approx(sum(r["angle"] * r["norm2"] for r in lay) / s["norm2"])


def test_each_axis_is_evaluate_tensor_on_the_right_dim(report, steps):
    for rec in report.records:
        step = int(rec.record[1:8])
        g = steps[step][rec.layer]["grad"].reshape(-1, OUT if rec.layer == "2" else 10)
        assert rec.shape == tuple(g.shape)
        ref = evaluate_tensor(g, rec.method, "2:4", dim=-1 if rec.axis == "features" else 0, samples=0)
        for k in ("mse", "bias", "variance", "norm2"):
            assert rec.metrics[k] == pytest.approx(getattr(ref, k), rel=1e-12, abs=1e-30), (rec, k)
    # and the two axes really differ
    f = rows(report, layer="0", axis="features", method="greedy")[0]["mse"]
    t = rows(report, layer="0", axis="tokens", method="greedy")[0]["mse"]
    assert abs(f - t) > 1e-3


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_gemm_error_estimator_matches_the_random_closed_form(pattern, axis):
    """Same-sign dY and nearly parallel W rows (X rows) make the in-block covariances large: an
    estimator or a formula that ignored them would be off by > 50 standard errors."""
    n, m = map(int, pattern.split(":"))
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(10, 10, generator=gen, dtype=torch.float64).abs()  # (T, F)
    other = torch.ones(10, 3, dtype=torch.float64) + 0.1 * torch.randn(10, 3, generator=gen, dtype=torch.float64)
    out = gemm_error(g, other, "random", pattern, axis, 1000, torch.Generator().manual_seed(1))
    expected = random_gemm_err_abs(g if axis == "features" else g.T, other, n, m)
    assert abs(out["err_abs"] - expected) <= 4 * out["err_abs_se"]
    assert out["err_abs_se"] < 0.02 * expected
    exact = g @ other if axis == "features" else g.T @ other
    assert out["norm2"] == pytest.approx(float((exact**2).sum()), rel=1e-12)
    assert out["err"] == pytest.approx(expected / out["norm2"], rel=0.1)


def test_random_gemm_errors_on_the_dump_match_the_closed_form(dump, steps):
    samples = 300
    rep = evaluate(
        [dump], EvalConfig(pattern="2:4", methods=("random",), axis="both", samples=samples, seed=5, mc_check=True)
    )
    assert len(rep.records) == 8
    for rec in rep.records:
        s = steps[int(rec.record[1:8])][rec.layer]
        g = s["grad"].reshape(-1, s["grad"].shape[-1])
        if rec.axis == "features":
            expected, exact = random_gemm_err_abs(g, s["weight"], 2, 4), g @ s["weight"]
        else:
            x = s["input"].reshape(-1, s["input"].shape[-1])
            expected, exact = random_gemm_err_abs(g.T, x, 2, 4), g.T @ x
        gemm = rec.gemm
        assert gemm["target"] == ("dX" if rec.axis == "features" else "dW")
        assert gemm["norm2"] == pytest.approx(float((exact.double() ** 2).sum()), rel=1e-5)
        # exact: the pairwise-inclusion closed form, all of it variance
        assert gemm["mse_abs"] == pytest.approx(expected, rel=1e-9)
        assert gemm["var_abs"] == pytest.approx(expected, rel=1e-9) and gemm["bias"] < 1e-12
        assert gemm["mse"] == pytest.approx(gemm["mse_abs"] / gemm["norm2"])
        # --mc-check: the Monte-Carlo estimate from the same draws as the angle agrees
        mc_se = gemm["mc_mse_se"]
        assert abs(gemm["mc_mse"] - gemm["mse"]) <= 4 * mc_se and mc_se < 0.1 * gemm["mse"], (rec.layer, rec.axis)
    for row in rep.layers:
        g = row["gemm"]
        assert g["mse"] == pytest.approx(g["bias"] + g["variance"]) and g["records"] == 2
        assert abs(g["mc_mse"] - g["mse"]) <= 4 * g["mc_mse_se"]


def test_greedy_gemm_error_is_the_deterministic_one(report, steps):
    for rec in report.records:
        if rec.method != "greedy":
            continue
        s = steps[int(rec.record[1:8])][rec.layer]
        g = s["grad"].reshape(-1, s["grad"].shape[-1])
        if rec.axis == "features":
            diff, exact = (prune(g, "greedy", "2:4", -1) - g) @ s["weight"], g @ s["weight"]
        else:
            x = s["input"].reshape(-1, s["input"].shape[-1])
            diff, exact = (prune(g, "greedy", "2:4", 0) - g).T @ x, g.T @ x
        want = float((diff.double() ** 2).sum() / (exact.double() ** 2).sum())
        assert rec.gemm["mse"] == pytest.approx(want, rel=1e-4)
        assert rec.gemm["bias"] == rec.gemm["mse"] and rec.gemm["variance"] == 0.0  # all of it bias


# --- config, methods, samples, seeds ------------------------------------------------------------


def test_methods_undefined_for_the_pattern_are_skipped_with_a_note_unless_named():
    names, notes = EvalConfig(pattern="3:8").resolve_methods()
    assert names == ["greedy", "random", "mvue"]
    assert any(n.startswith("approx-mvue skipped") for n in notes)
    assert any(n.startswith("mvue12 skipped") for n in notes)
    names, notes = EvalConfig(pattern="2:8").resolve_methods()
    assert names == ["greedy", "random", "mvue", "approx-mvue"] and len(notes) == 1
    with pytest.raises(PatternError, match="approx-mvue.*3:8"):
        EvalConfig(pattern="3:8", methods=("approx-mvue",))
    with pytest.raises(PatternError, match="mvue12.*2:8"):
        EvalConfig(pattern="2:8", methods=("mvue", "mvue12"))
    with pytest.raises(MethodError, match="unknown method 'foo'"):
        EvalConfig(methods=("foo",))
    with pytest.raises(PatternError, match="malformed"):
        EvalConfig(pattern="2-4")
    with pytest.raises(NmgradError, match="--samples -1"):
        EvalConfig(samples=-1)


def test_skipped_methods_are_noted_in_the_report(dump):
    rep = evaluate([dump], EvalConfig(pattern="3:8", samples=0))
    assert rep.methods == ["greedy", "random", "mvue"]
    assert {r["method"] for r in rep.summary} == {"greedy", "random", "mvue"}
    assert sum("skipped" in n for n in rep.notes) == 2


def test_samples_zero_gives_no_angle_but_the_exact_gemm_errors(dump, report):
    rep = evaluate([dump], EvalConfig(samples=0, methods=("mvue",)))
    assert all(r.metrics["angle"] is None for r in rep.records)
    assert all(r["angle"] is None for r in rep.summary)
    with_samples = {(r.layer, r.record): r.gemm for r in report.records if (r.axis, r.method) == ("features", "mvue")}
    assert all(r.gemm == with_samples[(r.layer, r.record)] for r in rep.records)  # exact: no draws involved


def test_results_are_reproducible_and_independent_of_the_selection(dump):
    cfg = EvalConfig(methods=("mvue", "random"), samples=4, seed=3)
    a = evaluate([dump], cfg)
    b = evaluate([dump], EvalConfig(methods=("random",), samples=4, seed=3, layers="2"))
    c = evaluate([dump], EvalConfig(methods=("mvue", "random"), samples=4, seed=4))
    key = lambda r: (r.layer, r.record, r.axis, r.method)  # noqa: E731
    amap = {key(r): r for r in a.records}
    assert {key(r) for r in b.records} < set(amap)
    for r in b.records:
        assert r.metrics == amap[key(r)].metrics and r.gemm == amap[key(r)].gemm
    assert [r.metrics["angle"] for r in evaluate([dump], cfg).records] == [r.metrics["angle"] for r in a.records]
    assert [r.metrics["angle"] for r in c.records] != [r.metrics["angle"] for r in a.records]


def test_config_and_everything_is_in_the_json(report):
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["config"] == {"pattern": "2:4", "methods": None, "axis": "both", "layers": None, "steps": None,
                           "every": 1, "max_records": None, "samples": 8, "seed": 0, "mc_check": False,
                           "device": "auto", "backend": "auto", "workers": 1, "threads": 0,
                           "memory_budget": "auto"}
    assert d["files"][0]["layers"] == {"0": "Linear", "2": "Linear"} and d["files"][0]["complete"]
    assert len(d["records"]) == 2 * 2 * 2 * len(METHODS) and d["errors"] == []


def test_mc_check_agrees_with_exact(dump):
    rep = evaluate([dump], EvalConfig(methods=("greedy", "mvue"), samples=200, mc_check=True, layers="2"))
    for r in rep.records:
        m = r.metrics
        if r.method == "greedy":
            assert m["mc_mse"] == pytest.approx(m["mse"], rel=1e-5) and m["mc_variance"] == pytest.approx(0, abs=1e-9)
        else:  # sample variance of 200 draws: within 25% of the exact one
            assert m["mc_variance"] == pytest.approx(m["variance"], rel=0.25)
    assert all("mc_mse" in r for r in rep.summary)


def test_progress_callback_counts_grad_records(dump):
    calls = []
    evaluate([dump], EvalConfig(methods=("greedy",), samples=0), progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 4, "") and calls[-1][:2] == (4, 4) and len(calls) == 5
    assert [c[2] for c in calls[1:]] == ["0", "0", "2", "2"]


# --- odd inputs ------------------------------------------------------------------------------------


def test_nan_inf_record_is_reported_and_the_rest_evaluated(tmp_path, steps):
    path = tmp_path / "bad.h5"
    with DumpWriter(path) as w:
        w.add_layer("ok", "Linear", -1, [0])
        w.add_layer("nan", "Linear", -1, [0])
        w.add_layer("zero", "Linear", -1, [0])
        bad = torch.randn(6, 8)
        bad[1, 2], bad[4, 0], bad[5, 5] = float("nan"), float("inf"), -float("inf")
        w.write("ok", "grad", 0, 0, steps[0]["2"]["grad"])
        w.write("nan", "grad", 0, 0, bad)
        w.write("nan", "grad", 1, 0, torch.randn(6, 8))
        w.write("zero", "grad", 0, 0, torch.zeros(5, 8))
        w.write("zero", "input", 0, 0, torch.randn(5, 3))
        w.write("zero", "weight", 0, 0, torch.randn(8, 3))
    rep = evaluate([path], EvalConfig(axis="both", samples=4))
    (err,) = rep.errors
    assert err.layer == "nan" and err.record == "s0000000c000"
    assert "layer nan" in err.message and "3 of 48" in err.message and "NaN/Inf" in err.message
    assert {r["layer"] for r in rep.layers} == {"ok", "nan", "zero"}
    assert all(r["records"] == 1 for r in rep.layers)  # the good record of "nan" still evaluated
    zero = rows(rep, layer="zero")
    assert all(r["mse"] == r["bias"] == r["variance"] == r["norm2"] == 0.0 for r in zero)
    assert all(r["angle"] is None for r in zero)  # no angle of a zero vector: not 0, not NaN
    assert all(r["gemm"]["mse"] == 0.0 and r["gemm"]["norm2"] == 0.0 for r in zero)
    assert any("all-zero" in n and "zero" in n for n in rep.notes)
    assert all(r.note == "all-zero gradient" for r in rep.records if r.layer == "zero")
    json.dumps(rep.to_dict(), allow_nan=False)  # no NaN anywhere


def test_conv2d_feature_axis_and_its_dx_gemm(tmp_path):
    path = make_conv_dump(tmp_path / "conv.h5")
    rep = evaluate([path], EvalConfig(methods=("mvue",), samples=4, axis="both"))
    conv = [r for r in rep.records if r.layer == "0"]
    lin = [r for r in rep.records if r.layer == "3"]
    # a hand-written dump without the conv attribute: dX errors, and a note that dW needs a recapture
    assert conv and all((r.gemm is not None) == (r.axis == "features") for r in conv)
    assert all(r.gemm is not None for r in lin)
    assert any("Conv2d" in n and "dW errors skipped" in n and "recapture" in n for n in rep.notes)
    assert all(r.gemm["variance"] > 0 and r.gemm["bias"] < 1e-12 for r in conv if r.gemm)
    assert conv[0].shape == (2 * 4 * 4, 8)  # tokens B*H*W, features C
    from nmgrad_cli.dump import DumpReader

    with DumpReader(path) as r:
        (rec,) = [x for x in r.records("grad") if x.layer.name == "0"]
        g = rec.load()
        assert torch.equal(as_matrix(g, rec.layer), g.permute(0, 2, 3, 1).reshape(-1, 8))
        ref = evaluate_tensor(g.movedim(1, -1), "mvue", "2:4", dim=-1, samples=0)
    assert conv[0].metrics["variance"] == pytest.approx(ref.variance, rel=1e-12)


def test_bf16_and_fp16_dumps(tmp_path, steps):
    for dtype in (torch.bfloat16, torch.float16):
        path = write_dump(tmp_path / f"{dtype}.h5", steps, dtype=dtype)
        rep = evaluate([path], EvalConfig(samples=4))
        by = {r["method"]: r for r in rep.summary}
        assert by["greedy"]["bias"] > 0 and by["greedy"]["variance"] == 0
        assert all(by[m]["bias"] < 1e-10 for m in UNBIASED)
        assert all(r.gemm is not None for r in rep.records)


def test_several_files_and_incomplete_note(tmp_path, dump, steps):
    part = tmp_path / "part.h5"
    with pytest.raises(RuntimeError), DumpWriter(part) as w:
        w.add_layer("2", "Linear", -1, [0, 1])
        w.write("2", "grad", 0, 0, steps[0]["2"]["grad"])
        raise RuntimeError("killed")
    rep = evaluate([dump, part, dump], EvalConfig(methods=("greedy",), samples=0))
    assert [f["path"] for f in rep.files] == [str(dump), str(part)]
    assert any("more than once" in n for n in rep.notes)
    assert {(r["file"], r["layer"]) for r in rep.layers} == {(str(dump), "0"), (str(dump), "2"), (str(part), "2")}
    assert any("incomplete" in n and "part.h5" in n for n in rep.notes)
    s = rep.summary[0]
    assert s["norm2"] == pytest.approx(sum(r["norm2"] for r in rep.layers))


def test_empty_dumps_and_no_matching_layer(tmp_path, dump):
    with DumpWriter(tmp_path / "empty.h5"):
        pass
    with DumpWriter(tmp_path / "nogr.h5") as w:
        w.add_layer("a", "Linear", -1, [0])
    with pytest.raises(DumpError, match="empty dump"):
        evaluate([tmp_path / "empty.h5"], EvalConfig())
    with pytest.raises(DumpError, match="no gradient records"):
        evaluate([tmp_path / "nogr.h5"], EvalConfig())
    with pytest.raises(NmgradError, match="no dump layer matches --layers 'enc.*': the names are 0, 2;"):
        evaluate([dump], EvalConfig(layers="enc.*"))
    with pytest.raises(NmgradError, match="no dump given"):
        evaluate([], EvalConfig())


# --- --fail-if thresholds ------------------------------------------------------------------------


def test_parse_threshold():
    t = parse_threshold(" mvue.bias > 1e-6 ")
    assert (t.method, t.metric, t.op, t.value) == ("mvue", "bias", ">", 1e-6)
    assert parse_threshold("*.angle<=30").method == "*"
    assert parse_threshold("approx-mvue.mse>=.5").value == 0.5
    for bad in ["mvue.bias", "mvue bias>1", "mvue.bias=>1", "mvue.bias>x", "mvue.bias>1e", ".bias>1", ""]:
        with pytest.raises(NmgradError, match="malformed.*e.g. --fail-if 'mvue.bias>1e-6'"):
            parse_threshold(bad)
    with pytest.raises(NmgradError, match="metric 'xx' is unknown"):
        parse_threshold("mvue.xx>1")
    with pytest.raises(NmgradError, match="unknown method 'foo'"):
        parse_threshold("foo.bias>1")
    with pytest.raises(NmgradError, match="not evaluated"):
        check_threshold_applies(parse_threshold("mvue12.bias>1"), EvalConfig(pattern="2:8"))
    with pytest.raises(NmgradError, match="--samples 0"):
        check_threshold_applies(parse_threshold("mvue.angle>1"), EvalConfig(samples=0))


def test_violations(report):
    assert violations(report, [parse_threshold("mvue.bias>1e-6"), parse_threshold("*.bias>1")]) == []
    fired = violations(report, [parse_threshold("greedy.bias>1e-6")])
    assert len(fired) == 2 and all(f.startswith("greedy.bias>1e-06 violated: greedy.bias = ") for f in fired)
    assert len(violations(report, [parse_threshold("*.variance>=0")])) == 2 * len(METHODS)
    assert len(violations(report, [parse_threshold("random.mse<0.999")])) == 0


def test_a_captured_cnn_gets_conv2d_dw_gemm_errors(tmp_path):
    """capture stores each conv site's stride/padding/dilation/groups, so evaluate's dW GEMM errors
    cover the Conv2d layers of a real capture (strided, padded, 1x1 shortcut) as well as the Linear."""
    from nmgrad_cli.capture import CaptureConfig, run_capture
    from nmgrad_cli.dump import DumpReader

    out = tmp_path / "cnn.h5"
    run_capture(CaptureConfig(model="cnn", steps=1, batch_size=4, with_inputs=True, out=str(out)), None, False)
    with DumpReader(out) as r:
        convs = {li.name: li.conv for li in r.layers.values() if li.module_type == "Conv2d"}
    assert convs and convs["layer2.shortcut.0"] == {"stride": [2, 2], "padding": [0, 0], "dilation": [1, 1],
                                                     "groups": 1}
    rep = evaluate([out], EvalConfig(methods=("mvue", "greedy"), samples=2, axis="tokens"))
    assert not any("dW errors skipped" in n for n in rep.notes)
    for r in rep.records:
        assert r.gemm is not None and r.gemm["target"] == "dW", r.layer
        if r.method == "mvue":
            assert r.gemm["bias"] < 1e-12 and r.gemm["variance"] > 0
        else:
            assert r.gemm["bias"] > 0 and r.gemm["variance"] == 0
    assert {r.layer for r in rep.records} >= set(convs)


def test_grouped_and_depthwise_convs_get_dw_gemm_errors(tmp_path):
    """A user's model with stock grouped convs (depthwise groups=8, pointwise groups=2): evaluate's
    dW GEMM errors cover them (per group), no layer is skipped."""
    from nmgrad_cli.capture import CaptureConfig, run_capture
    from nmgrad_cli.dump import DumpReader

    out = tmp_path / "mobile.h5"
    run_capture(CaptureConfig(model="tests.user_models:mobile_block", data="tests.user_models:images", steps=1,
                              batch_size=4, with_inputs=True, out=str(out)), None, False)
    with DumpReader(out) as r:
        groups = {li.name: li.conv["groups"] for li in r.layers.values() if li.module_type == "Conv2d"}
    assert groups == {"stem": 1, "depthwise": 8, "pointwise": 2}
    rep = evaluate([out], EvalConfig(methods=("mvue", "greedy"), samples=2, axis="tokens"))
    assert not any("skipped" in n for n in rep.notes), rep.notes
    seen = set()
    for r in rep.records:
        assert r.gemm is not None and r.gemm["target"] == "dW", r.layer
        seen.add(r.layer)
        if r.method == "mvue":
            assert r.gemm["bias"] < 1e-12 and r.gemm["variance"] > 0
        else:
            assert r.gemm["bias"] > 0 and r.gemm["variance"] == 0
    assert seen >= set(groups)
