"""The Triton prune kernel compiles for sm80 and sm90 without a GPU, and its launch grid fits CUDA's limits.

Ahead-of-time compiles (Triton -> PTX -> cubin with the bundled ptxas) catch what the interpreter
accepts but the compiler rejects. CI (``.ci/run``) runs this file twice: with the installed (newest)
Triton, and again with Triton 3.6.0 first on ``PYTHONPATH``, the version the GPU machines have (it
caught ``tl.to_tensor``, which 3.6 does not export). Every variant is compiled at a small tile (the
code path does not depend on the tile, and a compile costs ~0.25 s instead of ~0.7 s), in a few
worker processes; the default tiles are compiled for a few variants.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from nmgrad_cli.errors import NmgradError
from nmgrad_cli.kernels import triton_prune

CUDA_GRID_LIMITS = ((1 << 31) - 1, 65535, 65535)


def _has_nvidia_backend() -> bool:
    triton = pytest.importorskip("triton")
    return "nvidia" in getattr(triton.backends, "backends", {})


def test_variants_cover_every_combination():
    variants = triton_prune.kernel_variants()
    assert len(set(variants)) == len(variants)
    # 10 (method, pattern) x 3 dtypes x 2 (Philox/uniforms) x 2 archs, plus the CUTLASS layout for
    # 5 methods at 2:4 x 2 half dtypes x 2 x 2 archs, plus the cuSPARSELt one at sm90 only
    assert len(variants) == 10 * 3 * 2 * 2 + 5 * 2 * 2 * 2 + 5 * 2 * 2
    assert {v.method for v in variants} == set(triton_prune._METHOD_CODES)
    assert {v.arch for v in variants} == {80, 90}
    assert all(v.pattern == (2, 4) and v.out_dtype != torch.float32 for v in variants if v.layout != "none")
    assert {v.arch for v in variants if v.layout == "cslt"} == {90}


def _compile_small(v: triton_prune.Variant) -> bytes:
    """A small tile: (4, 16), or (16, 16) for the cuSPARSELt layout (its metadata pairs rows r and r + 8)."""
    return triton_prune.compile_ahead(v, tile=(16, 16) if v.layout == "cslt" else (4, 16))


def test_every_variant_compiles_to_cubin():
    if not _has_nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend")
    variants = triton_prune.kernel_variants((80, 90))
    workers = max(1, min(4, len(os.sched_getaffinity(0))))
    failures = []
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker (no forked triton state)
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [(v, pool.submit(_compile_small, v)) for v in variants]
        for v, fut in futures:
            try:
                assert fut.result()[:4] == b"\x7fELF"  # a cubin is an ELF file
            except Exception as exc:  # collect every failing variant, not just the first
                failures.append(f"{v}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
    assert not failures, f"{len(failures)} of {len(variants)} variants fail to compile:\n" + "\n".join(failures)


@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize(
    "method, pattern, dtype, philox, layout",
    [
        ("mvue", (2, 4), torch.float32, True, "cutlass"),  # float32 dY -> bf16 operand (fp32="bf16")
        ("approx-mvue", (2, 4), torch.float32, False, "none"),
        ("random", (1, 2), torch.float16, True, "none"),
        ("mvue", (2, 4), torch.bfloat16, True, "cslt"),
    ],
)
def test_default_tiles_compile(method, pattern, dtype, philox, layout, axis):
    """The tiles the library launches by default (the register-heavy case)."""
    if not _has_nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend")
    out = torch.bfloat16 if layout != "none" else dtype
    v = triton_prune.Variant(method, pattern, dtype, out, philox, layout, 90)
    assert triton_prune.compile_ahead(v, tile=triton_prune._DEFAULT_TILE[axis])[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", [80, 90])
def test_small_seed_compiles(arch):
    """A seed below 2^31 reaches the kernel as i32 (seed=1 in the benchmarks): the Philox key still compiles."""
    if not _has_nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend")
    v = triton_prune.Variant("mvue", (2, 4), torch.bfloat16, torch.bfloat16, True, "none", arch)
    assert triton_prune.compile_ahead(v, tile=(4, 16), seed_type="i32")[:4] == b"\x7fELF"


@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("method", ["mvue", "approx-mvue", "mvue12"])
def test_fused_cslt_kernel_has_no_local_memory_spills(method, axis, tmp_path):
    """The fused prune + cuSPARSELt-pack kernel at the default tiles, sm90, Philox: its PTX uses no
    local memory (a spill or a local array would show as .local / ld.local / st.local)."""
    if not _has_nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend")
    v = triton_prune.Variant(method, (2, 4), torch.bfloat16, torch.bfloat16, True, "cslt", 90)
    ptx = triton_prune.compile_ahead(v, tile=triton_prune._DEFAULT_TILE[axis], asm="ptx")
    assert ".entry prune_kernel" in ptx
    assert ".local" not in ptx and "ld.local" not in ptx and "st.local" not in ptx
    # and register allocation (ptxas, where spills are decided) spills nothing
    report = _ptxas_report(ptx, tmp_path)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert not re.search(r"[1-9]\d* bytes (spill|stack)", report), report


def test_philox_calls_are_shared_and_mvue_divides_twice_per_block():
    """One Philox4x32 call (10 rounds, 2 mul.hi each) serves 4 / U blocks: mvue (U = 1) makes a
    quarter of random 2:4's calls (U = 4, one per block), approx-mvue (U = 2) half; the mvue 2:4
    closed form has two IEEE divisions per block (1 / max|a| and 1 / lam), no sort; mvue12 two per pair."""
    if not _has_nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend")
    tile, warps = (16, 64), triton_prune.DEFAULT_WARPS
    ptx = {m: triton_prune.compile_ahead(triton_prune.Variant(m, (2, 4), torch.bfloat16, torch.bfloat16, True,
                                                             "none", 90), tile=tile, asm="ptx")
           for m in ("mvue", "approx-mvue", "mvue12", "random")}
    # mul.hi.u32 is almost all Philox (2 per round; Triton 3.6 also uses a few for index arithmetic)
    mulhi = {m: text.count("mul.hi.u32") for m, text in ptx.items()}
    assert mulhi["random"] >= 40  # four calls per thread (four blocks, one call each)
    assert mulhi["mvue"] * 3.5 <= mulhi["random"] and mulhi["approx-mvue"] * 1.8 <= mulhi["random"]
    blocks_per_thread = tile[0] * tile[1] // (32 * warps)
    assert ptx["mvue"].count("div.rn.f32") == 2 * blocks_per_thread
    assert mulhi["mvue12"] * 1.8 <= mulhi["random"]  # U = 2: one call per two blocks
    assert ptx["mvue12"].count("div.rn.f32") == 4 * blocks_per_thread  # two per pair (1 / max, 1 / lam)


def _ptxas_report(ptx: str, tmp_path) -> str:
    """``ptxas -v`` (Triton's bundled one) on the PTX: its resource report (registers, spills)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except ImportError:
        ptxas = triton.knobs.nvidia.ptxas.path
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    done = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", str(tmp_path / "k.cubin"), str(src)],
                          capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


# ---- launch grid ----------------------------------------------------------------------------------


def tiles_of(grid: tuple[int, ...], rows: int, groups: int, tile: tuple[int, int]) -> set[tuple[int, int]]:
    """(row tile, block tile) of every program, decoded as the kernel does (row tiles fastest)."""
    n_r = -(-rows // tile[0])
    return {(p % n_r, p // n_r) for p in range(grid[0])}


@pytest.mark.parametrize(
    "rows, groups, tile",
    [
        (4096, 64 * 65536, (64, 16)),  # tokens axis, T = 16.7M tokens: 262,144 block tiles
        (8192, (1 << 26) // 4, (64, 16)),  # T = 2^26 tokens
        (1 << 24, 2048, (16, 64)),  # features axis, T = 16.7M rows
        (45, 26, (64, 32)),
    ],
)
def test_launch_grid_fits_cuda_limits(rows, groups, tile):
    grid = triton_prune.launch_grid(rows, groups, tile)
    assert len(grid) <= 3
    assert all(0 < g <= limit for g, limit in zip(grid, CUDA_GRID_LIMITS))
    n_r, n_g = -(-rows // tile[0]), -(-groups // tile[1])
    assert grid[0] == n_r * n_g  # one program per tile, no more
    if grid[0] <= 1 << 16:  # decode small grids fully: every tile exactly once
        assert tiles_of(grid, rows, groups, tile) == {(i, j) for i in range(n_r) for j in range(n_g)}
    else:  # the last program owns the last tile
        p = grid[0] - 1
        assert (p % n_r, p // n_r) == (n_r - 1, n_g - 1)


def test_launch_grid_too_large_is_a_clear_error():
    with pytest.raises(NmgradError, match="larger tile"):
        triton_prune.launch_grid(1 << 30, 1 << 30, (16, 64))
