"""Honest numbers: the angle's ± has the coverage it claims for any number of draws (checked by
simulation, bounds from the binomial standard error of a coverage), none where it cannot be
estimated, and one rounding rule for a bias at float64's noise floor (JSON, table, --fail-if,
compare)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import pytest
import torch
from _cli import invoke
from _dumps import make_mlp_dump

from nmgrad_cli import results
from nmgrad_cli.metrics import (
    COVERAGE,
    _angle_stats,
    _angles,
    angle_se,
    bias_floor,
    evaluate_tensor,
    exact_moments,
    gemm_moments,
    student_t_cdf,
    t_factor,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"


def coverage_bound(groups: int) -> float:
    """Three binomial standard errors of an observed coverage over ``groups`` independent intervals."""
    return 3 * math.sqrt(COVERAGE * (1 - COVERAGE) / groups)


def covered(draws: torch.Tensor, n: int, truth: float, se_of) -> float:
    """The fraction of the groups of ``n`` consecutive draws whose mean ± se_of(sd, n) holds ``truth``."""
    g = draws[: len(draws) // n * n].view(-1, n).to(torch.float64)
    means, sds = g.mean(1), g.std(1, unbiased=True)
    hits = [abs(m - truth) <= se_of(s, n) for m, s in zip(means.tolist(), sds.tolist())]
    return sum(hits) / len(hits)


def test_t_factor_is_the_student_t_quantile():
    # df = 1 (Cauchy) and df = 2 have closed-form quantiles; the series CDF is symmetric about 0
    assert t_factor(1) == pytest.approx(math.tan(math.pi * COVERAGE / 2), rel=1e-10)
    q = COVERAGE / 2  # F(t) - 1/2 at the quantile; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert t_factor(2) == pytest.approx(2 * q * math.sqrt(2) / math.sqrt(1 - 4 * q * q), rel=1e-10)
    assert COVERAGE == pytest.approx(0.682689, abs=1e-6)
    for df in (1, 2, 3, 4, 7, 30):
        assert student_t_cdf(0.0, df) == pytest.approx(0.5)
        assert student_t_cdf(1.3, df) + student_t_cdf(-1.3, df) == pytest.approx(1.0)
    assert t_factor(4) == pytest.approx(1.1416, abs=1e-4)  # the t table
    assert t_factor(2000) == pytest.approx(t_factor(2001), rel=1e-6) and 1 < t_factor(5000) < 1.0002
    assert math.isnan(angle_se(1.0, 1)) and angle_se(2.0, 5) == pytest.approx(t_factor(4) * 2 / math.sqrt(5))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_angle_se_covers_normal_draws(n):
    """mean ± angle_se holds the true mean in COVERAGE of 4000 groups (normal draws, fixed seed); the
    plain s/sqrt(n) of before covers 50% at n = 2, 61% at n = 3."""
    draws = torch.randn(4000 * n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3 + 25
    assert abs(covered(draws, n, 25.0, angle_se) - COVERAGE) < coverage_bound(4000)
    if n <= 3:
        assert covered(draws, n, 25.0, lambda s, k: s / math.sqrt(k)) < COVERAGE - 0.05


def test_angle_se_covers_real_angles():
    """The angles of mvue 2:4 draws on a real digits gradient (fc2, 64 x 256), through the statistics
    evaluate uses (_angle_stats): groups of 2 draws cover the mean of all 2400 draws in COVERAGE of
    the groups (that mean is 35x more precise than one group's); the old s/sqrt(2) covers about half.
    (On a slice dominated by a few blocks the angle takes few values and no 2-draw interval covers:
    docs/methods.md says so.)"""
    with h5py.File(SAMPLE) as f:
        g = torch.from_numpy(f["layers/fc2/grad/s0000100c000"][()])
    g64 = g.to(torch.float64).flatten()
    norm2 = float(g64 @ g64)
    angles: list[float] = []
    evaluate_tensor(g, "mvue", "2:4", samples=1200, generator=torch.Generator().manual_seed(3),
                    on_sample=lambda d: angles.extend(_angles(d.reshape(1, -1).to(torch.float64), g64, norm2)))
    truth = sum(angles) / len(angles)
    stats = [_angle_stats(angles[i : i + 2], 2) for i in range(0, len(angles), 2)]
    hit = sum(abs(s["angle"] - truth) <= s["angle_se"] for s in stats) / len(stats)
    assert abs(hit - COVERAGE) < coverage_bound(len(stats))
    old = sum(abs(s["angle"] - truth) <= s["angle_se"] / t_factor(1) for s in stats) / len(stats)
    assert old < COVERAGE - 0.1


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return make_mlp_dump(tmp_path_factory.mktemp("honest") / "mlp.h5", steps=2)


def test_one_sample_has_no_standard_error(dump):
    """One draw: no spread to estimate, so no ± (JSON null, the table prints the angle alone), never 0."""
    m = evaluate_tensor(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), "mvue", "2:4", samples=1)
    assert math.isfinite(m.angle) and m.to_dict()["angle_se"] is None
    r = invoke("evaluate", dump, "--samples", "1", "--methods", "mvue", "--json", "-")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert all(row["angle"] is not None and row["angle_se"] is None for row in d["summary"] + d["layers"])
    t = invoke("evaluate", dump, "--samples", "1", "--methods", "mvue")
    assert "±" not in t.stdout and "angle" in t.stdout
    two = invoke("evaluate", dump, "--samples", "2", "--methods", "mvue")
    assert "±" in two.stdout  # with two draws there is one


# --- one rounding rule ---------------------------------------------------------------------------


def test_rounding_noise_is_zero_and_a_real_tiny_bias_is_kept():
    """float64 rounding makes mvue's raw bias ~1e-33 relative: below the floor, so exactly 0, for dY
    and the GEMM; greedy dropping values 1e-8 of the rest has a real bias of ~1e-16, which is kept."""
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bias, _, norm2 = exact_moments(g, "mvue", "2:4")
    assert bias == 0.0
    assert gemm_moments(g, torch.randn(32, 8, dtype=torch.float64), "mvue", "2:4").bias == 0.0
    tiny = g.clone()
    tiny.view(-1, 4)[:, 2:] *= 1e-8  # greedy drops exactly these
    b, _, n2 = exact_moments(tiny, "greedy", "2:4")
    assert b > 1e3 * bias_floor(n2) and b / n2 == pytest.approx(float((tiny.view(-1, 4)[:, 2:] ** 2).sum()) / n2)


@pytest.fixture(scope="module")
def evals(dump, tmp_path_factory):
    d = tmp_path_factory.mktemp("honest_evals")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        js = d / f"{name}.json"
        r = invoke("evaluate", dump, "--samples", "0", "--methods", "mvue,greedy", "--axis", "both",
                   "--seed", seed, "--json", js)
        assert r.exit_code == 0, r.output
        out[name] = (js, r.stdout)
    return out


def test_json_bias_is_zero(evals):
    d = json.loads(evals["a"][0].read_text())
    for row in d["summary"] + d["layers"]:
        real = row["method"] == "greedy"
        assert (row["bias"] > 0) is real and (row["gemm"]["bias"] > 0) is real, row
    assert all(r["metrics"]["bias"] == 0 for r in d.get("records", []) if r.get("method") == "mvue")


def test_table_bias_is_zero(evals):
    head, shown = [], {}
    for line in evals["a"][1].splitlines():
        if "┃" in line:
            head = [c.strip() for c in line.split("┃")]
        elif "│" in line and head and "method" in head:
            row = [c.strip() for c in line.split("│")]
            shown[row[head.index("method")]] = row  # the last table: the summary
    cols = [i for i, h in enumerate(head) if "bias" in h]  # bias and dX|dW bias
    assert len(cols) == 2 and all(shown["mvue"][i] == "0" for i in cols)
    assert all(shown["greedy"][i] not in ("0", "-") for i in cols)


def test_fail_if_bias_above_zero_passes_for_mvue(dump):
    """Before: exit 1 with 'mvue.bias = 1.03e-33'."""
    ok = invoke("evaluate", dump, "--samples", "0", "--methods", "mvue,greedy", "--fail-if", "mvue.bias>0")
    assert ok.exit_code == 0, ok.stderr
    bad = invoke("evaluate", dump, "--samples", "0", "--methods", "mvue,greedy", "--fail-if", "greedy.bias>0")
    assert bad.exit_code == 1 and "greedy.bias" in bad.stderr


def test_compare_bias_is_zero(evals):
    """Before: compare printed mvue's bias as 1.24e-33."""
    rows, _ = results.compare(results.load(evals["a"][0]), results.load(evals["b"][0]))
    mvue = [r for r in rows if r["method"] == "mvue"]
    assert mvue and all(r[k] == 0 for r in mvue for k in ("bias_a", "bias_b", "bias_diff", "gemm_bias_a"))
    out = invoke("compare", evals["a"][0], evals["b"][0], "--metrics", "bias")
    assert out.exit_code == 0, out.output
    cells = [line for line in out.stdout.splitlines() if "mvue" in line]
    assert cells and all("e-3" not in c and "e-2" not in c for c in cells)
