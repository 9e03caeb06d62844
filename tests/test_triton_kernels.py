"""The Triton prune kernels compute the reference's function of the same uniforms.

They run on CPU tensors under the Triton interpreter. ``triton_prune`` loads its kernel file as a
separate module with the interpreter knob set and picks it per call from ``TRITON_INTERPRET``, so
the ``interpreter`` fixture only has to set the variable for the test (import order does not matter
and the rest of the suite, GPU tests included, keeps compiled kernels).

Tolerances: greedy, random and mvue12 are bit-exact. mvue and approx-mvue sum magnitudes in float32
where the CPU reference accumulates its cumsums in float64, so kept values may differ by a few float32
ulps (rtol 1e-6), and by one ulp of the output dtype for fp16/bf16. Decisions must be identical:
the test uniforms are kept 1e-4 away from every sampling boundary (see ``safe_uniforms``), far
beyond float32 rounding, so a decision flip means a wrong kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

pytest.importorskip("triton")

from nmgrad_cli import prune  # noqa: E402
from nmgrad_cli.errors import NmgradError  # noqa: E402
from nmgrad_cli.kernels import triton_prune  # noqa: E402
from nmgrad_cli.methods import METHODS  # noqa: E402
from nmgrad_cli.patterns import parse_pattern  # noqa: E402

CASES = [(meth, p) for meth in METHODS for p in ("1:2", "2:4") if triton_prune.supports(meth, *map(int, p.split(":")))]
EXACT = {"greedy", "random", "mvue12"}  # no float sums on the decision path: bit-exact
# mvue12 1:2 is mvue 1:2 (the same kernel code)
UNBIASED = [(meth, p) for meth, p in CASES if METHODS[meth].unbiased and (meth, p) != ("mvue12", "1:2")]
HALF_TOL = {torch.float16: dict(rtol=2**-10, atol=2**-24), torch.bfloat16: dict(rtol=2**-7, atol=0.0)}


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def logical_matrix(rows: int, length: int, m: int, seed: int) -> torch.Tensor:
    """X [rows, length] with blocks of m along the last dim, including every special case."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, length, generator=gen) * (0.05 + torch.rand(rows, length, generator=gen) ** 3)
    g = length // m
    blocks = x[:, : g * m].view(rows, g, m)
    blocks[0::7] = 0.0  # zero blocks
    blocks[1::7, :, 0] = 0.0  # a zero inside a block
    blocks[2::7, :, -1] *= 100.0  # a dominant element (|a4| > |a1|+|a2|+|a3| for most blocks)
    blocks[3::7] = 1.5  # ties
    blocks[4::7, :, 1:] = 0.0  # a single non-zero
    blocks[5::7, :, 0] = -0.0  # negative zeros
    blocks[5::7, :, 1] = -0.0
    return x


def as_dy(x: torch.Tensor, axis: str, dtype=torch.float32) -> torch.Tensor:
    """dY [T, F] whose blocks along ``axis`` are the rows' blocks of the logical matrix x."""
    return (x if axis == "features" else x.t()).contiguous().to(dtype)


def safe_uniforms(blocks: torch.Tensor, method: str, n: int, u_cols: int, gen, delta: float = 1e-4):
    """Uniforms (K, U) for which the reference's keep-mask does not change when any uniform moves
    by +-delta: no decision of these draws lies within float32 rounding of a boundary."""
    meth = METHODS[method]
    a = blocks.double()
    u = torch.rand(blocks.shape[0], u_cols, generator=gen, dtype=torch.float64)
    for _ in range(50):
        keep = meth.sample(a, n, u) != 0
        bad = torch.zeros(len(a), dtype=torch.bool)
        for j in range(u_cols):
            for step in (-delta, delta):
                moved = u.clone()
                moved[:, j] = (moved[:, j] + step).clamp(0.0, 1.0 - 1e-9)
                bad |= ((meth.sample(a, n, moved) != 0) != keep).any(-1)
        if not bad.any():
            return u.float()
        u[bad] = torch.rand(int(bad.sum()), u_cols, generator=gen, dtype=torch.float64)
    raise AssertionError("could not draw boundary-safe uniforms")


def reference(dy: torch.Tensor, method: str, pattern: str, axis: str, u: torch.Tensor) -> torch.Tensor:
    dim = 1 if axis == "features" else 0
    return prune(dy, method, pattern, dim=dim, uniforms=u, backend="reference")


def check_nm(out: torch.Tensor, n: int, m: int, dim: int) -> None:
    """At most n non-zeros in every block of m along ``dim`` (zero-padded)."""
    moved = out.movedim(dim, -1)
    moved = torch.nn.functional.pad(moved, (0, (-moved.shape[-1]) % m))
    assert ((moved.reshape(-1, m) != 0).sum(-1) <= n).all()


