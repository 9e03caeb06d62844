"""The fused prune + cuSPARSELt-pack kernel (triton_prune.prune_pack_2d) under the Triton interpreter.

It must write exactly ``cslt_layout.pack`` of the pruned operand, for both backward operands (dX's
dY^ [T, F], blocks along features; dW's dY^^T [F, T], blocks along tokens, read through strides),
for every method with a kernel, on shapes that leave partial tiles. Whether the layout is
cuSPARSELt's is a separate question (gpu_session.sh's byte check)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_kernels import EXACT, as_dy, logical_matrix, safe_uniforms  # noqa: E402

from nmgrad_cli import prune  # noqa: E402
from nmgrad_cli.errors import NmgradError  # noqa: E402
from nmgrad_cli.kernels import cslt_layout, triton_prune  # noqa: E402
from nmgrad_cli.methods import METHODS  # noqa: E402

METHODS_24 = [m for m in METHODS if triton_prune.supports(m, 2, 4)]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _operand(method, axis, rows=64, length=96, dtype=torch.bfloat16, seed=0):
    """dY, its logical matrix's blocks and boundary-safe uniforms in prune()'s block order."""
    x = logical_matrix(rows, length, 4, seed)
    dy = as_dy(x, axis, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    u = safe_uniforms(x.view(-1, 4), method, 2, triton_prune.n_uniforms(method, 4), gen)
    return dy, u


@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("method", METHODS_24)
def test_fused_buffer_is_pack_of_the_pruned_operand(method, axis):
    dy, u = _operand(method, axis)
    buf = triton_prune.prune_pack_2d(dy, method, axis, uniforms=u, tile=(32, 16))
    pruned = triton_prune.prune_2d(dy, method, "2:4", axis, uniforms=u, tile=(32, 16))  # [T, F] or [F, T]
    assert buf.shape == cslt_layout.buffer_shape(*pruned.shape)
    assert torch.equal(buf.view(torch.int16), cslt_layout.pack(pruned).view(torch.int16))  # bit for bit
    # and the reference's pruning of the same draws (bit-exact where the kernel is, see test_triton_kernels)
    dim = 1 if axis == "features" else 0
    ref = prune(dy.float(), method, "2:4", dim=dim, uniforms=u, backend="reference").to(dy.dtype)
    ref = ref if axis == "features" else ref.t()
    got = cslt_layout.unpack(buf, tuple(pruned.shape))
    assert torch.equal(got != 0, ref != 0)
    if method in EXACT:
        assert torch.equal(cslt_layout.pack(ref.contiguous()).view(torch.int16), buf.view(torch.int16))
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=0.0)


@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_fused_philox_float32_in_half_out_and_tiles(axis):
    """float32 dY -> fp16 buffer, in-kernel Philox: the same buffer whatever the tile, and pack of prune_2d."""
    dy, _ = _operand("mvue", axis, rows=128, length=64, dtype=torch.float32, seed=3)
    a = triton_prune.prune_pack_2d(dy, "mvue", axis, seed=7, tile=(16, 8), out_dtype=torch.float16)
    b = triton_prune.prune_pack_2d(dy, "mvue", axis, seed=7, tile=(64, 32), out_dtype=torch.float16)
    pruned = triton_prune.prune_2d(dy, "mvue", "2:4", axis, seed=7, tile=(64, 32), out_dtype=torch.float16)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.equal(a.view(torch.int16), cslt_layout.pack(pruned).view(torch.int16))


def test_fused_refuses_what_the_layout_cannot_take():
    with pytest.raises(NmgradError, match="multiple of 64"):
        triton_prune.prune_pack_2d(torch.randn(48, 64, dtype=torch.bfloat16), "mvue", "features", seed=1)
    with pytest.raises(NmgradError, match="multiple of 64"):  # tokens: the operand is [F, T] = 48 x 64
        triton_prune.prune_pack_2d(torch.randn(64, 48, dtype=torch.bfloat16), "mvue", "tokens", seed=1)
    with pytest.raises(NmgradError, match="float16 or bfloat16"):
        triton_prune.prune_pack_2d(torch.randn(64, 64), "mvue", seed=1)
    with pytest.raises(NmgradError, match="multiple of 16"):
        triton_prune.prune_pack_2d(torch.randn(64, 64, dtype=torch.bfloat16), "mvue", seed=1, tile=(8, 16))
