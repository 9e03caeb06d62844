"""Probe (GPU only, not a test): what turns an already 2:4-pruned bf16 operand into cuSPARSELt's
compressed form fastest, and is each route exact? Run on a GPU machine after gpu_bench showed
``_cslt_compress`` costing ~8x the prune kernel (H200: 3.7 ms vs 0.47 ms on 16384 x 8192 bf16).

    PYTHONPATH=. python benchmarks/compress_probe.py

For each operand (dX's A = dY^ (T, F); dW's A = dY^^T (F, T)) it times, with gpu_bench's clock:
the prune kernel, ``clone`` (a copy), ``torch._cslt_compress`` and ``torch._sparse_semi_structured_tile``
(torch's tile kernel that writes cuSPARSELt's layout; it prunes by its own rule, so on an already 2:4
tensor it must keep every nonzero for the result to be exact), and the relative error of
``_cslt_sparse_mm`` on each compressed form against the dense product of the pruned operand.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import CudaClock, _operands, fmt, measure, ms, table  # noqa: E402

from nmgrad_cli.kernels import triton_prune  # noqa: E402


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def probe(a: torch.Tensor, b: torch.Tensor, reprune, clock) -> list[list]:
    """Rows for one pruned operand ``a`` (B = ``b``); ``reprune()`` runs the prune kernel again."""
    want = a.float() @ b.float()
    name = "x".join(map(str, a.shape))
    cases = [("prune kernel", reprune, None), ("clone", a.clone, None),
             ("_cslt_compress", lambda: torch._cslt_compress(a), lambda: torch._cslt_compress(a))]
    tile = getattr(torch, "_sparse_semi_structured_tile", None)
    if tile is not None:
        cases.append(("_sparse_semi_structured_tile", lambda: tile(a, "", False), lambda: tile(a, "", False)[0]))
        # the H200 run: _cslt_sparse_mm asserted a 2-D operand; _cslt_compress's output has the same
        # numel, so try the tile kernel's buffer in its shape (exact only if it kept every non-zero)
        shape = torch._cslt_compress(a).shape
        cases.append(("tile, viewed as _cslt_compress's shape", lambda: tile(a, "", False),
                      lambda: tile(a, "", False)[0].view(shape)))
    rows, base = [], None
    for label, fn, packed in cases:
        try:
            tm = measure(fn, clock)
        except RuntimeError as exc:
            rows.append([name, label, "error", str(exc).splitlines()[0][:70], "-", "-"])
            continue
        base = base or ms(tm)
        err = "-"
        if packed is not None:
            try:
                err = f"{rel_err(torch._cslt_sparse_mm(packed(), b), want):.1e}"
            except RuntimeError as exc:
                err = "mm error: " + str(exc).splitlines()[0][:50]
        rows.append([name, label, *fmt(tm), f"{ms(tm) / base:.2f}x", err])
    if tile is not None:
        try:
            out, ref = tile(a, "", False), torch._cslt_compress(a)
            same = bool(torch.equal(out[0].view(-1), ref.view(-1))) if out[0].numel() == ref.numel() else "sizes differ"
            print(f"{name}: _sparse_semi_structured_tile returns",
                  [tuple(o.shape) if isinstance(o, torch.Tensor) else o for o in out],
                  "; _cslt_compress gives", tuple(ref.shape), "; equal bytes:", same)
        except RuntimeError as exc:
            print(f"{name}: _sparse_semi_structured_tile failed: {str(exc).splitlines()[0]}")
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("compress_probe needs a CUDA GPU")
    dev = torch.device("cuda")
    clock = CudaClock()
    print(f"GPU {torch.cuda.get_device_name()}; torch {torch.__version__}")
    rows = []
    for t, width in ((16384, 4096), (16384, 8192)):
        dy, x, w = _operands(dev, t, width)
        for axis, b, seed in (("features", w, 1), ("tokens", x, 2)):
            a = triton_prune.prune_2d(dy, "mvue", "2:4", axis, seed=seed)
            rows += probe(a, b, functools.partial(triton_prune.prune_2d, dy, "mvue", "2:4", axis, seed=seed), clock)
    table("2:4 operand -> cuSPARSELt compressed form (bf16), ms; rel err of _cslt_sparse_mm vs dense on it",
          ["A shape", "what", "kernel ms", "call ms", "vs prune", "rel err"], rows)


if __name__ == "__main__":
    main()