def run_case(method, pattern, axis, dtype, rows, length, tile, seed):
    pat = parse_pattern(pattern)
    x = logical_matrix(rows, length, pat.m, seed)
    dy = as_dy(x, axis, dtype)
    blocks = torch.nn.functional.pad(x.to(dtype).float(), (0, (-length) % pat.m)).view(-1, pat.m)
    u = safe_uniforms(blocks, method, pat.n, METHODS[method].n_uniforms(pat), torch.Generator().manual_seed(seed))
    ref = reference(dy, method, pattern, axis, u)
    out = triton_prune.prune_2d(dy, method, pattern, axis, uniforms=u, tile=tile)
    if axis == "tokens":
        assert out.shape == (dy.shape[1], dy.shape[0])  # dY^T, written by the kernel
        out = out.t()
    assert out.dtype == dtype and out.shape == dy.shape
    assert torch.equal(out != 0, ref != 0), "a keep decision differs from the reference"
    if method in EXACT:
        assert torch.equal(out, ref)
    elif dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0.0)
    else:
        torch.testing.assert_close(out.float(), ref.float(), **HALF_TOL[dtype])
    check_nm(out, pat.n, pat.m, 1 if axis == "features" else 0)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("method, pattern", CASES)
def test_kernel_equals_reference_fp32(method, pattern, axis):
    # odd sizes: 45 rows and a blocked length of 102 (not a multiple of 4: the last block is padded)
    run_case(method, pattern, axis, torch.float32, rows=45, length=102, tile=(64, 32), seed=11)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("method, pattern", [("mvue", "2:4"), ("approx-mvue", "2:4"), ("greedy", "2:4"), ("mvue", "1:2")])  # noqa: E501
def test_kernel_equals_reference_half(method, pattern, axis, dtype):
    run_case(method, pattern, axis, dtype, rows=21, length=70, tile=(32, 32), seed=5)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_many_small_tiles(axis):
    """Tile edges in both dims, partial tiles and a padded last block: 33 x 23, tiles of 8 x 2 blocks."""
    run_case("mvue", "2:4", axis, torch.float32, rows=33, length=23, tile=(8, 2), seed=3)
    run_case("approx-mvue", "2:4", axis, torch.bfloat16, rows=33, length=23, tile=(8, 2), seed=4)


@pytest.mark.usefixtures("interpreter")
def test_dominant_element_kept_exactly():
    """|a4| > |a1|+|a2|+|a3|: mvue keeps a4 unchanged and one other at sign(a_i) R, w.p. |a_i|/R."""
    a = torch.tensor([[0.5, -1.0, 0.5, 10.0]] * 64)
    u = torch.linspace(0.0, 0.99, 64)[:, None]
    out = triton_prune.prune_2d(a, "mvue", "2:4", uniforms=u)
    assert torch.equal(out[:, 3], torch.full((64,), 10.0))
    r = 2.0
    kept = out[:, :3]
    assert ((kept != 0).sum(-1) == 1).all()
    assert torch.equal(kept[kept != 0].abs(), torch.full((64,), r))
    # p = (0.25, 0.5, 0.25, 1), C = (0.25, 0.75, 1, 2): u < 0.25 keeps a1, u in [0.25, 0.75) keeps a2
    assert (kept[:, 0] != 0).sum() == (u[:, 0] < 0.25).sum()
    assert (kept[:, 1] != 0).sum() == ((u[:, 0] >= 0.25) & (u[:, 0] < 0.75)).sum()


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_transpose_out_option(axis):
    x = logical_matrix(12, 20, 4, seed=2)
    dy = as_dy(x, axis)
    a = triton_prune.prune_2d(dy, "greedy", "2:4", axis, transpose_out=False)
    b = triton_prune.prune_2d(dy, "greedy", "2:4", axis, transpose_out=True)
    assert a.shape == dy.shape and b.shape == dy.t().shape
    assert torch.equal(a, b.t())


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_float32_in_half_out(out_dtype):
    """float32 dY, half output: the float32 decisions, values rounded once (= casting the fp32 output)."""
    dy = as_dy(logical_matrix(32, 64, 4, seed=6), "features")
    full = triton_prune.prune_2d(dy, "mvue", "2:4", seed=4, tile=(32, 16))
    half = triton_prune.prune_2d(dy, "mvue", "2:4", seed=4, tile=(32, 16), out_dtype=out_dtype)
    assert half.dtype == out_dtype and torch.equal(half, full.to(out_dtype))
    c = triton_prune.prune_compress_2d(dy, "mvue", "2:4", seed=4, tile=(32, 16), out_dtype=out_dtype)
    assert torch.equal(c.pruned, half)


