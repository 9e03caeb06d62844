#!/usr/bin/env bash
# Evaluate on the GPU against the file-read rate (issue 19 item 4), with the CPU agreement check, in <= 90 s.
# Writes its table to $OUT/gpu_evaluate.txt (benchmarks/gpu_session.sh calls it with its $OUT).
#   OUT=runs/gpu_evaluate bash benchmarks/gpu_evaluate.sh
# 1. a synthetic dump of 2 Linear records of 4096 x 4096 = 16.8 M floats each (>= 8 M): the read rate,
#    evaluate's rate on CUDA (after one run that compiles the Triton kernels) and on the CPU, side by side,
#    then the agreement check (exact metrics to rounding, the angles within Monte-Carlo error);
# 2. the GPT-2-small dump, made here from the config (transformers, no download: random init, seed 0,
#    2 steps of batch 4 on sample_data/pydoc_topics.txt), on CUDA against the read rate. Without
#    transformers on the image: records of its lm_head's shape (256 x 50257) instead, and the log says so.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.} OUT=${OUT:-runs/gpu_evaluate}
mkdir -p "$OUT"
log="$OUT/gpu_evaluate.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "== gpu_evaluate.sh $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo "== 1. synthetic, 2 records of 4096 x 4096 floats: CUDA and CPU vs the read rate, agreement"
  timeout "${SYN_S:-50}" python benchmarks/evaluate_bench.py "$tmp/syn.h5" --synthetic 2,4096,4096 --device cuda 2>&1 ||
    echo "(part 1 stopped: exit $?, 124 = over SYN_S=${SYN_S:-50} s)"
  if python -c "import transformers" 2>/dev/null; then
    echo "== 2. GPT-2-small (124 M params, from its config), 2 steps of batch 4: CUDA vs the read rate"
    timeout "${GPT2_S:-38}" bash -c "
      python -c 'import torch; from transformers import GPT2Config, GPT2LMHeadModel; torch.manual_seed(0); \
GPT2LMHeadModel(GPT2Config()).save_pretrained(\"$tmp/gpt2s\")' &&
      python -m nmgrad_cli capture --model hf:$tmp/gpt2s --data text:sample_data/pydoc_topics.txt --batch-size 4 \
        --steps 2 --out $tmp/gpt2s.h5 > $tmp/capture.log 2>&1 &&
      python benchmarks/evaluate_bench.py $tmp/gpt2s.h5 --device cuda --no-cpu" 2>&1 ||
      echo "(part 2 stopped: exit $?, 124 = over GPT2_S=${GPT2_S:-38} s; capture log: $(tail -2 "$tmp/capture.log" 2>/dev/null))"
  else
    echo "== 2. transformers is not installed on this image: NO GPT-2-small dump; instead 2 synthetic records of its"
    echo "      lm_head's shape (256 tokens x 50257 = 12.9 M floats): CUDA vs the read rate"
    timeout "${GPT2_S:-38}" python benchmarks/evaluate_bench.py "$tmp/lm.h5" --synthetic 2,256,50257 --device cuda --no-cpu 2>&1 ||
      echo "(part 2 stopped: exit $?, 124 = over GPT2_S=${GPT2_S:-38} s)"
  fi
} | tee "$log"
