"""Prepared draws: the law of a record is computed once and every Monte-Carlo draw applies its
uniforms to it (``PruningMethod.prepare``/``draw``). The draws, and so evaluate's numbers, must
be bit for bit those of pruning each draw separately."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmgrad_cli import METHODS, metrics
from nmgrad_cli.evaluate import EvalConfig, evaluate
from nmgrad_cli.methods import is_defined
from nmgrad_cli.metrics import monte_carlo
from nmgrad_cli.patterns import parse_pattern, to_blocks
from nmgrad_cli.prune import draw_uniforms

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"
CASES = [(m, p) for m in METHODS for p in ("1:2", "2:4", "2:8") if is_defined(m, p)]


def odd_tensor(seed: int, dtype=torch.float32) -> torch.Tensor:
    """(13, 11): neither dim a multiple of 2, 4 or 8 (padded blocks), with exact zeros, a tie, a
    dominant element and a tiny one, so zero blocks, `few non-zeros` blocks and the clamps occur."""
    g = torch.randn(13, 11, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    g[0, :] = 0.0
    g[1, :8] = torch.tensor([3.0, 0, 0, 0, 1e-30, 0, 2.0, 0])
    g[2, :4] = torch.tensor([1.0, 1.0, -1.0, 1.0])
    g[3, :4] = torch.tensor([1e30, 1.0, 2.0, 3.0])
    return g.to(dtype)


@pytest.mark.parametrize("method,pattern", CASES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_prepared_draws_are_the_separate_draws(method, pattern, dim):
    """monte_carlo on the prepared path vs one prune() per draw (batch=False) and vs pruning the
    stacked copies (the previous batched path): the same draws, bit for bit, and the same numbers
    (exactly the stacked path's; the separate path sums draw by draw, equal to rounding)."""
    g = odd_tensor(3)
    seen: dict[str, list[torch.Tensor]] = {"sep": [], "stacked": [], "prepared": []}
    out = {}
    for key, batch, prepared in (("sep", False, True), ("stacked", True, False), ("prepared", True, True)):
        old = metrics.PREPARED_DRAWS
        metrics.PREPARED_DRAWS = prepared
        try:
            out[key] = monte_carlo(
                g, method, pattern, dim, 7, torch.Generator().manual_seed(11), True, seen[key].append, batch=batch,
                backend="reference",
            )
        finally:
            metrics.PREPARED_DRAWS = old
    assert len(seen["prepared"]) == 7
    for key in ("sep", "stacked"):
        for a, b in zip(seen[key], seen["prepared"], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bits, -0.0 and NaN included
    assert out["stacked"] == out["prepared"]  # same chunks: the sums are added in the same order
    assert out["sep"] == pytest.approx(out["prepared"], rel=1e-12, abs=0)  # one draw per sum: rounding
    if METHODS[method].n_uniforms(parse_pattern(pattern)):  # the draws do differ from one another
        assert any(not torch.equal(seen["prepared"][0], d) for d in seen["prepared"][1:])


@pytest.mark.parametrize("method,pattern", CASES)
def test_draw_of_prepared_is_sample(method, pattern):
    """The API: sample(a, n, u) == draw(prepare(a, n), u), and a stack of c uniforms drawn against
    one prepared state is c samples; float64 and a block with a NaN or an infinity included."""
    meth, pat = METHODS[method], parse_pattern(pattern)
    for dtype in (torch.float32, torch.float64):
        g = odd_tensor(5, dtype)
        g[4, 0], g[5, 1] = float("nan"), float("-inf")
        blocks, _ = to_blocks(g, pat.m, -1)
        gen = torch.Generator().manual_seed(2)
        u = torch.stack([draw_uniforms(len(blocks), meth, pat, "cpu", gen).to(dtype) for _ in range(3)])
        state = meth.prepare(blocks, pat.n)
        many = meth.draw(state, u)
        assert many.shape == (3, *blocks.shape)
        for i in range(3):
            one = meth.sample(blocks, pat.n, u[i])
            assert torch.equal(torch.nan_to_num(one, nan=7.0), torch.nan_to_num(many[i], nan=7.0))
            assert torch.equal(one.isnan(), many[i].isnan())
        bad = ~torch.isfinite(blocks).all(-1)
        assert bad.sum() >= 1 and many[:, bad].isnan().all() and not many[:, ~bad].isnan().any()


def test_evaluate_json_is_unchanged_on_the_sample_dump():
    """`nmgrad evaluate sample_data/mlp_digits.h5` (every method, both axes, a few draws): the
    report with prepared draws equals the one pruning stacked copies, number for number."""
    cfg = EvalConfig(pattern="2:4", axis="both", samples=4, seed=3, mc_check=True, backend="reference")
    old = metrics.PREPARED_DRAWS
    try:
        metrics.PREPARED_DRAWS = False
        before = evaluate([SAMPLE], cfg).to_dict()
        metrics.PREPARED_DRAWS = True
        after = evaluate([SAMPLE], cfg).to_dict()
    finally:
        metrics.PREPARED_DRAWS = old
    assert before["records"] and before == after
    assert any(r.get("angle") or r.get("metrics", {}).get("angle") for r in after["records"])


@pytest.mark.parametrize("m", [2, 4, 5, 8, 16])
def test_smallest_keys_is_the_sorted_rank(m):
    """random's sort-free rank: the same mask as the stable sort, ties (lower index first) included."""
    from nmgrad_cli.methods.base import kept_by_rank, smallest_keys

    keys = torch.rand(3, 500, m, generator=torch.Generator().manual_seed(m))
    keys[:, ::3, 1] = keys[:, ::3, 0]  # ties
    keys[:, ::5] = 0.5  # a whole row tied
    for n in range(1, m):
        mask = smallest_keys(keys, n)
        assert torch.equal(mask, kept_by_rank(keys, n, descending=False))
        assert (mask.sum(-1) == n).all()


def test_the_law_is_prepared_once_per_record(monkeypatch):
    """Several chunks of draws (DRAW_CHUNK small) prepare the record's law once, and the draws are
    still the separate ones; pruning the stacked copies (PREPARED_DRAWS off) prepares per chunk."""
    meth = METHODS["mvue"]
    calls = []
    real = type(meth).prepare
    monkeypatch.setattr(type(meth), "prepare", lambda self, a, n: calls.append(a.shape) or real(self, a, n))
    g = odd_tensor(8)
    monkeypatch.setattr(metrics, "DRAW_CHUNK", 3 * g.numel())  # chunks of 3 draws: 3 + 3 + 3 + 1
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for prepared in (True, False):
        monkeypatch.setattr(metrics, "PREPARED_DRAWS", prepared)
        calls.clear()
        monte_carlo(g, "mvue", "2:4", 0, 10, torch.Generator().manual_seed(4), on_sample=seen[prepared].append,
                    backend="reference")
        assert len(calls) == (1 if prepared else 4)
    assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False], strict=True))