# ---- in-kernel Philox ---------------------------------------------------------------------------


@pytest.mark.usefixtures("interpreter")
def test_philox_reproducible_and_tile_independent():
    dy = as_dy(logical_matrix(40, 64, 4, seed=1), "features")
    a = triton_prune.prune_2d(dy, "mvue", "2:4", seed=7, tile=(64, 16))
    b = triton_prune.prune_2d(dy, "mvue", "2:4", seed=7, tile=(8, 4))  # same (seed, block) stream
    c = triton_prune.prune_2d(dy, "mvue", "2:4", seed=8, tile=(64, 16))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    check_nm(a, 2, 4, 1)
    check_nm(c, 2, 4, 1)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("method, pattern", UNBIASED)
def test_philox_unbiased_with_exact_variance(method, pattern):
    """D independent draws of a small X in one launch (D copies get distinct Philox streams).

    Per element: the mean is within 5 standard errors of X, sqrt(var / D) with var = a^2 (1/p - 1)
    the exact variance from ``marginals``; and the mean squared deviation from X is within 6
    standard errors of var, sqrt((mu4 - var^2) / D) with mu4 the exact fourth central moment."""
    pat = parse_pattern(pattern)
    copies = 1000
    x = logical_matrix(4, 16, pat.m, seed=21)
    x[0] = torch.tensor([0.3, -0.2, 0.1, 4.0] * 4)  # dominant element in every 2:4 block
    dy = x.repeat(copies, 1)  # (4 * D, 16)
    out = triton_prune.prune_2d(dy, method, pattern, "features", seed=123, tile=(1024, 8)).view(copies, 4, 16)
    check_nm(out.view(-1, 16), pat.n, pat.m, 1)
    out, xa = out.double(), x.double()
    p, v = (t.view(4, 16) for t in METHODS[method].marginals(xa.view(-1, pat.m), pat.n))
    torch.testing.assert_close(p * v, xa, rtol=1e-12, atol=1e-12)  # the reference law is unbiased
    var = p * v**2 - xa**2  # exact per-element variance
    mu4 = p * (v - xa) ** 4 + (1 - p) * xa**4  # an element is v w.p. p, else 0
    random_part = var > 1e-12
    assert random_part.sum() > 20
    z_mean = (out.mean(0) - xa) / (var / copies).sqrt()
    assert z_mean[random_part].abs().max() < 5.0
    assert torch.equal(out.mean(0)[~random_part], xa[~random_part])  # deterministic elements exact
    sq_err = ((out - xa) ** 2).mean(0)
    se = ((mu4 - var**2).clamp(min=0) / copies).sqrt()
    assert ((sq_err - var).abs() <= 6.0 * se + 1e-6 * var)[random_part].all()


@pytest.mark.usefixtures("interpreter")
def test_philox_tokens_axis_unbiased():
    """The tokens axis draws from the same law: mvue 2:4 on dY^T, D copies stacked along T."""
    copies = 1000
    x = logical_matrix(4, 16, 4, seed=9)  # rows = features, blocked length = tokens
    dy = x.t().repeat(copies, 1)  # (16 * D, 4): blocks along tokens never cross copies
    out = triton_prune.prune_2d(dy, "mvue", "2:4", "tokens", seed=5, tile=(4, 2048))  # (4, 16 * D)
    check_nm(out, 2, 4, 1)
    mean = out.double().view(4, copies, 16).mean(1)
    p, v = METHODS["mvue"].marginals(x.double().view(-1, 4), 2)
    var = (p * v**2 - (p * v) ** 2).view(4, 16)
    random_part = var > 1e-12
    z = (mean - x.double())[random_part] / (var[random_part] / copies).sqrt()
    assert random_part.sum() > 20 and z.abs().max() < 5.0


# ---- compressed format --------------------------------------------------------------------------


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("method", ["greedy", "mvue", "approx-mvue"])
def test_compressed_equals_torch_cutlass_converter(method, axis, dtype):
    """The kernel's values + metadata are exactly torch's pure-torch CUTLASS compression of the
    pruned tensor, and decompress back to it (with -0.0, zero blocks and single non-zeros)."""
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    x = logical_matrix(64, 128, 4, seed=17)  # sparse operand: 64 rows, 128 along the blocks
    dy = as_dy(x, axis, dtype)
    c = triton_prune.prune_compress_2d(dy, method, "2:4", axis, seed=3, tile=(64, 32))
    assert c.pruned.shape == (64, 128)
    check_nm(c.pruned, 2, 4, 1)
    assert torch.equal(c.pruned, triton_prune.prune_2d(dy, method, "2:4", axis, seed=3, tile=(64, 32)))
    packed, meta = conv.sparse_semi_structured_from_dense_cutlass(c.pruned)
    assert torch.equal(c.packed, packed)
    assert torch.equal(c.meta, meta)
    assert torch.equal(conv.sparse_semi_structured_to_dense_cutlass(c.packed, c.meta), c.pruned)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_compressed_across_tiles(axis):
    """Metadata placement across program tiles: 96 x 192 operand, tiles of 32 rows x 16 blocks."""
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    dy = as_dy(logical_matrix(96, 192, 4, seed=8), axis, torch.float16)
    c = triton_prune.prune_compress_2d(dy, "approx-mvue", "2:4", axis, seed=1, tile=(32, 16))
    packed, meta = conv.sparse_semi_structured_from_dense_cutlass(c.pruned)
    assert torch.equal(c.packed, packed) and torch.equal(c.meta, meta)


