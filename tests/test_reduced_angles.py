"""Evaluate's fast paths give the numbers of the plain ones.

- Reduced angles: without --mc-check, a draw's <g^, g> and ||g^||^2 come from its keep-mask and
  per-record float64 weights (``metrics.REDUCED_ANGLES``), not from the draw itself; the angles
  must be those of the draw-by-draw float64 path on the same generator, to float64 rounding.
- Method threads: a record's (axis, method) pairs run in threads, each on its own stream, so the
  report is the one of running them one after the other, number for number.
- The sort-free helpers (max/min network, the one-sum finiteness check) equal what they replace.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_prepared_draws import CASES, odd_tensor

from nmgrad_cli import METHODS, metrics
from nmgrad_cli.evaluate import EvalConfig, evaluate, pipeline, record, run, threads
from nmgrad_cli.methods.base import nonfinite_blocks, nonfinite_or_none, sort_descending
from nmgrad_cli.metrics import monte_carlo

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"


def both_paths(g, method, pattern, dim, samples=9, seed=11) -> tuple[dict, dict]:
    out = {}
    for reduced in (False, True):
        old = metrics.REDUCED_ANGLES
        metrics.REDUCED_ANGLES = reduced
        try:
            out[reduced] = monte_carlo(g, method, pattern, dim, samples, torch.Generator().manual_seed(seed),
                                       backend="reference")
        finally:
            metrics.REDUCED_ANGLES = old
    return out[False], out[True]


def tensors() -> dict[str, torch.Tensor]:
    """Padded odd shapes with zero blocks, ties, a dominant and a tiny element; huge and tiny
    magnitudes (squares and products past float32's range); float64."""
    g = torch.randn(37, 22, generator=torch.Generator().manual_seed(4))
    g[5:9] = 0.0  # all-zero blocks along both axes
    return {
        "odd": odd_tensor(3),
        "zero rows": g,
        "huge": odd_tensor(6) * 1e25,  # (v a) ~ 1e50: past float32, exact in float64
        "tiny": odd_tensor(7) * 1e-30,  # squares ~ 1e-60: float32 would flush them to 0
        "float64": odd_tensor(8, torch.float64),
    }


@pytest.mark.parametrize("method,pattern", CASES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_reduced_angles_are_the_draw_by_draw_angles(method, pattern, dim):
    """Every method, both axes: the same angles (mean and standard error) as the float64 path of
    the same draws, to float64 rounding; a randomised method's angles do vary between draws."""
    for name, g in tensors().items():
        slow, fast = both_paths(g, method, pattern, dim)
        assert fast["angle"] == pytest.approx(slow["angle"], rel=1e-12, abs=1e-10), name
        assert fast["angle_se"] == pytest.approx(slow["angle_se"], rel=1e-8, abs=1e-10), name
        if METHODS[method].n_uniforms(metrics.parse_pattern(pattern)) and name == "zero rows":
            assert fast["angle_se"] > 1e-3  # the draws differ: not one draw repeated (odd: 1e30 dominates, angle 0)


def test_deterministic_method_has_one_angle_and_no_spread():
    """greedy: every draw is the same, so one angle serves all and its standard error is 0 (the
    draw-by-draw path gives rounding noise ~1e-13 there)."""
    g = odd_tensor(9)
    slow, fast = both_paths(g, "greedy", "2:4", -1, samples=16)
    assert fast["angle_se"] == 0.0 and slow["angle_se"] < 1e-9
    assert fast["angle"] == pytest.approx(slow["angle"], rel=1e-13)


@pytest.mark.parametrize("method", ["mvue", "random"])
def test_kept_values_out_of_range_take_the_draw_by_draw_path(method):
    """float32 values near its max: the kept values a/p overflow to inf, so the reduced path hands
    over to the draw-by-draw one and both report the same (NaN) angle, never a finite wrong one."""
    g = torch.full((6, 8), 3e38)  # 2:4 keeps 2 of 4 equal values as 2 x 3e38 = inf
    slow, fast = both_paths(g, method, "2:4", -1)
    assert torch.isnan(torch.tensor(slow["angle"])) and torch.isnan(torch.tensor(fast["angle"]))


def test_mc_check_and_on_sample_keep_the_draws():
    """--mc-check needs the draws themselves: it runs the draw-by-draw path, and its angle is the
    reduced one to rounding."""
    g = odd_tensor(2)
    seen = []
    full = monte_carlo(g, "mvue", "2:4", 0, 6, torch.Generator().manual_seed(1), True, seen.append,
                       backend="reference")
    fast = monte_carlo(g, "mvue", "2:4", 0, 6, torch.Generator().manual_seed(1), backend="reference")
    assert len(seen) == 6 and fast["angle"] == pytest.approx(full["angle"], rel=1e-12)


def test_method_threads_give_the_sequential_report(monkeypatch):
    """The sample dump, every method, both axes, --mc-check: the report with the (axis, method)
    pairs in 3 threads equals the one with them in turn, number for number."""
    cfg = EvalConfig(pattern="2:4", axis="both", samples=5, seed=2, mc_check=True)
    reports = {}
    for n in (1, 3):
        monkeypatch.setattr(threads, "method_threads", lambda *a, n=n, **k: n)
        reports[n] = evaluate([SAMPLE], cfg).to_dict()
    assert reports[1]["records"] and reports[1] == reports[3]
    cfg = EvalConfig(pattern="2:4", samples=5, seed=2)  # the reduced angles as well
    for n in (1, 3):
        monkeypatch.setattr(threads, "method_threads", lambda *a, n=n, **k: n)
        reports[n] = evaluate([SAMPLE], cfg).to_dict()
    assert reports[1] == reports[3]


def test_pipelined_records_give_the_sequential_events(tmp_path, monkeypatch):
    """Records one ahead in a shared pool (``pipeline.PIPELINE``): the events of a dump mixing method-thread
    records, a NaN record, a record over the thread threshold (its own policy) and a record whose
    ||g||^2 overflows are those of one record after the other, in order; and the next record's jobs
    really start before the current record's results are taken."""
    from nmgrad_cli.dump import DumpWriter
    from nmgrad_cli.evaluate.events import RecordResult

    gen = torch.Generator().manual_seed(5)
    path = tmp_path / "mix.h5"
    with DumpWriter(path) as w:
        w.add_layer("a", "Linear", -1, [0])
        for step, (rows, scale) in enumerate([(16, 1), (16, float("nan")), (12, 1), (64, 1), (8, 1), (8, 1e160)]):
            g = torch.randn(rows, 12, dtype=torch.float64, generator=gen) * scale
            w.write("a", "grad", step, 0, g if step != 2 else g.float())
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "THREADS_MIN_NUMEL", 700)  # the 64 x 12 record: 2 torch threads, no method threads
    cfg = EvalConfig(pattern="2:4", axis="both", samples=3, seed=4)
    events, starts = {}, {}
    real = record.start_record
    for pipe in (False, True):
        monkeypatch.setattr(pipeline, "PIPELINE", pipe)
        seen, starts[pipe] = [], []

        def spy(*a, seen=seen, pipe=pipe, **k):
            starts[pipe].append(sum(isinstance(e, RecordResult) for e in seen))
            return real(*a, **k)

        monkeypatch.setattr(record, "start_record", spy)
        for e in run.iter_evaluate([path], cfg):
            seen.append(e)
        events[pipe] = seen
    assert events[True] == events[False]
    kinds = [type(e).__name__ for e in events[True]]
    assert kinds.count("ErrorEntry") == 2 and kinds.count("RecordResult") == 4 * 10
    per = 10  # (axis, method) results of a record
    assert starts[False] == [0, per, per, 2 * per, 3 * per, 4 * per]
    # one record ahead: the second starts before the first's results are out; the big record drains
    assert starts[True] == [0, 0, per, 2 * per, 3 * per, 3 * per]


def test_method_threads_policy():
    """Threads only where each record runs on one torch thread with reference draws on the CPU."""
    cores = max(1, __import__("os").cpu_count() or 1)
    assert run.method_threads(1000) == cores
    assert run.method_threads(1000, workers=cores) == 1
    assert run.method_threads(1000, threads=1) == 1  # --threads N: N torch threads, no more
    assert run.method_threads(1 << 23) == (1 if run.thread_policy(1 << 23) > 1 else cores)
    assert run.method_threads(1000, device="meta") == 1
    assert run.method_threads(1000, backend="fused") == 1  # torch.compile's tracing is not thread-safe


@pytest.mark.parametrize("m", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sort_descending_is_the_sort(m, dtype):
    x = torch.rand(4000, m, generator=torch.Generator().manual_seed(m), dtype=dtype)
    x[::3, 1] = x[::3, 0]  # ties
    x[::5] = 0.0
    x[::7, 0] = 0.0
    assert torch.equal(sort_descending(x), torch.sort(x, -1, descending=True).values)


def test_nonfinite_or_none_is_the_block_check():
    """None exactly when no block holds a NaN or an infinity, including finite values whose sum
    overflows (the quick sum is inf, the block check then clears them)."""
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert nonfinite_or_none(x) is None
    big = torch.full((50, 4), 3e38)
    assert not torch.isfinite(big.sum()) and nonfinite_or_none(big) is None
    for value in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[7, 2] = value
        assert torch.equal(nonfinite_or_none(y), nonfinite_blocks(y))
        assert nonfinite_or_none(y).sum() == 1


@pytest.mark.parametrize("m", [2, 4, 8])
@pytest.mark.parametrize("descending", [True, False])
def test_kept_by_rank_is_the_stable_sort(m, descending):
    """greedy's mask without a sort (rows of up to 8): the n first of a stable sort, ties to the
    lower index, zeros and whole tied rows included."""
    from nmgrad_cli.methods.base import kept_by_rank

    keys = torch.rand(3000, m, generator=torch.Generator().manual_seed(m)).abs()
    keys[::3, 1] = keys[::3, 0]
    keys[::5] = 0.0
    keys[::7, -1] = keys[::7, 0]
    order = torch.sort(keys, dim=-1, descending=descending, stable=True).indices
    for n in range(1, m):
        want = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, order[..., :n], True)
        assert torch.equal(kept_by_rank(keys, n, descending), want)


@pytest.mark.parametrize("m,n", [(2, 1), (4, 2), (8, 3)])
def test_systematic_keep_running_is_the_two_bound_mask(m, n):
    """mvue's one-ceil keep-mask equals systematic_keep on (prev, c) for the same uniforms,
    saturated (p = 1), zero and tiny probabilities and u = 0 included, with draws broadcast."""
    from nmgrad_cli.methods.base import systematic_bounds, systematic_keep, systematic_keep_running
    from nmgrad_cli.methods.mvue import water_fill

    mag = torch.rand(5000, m, generator=torch.Generator().manual_seed(m)) ** 4
    mag[::3, 0] = 50.0  # saturates
    mag[::5, 1:] = 0.0  # few non-zeros
    mag[::7, -1] = 1e-30
    prev, c = systematic_bounds(water_fill(mag, n), n)
    u = torch.rand(6, 5000, 1, generator=torch.Generator().manual_seed(0))
    u[0] = 0.0
    assert torch.equal(systematic_keep_running(c, u), systematic_keep(prev, c, u))
    assert (systematic_keep_running(c, u).sum(-1) <= n).all()


def test_proportional_keep_running_is_the_two_bound_mask():
    """approx-mvue's one-comparison mask equals proportional_keep on (prev, c): zeros (equal
    running sums), a dominant element, u = 0, and draws broadcast over the blocks."""
    from nmgrad_cli.methods.approx_mvue import proportional_bounds, proportional_keep, proportional_keep_running

    mag = torch.rand(5000, 4, generator=torch.Generator().manual_seed(1)) ** 3
    mag[::3, 1] = 0.0
    mag[::5, 2:] = 0.0
    mag[::7, 0] = 1e7
    prev, c = proportional_bounds(mag)
    u = torch.rand(6, 5000, 1, generator=torch.Generator().manual_seed(2))
    u[0] = 0.0
    got = proportional_keep_running(c, u)
    assert torch.equal(got, proportional_keep(prev, c, u)) and (got.sum(-1) == 1).all()


@pytest.mark.parametrize("m", [2, 3, 4, 8])
def test_rising_edges_is_the_first_true(m):
    """The integer-view edge mask equals below_i and not below_{i-1} on every monotone row (all
    False and all True included), on a broadcast view, and on a non-contiguous slice."""
    from nmgrad_cli.methods.base import rising_edges

    rows = torch.stack([torch.arange(m) >= j for j in range(m + 1)])  # (M + 1, M): every monotone row
    below = rows[torch.randint(0, m + 1, (3, 500), generator=torch.Generator().manual_seed(m))]  # (3, 500, M)
    want = below & ~torch.nn.functional.pad(below[..., :-1], (1, 0))
    assert torch.equal(rising_edges(below), want)
    assert torch.equal(rising_edges(below[:, ::2]), want[:, ::2])


@pytest.mark.parametrize("m,n", [(2, 1), (4, 2), (4, 3), (8, 3), (3, 2)])
def test_systematic_edges_are_the_ceil_mask(m, n):
    """mvue's keep-mask from the edges of C_i - u > k - 1 (k = 1..n) equals the one-ceil mask:
    saturated, zero and tiny probabilities, u = 0 and u just under 1, a NaN block."""
    from nmgrad_cli.methods.base import systematic_bounds, systematic_keep_running
    from nmgrad_cli.methods.mvue import water_fill

    mag = torch.rand(4000, m, generator=torch.Generator().manual_seed(m + n)) ** 4
    mag[::3, 0] = 50.0
    mag[::5, 1:] = 0.0
    mag[::7, -1] = 1e-30
    mag[::11] = 0.0
    _, c = systematic_bounds(water_fill(mag, n), n)
    c[13] = float("nan")
    u = torch.rand(5, 4000, 1, generator=torch.Generator().manual_seed(3))
    u[0], u[1] = 0.0, 1 - 2**-24
    assert torch.equal(systematic_keep_running(c, u, n), systematic_keep_running(c, u))


def test_approx_mvue_second_draw_table_is_the_running_sum():
    """approx-mvue's looked-up second-draw sums equal running_sum(where(keep, 0, mag)) bit for bit:
    no element drawn first (zero blocks; u just under 1), ties, a dominant element;
    batched draws take the table, a single draw sums."""
    from nmgrad_cli.methods.approx_mvue import SecondBounds
    from nmgrad_cli.methods.base import rising_edges, running_sum, scaled_magnitudes

    gen = torch.Generator().manual_seed(8)
    a = torch.randn(3000, 4, generator=gen)
    a[::3, 1] = 0.0
    a[::5] = 0.0
    a[::7, 2] = a[::7, 0]
    a[::9, 3] = 1e7
    mag = scaled_magnitudes(a)
    c = running_sum(mag)
    u = torch.rand(4, 3000, 1, generator=gen)
    u[0] = 1 - 2**-24
    below = u * c[..., -1:] < c
    assert (~below[0]).all(-1).sum() > 400  # nothing drawn first: the zero blocks
    keep = rising_edges(below)
    want = running_sum(torch.where(keep, 0.0, mag))
    second = SecondBounds(mag)
    assert torch.equal(second(below[0], keep[0]), want[0])  # the first, single draw: summed
    assert second.table is None
    assert torch.equal(second(below, keep), want) and second.table is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_of_others_is_the_two_running_sums(dtype):
    """sum_of_others column by column equals (prefix sums shifted) + (suffix sums shifted), the
    same adds in the same order, bit for bit: huge, subnormal and zero entries, M = 1 to 8."""
    from nmgrad_cli.methods.base import running_sum, sum_of_others

    gen = torch.Generator().manual_seed(4)
    big, tiny = torch.finfo(dtype).max / 8, torch.finfo(dtype).tiny / 64
    for m in (1, 2, 3, 4, 8):
        x = torch.rand(3000, m, generator=gen, dtype=dtype) ** 8 * 1e3
        x[::3, 0], x[::5], x[::7, -1] = big, 0.0, tiny
        zero = torch.zeros_like(x[..., :1])
        want = torch.cat([zero, running_sum(x)[..., :-1]], -1) + torch.cat(
            [running_sum(x.flip(-1))[..., :-1].flip(-1), zero], -1
        )
        assert torch.equal(sum_of_others(x), want)


def test_smallest_keys_with_one_comparison_per_pair():
    """The rank test with one comparison per pair equals the one with both (k_j <= k_i for j < i,
    k_j < k_i for j > i): ties, zeros, -0.0, every N from 0 to M."""
    from nmgrad_cli.methods.base import smallest_keys

    gen = torch.Generator().manual_seed(6)
    for m in range(1, 9):
        keys = torch.rand(2000, m, generator=gen)
        keys[::3, -1], keys[::5], keys[::7, 0] = keys[::3, 0], 0.0, -0.0
        cols = keys.unbind(-1)
        for n in range(m + 1):
            zero = torch.zeros(len(keys), dtype=torch.int)
            before = [sum((((cols[j] <= cols[i]) if j < i else (cols[j] < cols[i])).int() for j in range(m) if j != i),
                          zero) for i in range(m)]
            want = torch.stack([b < n for b in before], -1)
            assert torch.equal(smallest_keys(keys, n), want), (m, n)
