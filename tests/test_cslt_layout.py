"""The plain-torch model of cuSPARSELt's compressed 2:4 layout (kernels/cslt_layout.py).

The model itself is unverified on a GPU (gpu_session.sh compares it with _cslt_compress); these
tests pin what it promises: a lossless, bijective encoding with the documented byte formula."""

from __future__ import annotations

import pytest
import torch

from nmgrad_cli.errors import NmgradError
from nmgrad_cli.kernels import cslt_layout
from nmgrad_cli.prune import prune


def _sparse(rows, cols, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return prune(x, "mvue", "2:4", dim=1, generator=g).to(dtype)


@pytest.mark.parametrize("shape", [(64, 32), (128, 128), (192, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip(shape, dtype):
    a = _sparse(*shape, dtype)
    buf = cslt_layout.pack(a)
    assert buf.shape == cslt_layout.buffer_shape(*shape) == (shape[0], shape[1] // 2 + shape[1] // 16)
    assert buf.dtype == dtype
    assert torch.equal(cslt_layout.unpack(buf, shape), a)


def test_every_metadata_nibble_is_written_exactly_once():
    rows, cols = 128, 96
    byte, shift = cslt_layout.meta_offsets(rows, cols)
    nibble_ids = (byte * 2 + shift // 4).reshape(-1)
    assert torch.equal(nibble_ids.sort().values, torch.arange(rows * cols // 4))


def test_byte_formula_by_hand():
    """A few blocks placed by the issue's formula, computed by hand (C = 64)."""
    byte, shift = cslt_layout.meta_offsets(128, 64)
    # (r, c) -> byte: r=0,c=0 -> 0; r=8 -> same byte, high nibble; r=1 -> 8; c=4 (q=1) -> 2; c=16 (q=4) -> 1
    assert (byte[0, 0], shift[0, 0]) == (0, 0)
    assert (byte[8, 0], shift[8, 0]) == (0, 4)
    assert byte[1, 0] == 8 and byte[0, 1] == 2 and byte[0, 4] == 1
    assert byte[16, 0] == 64 and byte[0, 8] == 256  # next 16-row group; next 32 columns
    assert byte[64, 0] == 8 * 64  # next 64-row stripe: 8 * C bytes on


def test_values_and_nibbles_of_one_block():
    a = torch.zeros(64, 32, dtype=torch.bfloat16)
    a[0, 1], a[0, 3] = 2.0, -3.0  # kept positions 1, 3 -> nibble 1 | 3 << 2 = 13
    a[8, 0], a[8, 2] = 5.0, 7.0  # row 8: same byte, high nibble 0 | 2 << 2 = 8
    values, meta = cslt_layout.split(cslt_layout.pack(a), (64, 32))
    assert values[0, :2].tolist() == [2.0, -3.0] and values[8, :2].tolist() == [5.0, 7.0]
    assert int(meta[0]) == 13 | (8 << 4)


@pytest.mark.parametrize(
    "block, kept",
    [((0, 0, 0, 0), (2, 3)), ((1, 0, 0, 0), (0, 2)), ((0, 1, 0, 0), (1, 2)), ((0, 0, 1, 0), (2, 3)),
     ((0, 0, 0, 1), (2, 3)), ((1, 1, 0, 0), (0, 1)), ((0, 1, 0, 1), (1, 3)), ((-0.0, 0, 4, 0), (2, 3))],
)
def test_blocks_with_fewer_than_two_nonzeros(block, kept):
    """The CUTLASS compressor's completion rule, and -0.0 is a zero."""
    nz = torch.tensor(block) != 0
    i0, i1 = cslt_layout.kept_indices(nz)
    assert (int(i0), int(i1)) == kept
    a = torch.zeros(64, 32, dtype=torch.float16)
    a[3, 4:8] = torch.tensor(block, dtype=torch.float16)
    assert torch.equal(cslt_layout.unpack(cslt_layout.pack(a), (64, 32)), a)


def test_kept_indices_are_the_nonzeros_and_ascending():
    """Every one of the 11 non-zero patterns with at most 2 non-zeros: i0 < i1, the non-zeros among them."""
    for bits in range(16):
        nz = torch.tensor([(bits >> j) & 1 for j in range(4)], dtype=torch.bool)
        if nz.sum() > 2:
            continue
        i0, i1 = (int(v) for v in cslt_layout.kept_indices(nz))
        assert i0 < i1
        assert set(torch.nonzero(nz).flatten().tolist()) <= {i0, i1}


@pytest.mark.parametrize("shape, match", [((32, 32), "multiple of 64"), ((64, 48), "multiple of 64 and columns of 32")])
def test_shapes_the_layout_cannot_take_are_refused(shape, match):
    with pytest.raises(NmgradError, match=match):
        cslt_layout.pack(torch.zeros(shape, dtype=torch.bfloat16))
    assert cslt_layout.layout_reason(*shape, torch.bfloat16) is not None


def test_float32_and_dense_operands_are_refused():
    with pytest.raises(NmgradError, match="float16/bfloat16"):
        cslt_layout.pack(torch.zeros(64, 32))
    with pytest.raises(NmgradError, match="2:4-sparse"):
        cslt_layout.pack(torch.ones(64, 32, dtype=torch.bfloat16))
    with pytest.raises(NmgradError, match="elements"):
        cslt_layout.unpack(torch.zeros(10, dtype=torch.bfloat16), (64, 32))
