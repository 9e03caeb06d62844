"""--memory-budget: records over the budget are read and evaluated in pieces (nmgrad_cli.evaluate.chunked),
with the results of the record evaluated whole; a budget that cannot hold one row is refused up front."""

from __future__ import annotations

import math

import pytest
import torch
from _cli import assert_user_error, invoke
from torch import nn

from nmgrad_cli.dump import DumpReader, DumpWriter
from nmgrad_cli.errors import NmgradError
from nmgrad_cli.evaluate import EvalConfig, evaluate
from nmgrad_cli.evaluate import chunked as chunked_mod
from nmgrad_cli.evaluate.chunked import pieces


def _dump(path, nan: bool = False, dtype=torch.float32):
    """A grouped Conv2d (padding 1, stride 1) and a Linear on (3, 10, 6) tokens, their real dY, inputs and
    weights; F = 6 is not a multiple of 4 (padded blocks). ``nan``: one more record with a NaN."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    lin = nn.Linear(5, 6)
    x, xl = torch.randn(2, 4, 5, 5), torch.randn(3, 10, 5)
    outs = {}
    for name, mod, inp in (("conv", conv, x), ("lin", lin, xl)):
        y = mod(inp)
        y.retain_grad()
        (y.square() * torch.randn_like(y).exp()).sum().backward()
        outs[name] = (y.grad, inp, mod.weight.detach())
    with DumpWriter(path) as w:
        w.add_layer("conv", "Conv2d", 1, [0, 2, 3], tuple(conv.weight.shape),
                    conv={"stride": 1, "padding": 1, "dilation": 1, "groups": 2})
        w.add_layer("lin", "Linear", -1, [0, 1], tuple(lin.weight.shape))
        for name, (dy, inp, weight) in outs.items():
            w.write(name, "grad", 0, 0, dy.to(dtype))
            w.write(name, "input", 0, 0, inp.to(dtype))
            w.write(name, "weight", 0, 0, weight.to(dtype))
        if nan:
            bad = outs["lin"][0].clone()
            bad[1, 2, 3] = float("nan")
            w.write("lin", "grad", 1, 0, bad.to(dtype))
    return path


def _close(a, b, path="", f32: bool = False) -> None:
    """Equal structures, floats to 1e-12 (float64 sums in another order), all else exactly; with ``f32``
    the Monte-Carlo GEMM cross-check (products of float32 records in float32, as the whole record's)
    to float32 rounding."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", f32)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", f32)
    elif isinstance(a, float) and isinstance(b, float):
        tol = 1e-5 if f32 and ".gemm.mc_mse" in path else 1e-12
        assert math.isclose(a, b, rel_tol=tol, abs_tol=1e-12), (path, a, b)  # abs: a 0 vs 1e-14 se
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pieces_give_the_whole_records_results(tmp_path, monkeypatch, dtype):
    """Every method, both axes, --mc-check (Monte-Carlo moments and GEMM error) and the angles: a budget
    that cuts both records into pieces (rows across a token dim, columns, a conv group boundary) gives the
    report of the whole records, to float64 rounding; the draws are the same draws (a different stream
    would move the angles by about their standard error, ~1e-2 relative)."""
    path = _dump(tmp_path / "d.h5", nan=True, dtype=dtype)
    base = dict(pattern="2:4", axis="both", samples=3, seed=7, mc_check=True)
    whole = evaluate([path], EvalConfig(**base, memory_budget=None))
    used = []
    real = chunked_mod.evaluate_pieces

    def spy(rec, axis, *a, **k):
        used.append((rec.layer.name, axis, len(pieces(rec, axis, a[2]))))
        return real(rec, axis, *a, **k)

    monkeypatch.setattr(chunked_mod, "evaluate_pieces", spy)
    cut = evaluate([path], EvalConfig(**base, memory_budget="8000"))
    assert {(layer, axis) for layer, axis, n in used if n > 2} == {
        ("conv", "features"), ("conv", "tokens"), ("lin", "features"), ("lin", "tokens")
    }
    _close(cut.layers, whole.layers, f32=dtype == torch.float32)
    _close(cut.summary, whole.summary, f32=dtype == torch.float32)
    assert [e.message for e in cut.errors] == [e.message for e in whole.errors] and len(whole.errors) == 1
    assert all(r["angle"] is not None and r["gemm"] for r in whole.layers)
    # without --mc-check the angles come from keep-masks (metrics.REDUCED_ANGLES), in pieces as well
    quick = dict(pattern="2:4", axis="tokens", samples=3, seed=8)
    _close(evaluate([path], EvalConfig(**quick, memory_budget="8000")).layers,
           evaluate([path], EvalConfig(**quick, memory_budget=None)).layers)


def test_pieces_cover_the_record_in_block_order(tmp_path):
    """The selections of the pieces tile the (T, F) view in order: rows for features, columns for tokens."""
    path = _dump(tmp_path / "d.h5")
    with DumpReader(path) as r:
        for rec in r.records("grad"):
            g = rec.load()
            from nmgrad_cli.evaluate.record import as_matrix

            g2 = as_matrix(g, rec.layer)
            for floats in (1, 17, 64, 10**6):
                rows = torch.cat([as_matrix(rec.load(i), rec.layer) for i in pieces(rec, "features", floats)])
                cols = torch.cat([as_matrix(rec.load(i), rec.layer) for i in pieces(rec, "tokens", floats)], dim=1)
                assert torch.equal(rows, g2) and torch.equal(cols, g2)
                if floats < g2.shape[1]:
                    assert len(pieces(rec, "features", floats)) == g2.shape[0]  # one row each


def test_a_budget_that_cannot_hold_one_row_is_refused(tmp_path):
    path = _dump(tmp_path / "d.h5")
    with pytest.raises(NmgradError, match="raise it to at least"):
        evaluate([path], EvalConfig(memory_budget="1000"))
    assert_user_error(invoke("evaluate", path, "--memory-budget", "1kB"), "--memory-budget 1kB cannot hold")
    assert_user_error(invoke("evaluate", path, "--memory-budget", "lots"), "--memory-budget 'lots' is invalid")
    assert EvalConfig(memory_budget="2GiB").budget_bytes == 2 << 30
    assert EvalConfig(memory_budget="1.5GB").budget_bytes == 1_500_000_000
    auto = EvalConfig()  # auto: a bound on the CPU, none on a GPU
    assert auto.budget_for("cpu") == 256 << 20 and auto.budget_for("cuda") is None
    r = invoke("evaluate", path, "--memory-budget", "8000", "--samples", "2", "--methods", "mvue")
    assert r.exit_code == 0, r.output
