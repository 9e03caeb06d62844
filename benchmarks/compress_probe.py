"""Check the cuSPARSELt layout model against ``torch._cslt_compress`` on a GPU, and recover the real
mapping where they differ (not a test; gpu_session.sh runs it first).

    PYTHONPATH=. python benchmarks/compress_probe.py --check [--out DIR]   # exit 3 when bytes differ
    PYTHONPATH=. python benchmarks/compress_probe.py --probe [--out DIR]

``--check``: for 128x128, 256x512 and 16384x8192 bf16 operands with exactly two non-zeros per block
(kept pairs drawn at random), compares ``cslt_layout.pack(a)`` and the fused Triton kernel's buffer
(``triton_prune.prune_pack_2d``, mvue 2:4 of a dense dY) with ``_cslt_compress`` byte for byte,
counting mismatches in the values region (bytes [0, R*C)) and the metadata region apart; also
blocks with fewer than two non-zeros (the completion rule). Writes ``cslt_check.json``.

``--probe``: recovers what ``_cslt_compress`` does on small fp16 operands, so the model can be
corrected on a CPU: the values region by putting each kept element's index into its bits (normal
fp16 codes 0x0400 + k, distinct and non-zero), and the metadata region by flipping the kept pair of
the blocks whose index has bit t set, one bit t at a time, and reading which metadata bits change;
plus the nibble each kept pair is written as. Writes ``cslt_mapping.json``: per shape the source
element (r * C + c) of every value slot, the block index of every changed metadata bit, the pair
codes, and whether each agrees with the model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

try:
    import nmgrad_cli  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmgrad_cli.kernels import cslt_layout, triton_prune  # noqa: E402

PAIRS = list(itertools.combinations(range(4), 2))  # the six kept pairs (i0 < i1)
CHECK_SHAPES = ((128, 128), (256, 512), (16384, 8192))
PROBE_SHAPES = ((64, 64), (128, 128), (128, 256), (256, 128))


def two_per_block(rows: int, cols: int, dtype, device, seed: int = 0, values: torch.Tensor | None = None):
    """(R, C) with exactly two non-zeros in every block of 4 columns (pair i drawn per block), and the
    pair index per block (R, C/4). ``values`` (R, C/2): the kept values in order (default: randn,
    kept away from zero)."""
    gen = torch.Generator(device).manual_seed(seed)
    pair = torch.randint(0, len(PAIRS), (rows, cols // 4), generator=gen, device=device)
    return place(pair, values if values is not None else _nonzero_values(rows, cols, dtype, gen, device), dtype), pair


def _nonzero_values(rows, cols, dtype, gen, device):
    v = torch.randn(rows, cols // 2, generator=gen, device=device)
    return (v + v.sign() * 0.25).to(dtype)


def place(pair: torch.Tensor, values: torch.Tensor, dtype) -> torch.Tensor:
    """The (R, C) operand keeping ``values`` (R, C/2, in order) at each block's ``pair`` (R, C/4)."""
    rows, blocks = pair.shape
    table = torch.tensor(PAIRS, device=pair.device)  # (6, 2)
    idx = table[pair]  # (R, C/4, 2)
    out = torch.zeros(rows, blocks, 4, dtype=dtype, device=pair.device)
    out.scatter_(-1, idx, values.view(rows, blocks, 2).to(dtype))
    return out.view(rows, blocks * 4)


def byte_diff(got: torch.Tensor, want: torch.Tensor, shape) -> dict:
    """Mismatching bytes of two compressed buffers, in the values region and the metadata region."""
    rows, cols = shape
    g, w = got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
    if g.numel() != w.numel():
        return {"same_size": False, "got_bytes": g.numel(), "want_bytes": w.numel()}
    diff = g != w
    split = rows * cols  # bytes of values (16-bit)
    return {"same_size": True, "values_mismatch": int(diff[:split].sum()), "values_bytes": split,
            "meta_mismatch": int(diff[split:].sum()), "meta_bytes": int(w.numel() - split),
            "want_shape": list(want.shape), "got_shape": list(got.shape)}


