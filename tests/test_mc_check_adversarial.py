"""``nmgrad evaluate --mc-check`` agrees with the exact metrics on adversarial blocks, every method.

The exact metrics come from the marginals in float64; the Monte-Carlo ones from float32 draws. A
backend whose draws do not follow its marginals (e.g. approx-mvue's cancellation on a dominant
block, or zeros from an overflowing sum) shows up as a Monte-Carlo bias far above the exact one.
Bounds (all relative to ||g||^2, S draws): E[mc_bias] = bias + variance / S, and an unbiased
method's mc_bias is a scaled chi-square with mean variance / S, so it stays below bias + 12
variance / S (plus float32 rounding); the sample variance is within 6 sd, sd = sqrt(2 / (S - 1))
of the variance (many independent blocks per record), plus 1e-6 for events too rare for S draws.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _cli import invoke

from nmgrad_cli.dump import DumpWriter
from nmgrad_cli.methods import is_defined, method_names

ROWS = 16  # blocks per record: independent draws of the same kind of block
KINDS = {
    "dominant": [3e7, 1.0, -1.0, 1.0, 1.0, 1.0, 3e7, 1.0],  # one element ~2^24 x the rest
    "huge": [1e38, -1e38, 1e38, 1e38, 1e38, -1e38, 5e37, 1e38],  # block sums past float32's max
    "tiny": [1e-40, 2e-40, -3e-40, 4e-40, 1e-44, 1e-40, 0.0, 5e-41],  # subnormals
    "ties": [1.5, 1.5, 1.5, 1.5, -2.0, 2.0, 2.0, -2.0],
    "zeros": [0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, -1.0],  # a zero block, at most N non-zeros
}
SAMPLES = 200


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    path = tmp_path_factory.mktemp("adv") / "adv.h5"
    with DumpWriter(path, run={"model": "adversarial", "seed": 0}) as w:
        w.add_layer("adv", "Linear", feature_axis=-1, token_axes=[0])
        for step, block in enumerate(KINDS.values()):
            w.write("adv", "grad", step, 0, torch.tensor([block] * ROWS, dtype=torch.float32))
            w.step_done(step)
    return path


@pytest.mark.parametrize("pattern", ["2:4", "1:2"])
def test_mc_check_agrees_with_exact_metrics_on_adversarial_blocks(dump, tmp_path, pattern):
    out = tmp_path / "eval.json"
    result = invoke("evaluate", dump, "--pattern", pattern, "--samples", SAMPLES, "--mc-check", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    kinds = list(KINDS)
    seen = set()
    for rec in report["records"]:
        m, kind = rec["metrics"], kinds[rec["step"]]
        seen.add((rec["method"], kind))
        where = f"{rec['method']} {pattern} on {kind}"
        bias, var = m["bias"], m["variance"]
        assert math.isfinite(m["mc_bias"]) and math.isfinite(m["mc_variance"]), where
        assert m["mc_bias"] >= bias * (1 - 1e-5) - 1e-9, where
        assert m["mc_bias"] <= bias * (1 + 1e-5) + 12 * var / SAMPLES + 1e-9, where
        assert abs(m["mc_variance"] - var) <= 6 * math.sqrt(2 / (SAMPLES - 1)) * var + 1e-6, where
    expected = {(name, kind) for name in method_names() if is_defined(name, pattern) for kind in kinds}
    assert seen == expected
