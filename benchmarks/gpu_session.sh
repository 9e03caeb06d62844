#!/usr/bin/env bash
# One device call for a session lent a GPU (device tool): the GPU bench, the CUDA tests, evaluate on the GPU.
#   bash benchmarks/gpu_session.sh          # writes logs and gpu_bench.md/json to $OUT (else runs/gpu_session)
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/versions.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cusparselt', torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)" | tee -a "$OUT/versions.txt"
timeout "${BENCH_S:-300}" python benchmarks/gpu_bench.py --budget "${BENCH_BUDGET:-230}" --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
timeout "${TEST_S:-110}" python -m pytest -q -p no:cacheprovider --timeout 60 -m requires_cuda \
    tests/test_sparse_gemm.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/pytest_cuda.log"
python -m nmgrad_cli capture --model gpt --steps 1 --out /tmp/g1.h5 --force >/dev/null 2>"$OUT/capture.log" &&
  timeout "${EVAL_S:-100}" python benchmarks/evaluate_bench.py /tmp/g1.h5 --device cuda 2>&1 | tee "$OUT/eval_gpu.log"
echo done
