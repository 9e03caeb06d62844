#!/bin/sh
# Regenerate sample_data/mlp_digits.h5 (see LICENSE.md): the built-in mlp on the digits, 100 AdamW
# warm-up steps, then 40 steps of which every 10th is recorded (4 steps), with inputs X and weights W.
# The file's tensors are the same on every run (same seed); the creation time differs.
set -e
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m nmgrad_cli capture --model mlp --seed 0 --warmup 100 --steps 40 --every 10 \
    --with-inputs --compression gzip --device cpu --quiet --force --out sample_data/mlp_digits.h5