@pytest.mark.usefixtures("interpreter")
def test_negative_zero_is_not_kept_in_metadata():
    pos = torch.zeros(32, 64, dtype=torch.float16)
    pos[:, 1::4] = 1.0  # one non-zero per block; greedy also keeps a zero
    neg = pos.clone()
    neg[:, 0::4] = -0.0
    cp = triton_prune.prune_compress_2d(pos, "greedy", "2:4")
    cn = triton_prune.prune_compress_2d(neg, "greedy", "2:4")
    assert torch.equal(cp.meta, cn.meta)
    assert torch.equal(cn.packed.abs(), cp.packed)


@pytest.mark.usefixtures("interpreter")
def test_compress_rejects_unaligned_shapes():
    with pytest.raises(NmgradError, match="multiple of 32"):
        triton_prune.prune_compress_2d(torch.randn(30, 64, dtype=torch.float16), "mvue")
    with pytest.raises(NmgradError, match="float16 or bfloat16"):
        triton_prune.prune_compress_2d(torch.randn(32, 64), "mvue")


# ---- dispatch and errors ------------------------------------------------------------------------


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("method, pattern", [("mvue", "2:4"), ("random", "1:2"), ("approx-mvue", "2:4")])
def test_prune_triton_backend_equals_reference(method, pattern):
    """prune(..., backend='triton') on a 3-D tensor along a middle dim."""
    x = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(0))
    meth, pat = METHODS[method], parse_pattern(pattern)
    k = 3 * 7 * -(-10 // pat.m)
    blocks = torch.nn.functional.pad(x.movedim(1, -1), (0, (-10) % pat.m)).reshape(-1, pat.m)
    u = safe_uniforms(blocks, method, pat.n, meth.n_uniforms(pat), torch.Generator().manual_seed(1))
    assert u.shape[0] == k
    ref = prune(x, method, pattern, dim=1, uniforms=u, backend="reference")
    out = prune(x, method, pattern, dim=1, uniforms=u, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0.0)
    out64 = prune(x.double(), method, pattern, dim=1, uniforms=u.double(), backend="triton")  # reference
    assert out64.dtype == torch.float64


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NmgradError, match="TRITON_INTERPRET=1"):
        triton_prune.prune_2d(torch.randn(8, 8), "mvue")


@pytest.mark.usefixtures("interpreter")
def test_bad_arguments():
    dy = torch.randn(8, 8)
    with pytest.raises(NmgradError, match="no Triton kernel"):
        triton_prune.prune_2d(dy, "mvue", "2:8")
    with pytest.raises(NmgradError, match="uniforms must have shape"):
        triton_prune.prune_2d(dy, "mvue", "2:4", uniforms=torch.rand(3, 1))
    with pytest.raises(NmgradError, match="axis"):
        triton_prune.prune_2d(dy, "mvue", "2:4", axis="rows")
    with pytest.raises(NmgradError, match="2-D"):
        triton_prune.prune_2d(torch.randn(2, 8, 8), "mvue")
    assert not triton_prune.supports("mvue", 3, 8)


# ---- on a GPU: the compiled kernels ---------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("method, pattern", CASES)
def test_compiled_kernel_equals_reference_on_cuda(method, pattern, axis, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pat = parse_pattern(pattern)
    x = logical_matrix(301, 1026, pat.m, seed=4)
    blocks = torch.nn.functional.pad(x, (0, (-1026) % pat.m)).view(-1, pat.m)
    u = safe_uniforms(blocks, method, pat.n, METHODS[method].n_uniforms(pat), torch.Generator().manual_seed(2))
    dy = as_dy(x, axis).cuda()
    ref = reference(dy.cpu(), method, pattern, axis, u)
    out = triton_prune.prune_2d(dy, method, pattern, axis, uniforms=u.cuda()).cpu()
    out = out.t() if axis == "tokens" else out
    assert torch.equal(out != 0, ref != 0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0.0)
