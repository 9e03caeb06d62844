#!/usr/bin/env bash
# One device call (at most 8 minutes on an H100/H200: torch 2.11 CUDA 13, Triton 3.6, no pip or
# internet there) for a session lent a GPU. Every step is time-boxed (`timeout`) inside one overall
# deadline, so a hung step cannot eat the call; each writes its log (and tables) under $OUT.
#   bash benchmarks/gpu_session.sh            # $OUT, else runs/gpu_session
# Order: versions; the cuSPARSELt layout check (kernels/cslt_layout.py's pack and the fused kernel vs
# torch._cslt_compress, bytes of values and metadata counted apart); if they differ, the probe that
# recovers the real mapping (cslt_mapping.json, to correct the model on a CPU); the GPU bench (dense
# baseline in the same run); the CUDA tests; evaluate on the GPU (benchmarks/gpu_evaluate.sh, when present);
# GPT-2-small capture (benchmarks/scale_bench.py) in what is left.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-470}  # the whole call; each step also has its own slice below
start=$SECONDS

step() {  # step NAME SLICE_S COMMAND...: run COMMAND under min(SLICE_S, time left), log to $OUT/NAME.log
    local name=$1 slice=$2
    shift 2
    local left=$((TOTAL_S - (SECONDS - start)))
    if [ "$left" -lt 15 ]; then
        echo "== $name: skipped (${left} s left of ${TOTAL_S} s)" | tee -a "$OUT/steps.txt"
        return 124
    fi
    [ "$slice" -gt "$left" ] && slice=$left
    echo "== $name (at most ${slice} s) -> $OUT/$name.log"
    local t0=$SECONDS
    timeout --kill-after=5 "$slice" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "$name: rc $rc, $((SECONDS - t0)) s, log $OUT/$name.log" | tee -a "$OUT/steps.txt"
    return $rc
}

: > "$OUT/steps.txt"
step versions 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c \"import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cusparselt', torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)\""
step cslt_check 50 python benchmarks/compress_probe.py --check --out "$OUT"
if [ $? -eq 3 ]; then  # bytes differ: recover the real mapping so the model can be fixed on a CPU
    step cslt_probe 50 python benchmarks/compress_probe.py --probe --out "$OUT"
fi
step gpu_bench "${BENCH_S:-190}" python benchmarks/gpu_bench.py --budget "${BENCH_BUDGET:-170}" --out "$OUT"
# the requires_cuda tests of the GPU files, 8 workers (pytest-xdist is on the image)
step pytest_cuda "${TEST_S:-70}" python -m pytest -q -p no:cacheprovider --timeout 60 -n 8 \
    tests/test_sparse_gemm.py tests/test_triton_kernels.py tests/test_evaluate_scale.py tests/test_capture_host.py \
    tests/test_gemm_routes.py
if [ -f benchmarks/gpu_evaluate.sh ]; then  # evaluate on the GPU (the "Real model sizes" issue's script)
    step gpu_evaluate "${EVAL_S:-90}" bash benchmarks/gpu_evaluate.sh
else
    echo "== gpu_evaluate: benchmarks/gpu_evaluate.sh not present, skipped" | tee -a "$OUT/steps.txt"
fi
# the "Real model sizes" issue, item 5: GPT-2-small capture on the GPU (asynchronous pinned copies) vs a
# plain step, the writer vs write(); last, in what is left of the call
if python -c "import transformers" 2>/dev/null; then
    step scale_bench "${SCALE_S:-90}" python benchmarks/scale_bench.py --device cuda --steps 4 --samples 4
else
    echo "== scale_bench: transformers is not installed on this machine, skipped" | tee -a "$OUT/steps.txt"
fi
echo "== done in $((SECONDS - start)) s; tables: $OUT/gpu_bench.md (+ .json), $OUT/cslt_check.json," \
     "$OUT/cslt_mapping.json (if the check differed), step logs $OUT/*.log, summary $OUT/steps.txt"