def check(compress, device, shapes=CHECK_SHAPES, fused: bool = True) -> list[dict]:
    """pack (and the fused kernel) against ``compress`` (``torch._cslt_compress`` on a GPU)."""
    out = []
    for rows, cols in shapes:
        a, _ = two_per_block(rows, cols, torch.bfloat16, device, seed=rows + cols)
        want = compress(a)
        out.append({"shape": [rows, cols], "what": "pack (two non-zeros per block)",
                    **byte_diff(cslt_layout.pack(a), want, (rows, cols))})
        sparse = a.clone()
        sparse.view(rows, -1, 4)[1::3, :, :] *= torch.tensor([1, 0, 1, 1], dtype=a.dtype, device=device)  # fewer
        sparse.view(rows, -1, 4)[2::5] = 0  # empty blocks
        out.append({"shape": [rows, cols], "what": "pack (blocks with fewer than 2 non-zeros)",
                    **byte_diff(cslt_layout.pack(sparse), compress(sparse), (rows, cols))})
        if fused:
            dy = torch.randn(rows, cols, device=device).to(torch.bfloat16)
            buf = triton_prune.prune_pack_2d(dy, "mvue", "features", seed=1)
            pruned = triton_prune.prune_2d(dy, "mvue", "2:4", "features", seed=1)
            out.append({"shape": [rows, cols], "what": "fused prune+pack kernel (mvue 2:4)",
                        **byte_diff(buf, compress(pruned), (rows, cols))})
    return out


