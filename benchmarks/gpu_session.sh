#!/usr/bin/env bash
# One device call for a session lent a GPU (the device tool): versions, the GPU bench, the compress probe,
# the CUDA tests, evaluate on the GPU. Logs and gpu_bench.md/json go to $OUT (else runs/gpu_session).
#   bash benchmarks/gpu_session.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/versions.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cusparselt', torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)" | tee -a "$OUT/versions.txt"
timeout "${BENCH_S:-200}" python benchmarks/gpu_bench.py --budget "${BENCH_BUDGET:-170}" --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
timeout "${PROBE_S:-60}" python benchmarks/compress_probe.py 2>&1 | tee "$OUT/compress_probe.log"
# every test of the GPU files (the requires_cuda ones run only here), 8 workers (pytest-xdist is on the image)
timeout "${TEST_S:-150}" python -m pytest -q -p no:cacheprovider --timeout 90 -n 8 \
    tests/test_sparse_gemm.py tests/test_triton_kernels.py tests/test_evaluate_scale.py tests/test_capture_host.py 2>&1 | tail -25 | tee "$OUT/pytest_cuda.log"
python -m nmgrad_cli capture --model gpt --steps 1 --out /tmp/g1.h5 --force >/dev/null 2>"$OUT/capture.log" &&
  timeout "${EVAL_S:-100}" python benchmarks/evaluate_bench.py /tmp/g1.h5 --device cuda 2>&1 | tee "$OUT/eval_gpu.log"
# real-size records (4 x 16384 x 4096 float32, 1.1 GB): evaluate on the GPU against the file-read rate
rm -f /tmp/big.h5
timeout "${BIG_S:-150}" python benchmarks/evaluate_bench.py /tmp/big.h5 --synthetic 4,16384,4096 --device cuda --no-cpu \
    2>&1 | tee "$OUT/eval_gpu_big.log"
# issue 19 item 5: GPT-2-small capture on the GPU (asynchronous pinned copies) vs a plain step, writer vs write()
timeout "${SCALE_S:-150}" python benchmarks/scale_bench.py --device cuda --steps 8 --samples 4 2>&1 | tee "$OUT/scale_bench.log"
echo done
