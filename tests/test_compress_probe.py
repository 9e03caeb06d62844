"""benchmarks/compress_probe.py's logic on the CPU, with cslt_layout.pack (and deliberately wrong
variants of it) standing in for torch._cslt_compress: the byte check counts mismatches in the right
region, and the probe recovers a mapping that differs from the model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from nmgrad_cli.kernels import cslt_layout

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compress_probe", ROOT / "benchmarks" / "compress_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)
CPU = torch.device("cpu")


def rows_reversed(a: torch.Tensor) -> torch.Tensor:
    """A wrong compressor: the model's buffer with the values region's rows in reverse order."""
    buf = cslt_layout.pack(a)
    rows, cols = a.shape
    vals, _ = cslt_layout.split(buf, (rows, cols))
    vals.copy_(vals.flip(0).clone())
    return buf


def meta_swapped(a: torch.Tensor) -> torch.Tensor:
    """A wrong compressor: the model's buffer with each metadata byte's nibbles swapped."""
    buf = cslt_layout.pack(a)
    _, meta = cslt_layout.split(buf, tuple(a.shape))
    meta.copy_((meta << 4) | (meta >> 4))
    return buf


def test_two_per_block_has_exactly_two_nonzeros_per_block():
    a, pair = probe.two_per_block(64, 32, torch.bfloat16, CPU)
    assert torch.equal((a.view(64, 8, 4) != 0).sum(-1), torch.full((64, 8), 2))
    assert pair.shape == (64, 8)


def test_check_counts_mismatches_by_region(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shapes = ((64, 64),)
    same = probe.check(cslt_layout.pack, CPU, shapes, fused=True)
    assert all(r["values_mismatch"] == 0 and r["meta_mismatch"] == 0 for r in same)
    assert [r["what"].split(" (")[0] for r in same] == ["pack", "pack", "fused prune+pack kernel"]
    wrong_meta = probe.check(meta_swapped, CPU, shapes, fused=False)
    assert wrong_meta[0]["values_mismatch"] == 0 and wrong_meta[0]["meta_mismatch"] > 0
    wrong_vals = probe.check(rows_reversed, CPU, shapes, fused=False)
    assert wrong_vals[0]["values_mismatch"] > 0 and wrong_vals[0]["meta_mismatch"] == 0


def test_probe_agrees_with_the_model_when_the_compressor_is_the_model():
    res = probe.probe_shape(cslt_layout.pack, 64, 64, CPU)
    assert res["values_match_model"] and res["meta_match_model"] and res["pair_codes_match_model"]
    known = [b for b in res["meta_bit_block"] if b >= 0]
    assert sorted(known) == sorted(list(range(64 * 16)) * 2)  # two changing bits per block, every block


@pytest.mark.parametrize("wrong, field", [(rows_reversed, "values_match_model"), (meta_swapped, "meta_match_model")])
def test_probe_recovers_a_different_mapping(wrong, field):
    res = probe.probe_shape(wrong, 64, 64, CPU)
    assert not res[field]
    if wrong is rows_reversed:  # slot j of row r holds row (R - 1 - r)'s value
        src = torch.tensor(res["value_src"]).view(64, 32)
        model = torch.tensor(probe.probe_shape(cslt_layout.pack, 64, 64, CPU)["value_src"]).view(64, 32)
        assert torch.equal(src, model.flip(0))
    else:
        assert res["values_match_model"]  # (equal nibbles: the pair codes of byte 0 cannot tell)