def probe_shape(compress, rows: int, cols: int, device) -> dict:
    """What ``compress`` does with an fp16 (rows, cols) operand (see the module docstring)."""
    n_vals = rows * cols // 2
    if n_vals > 0x7C00 - 0x0400:
        raise ValueError(f"{rows}x{cols}: too many values to encode in distinct fp16 codes")
    gen = torch.Generator(device).manual_seed(rows * 7 + cols)
    pair = torch.randint(0, len(PAIRS), (rows, cols // 4), generator=gen, device=device)
    codes = (torch.arange(n_vals, device=device, dtype=torch.int32) + 0x0400).to(torch.int16)
    a = place(pair, codes.view(torch.float16).view(rows, cols // 2), torch.float16)
    # the source element of value k: its row and column in a
    src = torch.nonzero(a.view(torch.int16) != 0)  # row-major order = the order values were placed
    src_flat = (src[:, 0] * cols + src[:, 1]).cpu()
    buf = compress(a)
    got_codes = buf.reshape(-1)[:n_vals].view(torch.int16).to(torch.int32) - 0x0400
    valid = (got_codes >= 0) & (got_codes < n_vals)
    value_src = torch.where(valid, src_flat.to(device)[got_codes.clamp(0, n_vals - 1)], -1).cpu()
    model = cslt_layout.pack(a).reshape(-1)[:n_vals].view(torch.int16).to(torch.int32) - 0x0400
    model_src = src_flat[model.cpu().long()]

    # metadata: flip the pair (0, 1) <-> (2, 3) of the blocks whose index has bit t set
    n_blocks = rows * cols // 4
    ones = torch.ones(rows, cols // 2, dtype=torch.float16, device=device)
    base_pair = torch.zeros(rows, cols // 4, dtype=torch.long, device=device)  # PAIRS[0] = (0, 1)

    def meta_of(p: torch.Tensor) -> torch.Tensor:  # the metadata bytes of the operand keeping pairs p
        return compress(place(p, ones, torch.float16)).reshape(-1).view(torch.uint8)[rows * cols :]

    base = meta_of(base_pair)
    bits = torch.arange(8, device=device)
    block_of_bit = torch.zeros(base.numel() * 8, dtype=torch.long, device=device)
    changed_any = torch.zeros_like(block_of_bit, dtype=torch.bool)
    index = torch.arange(n_blocks, device=device).view(rows, cols // 4)
    for t in range(max(1, (n_blocks - 1).bit_length())):
        flipped = torch.where((index >> t) & 1 == 1, len(PAIRS) - 1, base_pair)  # PAIRS[5] = (2, 3)
        changed = (((meta_of(flipped) ^ base)[:, None] >> bits) & 1).bool().reshape(-1)
        block_of_bit |= changed.long() << t
        changed_any |= changed
    # bits that never changed: index 0's own bits change in no experiment; find them by flipping block 0 alone
    only0 = base_pair.clone()
    only0.view(-1)[0] = len(PAIRS) - 1
    zero_bits = (((meta_of(only0) ^ base)[:, None] >> bits) & 1).bool().reshape(-1)
    block_of_bit = torch.where(changed_any | zero_bits, block_of_bit, -1).cpu()
    byte, shift = cslt_layout.meta_offsets(rows, cols)
    model_bits = torch.full((base.numel() * 8,), -1, dtype=torch.long)
    flat_index = torch.arange(n_blocks).view(rows, cols // 4)
    for bit in (1, 3):  # (0, 1) -> (2, 3) changes nibble 0b0100 -> 0b1110: bits 1 and 3
        model_bits[(byte * 8 + shift + bit).reshape(-1)] = flat_index.reshape(-1)
    # the code each pair is written as: every block the same pair, block 0's byte
    pair_codes = {}
    for i, p in enumerate(PAIRS):
        meta = meta_of(torch.full_like(base_pair, i))
        pair_codes[f"{p[0]}{p[1]}"] = int(meta[0])
    model_codes = {f"{p[0]}{p[1]}": (p[0] | p[1] << 2) | ((p[0] | p[1] << 2) << 4) for p in PAIRS}
    return {
        "shape": [rows, cols],
        "buffer_shape": list(buf.shape), "model_buffer_shape": list(cslt_layout.buffer_shape(rows, cols)),
        "value_src": value_src.tolist(),
        "values_match_model": bool(torch.equal(value_src, model_src)),
        "meta_bit_block": block_of_bit.tolist(),
        "meta_match_model": bool(torch.equal(block_of_bit, model_bits)),
        "pair_codes_byte0": pair_codes, "model_pair_codes_byte0": model_codes,
        "pair_codes_match_model": pair_codes == model_codes,
    }


def out_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("OUT") or "runs/gpu_session")


def print_check(rows: list[dict]) -> bool:
    same = True
    print(f"{'shape':>12}  {'what':<44} {'values bytes differ':>20} {'metadata bytes differ':>22}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if not r["same_size"]:
            print(f"{shape:>12}  {r['what']:<44} sizes differ: {r['got_bytes']} vs {r['want_bytes']} bytes")
            same = False
            continue
        print(f"{shape:>12}  {r['what']:<44} {r['values_mismatch']:>11} of {r['values_bytes']:<8}"
              f"{r['meta_mismatch']:>11} of {r['meta_bytes']}")
        same &= r["values_mismatch"] == 0 and r["meta_mismatch"] == 0
    return same


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare pack / the fused kernel with _cslt_compress")
    ap.add_argument("--probe", action="store_true", help="recover _cslt_compress's mapping (small shapes)")
    ap.add_argument("--out", default=None, help="folder for cslt_check.json / cslt_mapping.json ($OUT)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not torch.backends.cusparselt.is_available():
        print("compress_probe needs a CUDA GPU and a torch with cuSPARSELt: nothing to do here")
        return 0
    dev = torch.device("cuda")
    folder = out_dir(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"GPU {torch.cuda.get_device_name()}; torch {torch.__version__}; cuSPARSELt "
          f"{torch.backends.cusparselt.version()}")
    rc = 0
    if args.check or not args.probe:
        t0 = time.perf_counter()
        rows = check(torch._cslt_compress, dev)
        same = print_check(rows)
        (folder / "cslt_check.json").write_text(json.dumps({"rows": rows, "match": same}, indent=1) + "\n")
        print(f"{'MATCH' if same else 'MISMATCH'}: cslt_layout.pack vs torch._cslt_compress "
              f"({time.perf_counter() - t0:.1f} s); wrote {folder / 'cslt_check.json'}")
        rc = 0 if same else 3
    if args.probe:
        res = [probe_shape(torch._cslt_compress, r, c, dev) for r, c in PROBE_SHAPES]
        for r in res:
            print(f"{'x'.join(map(str, r['shape'])):>9}: values {'match' if r['values_match_model'] else 'DIFFER'}, "
                  f"metadata bits {'match' if r['meta_match_model'] else 'DIFFER'}, pair codes "
                  f"{'match' if r['pair_codes_match_model'] else 'DIFFER'}; buffer {r['buffer_shape']}")
        (folder / "cslt_mapping.json").write_text(json.dumps(res) + "\n")
        print(f"wrote {folder / 'cslt_mapping.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
